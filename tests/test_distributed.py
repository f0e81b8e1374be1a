"""Distributed tuning: KerasTuner's chief and workers over real gRPC on 127.0.0.1, real MLflow.

The fast tests drive the chief's oracle server with KerasTuner's own gRPC client and no training.
The slow ones run ``toolkit tune --workers N`` as real processes, with a real ``mlflow server``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import keras_tuner as kt
import pytest
from conftest import ROOT
from keras_tuner.src.distribute import oracle_client

from toolkit import distributed
from toolkit.config import ConfigError
from toolkit.distributed import Address, ChiefUnreachable, OracleServer

CARD = str(ROOT / "experiments" / "quickstart.yaml")
PYTHON = sys.executable


# ---------------------------------------------------------------------------------------- usage


def test_address_parses_host_and_port_and_names_the_flag_when_bad():
    assert Address.parse("10.0.0.5:8000", "--bind") == Address("10.0.0.5", 8000)
    assert Address.parse("[::1]:9000", "--oracle").target == "[::1]:9000"
    with pytest.raises(ConfigError, match=r"--oracle must be HOST:PORT, e.g. 10.0.0.5:8000. Received: 'chief-host'"):
        Address.parse("chief-host", "--oracle")
    with pytest.raises(ConfigError, match="Received: 'h:99999'"):
        Address.parse("h:99999", "--bind")


def _args(**kw):
    base = dict(workers=0, role=None, bind=None, oracle=None, exp="quickstart", overrides=[], fresh=False, verbose=False)
    return SimpleNamespace(**{**base, **kw})


def test_usage_errors_are_config_errors(monkeypatch):
    for name in (distributed.ENV_TUNER_ID, distributed.ENV_ORACLE_IP, distributed.ENV_ORACLE_PORT):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="--workers 2 runs the chief and the workers on this machine"):
        distributed.main(None, _args(workers=2, role="chief"))
    with pytest.raises(ConfigError, match=r"--bind HOST:PORT is required \(or set KERASTUNER_ORACLE_IP"):
        distributed.main(None, _args(role="chief"))
    with pytest.raises(ConfigError, match="--bind is for the chief"):
        distributed.main(None, _args(role="worker", bind="0.0.0.0:8000"))
    monkeypatch.setenv(distributed.ENV_ORACLE_IP, "10.0.0.5")
    with pytest.raises(ConfigError, match="KERASTUNER_ORACLE_IP is set but KERASTUNER_ORACLE_PORT is not"):
        distributed.main(None, _args())
    monkeypatch.setenv(distributed.ENV_ORACLE_PORT, "8000")
    monkeypatch.setenv(distributed.ENV_TUNER_ID, "chief")
    assert distributed._env_role() == "chief"
    monkeypatch.setenv(distributed.ENV_TUNER_ID, "tuner3")
    assert distributed._env_role() == "worker"
    assert "chief" not in distributed.default_tuner_id()


# ---------------------------------------------------------------------------------------- chief over gRPC


@pytest.fixture
def oracle(tmp_path):
    """A real KerasTuner oracle: 2 trials, one retry per trial, one integer parameter."""
    oracle = kt.oracles.RandomSearchOracle(objective=kt.Objective("score", "max"), max_trials=2, seed=1, max_retries_per_trial=1)
    oracle._set_project_dir(str(tmp_path), "project")
    hp = kt.HyperParameters()
    hp.Int("x", 0, 100)
    oracle.update_space(hp)
    return oracle


@pytest.fixture
def served(oracle, monkeypatch):
    server = OracleServer(
        oracle,
        Address("127.0.0.1", 0),
        {"parent_run_id": "p1", "search_id": "s1", "tracking_uri": "http://x", "workdir": "/nowhere"},
    )
    port = server.start()
    monkeypatch.setenv(distributed.ENV_ORACLE_IP, "127.0.0.1")
    monkeypatch.setenv(distributed.ENV_ORACLE_PORT, str(port))
    monkeypatch.setenv(distributed.ENV_TUNER_ID, "tuner0")
    monkeypatch.setattr(oracle_client, "TIMEOUT", 10)
    yield server, port
    server.stop()


def _client(oracle):
    return oracle_client.OracleClient(oracle)  # KerasTuner's own worker-side client, over gRPC


def _finish(client, trial, score):
    client.update_trial(trial.trial_id, {"score": score})
    trial.status = "COMPLETED"
    client.end_trial(trial)


def test_a_second_chief_on_the_same_port_fails_with_a_clear_message(served, oracle):
    _, port = served
    with pytest.raises(RuntimeError, match=rf"the chief could not listen on 127.0.0.1:{port}: is the port in use"):
        OracleServer(oracle, Address("127.0.0.1", port), {}).start()


def test_handshake_hands_the_worker_the_chiefs_search(served):
    _, port = served
    hello = distributed.handshake(Address("127.0.0.1", port), "tuner0", timeout=10)
    assert hello == {"parent_run_id": "p1", "search_id": "s1", "tracking_uri": "http://x", "workdir": "/nowhere"}


def test_worker_gives_up_on_an_unreachable_chief_within_its_timeout():
    port = distributed._free_port()  # nothing listens there
    started = time.monotonic()
    with pytest.raises(
        ChiefUnreachable, match=rf"could not reach the chief's oracle at 127.0.0.1:{port} within 1.5s \(TOOLKIT_ORACLE_TIMEOUT\)"
    ):
        distributed.handshake(Address("127.0.0.1", port), "tuner0", timeout=1.5)
    assert time.monotonic() - started < 10


def test_a_lost_workers_trial_is_retried_by_a_lingering_worker_and_the_chief_finishes(served, oracle):
    server, _ = served
    servicer = server.servicer
    a, b = _client(oracle), _client(oracle)
    first = a.create_trial("tuner0")
    second = b.create_trial("tuner1")
    assert {first.status, second.status} == {"RUNNING"} and first.trial_id != second.trial_id
    _finish(a, first, 1.0)
    # The budget is spent but tuner1 still runs a trial: tuner0 is kept (IDLE), not sent away.
    assert a.create_trial("tuner0").status == "IDLE"
    assert not servicer.done()
    lost = servicer.reclaim("tuner1", "worker tuner1 exited with code -9")
    assert lost.trial_id == second.trial_id and lost.status == "INVALID"  # queued for its one retry
    retry = a.create_trial("tuner0")
    assert (retry.status, retry.trial_id) == ("RUNNING", second.trial_id)
    _finish(a, retry, 2.0)
    assert a.create_trial("tuner0").status == "STOPPED"
    assert servicer.done()
    assert [e.trial.trial_id for e in servicer.take_ended()] == [first.trial_id, second.trial_id]
    assert oracle.trials[second.trial_id].status == "COMPLETED"


def test_a_lost_trial_without_retries_left_is_failed_and_nothing_waits_for_it(served, oracle):
    server, _ = served
    oracle.max_retries_per_trial = 0
    a = _client(oracle)
    trial = a.create_trial("tuner0")
    lost = server.servicer.reclaim("tuner0", "worker tuner0 sent no heartbeat for 30s")
    assert lost.status == "FAILED" and "no heartbeat" in lost.message
    b = _client(oracle)
    last = b.create_trial("tuner1")
    _finish(b, last, 1.0)
    assert b.create_trial("tuner1").status == "STOPPED"
    assert server.servicer.done()
    assert oracle.trials[trial.trial_id].status == "FAILED"


def test_a_worker_that_stops_sending_heartbeats_is_reported_after_its_lease(served):
    server, port = served
    beat = distributed._Heartbeat(Address("127.0.0.1", port), "tuner7", every=0.1)
    beat.start()
    time.sleep(0.5)
    assert server.servicer.expired(lease=0.3) == []
    beat.stop()
    time.sleep(0.5)
    assert server.servicer.expired(lease=0.3) == ["tuner7"]


def test_too_many_consecutive_failures_stop_every_worker_and_never_leave_the_oracle_locked(served, oracle):
    server, _ = served
    oracle.max_consecutive_failed_trials = 1
    oracle.max_retries_per_trial = 0
    a, b = _client(oracle), _client(oracle)
    trial = a.create_trial("tuner0")
    trial.status = "FAILED"
    trial.message = "boom"
    a.end_trial(trial)  # KerasTuner raises inside end_trial here; the chief must stay responsive
    assert isinstance(server.servicer.failure, RuntimeError)
    assert b.create_trial("tuner1").status == "STOPPED"
    assert a.create_trial("tuner0").status == "STOPPED"
    assert server.servicer.done()


# ---------------------------------------------------------------------------------------- real processes


def _env(uri: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERASTUNER_")}
    env.update({"MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", **extra})
    return env


def _tune(tmp_path: Path, uri: str, workers: int, *sets: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [PYTHON, "-m", "toolkit.cli", "tune", CARD, "--workers", str(workers)]
    for kv in ("train.diagnostics=false", "tracking.log_model=false", "tracking.report=false", *sets):
        cmd += ["--set", kv]
    # cwd=tmp_path: anything a server URI would put in ./mlruns stays in the test's folder.
    return subprocess.run(cmd, cwd=tmp_path, env=_env(uri), capture_output=True, text=True, timeout=timeout)


def _search(client, experiment: str = "quickstart"):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("toolkit.role") == "search"]
    trials = [r for r in runs if r.data.tags.get("toolkit.role") == "trial"]
    return parents, trials


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """One real ``mlflow server`` over SQLite for the tests that need to watch a search live."""
    store = tmp_path_factory.mktemp("server")
    server = distributed.TrackingServer(
        f"sqlite:///{store / 'mlflow.db'}", artifacts=store / "artifacts", log_path=store / "server.log"
    )
    uri = server.start()
    yield uri
    server.stop()


@pytest.mark.slow
def test_chief_and_two_workers_run_one_search_under_one_parent(tmp_path, store, mlflow_client):
    done = _tune(tmp_path, store, 2, "tuner.max_trials=4", "train.epochs=1")
    assert done.returncode == 0, done.stderr
    parents, trials = _search(mlflow_client)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.metrics["trials_completed"] == 4
    assert all(t.data.tags["mlflow.parentRunId"] == parent.info.run_id for t in trials)
    assert sorted(t.data.tags["toolkit.trial_id"] for t in trials) == ["0", "1", "2", "3"]  # each trial once
    assert {t.info.status for t in trials} == {"FINISHED"}
    assert {t.data.tags["toolkit.worker"] for t in trials} == {"tuner0", "tuner1"}
    assert "4 trial(s) finished, 0 failed" in done.stdout
    assert "database is locked" not in done.stderr


@pytest.mark.slow
def test_four_workers_on_the_embedded_sqlite_store_lose_no_metric_point(tmp_path, store, mlflow_client):
    # Keras' metrics are logged every epoch (the diagnostics' probe metrics are strided by design,
    # so they are off here): every (trial, metric, epoch) must be in the store exactly once.
    epochs, keras_metrics = 10, ("loss", "accuracy", "val_loss", "val_accuracy")
    done = _tune(tmp_path, store, 4, "tuner.max_trials=8", f"train.epochs={epochs}", "data.source=iris")
    assert done.returncode == 0, done.stderr
    assert "database is locked" not in done.stderr
    parents, trials = _search(mlflow_client)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(t.data.tags["toolkit.trial_id"] for t in trials) == [str(i) for i in range(8)]
    assert len({t.data.tags["toolkit.worker"] for t in trials}) >= 2
    points = 0
    for trial in trials:
        assert trial.info.status == "FINISHED"
        for key in keras_metrics:
            steps = sorted(m.step for m in mlflow_client.get_metric_history(trial.info.run_id, key))
            assert steps == list(range(epochs)), (trial.data.tags["toolkit.trial_id"], key, steps)
            points += len(steps)
    assert points == 8 * len(keras_metrics) * epochs


def _children(pid: int) -> dict[int, str]:
    """The direct children of ``pid`` with their KERASTUNER_TUNER_ID ('' for the mlflow server)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != pid:
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        tuner = next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"KERASTUNER_TUNER_ID=")), "")
        out[int(entry.name)] = tuner
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _launch(tmp_path: Path, uri: str, experiment: str, *sets: str) -> subprocess.Popen:
    """``toolkit tune --workers 2`` on iris in the background, logging to ``uri``."""
    cmd = [PYTHON, "-m", "toolkit.cli", "tune", CARD, "--workers", "2"]
    base = (
        "data.source=iris",
        f"tracking.experiment={experiment}",
        "train.diagnostics=false",
        "tracking.log_model=false",
        "tracking.report=false",
    )
    for kv in (*base, *sets):
        cmd += ["--set", kv]
    return subprocess.Popen(cmd, cwd=tmp_path, env=_env(uri), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _mid_trial(client, experiment: str, launcher: subprocess.Popen, children: dict[int, str], worker: str | None = None):
    """Wait for a trial run (of ``worker``) that has logged 3 epochs and has more to go."""
    deadline = time.monotonic() + 240
    query = "attributes.status = 'RUNNING' and tags.`toolkit.role` = 'trial'"
    if worker:
        query += f" and tags.`toolkit.worker` = '{worker}'"
    while time.monotonic() < deadline and launcher.poll() is None:
        time.sleep(0.3)
        children.update(_children(launcher.pid))
        exp = client.get_experiment_by_name(experiment)
        running = client.search_runs([exp.experiment_id], query) if exp else []
        if running and len(client.get_metric_history(running[0].info.run_id, "loss")) >= 3:
            return running[0]
    raise AssertionError(f"no trial of {worker or 'any worker'} ran; launcher exit {launcher.poll()}")


@pytest.mark.slow
def test_a_worker_killed_mid_trial_does_not_hang_the_search(tmp_path, tracking_server):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_server)
    launcher = _launch(
        tmp_path, tracking_server, "killed", "tuner.max_trials=3", "train.epochs=60", "tuner.max_retries_per_trial=1"
    )
    children: dict[int, str] = {}
    try:
        victim = _mid_trial(client, "killed", launcher, children, worker="tuner1").data.tags["toolkit.trial_id"]
        os.kill(next(p for p, tuner in children.items() if tuner == "tuner1"), signal.SIGKILL)
        stdout, stderr = launcher.communicate(timeout=240)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, stderr
    assert "worker tuner1 exited with code -9" in stderr
    parents, trials = _search(client, "killed")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    finished = Counter(t.data.tags["toolkit.trial_id"] for t in trials if t.info.status == "FINISHED")
    assert finished == Counter({"0": 1, "1": 1, "2": 1})  # the lost trial was retried, and each trial finished once
    lost = [t for t in trials if t.data.tags["toolkit.trial_id"] == victim and t.data.tags["toolkit.worker"] == "tuner1"]
    assert [t.info.status for t in lost] == ["KILLED"]
    assert "hands the trial to another worker" in lost[0].data.tags["toolkit.failure"]
    assert not [p for p in children if _alive(p)], "a child process outlived the launcher"


