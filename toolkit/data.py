"""The dataset registry: shipped, synthetic, Keras and user-file sources → seeded splits and tf.data.

Every source resolves to a :class:`Dataset` of numpy splits (train, validation and an optional
held-out test split) with its task and input shape. :func:`make_pipeline` turns a split into a
cached, shuffled, batched and prefetched ``tf.data.Dataset``. This module knows nothing of
tracking; TensorFlow is imported only where a pipeline or a Keras download needs it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from toolkit.config import (
    KERAS_DATASETS,
    SHIPPED_DATASETS,
    SYNTHETIC_DATASETS,
    ConfigError,
    DataConfig,
)


class DataError(ConfigError):
    """Bad data: a missing file or column, non-numeric features, NaNs, impossible splits (exit 2)."""


class DatasetUnavailable(RuntimeError):
    """A downloadable dataset that cannot be fetched (offline, no cached copy): exit 1."""


@dataclass
class Dataset:
    """A resolved data source: numpy splits plus what the model needs to know."""

    name: str
    source: str
    task: str  # "classification" or "regression"
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
        return tuple(self.x_train.shape[1:])

    @property
    def n_classes(self) -> int:
        if self.task != "classification":
            return 0
        if self.class_names:
            return len(self.class_names)
        return int(max(self.y_train.max(), self.y_val.max())) + 1

    @property
    def digest(self) -> str:
        """A short content hash of all splits, for MLflow's dataset tracking."""
        h = hashlib.sha256()
        for arr in (self.x_train, self.y_train, self.x_val, self.y_val, self.x_test, self.y_test):
            if arr is not None:
                h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:16]

    def feature_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature mean and variance of the **training** split only (no leakage)."""
        flat = self.x_train.reshape(len(self.x_train), -1).astype("float64")
        return flat.mean(axis=0), flat.var(axis=0)


# ---------------------------------------------------------------------------- sources


def _sklearn(name: str) -> Callable[[DataConfig, int], tuple[np.ndarray, np.ndarray, str, list[str] | None]]:
    def load(cfg: DataConfig, seed: int):
        from sklearn import datasets

        bunch = getattr(datasets, f"load_{name}")()
        names = [str(n) for n in bunch.target_names]
        return bunch.data.astype("float32"), bunch.target.astype("int64"), "classification", names

    return load


def _spirals(cfg: DataConfig, seed: int):
    rng = np.random.default_rng(seed)
    n = cfg.n_samples or 1000
    k = cfg.n_classes or 2
    noise = 0.2 if cfg.noise is None else cfg.noise
    per = n // k
    xs, ys = [], []
    for c in range(k):
        r = np.linspace(0.05, 1.0, per)
        t = np.linspace(c * 2 * np.pi / k, c * 2 * np.pi / k + 3 * np.pi, per) + rng.normal(0, noise, per)
        xs.append(np.stack([r * np.sin(t), r * np.cos(t)], axis=1))
        ys.append(np.full(per, c))
    return np.concatenate(xs).astype("float32"), np.concatenate(ys).astype("int64"), "classification", None


def _xor(cfg: DataConfig, seed: int):
    rng = np.random.default_rng(seed)
    n = cfg.n_samples or 1000
    noise = 0.1 if cfg.noise is None else cfg.noise
    x = rng.uniform(-1, 1, size=(n, 2))
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).astype("int64")
    x = x + rng.normal(0, noise, size=x.shape)
    return x.astype("float32"), y, "classification", None


def _moons(cfg: DataConfig, seed: int):
    from sklearn.datasets import make_moons

    x, y = make_moons(cfg.n_samples or 1000, noise=0.2 if cfg.noise is None else cfg.noise, random_state=seed)
    return x.astype("float32"), y.astype("int64"), "classification", None


def _circles(cfg: DataConfig, seed: int):
    from sklearn.datasets import make_circles

    noise = 0.1 if cfg.noise is None else cfg.noise
    x, y = make_circles(cfg.n_samples or 1000, noise=noise, factor=0.5, random_state=seed)
    return x.astype("float32"), y.astype("int64"), "classification", None


def _friedman(cfg: DataConfig, seed: int):
    from sklearn.datasets import make_friedman1

    noise = 1.0 if cfg.noise is None else cfg.noise
    x, y = make_friedman1(cfg.n_samples or 1000, n_features=cfg.n_features or 10, noise=noise, random_state=seed)
    return x.astype("float32"), y.astype("float32"), "regression", None


def keras_cache_dir() -> Path:
    """Where Keras caches downloads: ``$KERAS_HOME/datasets`` or ``~/.keras/datasets``."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "datasets"


_KERAS_FILES = {"mnist": "mnist.npz", "fashion_mnist": "fashion-mnist", "cifar10": "cifar-10-batches-py"}


