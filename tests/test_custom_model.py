"""One door for every model: the user's build(hp), HyperModel subclass or instance, from a card or from Python.

Real KerasTuner and a real SQLite MLflow store in tmp_path, on tiny searches over digits.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import keras
import keras_tuner as kt
import numpy as np
import pytest
from conftest import ROOT

from toolkit.config import ConfigError, load_config
from toolkit.tuner import run_search

PYTHON = sys.executable

# A model that is not a plain MLP: a Conv1D branch beside a Dense branch, returned uncompiled.
BUILDER = """
import keras


def build(hp):
    inputs = keras.Input(shape=(8, 8, 1))
    x = keras.layers.Rescaling(1 / 16)(keras.layers.Flatten()(inputs))
    signal = keras.layers.Reshape((64, 1))(x)
    conv = keras.layers.Conv1D(hp.Choice("filters", [4, 8]), 3, activation="relu", name="conv")(signal)
    conv = keras.layers.GlobalMaxPooling1D()(conv)
    dense = keras.layers.Dense(hp.Int("branch_units", 8, 16, step=8), activation="relu", name="branch")(x)
    merged = keras.layers.Concatenate()([conv, dense])
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax", name="head")(merged))


def explodes(hp):
    if hp.Choice("explode", [0, 1]):
        raise RuntimeError("this builder refuses to build")
    inputs = keras.Input(shape=(8, 8, 1))
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(inputs)))


