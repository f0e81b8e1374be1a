"""k-fold cross-validation splits (``train.folds``): the train and validation splits joined, seeded."""

from __future__ import annotations

from typing import Any

import numpy as np

from toolkit.config import ConfigError


def joined(dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    """The training and validation rows as one set, training rows first. The test split stays out."""
    return np.concatenate([dataset.x_train, dataset.x_val]), np.concatenate([dataset.y_train, dataset.y_val])


def fold_indices(dataset: Any, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` (train, validation) index pairs over :func:`joined`: every row validated exactly once.

    Classification folds are stratified (scikit-learn's ``StratifiedKFold``), so each keeps the
    class shares; regression folds are plain ``KFold``. Both shuffle with ``seed``, so every
    worker of a search and every resume cuts the same folds.

    Raises:
        ConfigError: When a fold would have no rows, or a class has fewer rows than folds.
    """
    from sklearn.model_selection import KFold, StratifiedKFold

    _, y = joined(dataset)
    if len(y) < 2 * k:
        raise ConfigError(f"train.folds: {k} folds need at least {2 * k} rows; the data has {len(y)}", field="train.folds")
    if dataset.task == "classification":
        _, counts = np.unique(y, return_counts=True)
        if counts.min() < k:
            raise ConfigError(
                f"train.folds: {k} stratified folds need at least {k} rows of every class; the rarest has {counts.min()}. "
                "Use fewer folds",
                field="train.folds",
            )
        splitter: Any = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    else:
        splitter = KFold(n_splits=k, shuffle=True, random_state=seed)
    return [(train, val) for train, val in splitter.split(np.zeros(len(y)), y)]


def fold_statistics(values: list[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean, sample standard deviation and the t interval of the mean over folds.

    Args:
        values: One score per fold.
        confidence: The interval's level. Defaults to 0.95.

    Returns:
        ``{"mean", "std", "ci_low", "ci_high"}``.
    """
    from scipy import stats

    data = np.asarray(values, dtype="float64")
    mean = float(np.mean(data))
    std = float(np.std(data, ddof=1)) if len(data) > 1 else float("nan")
    half = float(stats.t.ppf(0.5 + confidence / 2, len(data) - 1) * std / np.sqrt(len(data))) if len(data) > 1 else float("nan")
    return {"mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}