def _keras(name: str):
    def load(cfg: DataConfig, seed: int):
        import keras

        loader = getattr(keras.datasets, name)
        cache = keras_cache_dir()
        try:
            (x_train, y_train), (x_test, y_test) = loader.load_data()
        except Exception as exc:  # urllib, socket and HTTP errors all mean "could not fetch"
            raise DatasetUnavailable(
                f"dataset {name!r} is not cached in {cache} and could not be downloaded "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}). "
                f"Connect to the internet once, or place the files in {cache} (KERAS_HOME is honoured)."
            ) from None
        x = np.concatenate([x_train, x_test]).astype("float32") / 255.0
        y = np.concatenate([y_train, y_test]).reshape(-1).astype("int64")
        return x, y, "classification", None

    return load


BUILTIN: dict[str, Callable[[DataConfig, int], tuple]] = {
    **{name: _sklearn(name) for name in SHIPPED_DATASETS},
    "spirals": _spirals,
    "moons": _moons,
    "circles": _circles,
    "xor": _xor,
    "friedman": _friedman,
    **{name: _keras(name) for name in KERAS_DATASETS},
}
assert set(BUILTIN) == set(SHIPPED_DATASETS + SYNTHETIC_DATASETS + KERAS_DATASETS)


# ---------------------------------------------------------------------------- user files


def _read_table(path: Path, cfg: DataConfig):
    import pandas as pd

    try:
        frame = pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_parquet(path)
    except Exception as exc:
        raise DataError(f"{path}: cannot read the file ({type(exc).__name__}: {str(exc).splitlines()[0]})", field="data.source") from None
    if cfg.target is None:
        raise DataError(
            f"{path}: data.target must name the label column. Columns: {', '.join(map(str, frame.columns))}",
            field="data.target",
        )
    if cfg.target not in frame.columns:
        raise DataError(
            f"{path}: data.target column {cfg.target!r} not found. Columns: {', '.join(map(str, frame.columns))}",
            field="data.target",
        )
    features = cfg.features or [c for c in frame.columns if c != cfg.target]
    missing = [c for c in features if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: data.features column {missing[0]!r} not found. Columns: {', '.join(map(str, frame.columns))}", field="data.features")
    if not features:
        raise DataError(f"{path}: no feature columns besides the target {cfg.target!r}", field="data.features")
    x_frame = frame[features]
    non_numeric = [c for c in features if not pd.api.types.is_numeric_dtype(x_frame[c])]
    if non_numeric:
        sample = x_frame[non_numeric[0]].dropna().astype(str).head(1).tolist()
        raise DataError(
            f"{path}: feature column {non_numeric[0]!r} is not numeric (e.g. {sample[0]!r}). "
            "Encode it as numbers, or leave it out with data.features",
            field="data.features",
        )
    nan_cols = [c for c in list(features) + [cfg.target] if frame[c].isna().any()]
    if nan_cols:
        rows = int(frame[nan_cols[0]].isna().sum())
        raise DataError(f"{path}: column {nan_cols[0]!r} has {rows} missing (NaN) value(s); fill or drop them first", field="data.source")
    x = x_frame.to_numpy(dtype="float32")
    y_col = frame[cfg.target]
    task = cfg.task or ("regression" if pd.api.types.is_float_dtype(y_col) else "classification")
    class_names = None
    if task == "classification":
        codes, uniques = pd.factorize(y_col, sort=True)
        y = codes.astype("int64")
        class_names = [str(u) for u in uniques]
    else:
        if not pd.api.types.is_numeric_dtype(y_col):
            raise DataError(f"{path}: regression target {cfg.target!r} is not numeric", field="data.target")
        y = y_col.to_numpy(dtype="float32")
    return x, y, task, class_names, list(map(str, features))


def _read_npz(path: Path, cfg: DataConfig):
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            if "x" not in keys or "y" not in keys:
                raise DataError(f"{path}: an .npz source needs arrays 'x' and 'y'. Found: {', '.join(keys) or 'none'}", field="data.source")
            x, y = archive["x"], archive["y"]
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot read the file ({type(exc).__name__}: {str(exc).splitlines()[0]})", field="data.source") from None
    if len(x) != len(y):
        raise DataError(f"{path}: x has {len(x)} rows but y has {len(y)}", field="data.source")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{path}: array 'x' is not numeric (dtype {x.dtype})", field="data.source")
    if np.isnan(x.astype("float64")).any():
        raise DataError(f"{path}: array 'x' has missing (NaN) values", field="data.source")
    task = cfg.task or ("regression" if np.issubdtype(y.dtype, np.floating) else "classification")
    class_names = None
    if task == "classification":
        uniques, codes = np.unique(y, return_inverse=True)
        y = codes.astype("int64")
        class_names = [str(u) for u in uniques]
    else:
        y = y.astype("float32")
    return x.astype("float32"), y, task, class_names, None


# ---------------------------------------------------------------------------- splitting


def _split(x, y, task: str, cfg: DataConfig, seed: int, where: str):
    from sklearn.model_selection import train_test_split

    n = len(x)
    stratify = task == "classification"
    if stratify:
        counts = np.bincount(y)
        present = counts[counts > 0]
        smallest = int(present.min())
        needed = 2 if cfg.test_split == 0 else 3
        if smallest < needed:
            cls = int(np.flatnonzero(counts == smallest)[0])
            raise DataError(
                f"{where}: class {cls} has only {smallest} sample(s); stratified splitting needs at "
                f"least {needed} per class (one for each split)",
                field="data.target",
            )
    n_test = int(round(n * cfg.test_split))
    n_val = int(round(n * cfg.validation_split))
    if n - n_val - n_test < 1 or n_val < 1 or (cfg.test_split > 0 and n_test < 1):
        raise DataError(
            f"{where}: {n} sample(s) with validation_split={cfg.validation_split:g} and "
            f"test_split={cfg.test_split:g} leave an empty split",
            field="data.validation_split",
        )
    if stratify:
        n_classes = len(np.unique(y))
        for label, size in (("validation", n_val), ("test", n_test)):
            if (label == "validation" or n_test) and size < n_classes:
                raise DataError(
                    f"{where}: the {label} split would hold {size} sample(s), fewer than the {n_classes} "
                    "classes, so it cannot be stratified; use more data or a larger split",
                    field=f"data.{label}_split",
                )
    x_test = y_test = None
    try:
        if n_test:
            x, x_test, y, y_test = train_test_split(x, y, test_size=n_test, random_state=seed, stratify=y if stratify else None)
        x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=n_val, random_state=seed, stratify=y if stratify else None)
    except ValueError as exc:
        raise DataError(f"{where}: cannot split the data: {exc}", field="data.validation_split") from None
    return x_train, y_train, x_val, y_val, x_test, y_test


