"""tuner.pruning: hopeless trials stop early under random/grid/bayesian, judged against the search's finished trials.

Real KerasTuner and MLflow in tmp_path; the distributed case (real gRPC chief and workers) is slow.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, shrunk

from toolkit import analysis
from toolkit.config import PruningConfig
from toolkit.tuner import run_search
from toolkit.tuner.pruning import should_prune

QUICK = ["tracking.log_model=false", "tracking.register_model=false", "train.diagnostics=false"]
# Grid order: a good learning rate first, then two that cannot learn anything in 6 epochs.
HOPELESS = [
    "tuner.algorithm=grid",
    "tuner.max_trials=3",
    "train.epochs=6",
    "space.depth=1",
    "space.units=32",
    "space.activation=relu",
    "space.optimizer=adam",
    "space.l1=0",
    "space.l2=0",
    "space.learning_rate=[0.01, 1.0e-7, 2.0e-7]",
    "tuner.pruning={rule: median, min_epochs: 2, min_trials: 1}",
]


def test_the_rules_thresholds_in_both_directions():
    median = PruningConfig(rule="median", min_trials=3)
    assert should_prune(0.5, [0.6, 0.7, 0.8], median, "max")
    assert not should_prune(0.7, [0.6, 0.7, 0.8], median, "max")  # at the median: kept
    assert not should_prune(0.1, [0.6, 0.7], median, "max")  # fewer finished trials than min_trials
    assert should_prune(0.9, [0.2, 0.3, 0.4], median, "min") and not should_prune(0.3, [0.2, 0.3, 0.4], median, "min")
    top_quarter = PruningConfig(rule="percentile", percentile=25, min_trials=1)
    # Of 0..100 the top quarter starts at 75 (maximized) and ends at 25 (minimized).
    values = [float(v) for v in range(101)]
    assert should_prune(74.0, values, top_quarter, "max") and not should_prune(75.0, values, top_quarter, "max")
    assert should_prune(26.0, values, top_quarter, "min") and not should_prune(25.0, values, top_quarter, "min")


def test_a_hopeless_trial_is_pruned_and_the_best_is_not(store, mlflow_client, tmp_path, capsys):
    from toolkit import progress

    cfg = shrunk("quickstart", *HOPELESS, *QUICK)
    reporter = progress.Reporter(cfg, live=False)
    result = run_search(cfg, on_trial=reporter.trial_done)
    progress.print_summary(result)
    by_id = {t.trial_id: t for t in result.trials}
    assert all(t.status == "FINISHED" for t in result.trials)
    assert by_id["0"].pruned_epoch is None and result.best.trial_id == "0"
    pruned = [t for t in result.trials if t.pruned_epoch is not None]
    assert pruned, [(t.trial_id, t.metrics) for t in result.trials]
    for trial in pruned:
        run = mlflow_client.get_run(trial.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags["toolkit.pruned"] == "true"
        epoch = int(run.data.tags["toolkit.pruned_epoch"])
        assert 1 <= epoch < 5  # judged from min_epochs=2 (epoch index 1), never at the last epoch
        steps = [m.step for m in mlflow_client.get_metric_history(trial.run_id, "val_accuracy")]
        assert steps == list(range(epoch + 1))  # it stopped there, each epoch logged once
    assert "toolkit.pruned" not in mlflow_client.get_run(by_id["0"].run_id).data.tags
    saved = sum(6 - t.pruned_epoch - 1 for t in pruned)
    captured = capsys.readouterr()
    assert f"(pruned after epoch {pruned[0].pruned_epoch + 1})" in captured.err
    assert f"3 trial(s) finished ({len(pruned)} pruned, {saved} epochs saved)" in captured.out
    report = analysis.pruning_findings(analysis.load_search(result.parent_run_id))
    assert report == [
        f"Pruning (median rule, from epoch 2) stopped {len(pruned)} of 3 finished trial(s), saving {saved} of 18 epochs "
        f"({saved / 18:.0%}); the best trial, 0, ran all its epochs."
    ]


@pytest.mark.slow
def test_pruning_sees_every_workers_trials_under_two_workers(tmp_path, store, mlflow_client):
    overrides = [o for o in HOPELESS if not o.startswith(("tuner.max_trials", "space.learning_rate"))]
    # Two good rates run side by side first; the two hopeless ones start once one of those is done.
    overrides += ["tuner.max_trials=4", "space.learning_rate=[0.01, 0.005, 1.0e-7, 2.0e-7]", *QUICK]
    cmd = [sys.executable, "-m", "toolkit.cli", "tune", str(ROOT / "experiments/quickstart.yaml"), "--workers", "2"]
    for override in overrides:
        cmd += ["--set", override]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERASTUNER_")}
    env["MLFLOW_TRACKING_URI"] = store
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    runs = {
        r.data.tags["toolkit.trial_id"]: r
        for r in mlflow_client.search_runs(
            [mlflow_client.get_experiment_by_name("quickstart").experiment_id], "tags.`toolkit.role` = 'trial'"
        )
    }
    assert sorted(runs) == ["0", "1", "2", "3"] and {r.info.status for r in runs.values()} == {"FINISHED"}
    assert {r.data.tags["toolkit.worker"] for r in runs.values()} == {"tuner0", "tuner1"}
    pruned = {tid for tid, r in runs.items() if r.data.tags.get("toolkit.pruned") == "true"}
    # A hopeless rate starts after a good trial finished on the other worker, and is judged against it.
    assert pruned & {"2", "3"}, done.stderr
    best = max(runs, key=lambda tid: runs[tid].data.metrics["best_val_accuracy"])
    assert best in {"0", "1"} and best not in pruned
    # The chief's own progress lines and summary know which trials were pruned.
    assert "(pruned after epoch" in done.stderr
    assert f"4 trial(s) finished ({len(pruned)} pruned" in done.stdout
