"""The data types every source resolves to: :class:`Dataset`, the task names and the two errors.

A source loader returns :data:`Loaded` (arrays, task, class and feature names);
:func:`toolkit.data.load_dataset` splits it into a :class:`Dataset`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from toolkit.config import ConfigError

CLASSIFICATION, REGRESSION = "classification", "regression"

# A source loader returns (x, y, task, class_names, feature_names).
Loaded = tuple[np.ndarray, np.ndarray, str, "list[str] | None", "list[str] | None"]


class DataError(ConfigError):
    """Bad data: a missing file or column, non-numeric features, NaNs, impossible splits (exit 2)."""


class DatasetUnavailable(RuntimeError):
    """A downloadable dataset that cannot be fetched (offline, no cached copy): exit 1."""


@dataclass
class Dataset:
    """A resolved data source: numpy splits plus what the model needs to know.

    Args:
        name: A short name for MLflow's dataset tracking (the source name or the file's stem).
        source: The built-in source name, or the resolved path of a user file.
        task: ``"classification"`` or ``"regression"``.
        x_train: Training features.
        y_train: Training labels (int64 class indices) or targets (float32).
        x_val: Validation features.
        y_val: Validation labels or targets.
        x_test: Held-out test features, when ``test_split > 0``. Defaults to None.
        y_test: Held-out test labels or targets. Defaults to None.
        class_names: For classification, the original label of each class index.
        feature_names: Column names, for tabular sources that have them.
        extra: Anything else a source wants to pass along.
    """

    name: str
    source: str
    task: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    class_names: list[str] | None = None
    feature_names: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one sample."""
        return tuple(self.x_train.shape[1:])

    @property
    def is_image(self) -> bool:
        """Whether each sample is an image: (H, W, C), or (H, W) for one channel."""
        return self.x_train.ndim in (3, 4) and min(self.x_train.shape[1:3]) > 1

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """One sample as (H, W, C): a channel axis is added for (H, W) samples.

        Raises:
            ValueError: For data that is not image-shaped.
        """
        if not self.is_image:
            raise ValueError(f"{self.name}: samples of shape {self.input_shape} are not images (H, W, C)")
        shape = self.input_shape
        return (shape[0], shape[1], shape[2] if len(shape) == 3 else 1)

    def channel_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and variance of the **training** pixels, for an image model's first layer.

        Returns:
            ``(mean, variance)``, each of shape ``(C,)``.
        """
        channels = self.image_shape[2]
        flat = self.x_train.reshape(-1, channels)
        mean = flat.mean(axis=0, dtype="float64")
        variance = np.zeros_like(mean)
        for i in range(0, len(flat), 1 << 20):  # chunks: no float64 copy of a large image set
            variance += np.square(flat[i : i + (1 << 20)].astype("float64") - mean).sum(axis=0)
        return mean, variance / len(flat)

    @property
    def n_classes(self) -> int:
        """The number of classes (0 for regression)."""
        if self.task != CLASSIFICATION:
            return 0
        if self.class_names:
            return len(self.class_names)
        labels = [y for y in (self.y_train, self.y_val, self.y_test) if y is not None and len(y)]
        return int(max(y.max() for y in labels)) + 1

    @property
    def sizes(self) -> dict[str, int]:
        """Samples per split."""
        return {"train": len(self.x_train), "validation": len(self.x_val), "test": 0 if self.x_test is None else len(self.x_test)}

    @cached_property
    def digest(self) -> str:
        """A short content hash of all splits, for MLflow's dataset tracking.

        Cached: it is asked for on every trial, and hashing a few hundred MB each time would cost
        a noticeable share of a small trial.
        """
        h = hashlib.sha256()
        for arr in (self.x_train, self.y_train, self.x_val, self.y_val, self.x_test, self.y_test):
            if arr is not None:
                h.update(str(arr.shape).encode())
                h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:16]

    def feature_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature mean and variance of the **training** split only, so nothing leaks.

        Two passes in float64 over chunks of rows: exact like ``np.var`` (no E[x²]-E[x]²
        cancellation) without a float64 copy of a large image set.

        Returns:
            ``(mean, variance)``, each of shape ``(n_features,)`` over the flattened sample.
        """
        flat = self.x_train.reshape(len(self.x_train), -1)
        n, chunk = len(flat), 8192
        total = np.zeros(flat.shape[1], dtype="float64")
        for i in range(0, n, chunk):
            total += flat[i : i + chunk].sum(axis=0, dtype="float64")
        mean = total / n
        squares = np.zeros_like(mean)
        for i in range(0, n, chunk):
            squares += np.square(flat[i : i + chunk].astype("float64") - mean).sum(axis=0)
        return mean, squares / n

    def target_stats(self) -> tuple[float, float]:
        """Mean and standard deviation of the **training** targets (regression).

        For a model that predicts standardized targets and rescales them in its last layer, so a
        target in the hundreds trains as fast as one near zero.
        """
        if self.task != REGRESSION:
            raise ValueError(f"target statistics are for regression; this dataset is {self.task}")
        y = self.y_train.astype("float64")
        return float(y.mean()), float(max(y.std(), 1e-12))
