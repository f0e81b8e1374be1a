"""Progress: a rich bar in a terminal, one line per trial elsewhere, a summary at the end."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from conftest import ROOT
from rich.console import Console

from toolkit.config import validate
from toolkit.progress import Reporter, print_summary
from toolkit.tuner import SearchResult, TrialResult

CFG = validate({"name": "p", "data": {"source": "iris"}, "tuner": {"max_trials": 3}})


def trial(tid: str, score: float | None, status: str = "FINISHED") -> TrialResult:
    metrics = {} if score is None else {"best_val_accuracy": score, "val_accuracy": score}
    return TrialResult(
        tid,
        status,
        {"depth": 2, "activation": "relu", "learning_rate": 0.0123},
        metrics,
        1,
        1.5,
        None if status == "FINISHED" else "the loss became NaN",
        "run",
    )


def test_without_a_terminal_each_trial_is_one_line_with_the_best_so_far():
    buffer = io.StringIO()
    with Reporter(CFG, console=Console(file=buffer, force_terminal=False, width=200)) as reporter:
        reporter.trial_done(trial("0", 0.5))
        reporter.trial_done(trial("1", None, "FAILED"))
        reporter.trial_done(trial("2", 0.9))
    lines = buffer.getvalue().strip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("trial 0 FINISHED val_accuracy=0.5") and "1/3 done" in lines[0]
    assert "trial 1 FAILED reason: the loss became NaN" in lines[1] and "best val_accuracy=0.5 (trial 0)" in lines[1]
    assert "3/3 done, best val_accuracy=0.9 (trial 2)" in lines[2]


def test_in_a_terminal_a_bar_shows_done_total_best_and_eta():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=160)
    with Reporter(CFG, console=console) as reporter:
        reporter.trial_done(trial("0", 0.75))
    out = buffer.getvalue()
    assert "1/3" in out and "best val_accuracy=0.75 (trial 0)" in out and "ETA" in out


def test_summary_names_the_best_trial_its_hyperparameters_score_and_the_ui():
    buffer = io.StringIO()
    result = SearchResult("p", "val_accuracy", "max", "abc123", "1", trials=[trial("0", 0.5), trial("1", 0.8)], seconds=12.0)
    result.best = result.trials[1]
    print_summary(result, Console(file=buffer, width=300))
    out = buffer.getvalue()
    assert "2 trial(s) finished, 0 failed" in out
    assert "best trial 1: val_accuracy=0.8 (max) with depth=2, activation=relu, learning_rate=0.0123" in out
    assert "make ui" in out


@pytest.mark.slow
def test_tune_is_quiet_by_default_and_prints_progress_and_summary(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    args = [
        sys.executable,
        "-m",
        "toolkit.cli",
        "tune",
        "quickstart",
        "--set",
        "tuner.max_trials=2",
        "--set",
        "train.epochs=1",
        "--set",
        "tracking.log_model=false",
        "--set",
        "tracking.report=false",
    ]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # TensorFlow's start-up noise is suppressed by default.
    for noise in ("oneDNN", "absl::InitializeLog", "cuda", "retracing"):
        assert noise not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("trial ")]
    assert len(lines) == 2 and "2/2 done" in lines[-1]
    assert "best trial" in proc.stdout
    assert f"Browse: mlflow ui --backend-store-uri {env['MLFLOW_TRACKING_URI']} --port 5000, then open " in proc.stdout
    # The link opens the UI on this search's trials (tests/test_ui.py renders it in Chromium).
    assert "http://127.0.0.1:5000/#/experiments/" in proc.stdout and "/runs?viewStateShareKey=trials-" in proc.stdout
    verbose = subprocess.run([*args, "--verbose"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert verbose.returncode == 0
    assert "oneDNN" in verbose.stderr or "tensorflow" in verbose.stderr.lower()
