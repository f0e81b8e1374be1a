"""What MLflow records for a search: parent artifacts and metrics, trial failures, the champion model.

Real KerasTuner and a real SQLite MLflow store in tmp_path, on tiny searches.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, shrunk

from toolkit.data import load_dataset
from toolkit.tuner import run_search

QUICKSTART = str(ROOT / "experiments" / "quickstart.yaml")


def runs_by_role(client, name: str) -> tuple[list, list]:
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("toolkit.role") == "search"]
    trials = [r for r in runs if r.data.tags.get("toolkit.role") == "trial"]
    return parents, trials


def read_artifact(client, run_id: str, path: str) -> str:
    return Path(client.download_artifacts(run_id, path)).read_text()


@pytest.fixture(scope="module")
def champion_search(tmp_path_factory, _empty_store_db):
    """One search with a test split and the best model logged, shared by the tests that read it."""
    import shutil

    tmp = tmp_path_factory.mktemp("champion")
    (tmp / "store").mkdir()
    shutil.copyfile(_empty_store_db, tmp / "store" / "mlflow.db")
    uri = f"sqlite:///{tmp / 'store' / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        cfg = shrunk(
            "quickstart",
            "tuner.max_trials=2",
            "train.epochs=2",
            "data.test_split=0.2",
            "train.diagnostics=false",
            "tracking.report=false",
            "space.activation=relu",
            "space.optimizer=adam",
            "space.learning_rate=0.01",
        )
        result = run_search(cfg)
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
    from mlflow import MlflowClient

    return cfg, result, MlflowClient(tracking_uri=uri), uri, tmp / "store"


def test_parent_run_has_the_search_artifacts_and_summary_metrics(champion_search):
    cfg, result, client, _, _ = champion_search
    parents, trials = runs_by_role(client, "quickstart")
    assert len(parents) == 1 and len(trials) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"experiment.yaml", "trials.csv", "environment.json", "search_space.json"} <= names

    assert yaml.safe_load(read_artifact(client, parent.info.run_id, "experiment.yaml"))["data"]["test_split"] == 0.2

    rows = list(csv.DictReader(read_artifact(client, parent.info.run_id, "trials.csv").splitlines()))
    assert [r["trial_id"] for r in rows] == ["0", "1"]
    for row in rows:
        assert row["status"] == "FINISHED"
        assert row["activation"] == "relu" and row["optimizer"] == "adam"
        assert {"depth", "units", "l2"} <= set(row)
        assert 0.0 <= float(row["final_val_accuracy"]) <= float(row["best_val_accuracy"]) <= 1.0
        assert float(row["best_val_loss"]) <= float(row["final_val_loss"])
        assert row["best_epoch"] in ("0", "1")
        assert float(row["seconds"]) > 0
        assert row["failure"] == ""
        assert row["run_id"] in {t.info.run_id for t in trials}

    env = json.loads(read_artifact(client, parent.info.run_id, "environment.json"))
    assert {"python", "keras", "keras-tuner", "mlflow"} <= set(env["versions"])
    assert "tensorflow" in env["versions"] or "tensorflow-cpu" in env["versions"]
    assert env["devices"]["CPU"]
    assert env["strategy"]["replicas"] == 1
    assert env["git"] is None or len(env["git"]["commit"]) == 40
    # MLflow's own tag, which MlflowClient.create_run does not set: the same commit, for the UI.
    assert parent.data.tags.get("mlflow.source.git.commit") == (env["git"] or {}).get("commit")

    space = json.loads(read_artifact(client, parent.info.run_id, "search_space.json"))
    assert {"depth", "units", "l2"} <= {hp["config"]["name"] for hp in space["space"]}

    metrics = parent.data.metrics
    assert metrics["trials_completed"] == 2
    assert metrics["trials_failed"] == 0
    assert metrics["search_seconds"] > 0
    best = max(float(r["best_val_accuracy"]) for r in rows)
    assert metrics["best_val_accuracy"] == pytest.approx(best)
    assert {"test_loss", "test_accuracy"} <= set(metrics)
    assert parent.data.tags["toolkit.best_trial_id"] == result.best.trial_id


def test_trial_runs_have_summaries_beside_the_curves(champion_search):
    _, _, client, _, _ = champion_search
    _, trials = runs_by_role(client, "quickstart")
    for trial in trials:
        assert {"best_val_accuracy", "best_epoch", "trial_seconds", "model_params"} <= set(trial.data.metrics)
        # 64 pixels -> depth x units -> 10 digits: the size logged is the model the trial trained.
        depth, units = int(trial.data.params["depth"]), int(trial.data.params["units"])
        dense = 65 * units + (depth - 1) * (units + 1) * units + (units + 1) * 10
        assert trial.data.metrics["model_params"] == dense, trial.data.params
        steps = [m.step for m in client.get_metric_history(trial.info.run_id, "val_accuracy")]
        assert sorted(steps) == [0, 1]


def test_best_model_is_logged_once_on_the_parent_and_registered_as_champion(champion_search):
    cfg, result, client, _, _ = champion_search
    parents, _ = runs_by_role(client, "quickstart")
    parent = parents[0]
    assert len(parent.outputs.model_outputs) == 1
    version = client.get_model_version_by_alias("quickstart", "champion")
    assert version.run_id == parent.info.run_id
    assert version.tags["toolkit.best_trial_id"] == result.best.trial_id
    assert len(client.search_model_versions("name='quickstart'")) == 1
    assert result.model_uri == "models:/quickstart@champion"
    assert 0 < parent.data.metrics["model_log_seconds"] < 30


def test_champion_lives_in_the_searchs_experiment_and_beside_its_store(champion_search):
    # Copying the store folder must carry the models: nothing in experiment 0 or ./mlruns.
    _, _, client, _, store = champion_search
    parents, _ = runs_by_role(client, "quickstart")
    parent = parents[0]
    version = client.get_model_version_by_alias("quickstart", "champion")
    model = client.get_logged_model(parent.outputs.model_outputs[0].model_id)
    assert version.source == f"models:/{model.model_id}"
    assert model.experiment_id == parent.info.experiment_id != "0"
    assert model.source_run_id == parent.info.run_id
    assert str(model.status).endswith("READY")
    assert model.params["tuner.algorithm"]  # the run's params, as Model.log copies them
    download = client.get_model_version_download_uri("quickstart", version.version)
    for uri in (model.artifact_location, download):
        location = Path(uri.removeprefix("file://"))
        assert location.is_relative_to(store.resolve()), uri
        assert (location / "MLmodel").is_file()
    assert not (Path.cwd() / "mlruns" / "0" / "models" / model.model_id).exists()


def test_champion_predicts_from_raw_features(champion_search, monkeypatch):
    import mlflow.pyfunc

    cfg, _, client, uri, _ = champion_search
    dataset = load_dataset(cfg.data, cfg.seed)
    assert dataset.x_test.max() > 1.0  # raw pixel intensities (0-16): the model standardizes them itself
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model("models:/quickstart@champion")
    assert [s.shape for s in model.metadata.get_input_schema().inputs] == [(-1, 8, 8, 1)]  # digits are 8x8x1 images
    probabilities = np.asarray(model.predict(dataset.x_test))
    assert probabilities.shape == (len(dataset.x_test), 10)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    accuracy = float((probabilities.argmax(axis=1) == dataset.y_test).mean())
    parents, _ = runs_by_role(client, "quickstart")
    assert accuracy == pytest.approx(parents[0].data.metrics["test_accuracy"], abs=1e-6)


def test_only_the_best_checkpoint_is_kept(champion_search):
    _, result, _, _, store = champion_search
    checkpoints = sorted(p.parent.name for p in (store / "tuner" / "quickstart").glob("trial_*/checkpoint*"))
    assert checkpoints == [f"trial_{result.best.trial_id}"]


def test_nan_loss_fails_the_trial_and_the_search_still_finishes(store, mlflow_client):
    # Plain SGD at learning rate 50 diverges: the loss turns NaN within the first epoch.
    cfg = shrunk(
        "quickstart",
        "space.learning_rate=50",
        "space.optimizer=sgd",
        "space.activation=relu",
        "tuner.max_trials=3",
        "tuner.max_consecutive_failed_trials=10",
        "train.diagnostics=false",
        "tracking.report=false",
    )
    result = run_search(cfg)

    parents, trials = runs_by_role(mlflow_client, "quickstart")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(trials) == 3
    for trial in trials:
        assert trial.info.status == "FAILED"
        assert "NaN" in trial.data.tags["toolkit.failure"]
    assert parents[0].data.metrics["trials_failed"] == 3
    assert parents[0].data.metrics["trials_completed"] == 0
    assert result.best is None
    rows = list(csv.DictReader(read_artifact(mlflow_client, parents[0].info.run_id, "trials.csv").splitlines()))
    assert [r["status"] for r in rows] == ["FAILED"] * 3
    assert all("NaN" in r["failure"] for r in rows)
    assert not mlflow_client.search_registered_models()


def test_consecutive_failures_stop_the_search_cleanly_and_exit_1(store, mlflow_client, capfd):
    # The CLI contract when no trial succeeds: the runs are recorded (FAILED trials, a FINISHED
    # parent tagged toolkit.stopped) and the exit code is 1, since there is no model to use.
    from toolkit import cli

    sets = [
        "space.learning_rate=50",
        "space.optimizer=sgd",
        "space.activation=relu",
        "tuner.max_trials=5",
        "tuner.max_consecutive_failed_trials=2",
        "train.epochs=1",
        "train.diagnostics=false",
        "tracking.report=false",
    ]
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        code = cli.main(["tune", QUICKSTART, *[a for s in sets for a in ("--set", s)]])
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    out, err = capfd.readouterr()
    assert code == 1, err
    assert "Traceback" not in out + err
    assert "Invalid loss" not in out + err
    assert "no trial finished" in out

    client = mlflow_client
    parents, trials = runs_by_role(client, "quickstart")
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert "consecutive failed trials" in parents[0].data.tags["toolkit.stopped"]
    assert sorted(t.info.status for t in trials) == ["FAILED", "FAILED"]


def test_an_exception_in_build_fails_the_trial_with_its_reason(store, mlflow_client):
    import keras_tuner as kt

    from toolkit import tracking
    from toolkit.models import build_hypermodel
    from toolkit.strategy import make_strategy
    from toolkit.tuner import make_tuner

    cfg = shrunk("quickstart", "train.diagnostics=false", "tracking.report=false")
    dataset = load_dataset(cfg.data, cfg.seed)

    class Broken(kt.HyperModel):
        """Builds while KerasTuner declares the space, then fails in every trial."""

        def __init__(self):
            super().__init__()
            self.inner = build_hypermodel(cfg, dataset)
            self.fail = False

        def build(self, hp):
            if self.fail:
                raise ValueError("the layer config is impossible")
            return self.inner.build(hp)

    tracker = tracking.SearchTracker(cfg, store)
    tracker.start_search("broken")
    hypermodel = Broken()
    tuner = make_tuner(
        cfg,
        hypermodel,
        Path(store[len("sqlite:///") :]).parent / "tuner",
        "broken",
        overwrite=True,
        tracker=tracker,
        strategy_info=make_strategy(cfg.strategy),
        dataset=dataset,
        card=cfg,
    )
    hypermodel.fail = True
    tuner.search(dataset.x_train, dataset.y_train, validation_data=(dataset.x_val, dataset.y_val), epochs=1, verbose=0)
    tracker.end_search()

    _, trials = runs_by_role(mlflow_client, "quickstart")
    assert [t.info.status for t in trials] == ["FAILED", "FAILED"]
    for trial in trials:
        assert "ValueError: the layer config is impossible" in trial.data.tags["toolkit.failure"]
        assert "Traceback" in read_artifact(mlflow_client, trial.info.run_id, "failure.txt")


def test_an_interrupt_marks_the_open_runs_killed(store, mlflow_client):
    cfg = shrunk(
        "quickstart", "tuner.max_trials=3", "tracking.log_model=false", "train.diagnostics=false", "tracking.report=false"
    )

    def stop_after_first(result):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_search(cfg, on_trial=stop_after_first)
    parents, trials = runs_by_role(mlflow_client, "quickstart")
    assert [p.info.status for p in parents] == ["KILLED"]
    assert "interrupted" in parents[0].data.tags["toolkit.failure"]
    assert [t.info.status for t in trials] == ["FINISHED"]


# ---------------------------------------------------------------------------- slow: real processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"the process ended (rc {proc.returncode}) before {what}: {proc.stderr.read() if proc.stderr else ''}"
            )
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_champion_is_served_over_http(champion_search, monkeypatch):
    cfg, _, _, uri, store = champion_search
    dataset = load_dataset(cfg.data, cfg.seed)
    port = _free_port()
    venv_bin = str(Path(sys.executable).parent)
    # The scoring server is started through a shell that looks uvicorn up on PATH.
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")}
    mlflow_bin = str(Path(venv_bin) / "mlflow")
    cmd = [
        mlflow_bin,
        "models",
        "serve",
        "-m",
        "models:/quickstart@champion",
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    server = subprocess.Popen(
        cmd, env=env, cwd=store.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    try:
        _wait_for(healthy, 180, "the model server to answer /ping", server)
        rows = dataset.x_test[:8]
        body = json.dumps({"inputs": rows.tolist()}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as reply:
            served = np.asarray(json.loads(reply.read())["predictions"])
        import mlflow.pyfunc

        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        local = np.asarray(mlflow.pyfunc.load_model("models:/quickstart@champion").predict(rows))
        assert served.shape == (8, 10)
        np.testing.assert_allclose(served, local, atol=1e-5)
        # Non-finite inputs answer 400 with a reason, not 200 with a meaningless prediction.
        row = json.dumps(rows[:1].tolist())
        for literal in ("NaN", "Infinity", "-Infinity", "null", "1e400"):
            body = ('{"inputs": ' + re.sub(r"-?[0-9][0-9.e+-]*", literal, row, count=1) + "}").encode()
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=60)
            assert refused.value.code == 400, literal
            assert "finite number" in refused.value.read().decode() or literal == "null", literal
        # What the README says of MLflow's scoring server (3.17): no Content-Type answers 500.
        import http.client

        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("POST", "/invocations", body=json.dumps({"inputs": rows.tolist()}))
        assert connection.getresponse().status == 500
        connection.close()
    finally:
        # The server forks uvicorn workers: stop the whole group it leads.
        _stop_group(server)
    assert "━" not in server.stderr.read(), "a Keras progress bar per prediction in the server's log"


def _stop_group(proc: subprocess.Popen) -> None:
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:  # already gone
            pass
        try:
            proc.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_trial_exits_130_with_the_runs_killed(tmp_path, signum):
    (tmp_path / "store").mkdir()
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    sets = ["tuner.max_trials=3", "train.epochs=200", "train.diagnostics=false", "tracking.report=false"]
    args = [sys.executable, "-m", "toolkit.cli", "tune", QUICKSTART, *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)

    def training() -> bool:
        exp = client.get_experiment_by_name("quickstart") if (tmp_path / "store" / "mlflow.db").exists() else None
        if exp is None:
            return False
        runs = client.search_runs([exp.experiment_id], filter_string="tags.`toolkit.role` = 'trial'")
        # Wait for an epoch to be logged, so the signal lands inside model.fit.
        return any(r.data.metrics for r in runs)

    try:
        _wait_for(training, 180, "a trial to start training", proc)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    parents, trials = runs_by_role(client, "quickstart")
    assert [p.info.status for p in parents] == ["KILLED"]
    assert trials and all(t.info.status in ("KILLED", "FINISHED") for t in trials)
    killed = [t for t in trials if t.info.status == "KILLED"]
    # The signal landed in an epoch: that trial's run is the one killed, with the reason.
    assert len(killed) == 1 and "interrupted" in killed[0].data.tags["toolkit.failure"]


def test_the_served_champion_refuses_non_finite_inputs_and_predicts_quietly(champion_search, monkeypatch, capfd):
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from toolkit.tracking import serving

    cfg, _, _, uri, _ = champion_search
    dataset = load_dataset(cfg.data, cfg.seed)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model("models:/quickstart@champion")
    assert model.metadata.flavors["python_function"]["loader_module"] == serving.MODULE_NAME
    assert "keras" in model.metadata.flavors  # the Keras flavor is untouched
    rows = dataset.x_test[:4].astype("float32")
    capfd.readouterr()
    good = np.asarray(model.predict(rows))
    assert good.shape == (4, 10)
    assert "━" not in capfd.readouterr().out  # no Keras progress bar per prediction
    for bad in (np.nan, np.inf, -np.inf):
        poisoned = rows.copy()
        poisoned.flat[5] = bad
        with pytest.raises(MlflowException) as refused:
            model.predict(poisoned)
        assert refused.value.get_http_status_code() == 400
        assert "must be a finite number" in refused.value.message
    with pytest.raises(MlflowException, match="is null"):
        serving.check_finite(np.array([[1.0, None]], dtype=object))
    with pytest.raises(MlflowException, match="must be a number"):
        serving.check_finite([["a", 1.0]])
    # The loader travels with the model: its code folder holds it, so serving needs no toolkit install.
    import mlflow.artifacts

    local = Path(mlflow.artifacts.download_artifacts("models:/quickstart@champion"))
    assert (local / "code" / f"{serving.MODULE_NAME}.py").is_file()
    assert Model.load(str(local / "MLmodel")).flavors["python_function"]["code"] == "code"


def test_the_champion_is_logged_with_requirements_pinned_here_and_without_mlflows_environment_scan(
    tmp_path, store, mlflow_client, monkeypatch
):
    import keras
    import mlflow
    from mlflow.utils import requirements_utils

    from toolkit.tracking.champion import log_champion
    from toolkit.tracking.environment import pinned_requirements

    # MLflow maps every installed distribution to its modules, once per process, only to check
    # requirements that were read from this environment; start from a process that has not.
    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)
    # Its artifacts under tmp_path: an experiment's default location is ./mlruns of the current folder.
    experiment = mlflow_client.create_experiment("champion", artifact_location=(tmp_path / "artifacts").as_uri())
    run = mlflow_client.create_run(experiment)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))
    logged = log_champion(store, run.info.run_id, model, np.zeros((3, 4), "float32"), register_as="pinned")
    assert requirements_utils._MODULES_TO_PACKAGES is None
    folder = mlflow.artifacts.download_artifacts(logged.model_uri, tracking_uri=store)
    written = (Path(folder) / "requirements.txt").read_text().split()
    assert set(pinned_requirements()) <= set(written)
    assert mlflow.pyfunc.load_model(logged.champion_uri).predict(np.zeros((1, 4), "float32")).shape[-1] == 2
