"""Where the toolkit leans on a library instead of its own code (issue 17): scipy's Spearman
correlation, MLflow's async switch and batch splitting, MLflow's git tag, paged run searches."""

from __future__ import annotations

import logging
import shutil
import subprocess
import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import shrunk

from toolkit import analysis, tracking
from toolkit.analysis import findings
from toolkit.analysis import load as load_module
from toolkit.tracking import values

# ---------------------------------------------------------------------------- Spearman: scipy's


def test_spearman_is_scipys_over_the_known_pairs():
    from scipy import stats

    a = pd.Series([1.0, 2.0, 3.0, np.nan, 5.0, 6.0, 7.0])
    b = pd.Series([0.1, 0.4, 0.2, 0.9, np.nan, 0.5, 0.8])
    known = a.notna() & b.notna()
    assert findings._spearman(a, b) == pytest.approx(stats.spearmanr(a[known], b[known]).statistic)
    assert findings._spearman(pd.Series([1, 2, 2, 3]), pd.Series([4, 3, 3, 1])) == pytest.approx(-1.0)  # ties: average ranks


@pytest.mark.parametrize(
    ("a", "b"),
    [([1.0, 2.0, 3.0], [0.5, 0.5, 0.5]), ([2.0, 2.0], [1.0, 3.0]), ([1.0], [2.0]), ([1.0, np.nan], [np.nan, 2.0]), ([], [])],
)
def test_spearman_is_nan_where_undefined_and_quiet(a, b):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ConstantInputWarning reaches the report's caller
        assert np.isnan(findings._spearman(pd.Series(a, dtype=float), pd.Series(b, dtype=float)))


# ---------------------------------------------------------------------------- MLflow's async switch


