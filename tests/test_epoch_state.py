"""Resume inside a trial (train.epoch_state): a killed trial goes on from its last saved epoch.

The resumed trial gets its hyperparameters back, its weights and optimizer state, and the data
order of the epochs it has still to train; its run holds every epoch's metrics once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import keras
import keras_tuner as kt
import numpy as np
import pytest
from conftest import ROOT, shrunk

from toolkit.tuner import run_search

FAST = ("tracking.log_model=false", "tracking.report=false", "train.diagnostics=false", "tracking.system_metrics=false")


class _Interrupt(keras.callbacks.Callback):
    """Stands for a Ctrl-C that lands after an epoch (and after that epoch's state was saved)."""

    def __init__(self, after_epoch: int) -> None:
        super().__init__()
        self.after_epoch = after_epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.after_epoch:
            raise KeyboardInterrupt


class Small(kt.HyperModel):
    """A small digits model with dropout (a seed generator whose state must come back too)."""

    def __init__(self, interrupt_after: int | None = None) -> None:
        super().__init__()
        self.interrupt_after = interrupt_after

    def build(self, hp):
        model = keras.Sequential(
            [
                keras.Input((8, 8, 1)),  # a custom model gets digits as 8x8 images
                keras.layers.Flatten(),
                keras.layers.Dense(hp.Choice("units", [16, 32]), activation="relu"),
                keras.layers.Dropout(0.2),
                keras.layers.Dense(10, activation="softmax"),
            ]
        )
        model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    def fit(self, hp, model, *args, callbacks=(), **kwargs):
        extra = [] if self.interrupt_after is None else [_Interrupt(self.interrupt_after)]
        return model.fit(*args, callbacks=[*callbacks, *extra], **kwargs)


def _curves(client, run_id: str, names=("loss", "val_loss", "val_accuracy")) -> dict[str, list[tuple[int, float]]]:
    return {n: sorted((m.step, m.value) for m in client.get_metric_history(run_id, n)) for n in names}


def _trial_runs(client, name: str = "quickstart"):
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if r.data.tags.get("toolkit.role") == "trial"]


def test_an_interrupted_trial_resumes_at_its_saved_epoch_and_learns_what_it_would_have(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    cfg = shrunk("quickstart", "tuner.max_trials=1", "train.epochs=6", "train.epoch_state.budget=1.0", *FAST)
    uris = {}
    for label in ("straight", "interrupted"):
        (tmp_path / label).mkdir()
        uris[label] = f"sqlite:///{tmp_path / label / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uris["straight"])
    assert run_search(cfg, hypermodel=Small()).best is not None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uris["interrupted"])
    with pytest.raises(KeyboardInterrupt):
        run_search(cfg, hypermodel=Small(interrupt_after=2))
    saved = list((tmp_path / "interrupted").glob("tuner/**/epoch_state/state.json"))
    assert len(saved) == 1, "the interrupted trial's state is kept for the resume"
    resumed = run_search(cfg, hypermodel=Small())

    client = MlflowClient(uris["interrupted"])
    runs = _trial_runs(client)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) == 1 and len(runs) == 2
    run = finished[0]
    # Saved after every epoch (budget 1.0): the third epoch (index 2) was the last saved.
    assert run.data.tags["toolkit.resumed_from_epoch"] == "3"
    curves = _curves(client, run.info.run_id)
    for name, points in curves.items():
        assert [s for s, _ in points] == list(range(6)), (name, points)
    # Weights, optimizer, dropout's seed and the data order came back: the same curves as a trial never cut.
    straight_run = _trial_runs(MlflowClient(uris["straight"]))[0]
    straight = _curves(MlflowClient(uris["straight"]), straight_run.info.run_id)
    for name in curves:
        np.testing.assert_allclose([v for _, v in curves[name]], [v for _, v in straight[name]], rtol=1e-4, err_msg=name)
    assert resumed.best.metrics["best_val_accuracy"] == pytest.approx(straight_run.data.metrics["best_val_accuracy"], abs=1e-6)
    assert run.data.metrics["state_saves"] >= 1
    assert not list((tmp_path / "interrupted").glob("tuner/**/epoch_state")), "a finished search keeps no state"


def test_the_epoch_keyed_order_is_the_same_in_every_process_and_differs_by_epoch():
    from toolkit.data.pipeline import epoch_pipeline

    x = np.arange(40, dtype="float32")[:, None]
    y = np.arange(40)

    def order(ds, epoch):
        ds.toolkit_epoch.assign(epoch)
        return [int(v) for _, b in ds for v in b.numpy()]

    first, second = epoch_pipeline(x, y, 8, seed=5), epoch_pipeline(x, y, 8, seed=5)
    assert order(first, 0) == order(second, 0) and order(first, 3) == order(second, 3)
    assert order(first, 0) != order(first, 1)
    assert sorted(order(first, 2)) == list(range(40))
    assert first.cardinality().numpy() == 5


def test_state_saving_stays_within_its_budget(store, mlflow_client):
    result = run_search(shrunk("quickstart", "tuner.max_trials=1", "train.epochs=8", "train.epoch_state=true", *FAST))
    trial = result.trials[0]
    saving = trial.metrics.get("state_saving_seconds")
    assert saving is not None and trial.metrics["state_saves"] >= 1
    # The budget is 5% of the training time; the trial's time also holds its set-up.
    assert saving <= 0.05 * trial.seconds


@pytest.mark.slow
def test_kill_9_after_the_third_of_six_epochs_resumes_the_trial_there(tmp_path):
    (tmp_path / "store").mkdir()
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    # Epochs of about a second (batch 4, one step per call), so the kill lands within the fourth.
    sets = [
        "tuner.max_trials=1",
        "train.epochs=6",
        "train.batch_size=4",
        "train.steps_per_execution=1",
        "train.epoch_state=true",
        *FAST,
    ]
    args = [sys.executable, "-m", "toolkit.cli", "tune", str(ROOT / "experiments" / "quickstart.yaml")]
    args += [a for s in sets for a in ("--set", s)]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)

    def epochs_logged() -> int:
        if client.get_experiment_by_name("quickstart") is None:
            return 0
        running = [r for r in _trial_runs(client) if r.info.status == "RUNNING"]
        return len(client.get_metric_history(running[0].info.run_id, "val_loss")) if running else 0

    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if (tmp_path / "store" / "mlflow.db").exists() and epochs_logged() >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"the search ended before it could be killed: {proc.stderr.read()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = epochs_logged()
    assert 3 <= killed_at < 6

    rerun = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    runs = _trial_runs(client)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) == 1
    run = finished[0]
    assert int(run.data.tags["toolkit.resumed_from_epoch"]) >= 2
    for name, points in _curves(client, run.info.run_id).items():
        assert [s for s, _ in points] == list(range(6)), (name, points)
    # The same trial, with the same hyperparameters, as the one that was killed.
    killed = [r for r in runs if r.info.status != "FINISHED"]
    assert len(killed) == 1 and killed[0].data.params == run.data.params
