"""Resume: a rerun of the same card continues its search under the same parent run.

No trial is ever FINISHED twice, an interrupted trial's run is closed and the trial rerun,
and ``--fresh`` starts over with a new parent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from conftest import ROOT, shrunk

from toolkit.tuner import run_search

QUICKSTART = str(ROOT / "experiments" / "quickstart.yaml")
FAST = ("tracking.log_model=false", "tracking.report=false", "train.diagnostics=false")


def search_runs(client, name: str = "quickstart") -> tuple[list, list]:
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("toolkit.role") == "search"]
    trials = [r for r in runs if r.data.tags.get("toolkit.role") == "trial"]
    return parents, trials


def test_a_rerun_resumes_under_the_same_parent_and_runs_only_new_trials(store, mlflow_client):
    first = run_search(shrunk("quickstart", "tuner.max_trials=2", *FAST))
    # max_trials is not part of the search's identity: raising it extends the same search.
    second = run_search(shrunk("quickstart", "tuner.max_trials=3", *FAST))

    assert second.resumed and second.parent_run_id == first.parent_run_id
    parents, trials = search_runs(mlflow_client)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["toolkit.resumed"] == "true"
    assert sorted(t.data.tags["toolkit.trial_id"] for t in trials) == ["0", "1", "2"]
    assert all(t.info.status == "FINISHED" for t in trials)
    assert parents[0].data.metrics["trials_completed"] == 3
    assert [t.trial_id for t in second.trials] == ["0", "1", "2"]
    # The search's time adds up over its sessions.
    assert parents[0].data.metrics["search_seconds"] > second.seconds


def test_rerunning_a_finished_search_trains_nothing_and_logs_the_model_once(store, mlflow_client):
    cfg = shrunk("quickstart", "tuner.max_trials=1", "train.diagnostics=false", "tracking.report=false")
    first = run_search(cfg)
    again = run_search(cfg)

    assert again.parent_run_id == first.parent_run_id
    parents, trials = search_runs(mlflow_client)
    assert len(parents) == 1 and len(trials) == 1
    assert len(parents[0].outputs.model_outputs) == 1
    assert len(mlflow_client.search_model_versions("name='quickstart'")) == 1


def test_fresh_or_a_changed_card_starts_a_new_search_with_a_new_parent(store, mlflow_client):
    first = run_search(shrunk("quickstart", "tuner.max_trials=1", *FAST))
    second = run_search(shrunk("quickstart", "tuner.max_trials=1", *FAST), fresh=True)
    third = run_search(shrunk("quickstart", "tuner.max_trials=1", "train.batch_size=32", *FAST))

    assert not second.resumed and not third.resumed
    assert len({first.parent_run_id, second.parent_run_id, third.parent_run_id}) == 3
    parents, trials = search_runs(mlflow_client)
    assert len(parents) == 3 and all(p.info.status == "FINISHED" for p in parents)
    assert Counter(t.data.tags["mlflow.parentRunId"] for t in trials) == {p.info.run_id: 1 for p in parents}


def test_resume_after_an_interrupt_closes_nothing_twice(store, mlflow_client):
    cfg = shrunk("quickstart", "tuner.max_trials=2", *FAST)

    def stop_after_first(result):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_search(cfg, on_trial=stop_after_first)
    resumed = run_search(cfg)

    assert resumed.resumed
    parents, trials = search_runs(mlflow_client)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    finished = [t.data.tags["toolkit.trial_id"] for t in trials if t.info.status == "FINISHED"]
    assert sorted(finished) == ["0", "1"]
    assert not [t for t in trials if t.info.status == "RUNNING"]


def test_hyperband_keeps_what_it_needs_then_only_the_best_checkpoint(store, mlflow_client):
    # Hyperband trains later rounds from earlier trials' checkpoints, so they are pruned only
    # when the search ends; the best model must still load for the test split.
    cfg = shrunk("quickstart", "tuner.algorithm=hyperband", "train.epochs=2", "tuner.factor=2", "data.test_split=0.2", *FAST)
    result = run_search(cfg)

    parents, trials = search_runs(mlflow_client)
    assert parents[0].info.status == "FINISHED" and "test_accuracy" in parents[0].data.metrics
    assert all(t.info.status == "FINISHED" for t in trials)
    project = _store_dir(store) / "tuner" / "quickstart"
    assert [p.parent.name for p in project.glob("trial_*/checkpoint*")] == [f"trial_{result.best.trial_id}"]


def _store_dir(uri: str):
    from pathlib import Path

    return Path(uri[len("sqlite:///") :]).parent


@pytest.mark.slow
def test_sigkill_mid_search_then_rerun_gives_each_trial_finished_once(tmp_path):
    (tmp_path / "store").mkdir()
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    # Trials long enough (40 epochs, several seconds) that the poll below reliably sees one mid-way:
    # at 4 epochs a trial took ~1 s and the whole search could end between two polls.
    sets = [
        "tuner.max_trials=4",
        "train.epochs=40",
        "train.diagnostics=false",
        "tracking.log_model=false",
        "tracking.report=false",
    ]
    args = [sys.executable, "-m", "toolkit.cli", "tune", QUICKSTART, *[a for s in sets for a in ("--set", s)]]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)

    def state() -> tuple[int, bool]:
        """(trials finished, a later trial has logged an epoch)."""
        exp = client.get_experiment_by_name("quickstart")
        if exp is None:
            return 0, False
        _, trials = search_runs(client)
        done = sum(t.info.status == "FINISHED" for t in trials)
        training = any(t.info.status == "RUNNING" and t.data.metrics for t in trials)
        return done, training

    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            done, training = state() if (tmp_path / "store" / "mlflow.db").exists() else (0, False)
            if done >= 2 and training:
                break
            time.sleep(0.3)
        assert proc.poll() is None, f"the search ended before it could be killed: {proc.stderr.read()}"
        proc.send_signal(signal.SIGKILL)  # no cleanup at all: the trial's run stays RUNNING
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    _, before = search_runs(client)
    killed_trial = [t.data.tags["toolkit.trial_id"] for t in before if t.info.status == "RUNNING"]
    assert len(killed_trial) == 1

    rerun = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr

    parents, trials = search_runs(client)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    finished = [t.data.tags["toolkit.trial_id"] for t in trials if t.info.status == "FINISHED"]
    assert len(finished) == 4 and len(set(finished)) == 4
    assert not [t for t in trials if t.info.status == "RUNNING"]
    # The interrupted attempt is closed, with its reason, and the trial ran again.
    stale = [t for t in trials if t.info.status in ("KILLED", "FAILED")]
    assert [t.data.tags["toolkit.trial_id"] for t in stale] == killed_trial
    assert "stopped" in stale[0].data.tags["toolkit.failure"]
    assert killed_trial[0] in finished
    assert parents[0].data.metrics["trials_completed"] == 4


def test_resume_closes_left_open_runs_by_the_oracles_word(store, mlflow_client):
    from toolkit import tracking

    cfg = shrunk("quickstart")
    tracker = tracking.SearchTracker(cfg, store)
    tracker.start_search("reconcile")
    runs = {tid: tracker.start_trial(tid, {"depth": 1}) for tid in ("0", "1", "2", "3")}
    tracking.log_metrics(store, runs["0"], {"val_accuracy": 0.5}, step=0)
    tracking.log_metrics(store, runs["0"], {"val_accuracy": 0.7}, step=1)
    # Trial 1: an interrupt closed its run KILLED just after the oracle had recorded it.
    tracker.end_trial(runs["1"], "KILLED", failure="interrupted")

    changed = tracker.close_stale_trials(completed={"0", "1"}, failed={"2": "ValueError: boom"})

    assert changed == 4
    got = {tid: mlflow_client.get_run(run_id) for tid, run_id in runs.items()}
    assert got["0"].info.status == "FINISHED"
    assert got["0"].data.metrics["best_val_accuracy"] == 0.7 and got["0"].data.metrics["best_epoch"] == 1
    assert got["1"].info.status == "FINISHED" and "toolkit.failure" not in got["1"].data.tags
    assert got["2"].info.status == "FAILED" and got["2"].data.tags["toolkit.failure"] == "ValueError: boom"
    assert got["3"].info.status == "KILLED" and "rerun" in got["3"].data.tags["toolkit.failure"]


def test_a_late_process_never_rewrites_a_run_another_closed(store, mlflow_client):
    from toolkit import tracking

    cfg = shrunk("quickstart")
    chief = tracking.SearchTracker(cfg, store)
    chief.start_search("late")
    worker = tracking.SearchTracker(cfg, store)
    worker.attach(chief.parent_run_id)
    run = worker.start_trial("0", {"depth": 1})
    # The chief writes the worker off and closes its run; the worker comes back later.
    assert chief.end_trial(run, "FAILED", failure="worker tuner1 sent no heartbeat", force=True)
    assert not worker.end_trial(run, "FINISHED", metrics={"best_val_accuracy": 0.99})
    worker.open_runs.add(run)
    worker.close_open_runs("KILLED", "interrupted")
    got = mlflow_client.get_run(run)
    assert got.info.status == "FAILED" and got.data.tags["toolkit.failure"] == "worker tuner1 sent no heartbeat"
    assert "best_val_accuracy" not in got.data.metrics


def test_a_completed_trial_left_open_is_closed_with_the_oracles_summaries_not_a_short_history(store, mlflow_client):
    from toolkit import tracking

    cfg = shrunk("quickstart")
    tracker = tracking.SearchTracker(cfg, store)
    tracker.start_search("short")
    run = tracker.start_trial("0", {"depth": 1})
    tracking.log_metrics(store, run, {"val_accuracy": 0.5, "val_loss": 0.9}, step=0)  # the store lost epochs 1-3
    oracle = {"best_val_accuracy": 0.9, "best_epoch": 3}  # KerasTuner's report, at the trial's best epoch

    assert tracker.close_stale_trials(completed={"0": oracle}) == 1

    got = mlflow_client.get_run(run)
    assert got.info.status == "FINISHED"
    assert got.data.metrics["best_val_accuracy"] == 0.9 and got.data.metrics["best_epoch"] == 3
    assert got.data.metrics["best_val_loss"] == 0.9  # the other metrics' summaries come from the history
    assert "stops at epoch 0, before the oracle's best epoch 3" in got.data.tags["toolkit.history_incomplete"]


def test_a_run_interrupted_after_the_oracle_failed_its_trial_is_closed_failed_on_resume(store, mlflow_client):
    from toolkit import tracking

    cfg = shrunk("quickstart")
    tracker = tracking.SearchTracker(cfg, store)
    tracker.start_search("failed-then-killed")
    run = tracker.start_trial("0", {"depth": 1})
    tracker.end_trial(run, "KILLED", failure="interrupted")  # Ctrl-C between the oracle's verdict and the close

    assert tracker.close_stale_trials(failed={"0": "ValueError: boom"}) == 1

    got = mlflow_client.get_run(run)
    assert got.info.status == "FAILED" and got.data.tags["toolkit.failure"] == "ValueError: boom"


def test_oracle_summaries_give_the_oracles_best_objective_and_epoch(tmp_path):
    import keras_tuner as kt

    from toolkit.tuner import oracle_summaries

    trial = kt.engine.trial.Trial(kt.HyperParameters(), trial_id="0")
    for step, (acc, loss) in enumerate([(0.5, 1.0), (0.8, 0.4), (0.7, 0.6)]):
        trial.metrics.update("val_accuracy", acc, step=step)
        trial.metrics.update("val_loss", loss, step=step)
    assert oracle_summaries(trial, "val_accuracy", "max") == {"best_val_accuracy": 0.8, "best_epoch": 1}
    assert oracle_summaries(trial, "val_loss", "min") == {"best_val_loss": 0.4, "best_epoch": 1}
    assert oracle_summaries(trial, "val_mae", "min") == {}