@pytest.mark.slow
def test_ctrl_c_stops_every_worker_and_marks_the_runs_killed(tmp_path, tracking_server):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_server)
    launcher = _launch(tmp_path, tracking_server, "interrupted", "tuner.max_trials=4", "train.epochs=300")
    children: dict[int, str] = {}
    try:
        _mid_trial(client, "interrupted", launcher, children)
        launcher.send_signal(signal.SIGINT)
        stdout, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 130, stderr
    assert "interrupted: open runs were marked KILLED" in stderr
    assert sorted(children.values()) == ["tuner0", "tuner1"]
    assert not [p for p in children if _alive(p)], "a worker outlived the launcher"
    parents, trials = _search(client, "interrupted")
    assert [p.info.status for p in parents] == ["KILLED"]
    assert trials and "RUNNING" not in {t.info.status for t in trials}


@pytest.mark.slow
def test_a_worker_without_a_chief_stops_with_a_clear_message_in_bounded_time(tmp_path, store):
    port = distributed._free_port()
    cmd = [PYTHON, "-m", "toolkit.cli", "tune", CARD, "--role", "worker", "--oracle", f"127.0.0.1:{port}"]
    started = time.monotonic()
    done = subprocess.run(
        cmd, cwd=tmp_path, env=_env(store, TOOLKIT_ORACLE_TIMEOUT="3"), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    assert f"could not reach the chief's oracle at 127.0.0.1:{port} within 3s" in done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 90  # TensorFlow's import, then 3 s