NOT_CALLABLE = 3
"""


def _card(tmp_path: Path, builder: str, *extra: str, name: str = "mine") -> Path:
    (tmp_path / "models").mkdir(exist_ok=True)
    (tmp_path / "models" / "net.py").write_text(BUILDER)
    lines = [
        f"name: {name}",
        "data: {source: digits}",
        f"model: {{builder: {builder!r}}}",
        "tuner: {max_trials: 2}",
        "train: {epochs: 2, diagnostics: true}",
        "tracking: {report: false}",
        *extra,
    ]
    card = tmp_path / f"{name}.yaml"
    card.write_text("\n".join(lines) + "\n")
    return card


def _runs(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("toolkit.role") == "search"]
    trials = [r for r in runs if r.data.tags.get("toolkit.role") == "trial"]
    return parents, trials


def test_a_builder_file_beside_the_card_is_tuned_with_its_own_params_metrics_and_a_champion(tmp_path, store, mlflow_client):
    import mlflow

    card = _card(tmp_path, "models/net.py:build", "space: {optimizer: [adam, sgd], learning_rate: [0.01, 0.003]}")
    # The relative path is found beside the card, wherever the command runs from.
    cfg = load_config(card)
    assert cfg.model.builder == f"{(tmp_path / 'models' / 'net.py').resolve()}:build"
    result = run_search(cfg)
    parents, trials = _runs(mlflow_client, "mine")
    assert len(parents) == 1 and len(trials) == 2
    assert {t.info.status for t in trials} == {"FINISHED"}
    for trial in trials:
        params = trial.data.params
        # The builder's own names, plus the optimizer space the card adds to an uncompiled model.
        assert {"filters", "branch_units", "optimizer", "learning_rate"} <= set(params)
        assert params["optimizer"] in ("adam", "sgd") and float(params["learning_rate"]) in (0.01, 0.003)
        assert not {"depth", "units", "activation"} & set(params)
        history = mlflow_client.get_metric_history(trial.info.run_id, "val_accuracy")
        assert [m.step for m in history] == [0, 1]
        # Diagnostics read any layer with a kernel: the Conv1D and both Dense layers.
        assert any(k.startswith("grad_norm") and "conv" in k for k in trial.data.metrics), sorted(trial.data.metrics)
    assert parents[0].data.tags["toolkit.model"].endswith("net.py:build")
    assert "depth" not in parents[0].data.params["space"] if "space" in parents[0].data.params else True
    # The champion loads as a pyfunc and predicts raw pixels.
    champion = mlflow.pyfunc.load_model("models:/mine@champion")
    from sklearn.datasets import load_digits

    x = load_digits().data[:5].astype("float32").reshape(-1, 8, 8, 1)  # digits are 8x8x1 images
    predictions = np.asarray(champion.predict(x))
    assert predictions.shape == (5, 10)
    assert np.allclose(predictions.sum(axis=1), 1.0, atol=1e-4)
    assert result.best is not None


class TwoBranch(kt.HyperModel):
    """A HyperModel subclass that compiles its own model (with a metric of its own)."""

    def build(self, hp):
        inputs = keras.Input(shape=(8, 8, 1))
        x = keras.layers.Dense(hp.Choice("width", [8, 16]), activation="tanh")(keras.layers.Flatten()(inputs))
        if hp.Boolean("second_layer"):
            with hp.conditional_scope("second_layer", [True]):
                x = keras.layers.Dense(hp.Choice("second_width", [4, 8]), activation="relu")(x)
        model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        return model


@pytest.mark.parametrize("form", ["subclass", "instance"])
def test_a_hypermodel_from_python_is_tracked_like_a_card(form, tmp_path, store, mlflow_client):
    cfg = load_config(_card(tmp_path, "models/net.py:build", "tuner: {max_trials: 3}", name=f"hm-{form}"))
    result = run_search(cfg, hypermodel=TwoBranch if form == "subclass" else TwoBranch())
    parents, trials = _runs(mlflow_client, f"hm-{form}")
    assert len(trials) == 3 and {t.info.status for t in trials} == {"FINISHED"}
    for trial in trials:
        params = trial.data.params
        assert "width" in params and "second_layer" in params
        # A compiled model is used as it is: the card's optimizer space is not added.
        assert "optimizer" not in params and "learning_rate" not in params
        # A conditional hyperparameter is logged only when it is active.
        assert ("second_width" in params) == (params["second_layer"] == "True")
        assert mlflow_client.get_metric_history(trial.info.run_id, "val_accuracy")
    assert result.best is not None and result.best.trial_id in {t.data.tags["toolkit.trial_id"] for t in trials}


def test_a_builder_that_raises_fails_its_trial_and_the_search_goes_on(tmp_path, store, mlflow_client):
    card = _card(tmp_path, "models/net.py:explodes", "tuner: {algorithm: grid, max_trials: 2}", name="explodes")
    cfg = load_config(card, ["train.diagnostics=false"])
    result = run_search(cfg)
    _, trials = _runs(mlflow_client, "explodes")
    by_value = {t.data.params["explode"]: t for t in trials}
    assert set(by_value) == {"0", "1"}
    failed, finished = by_value["1"], by_value["0"]
    assert failed.info.status == "FAILED" and finished.info.status == "FINISHED"
    assert "refuses to build" in failed.data.tags["toolkit.failure"]
    text = Path(mlflow_client.download_artifacts(failed.info.run_id, "failure.txt", str(tmp_path))).read_text()
    assert "RuntimeError: this builder refuses to build" in text
    assert result.best is not None and result.best.hyperparameters["explode"] == 0


def test_python_door_accepts_a_reference_string(tmp_path, store, mlflow_client):
    _card(tmp_path, "models/net.py:build")
    cfg = load_config(
        "quickstart", ["tuner.max_trials=1", "train.epochs=1", "tracking.log_model=false"], experiments_dir=ROOT / "experiments"
    )
    cfg.tracking.report = False
    run_search(cfg, hypermodel=f"{tmp_path / 'models' / 'net.py'}:build")
    _, trials = _runs(mlflow_client, "quickstart")
    assert "filters" in trials[0].data.params and "depth" not in trials[0].data.params


@pytest.mark.parametrize(
    ("builder", "extra", "message"),
    [
        ("models/missing.py:build", (), "builder file 'models/missing.py' not found"),
        ("models/net.py:nothing", (), "defines no 'nothing'"),
        ("models/net.py:NOT_CALLABLE", (), "int 3 is not callable"),
        ("no_such_package.models:build", (), "no module named 'no_such_package'"),
        ("models/net.py", (), "must be 'path/to/file.py:build' or 'package.module:build'"),
        ("models/net.py:build", ("space: {depth: [1, 2]}",), "space.depth is read only by the built-in mlp family"),
    ],
)
def test_a_bad_builder_reference_exits_2_before_any_run(builder, extra, message, tmp_path, cli_in_process):
    card = _card(tmp_path, builder, *extra)
    store_dir = tmp_path / "store"
    code, _, err = cli_in_process(
        "tune", str(card), env={"MLFLOW_TRACKING_URI": f"sqlite:///{store_dir / 'mlflow.db'}"}, cwd=tmp_path
    )
    assert code == 2, err
    assert message in err
    assert "Traceback" not in err
    # No run, not even a store.
    assert not (store_dir / "mlflow.db").exists()


def test_toolkit_validate_checks_the_builder_without_tensorflow(tmp_path):
    card = _card(tmp_path, "models/net.py:nothing")
    with pytest.raises(ConfigError, match="defines no 'nothing'. .*It defines: build, explodes"):
        load_config(card)
    code = f"import sys; from toolkit.config import load_config; load_config({str(_card(tmp_path, 'models/net.py:build'))!r}); print('tensorflow' in sys.modules)"
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "False", out.stderr


def test_a_regression_search_on_val_mae_crowns_the_lowest_mae(tmp_path, store, mlflow_client):
    cfg = load_config(
        "quickstart",
        [
            "name=reg",
            "data.source=friedman",
            "data.n_samples=300",
            "tuner.objective=val_mae",
            "tuner.max_trials=3",
            "train.epochs=3",
            "space.learning_rate=[0.0001, 0.003, 0.03]",
            "space.optimizer=adam",
            "train.diagnostics=false",
            "tracking.log_model=false",
            "tracking.report=false",
        ],
        experiments_dir=ROOT / "experiments",
    )
    assert cfg.direction == "min"
    result = run_search(cfg)
    _, trials = _runs(mlflow_client, "reg")
    scores = {t.data.tags["toolkit.trial_id"]: t.data.metrics["best_val_mae"] for t in trials}
    assert len(set(scores.values())) > 1
    assert result.best.trial_id == min(scores, key=scores.get)
    for trial in trials:
        # best_* of an error metric is its lowest epoch, not its highest.
        for metric in ("mae", "val_mae"):
            history = [m.value for m in mlflow_client.get_metric_history(trial.info.run_id, metric)]
            assert trial.data.metrics[f"best_{metric}"] == pytest.approx(min(history))


@pytest.mark.slow
def test_two_workers_load_the_same_builder(tmp_path, store, mlflow_client):
    card = _card(tmp_path, "models/net.py:build", "tuner: {max_trials: 4}", name="workers")
    cmd = [PYTHON, "-m", "toolkit.cli", "tune", str(card), "--workers", "2", "--set", "train.epochs=1"]
    cmd += ["--set", "tracking.log_model=false", "--set", "train.diagnostics=false"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERASTUNER_")}
    env.update({"MLFLOW_TRACKING_URI": store, "PYTHONPATH": str(ROOT)})
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    parents, trials = _runs(mlflow_client, "workers")
    assert len(parents) == 1 and sorted(t.data.tags["toolkit.trial_id"] for t in trials) == ["0", "1", "2", "3"]
    assert {t.info.status for t in trials} == {"FINISHED"}
    assert len({t.data.tags["toolkit.worker"] for t in trials}) == 2
    assert all({"filters", "branch_units"} <= set(t.data.params) for t in trials)