@pytest.mark.parametrize(
    ("mlflow_value", "old_value", "synchronous"),
    [
        (None, None, False),  # the toolkit's default: queued
        ("false", None, True),
        ("0", None, True),
        ("true", None, False),
        ("TRUE", "0", False),  # MLflow's switch wins over the deprecated one
        (None, "0", True),  # the deprecated alias still works
        (None, "1", False),
    ],
)
def test_mlflow_enable_async_logging_is_the_switch(monkeypatch, caplog, mlflow_value, old_value, synchronous):
    for name, value in (("MLFLOW_ENABLE_ASYNC_LOGGING", mlflow_value), ("TOOLKIT_ASYNC_LOGGING", old_value)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    monkeypatch.setattr(values, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="toolkit.tracking.values"):
        assert values._synchronous() is synchronous
    deprecated = [r for r in caplog.records if "TOOLKIT_ASYNC_LOGGING is deprecated" in r.getMessage()]
    assert len(deprecated) == (1 if mlflow_value is None and old_value is not None else 0)


def test_a_bad_mlflow_switch_is_refused_before_a_search_and_tolerated_inside_one(monkeypatch, tmp_path, caplog, capsys):
    from toolkit.cli import main
    from toolkit.config import ConfigError

    monkeypatch.setenv("MLFLOW_ENABLE_ASYNC_LOGGING", "maybe")
    with pytest.raises(ConfigError, match=r"MLFLOW_ENABLE_ASYNC_LOGGING must be one of true, false, 1, 0 .*Received: 'maybe'"):
        tracking.check_store(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    assert main(["tune", "quickstart"]) == 2  # a usage error: one line, before TensorFlow or any run
    err = capsys.readouterr().err
    assert "MLFLOW_ENABLE_ASYNC_LOGGING must be one of" in err and "Traceback" not in err
    assert not (tmp_path / "store" / "mlflow.db").exists()
    # Inside a search (run_search from Python skips the CLI's check) it is said once, and queued.
    monkeypatch.setattr(values, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="toolkit.tracking.values"):
        assert values._synchronous() is False and values._synchronous() is False
    assert [r.getMessage() for r in caplog.records].count(
        "MLFLOW_ENABLE_ASYNC_LOGGING value must be one of ['true', 'false', '1', '0'] (case-insensitive), "
        "but got maybe; logging asynchronously, the toolkit's default"
    ) == 1


@pytest.mark.parametrize("synchronous", [True, False])
def test_log_batch_splits_what_the_store_limits(store, mlflow_client, synchronous):
    """More metrics and params than one request may carry, in one call each: MLflow splits them."""
    run_id = mlflow_client.create_run(mlflow_client.create_experiment("batch")).info.run_id
    tracking.log_metrics(store, run_id, {f"m{i}": float(i) for i in range(2500)}, step=3, synchronous=synchronous)
    tracking.log_params(store, run_id, {f"p{i}": i for i in range(250)}, synchronous=synchronous)
    mlflow_client.set_terminated(run_id)  # drains the async queue
    data = mlflow_client.get_run(run_id).data
    assert len(data.metrics) == 2500 and data.metrics["m2499"] == 2499.0
    assert len(data.params) == 250 and data.params["p249"] == "249"


# ---------------------------------------------------------------------------- the git commit


def _git(folder, *args: str) -> str:
    command = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "-c", "commit.gpgsign=false", *args]
    return subprocess.run(command, cwd=folder, check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_parent_run_carries_mlflows_git_tag_and_environment_the_dirty_flag(store, mlflow_client, tmp_path, monkeypatch):
    repo = tmp_path / "project"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "card.yaml").write_text("a: 1\n")
    _git(repo, "add", "card.yaml")
    _git(repo, "commit", "-q", "-m", "first")
    sha = _git(repo, "rev-parse", "HEAD")
    assert tracking.git_commit(repo) == {"commit": sha, "dirty": False}
    (repo / "card.yaml").write_text("a: 2\n")
    assert tracking.git_commit(repo) == {"commit": sha, "dirty": True}
    assert tracking.git_commit(tmp_path / "store") is None  # not a repository

    monkeypatch.chdir(repo)  # the folder the search runs in, not where the toolkit is installed
    tracker = tracking.SearchTracker(shrunk("quickstart"), store)
    parent = tracker.start_search("git-tag")
    assert mlflow_client.get_run(parent).data.tags["mlflow.source.git.commit"] == sha


def test_outside_a_repository_the_parent_has_no_git_tag(store, mlflow_client, tmp_path, monkeypatch):
    folder = tmp_path / "plain"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no repository above tmp_path either
    parent = tracking.SearchTracker(shrunk("quickstart"), store).start_search("no-git")
    assert "mlflow.source.git.commit" not in mlflow_client.get_run(parent).data.tags


# ---------------------------------------------------------------------------- runs read page by page


def test_a_search_is_read_whole_across_pages(store, mlflow_client, monkeypatch):
    from mlflow.entities import Metric, Param

    monkeypatch.setattr(load_module, "SEARCH_PAGE", 2)
    exp_id = mlflow_client.create_experiment("paged")
    parent = mlflow_client.create_run(exp_id, tags={"toolkit.role": "search", "toolkit.objective": "val_loss"}).info.run_id
    for trial_id in range(5):
        run_id = mlflow_client.create_run(
            exp_id, tags={"mlflow.parentRunId": parent, "toolkit.role": "trial", "toolkit.trial_id": str(trial_id)}
        ).info.run_id
        metrics = [Metric("val_loss", 1.0 / (trial_id + 1) + step, 0, step) for step in range(2)]
        mlflow_client.log_batch(run_id, metrics=metrics, params=[Param("units", str(8 * (trial_id + 1)))])
        mlflow_client.set_terminated(run_id)
    data = analysis.load_search(parent, store)
    assert list(data.table["trial_id"]) == ["0", "1", "2", "3", "4"]
    assert list(data.table["units"]) == [8, 16, 24, 32, 40]
    assert data.table["objective"].tolist() == pytest.approx([1.0, 0.5, 1 / 3, 0.25, 0.2])
