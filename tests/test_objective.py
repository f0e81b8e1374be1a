"""One rule for "is this metric better": the card's TF-free rule agrees with KerasTuner's."""

from __future__ import annotations

import pytest

from toolkit.config import objective_direction

# Every metric a task produces (toolkit.tuner.task_metrics), with and without val_.
TASK_METRICS = ["loss", "accuracy", "mae"]
# Keras metric and loss names KerasTuner's infer_metric_direction places.
KERAS_NAMES = [
    "acc",
    "binary_accuracy",
    "categorical_accuracy",
    "sparse_categorical_accuracy",
    "top_k_categorical_accuracy",
    "auc",
    "precision",
    "recall",
    "mse",
    "mean_squared_error",
    "mean_absolute_error",
    "mean_absolute_percentage_error",
    "mean_squared_logarithmic_error",
    "root_mean_squared_error",
    "binary_crossentropy",
    "categorical_crossentropy",
    "sparse_categorical_crossentropy",
    "hinge",
    "poisson",
    "kl_divergence",
    "huber",
    "false_positives",
]


@pytest.mark.parametrize("name", [p + m for m in TASK_METRICS + KERAS_NAMES for p in ("", "val_")])
def test_direction_agrees_with_kerastuner(name):
    from keras_tuner.src.engine.metrics_tracking import infer_metric_direction

    expected = infer_metric_direction(name)
    assert expected is not None, f"KerasTuner cannot place {name}; the list is wrong"
    assert objective_direction(name) == expected


def test_every_task_objective_is_checked():
    from toolkit.tuner import task_metrics

    produced = {m.removeprefix("val_") for task in ("classification", "regression") for m in task_metrics(task)}
    assert produced <= set(TASK_METRICS), f"a task produces a metric this test does not check: {produced - set(TASK_METRICS)}"


def test_val_mae_is_minimized():
    # A regression search with tuner.objective: val_mae and no direction once crowned the worst trial.
    assert objective_direction("val_mae") == "min"
    assert objective_direction("val_accuracy") == "max"
    # A name no rule places is maximized; the card's tuner.direction says otherwise.
    assert objective_direction("val_my_score") == "max"