def load_dataset(cfg: DataConfig, seed: int = 42) -> Dataset:
    """Resolve a card's data section into seeded, stratified numpy splits.

    Args:
        cfg: The card's ``data`` section.
        seed: The split and generation seed. Defaults to 42.

    Returns:
        The splits with task, class names and feature names.

    Raises:
        DataError: For bad user data (exit 2).
        DatasetUnavailable: When a Keras dataset cannot be downloaded (exit 1).
    """
    feature_names = None
    if cfg.source in BUILTIN:
        name, source = cfg.source, cfg.source
        x, y, task, class_names = BUILTIN[cfg.source](cfg, seed)
        if cfg.task and cfg.task != task:
            raise DataError(f"data.task: {cfg.source!r} is a {task} dataset. Received: {cfg.task!r}", field="data.task")
    else:
        path = Path(cfg.source).expanduser()
        if not path.is_file():
            raise DataError(f"data.source: file not found: {cfg.source!r} (resolved to {path.resolve()})", field="data.source")
        name, source = path.stem, str(path.resolve())
        if path.suffix.lower() == ".npz":
            x, y, task, class_names, feature_names = _read_npz(path, cfg)
        else:
            x, y, task, class_names, feature_names = _read_table(path, cfg)
    if len(x) == 0:
        raise DataError(f"{source}: the data has no rows", field="data.source")
    splits = _split(x, y, task, cfg, seed, where=source)
    return Dataset(name, source, task, *splits, class_names=class_names, feature_names=feature_names)


def make_pipeline(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
):
    """A cached, seeded-shuffle, batched, prefetched ``tf.data.Dataset`` for one split.

    Args:
        x: Features.
        y: Labels or targets.
        batch_size: The global batch; a strategy splits it across replicas.
        seed: The shuffle seed.
        shuffle: Whether to reshuffle each epoch. Defaults to True.

    Returns:
        The pipeline.
    """
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y)).cache()
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def describe_sources() -> list[dict[str, Any]]:
    """Every registered source with its size and task, for ``toolkit datasets``."""
    rows = []
    for name in SHIPPED_DATASETS + SYNTHETIC_DATASETS:
        x, y, task, names = BUILTIN[name](DataConfig(source=name), 0)
        rows.append({"name": name, "kind": "shipped" if name in SHIPPED_DATASETS else "synthetic", "samples": len(x), "features": int(np.prod(x.shape[1:])), "task": task, "classes": len(names) if names else (len(np.unique(y)) if task == "classification" else 0)})
    sizes = {"mnist": (70000, 784, 10), "fashion_mnist": (70000, 784, 10), "cifar10": (60000, 3072, 10)}
    for name in KERAS_DATASETS:
        n, f, c = sizes[name]
        rows.append({"name": name, "kind": "keras (download)", "samples": n, "features": f, "task": "classification", "classes": c})
    return rows
