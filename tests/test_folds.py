"""train.folds: k stratified folds of the train and validation rows, each trial scored by the mean over folds.

Real KerasTuner and MLflow in tmp_path; the per-fold values are read back from MLflow and the
summaries checked against them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import shrunk
from scipy import stats

from toolkit import analysis
from toolkit.config import ConfigError, load_config
from toolkit.data import load_dataset
from toolkit.data.folds import fold_indices, fold_statistics, joined
from toolkit.tuner import project_dir, run_search

K = 3
FOLDED = [
    "data.source=iris",
    "data.test_split=0.2",
    f"train.folds={K}",
    "tuner.algorithm=grid",
    "tuner.max_trials=2",
    "train.epochs=2",
    "space.depth=1",
    "space.units=16",
    "space.activation=[relu, tanh]",
    "space.optimizer=adam",
    "space.learning_rate=0.05",
    "space.l1=0",
    "space.l2=0",
    "space.dropout=0",
    "train.diagnostics=false",
    "tracking.report=false",
    "tracking.log_model=false",
    "tracking.register_model=false",
]


def test_every_row_is_validated_once_the_folds_are_stratified_and_seeded():
    cfg = shrunk("quickstart", "data.source=iris", "data.test_split=0.2")
    dataset = load_dataset(cfg.data, cfg.seed)
    _, y = joined(dataset)
    folds = fold_indices(dataset, K, cfg.seed)
    validated = np.concatenate([va for _, va in folds])
    assert sorted(validated.tolist()) == list(range(len(y)))  # each row once; the test rows are not among them
    assert len(y) == len(dataset.y_train) + len(dataset.y_val) and len(dataset.y_test) > 0
    for train, val in folds:
        assert not set(train) & set(val) and len(train) + len(val) == len(y)
        shares = np.bincount(y[val], minlength=3) / len(val)
        assert np.allclose(shares, np.bincount(y, minlength=3) / len(y), atol=0.05)
    again = fold_indices(dataset, K, cfg.seed)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again, strict=True))
    other = fold_indices(dataset, K, cfg.seed + 1)
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(folds, other, strict=True))


def test_the_interval_is_students_t_over_folds():
    values = [0.8, 0.9, 0.85, 0.7]
    got = fold_statistics(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert got["mean"] == pytest.approx(np.mean(values)) and got["std"] == pytest.approx(np.std(values, ddof=1))
    assert (got["ci_low"], got["ci_high"]) == (pytest.approx(low), pytest.approx(high))


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["train.folds=1"], "greater than or equal to 2"),
        (["train.folds=3", "tuner.algorithm=hyperband"], "does not go with hyperband"),
        (["train.folds=3", "tuner.pruning={rule: median}"], "does not go with tuner.pruning"),
    ],
)
def test_folds_refuse_what_they_cannot_share(overrides, words):
    with pytest.raises(ConfigError, match=words):
        load_config("quickstart", overrides)


def test_too_few_rows_for_the_folds_is_a_card_error_before_any_run(store, mlflow_client):
    cfg = shrunk("quickstart", "data.source=spirals", "data.n_samples=30", "train.folds=20")
    with pytest.raises(ConfigError, match="20 folds need at least 40 rows; the data has 30") as info:
        run_search(cfg)
    assert info.value.field == "train.folds"
    assert mlflow_client.search_experiments(filter_string="name = 'quickstart'") == []


def test_a_folded_trial_logs_each_fold_and_is_scored_by_their_mean(store, mlflow_client, tmp_path):
    cfg = shrunk("quickstart", *FOLDED)
    result = run_search(cfg)
    assert [t.status for t in result.trials] == ["FINISHED", "FINISHED"]
    parent = mlflow_client.get_run(result.parent_run_id)
    folds = json.loads(Path(mlflow_client.download_artifacts(parent.info.run_id, "folds.json", str(tmp_path))).read_text())
    rows = sorted(r for fold in folds["validation_rows"] for r in fold)
    assert folds["folds"] == K and rows == list(range(len(rows)))  # every row validated once per trial
    for trial in result.trials:
        run = mlflow_client.get_run(trial.run_id)
        metrics = run.data.metrics

        def history(key, run_id=trial.run_id):
            return [(m.step, m.value) for m in sorted(mlflow_client.get_metric_history(run_id, key), key=lambda m: m.step)]

        per_fold = [history(f"fold_{i}/val_accuracy") for i in range(K)]
        assert all([s for s, _ in h] == [0, 1] for h in per_fold)  # each fold's epochs, logged once
        mean_curve = history("val_accuracy")
        assert [s for s, _ in mean_curve] == [0, 1]
        for step, value in mean_curve:
            assert value == pytest.approx(np.mean([h[step][1] for h in per_fold]))
        best = int(metrics["best_epoch"])
        at_best = [h[best][1] for h in per_fold]
        assert [metrics[f"fold_{i}/best_val_accuracy"] for i in range(K)] == pytest.approx(at_best)
        assert metrics["best_val_accuracy"] == pytest.approx(np.mean(at_best))
        assert metrics["val_accuracy_std"] == pytest.approx(np.std(at_best, ddof=1))
        assert metrics["val_accuracy_ci_low"] <= metrics["best_val_accuracy"] <= metrics["val_accuracy_ci_high"]
        # The oracle heard the same mean.
        record = json.loads((project_dir(store, cfg) / f"trial_{trial.trial_id}" / "trial.json").read_text())
        assert record["score"] == pytest.approx(metrics["best_val_accuracy"])
    data = analysis.load_search(result.parent_run_id)
    (activation,) = analysis.choice_findings(data)
    assert "95% CI of" in activation and f"over {K} folds, paired" in activation
    (best,) = analysis.best_trial_finding(data)
    assert f"(mean over {K} folds, std" in best
