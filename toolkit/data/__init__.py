"""The dataset registry: shipped, synthetic, Keras and user-file sources → seeded splits and tf.data.

Every source resolves to a :class:`Dataset` of numpy splits (train, validation and an optional
held-out test split) with its task and input shape. :func:`make_pipeline` turns a split into a
cached, shuffled, batched and prefetched ``tf.data.Dataset``. This module knows nothing of
tracking; TensorFlow is imported only where a pipeline or a Keras download needs it, so
``toolkit datasets`` stays fast.

Sources:
    - shipped with scikit-learn: ``digits``, ``breast_cancer``, ``wine``, ``iris``;
    - generated: ``spirals``, ``moons``, ``circles``, ``xor`` (classification), ``friedman``
      (regression), taking ``n_samples``, ``noise``, and ``n_classes`` (spirals) or
      ``n_features`` (friedman);
    - Keras' downloadable sets ``mnist``, ``fashion_mnist``, ``cifar10`` (cached under
      ``$KERAS_HOME/datasets``);
    - user files: ``.csv`` and ``.parquet`` (``target`` names the label column, ``features``
      optionally selects columns) and ``.npz`` (arrays ``x`` and ``y``).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import pickle
import socket
import tempfile
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.config import (
    KERAS_DATASETS,
    SHIPPED_DATASETS,
    SYNTHETIC_DATASETS,
    ConfigError,
    DataConfig,
)

log = logging.getLogger(__name__)

CLASSIFICATION, REGRESSION = "classification", "regression"


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


# ---------------------------------------------------------------------------- built-in sources

# A built-in loader returns (x, y, task, class_names, feature_names).
Loaded = tuple[np.ndarray, np.ndarray, str, "list[str] | None", "list[str] | None"]


def _sklearn(name: str) -> Callable[[DataConfig, int], Loaded]:
    def load(cfg: DataConfig, seed: int) -> Loaded:
        from sklearn import datasets

        bunch = getattr(datasets, f"load_{name}")()
        names = [str(n) for n in bunch.target_names]
        features = [str(f) for f in getattr(bunch, "feature_names", [])] or None
        return bunch.data.astype("float32"), bunch.target.astype("int64"), CLASSIFICATION, names, features

    return load


def _spirals(cfg: DataConfig, seed: int) -> Loaded:
    """Interleaved spirals: no linear (or linear-activation) model separates them."""
    rng = np.random.default_rng(seed)
    n = cfg.n_samples or 1000
    k = cfg.n_classes or 2
    noise = 0.2 if cfg.noise is None else cfg.noise
    # Spread the remainder so that exactly n samples come out.
    per_class = [n // k + (1 if c < n % k else 0) for c in range(k)]
    xs, ys = [], []
    for c, per in enumerate(per_class):
        r = np.linspace(0.05, 1.0, per)
        start = c * 2 * np.pi / k
        t = np.linspace(start, start + 3 * np.pi, per) + rng.normal(0, noise, per)
        xs.append(np.stack([r * np.sin(t), r * np.cos(t)], axis=1))
        ys.append(np.full(per, c))
    return np.concatenate(xs).astype("float32"), np.concatenate(ys).astype("int64"), CLASSIFICATION, None, ["x1", "x2"]


def _xor(cfg: DataConfig, seed: int) -> Loaded:
    """Quadrant XOR: the textbook problem a network without non-linearities cannot fit."""
    rng = np.random.default_rng(seed)
    n = cfg.n_samples or 1000
    noise = 0.1 if cfg.noise is None else cfg.noise
    x = rng.uniform(-1, 1, size=(n, 2))
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).astype("int64")
    x = x + rng.normal(0, noise, size=x.shape)
    return x.astype("float32"), y, CLASSIFICATION, None, ["x1", "x2"]


def _moons(cfg: DataConfig, seed: int) -> Loaded:
    from sklearn.datasets import make_moons

    x, y = make_moons(cfg.n_samples or 1000, noise=0.2 if cfg.noise is None else cfg.noise, random_state=seed)
    return x.astype("float32"), y.astype("int64"), CLASSIFICATION, None, ["x1", "x2"]


def _circles(cfg: DataConfig, seed: int) -> Loaded:
    from sklearn.datasets import make_circles

    noise = 0.1 if cfg.noise is None else cfg.noise
    x, y = make_circles(cfg.n_samples or 1000, noise=noise, factor=0.5, random_state=seed)
    return x.astype("float32"), y.astype("int64"), CLASSIFICATION, None, ["x1", "x2"]


def _friedman(cfg: DataConfig, seed: int) -> Loaded:
    """Friedman #1 regression: y depends non-linearly on the first five features only."""
    from sklearn.datasets import make_friedman1

    noise = 1.0 if cfg.noise is None else cfg.noise
    n_features = cfg.n_features or 10
    if n_features < 5:
        raise DataError(f"data.n_features: friedman needs at least 5 features. Received: {n_features}", field="data.n_features")
    x, y = make_friedman1(cfg.n_samples or 1000, n_features=n_features, noise=noise, random_state=seed)
    return x.astype("float32"), y.astype("float32"), REGRESSION, None, [f"x{i + 1}" for i in range(n_features)]


# ---------------------------------------------------------------------------- Keras downloads


@dataclass(frozen=True)
class _KerasSet:
    """Where a Keras dataset lives online and in the cache (mirrors ``keras.datasets``)."""

    files: tuple[str, ...]  # names under origin and under the cache subdirectory
    origin: str  # base URL
    subdir: str  # under the cache folder
    size: str  # shown to the user before a download
    samples: int
    features: int
    sha256: str | None = None  # of the single file, when Keras pins one
    extract: bool = False


_TF_KERAS = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
_KERAS_SETS = {
    "mnist": _KerasSet(
        files=("mnist.npz",),
        origin=_TF_KERAS,
        subdir="datasets",
        size="11 MB",
        samples=70_000,
        features=784,
        sha256="731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1",
    ),
    "fashion_mnist": _KerasSet(
        files=(
            "train-labels-idx1-ubyte.gz",
            "train-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz",
        ),
        origin=_TF_KERAS,
        subdir=os.path.join("datasets", "fashion-mnist"),
        size="30 MB",
        samples=70_000,
        features=784,
    ),
    "cifar10": _KerasSet(
        files=("cifar-10-python.tar.gz",),
        origin="https://www.cs.toronto.edu/~kriz/",
        subdir="datasets",
        size="163 MB",
        samples=60_000,
        features=3072,
        sha256="6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
        extract=True,
    ),
}
_CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# How long the pre-flight reachability check and each socket operation of a download may wait.
CONNECT_TIMEOUT_S = 5.0
DOWNLOAD_SOCKET_TIMEOUT_S = 20.0


def keras_home() -> Path:
    """Keras' cache folder, read now: ``$KERAS_HOME``, else ``~/.keras``.

    Keras itself reads ``KERAS_HOME`` once, when it is imported; reading it here on each call
    means the folder named in messages is the one actually used, and tests can point it at
    ``tmp_path``. Like Keras, fall back to ``/tmp/.keras`` when the folder is not writable.
    """
    home = Path(os.environ.get("KERAS_HOME") or Path("~/.keras").expanduser())
    probe = home
    while not probe.exists() and probe != probe.parent:  # a folder not made yet: can we make it?
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        home = Path(tempfile.gettempdir()) / ".keras"
    return home


def keras_cache_dir(name: str = "mnist") -> Path:
    """The folder that holds (or will hold) a Keras dataset's files."""
    return keras_home() / _KERAS_SETS[name].subdir


def _cifar10_dir(cache: Path) -> Path:
    """Where the extracted CIFAR-10 batches are: where tf.keras 2 put them (and so do we), or
    where Keras 3 does, so a copy that either downloaded is found."""
    candidates = (cache / "cifar-10-batches-py", cache / "cifar-10-batches-py-target" / "cifar-10-batches-py")
    return next((c for c in candidates if (c / "test_batch").is_file()), candidates[0])


def keras_cached(name: str) -> bool:
    """Whether a Keras dataset's files are already in the cache (so no network is needed)."""
    spec, cache = _KERAS_SETS[name], keras_cache_dir(name)
    if name == "cifar10":
        return (_cifar10_dir(cache) / "test_batch").is_file()
    return all((cache / f).is_file() for f in spec.files)


def _unreachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why ``url``'s host cannot be reached within ``timeout`` seconds, or None if it can.

    Offline, ``urlretrieve`` can wait on DNS or on a TCP connect for minutes, and it has no
    timeout argument. ``getaddrinfo`` cannot be given a timeout either, so the check runs in a
    daemon thread that is abandoned if it takes too long.
    """
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(None)
        except OSError as exc:
            outcome.append(f"cannot reach {host}: {exc.strerror or exc}")

    thread = threading.Thread(target=probe, name="toolkit-reachability", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return outcome[0] if outcome else f"no answer from {host} within {timeout:g} s"


def _uses_proxy() -> bool:
    # Behind a proxy a direct connection may fail although urllib, which honours the proxy,
    # would succeed; then skip the pre-flight check and rely on the socket timeout.
    return any(os.environ.get(v) for v in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"))


def _download(name: str) -> None:
    """Fetch a Keras dataset's files into the cache, failing fast and clearly when offline."""
    spec, cache = _KERAS_SETS[name], keras_cache_dir(name)
    hint = (
        f"Connect to the internet once to download it ({spec.size}), or copy "
        f"{', '.join(spec.files)} into {cache} (KERAS_HOME sets the cache folder)."
    )
    # A copied-in archive (CIFAR-10) only needs extracting; check the network only for a download.
    missing = [f for f in spec.files if not (cache / f).is_file()]
    reason = None if not missing or _uses_proxy() else _unreachable(spec.origin)
    if reason:
        raise DatasetUnavailable(f"dataset {name!r} is not cached in {cache} and cannot be downloaded ({reason}). {hint}")
    import keras

    if missing:
        log.info("downloading %s (%s) into %s", name, spec.size, cache)
    # Keras' get_file falls back to /tmp/.keras when the folder does not exist yet.
    cache.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    # urlretrieve has no timeout argument: a stalled connection would otherwise hang forever.
    socket.setdefaulttimeout(DOWNLOAD_SOCKET_TIMEOUT_S)
    try:
        for fname in spec.files:
            keras.utils.get_file(
                fname,
                origin=spec.origin + fname,
                file_hash=spec.sha256,
                cache_dir=str(keras_home()),
                cache_subdir=spec.subdir,
                extract=spec.extract,
            )
    except Exception as exc:  # urllib, socket, HTTP and hash errors all mean "could not fetch"
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatasetUnavailable(
            f"dataset {name!r} is not cached in {cache} and could not be downloaded ({detail}). {hint}"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    if name == "cifar10" and not keras_cached(name):
        # get_file extracts into "<archive stem>_extracted"; move the batches to where we look.
        extracted = next(cache.glob("cifar-10-python*extracted*/cifar-10-batches-py"), None)
        if extracted is not None:
            extracted.rename(_cifar10_dir(cache))


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else (CIFAR batches are pickles): no code runs."""

    _ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")


def _read_keras(name: str, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a cached Keras dataset: all of train and test, as uint8 images and int labels."""
    if name == "mnist":
        with np.load(cache / "mnist.npz", allow_pickle=False) as f:
            return np.concatenate([f["x_train"], f["x_test"]]), np.concatenate([f["y_train"], f["y_test"]])
    if name == "fashion_mnist":
        parts = []
        for fname, offset in zip(_KERAS_SETS[name].files, (8, 16, 8, 16), strict=True):
            with gzip.open(cache / fname, "rb") as f:
                parts.append(np.frombuffer(f.read(), np.uint8, offset=offset))
        y_train, x_train, y_test, x_test = parts
        return np.concatenate([x_train, x_test]).reshape(-1, 28, 28), np.concatenate([y_train, y_test])
    xs, ys = [], []
    for batch in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(_cifar10_dir(cache) / batch, "rb") as f:
            d = _ArraysOnly(f, encoding="bytes").load()
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(d[b"labels"]))
    return np.concatenate(xs), np.concatenate(ys)


def _keras(name: str) -> Callable[[DataConfig, int], Loaded]:
    def load(cfg: DataConfig, seed: int) -> Loaded:
        if not keras_cached(name):
            _download(name)
        cache = keras_cache_dir(name)
        try:
            x, y = _read_keras(name, cache)
        except Exception as exc:
            raise DatasetUnavailable(
                f"dataset {name!r}: the cached copy in {cache} cannot be read ({type(exc).__name__}: {exc}). "
                "Delete it to download it again."
            ) from None
        # Scaled to [0, 1] for readability; the model's Normalization layer standardizes anyway.
        x = x.astype("float32")
        x /= 255.0  # in place: CIFAR-10 as float32 is 700 MB already
        y = y.reshape(-1).astype("int64")
        names = {"cifar10": _CIFAR10_NAMES, "fashion_mnist": _FASHION_NAMES}.get(name) or [str(i) for i in range(10)]
        return x, y, CLASSIFICATION, names, None

    return load


BUILTIN: dict[str, Callable[[DataConfig, int], Loaded]] = {
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


def _columns(frame: Any) -> str:
    names = [str(c) for c in frame.columns]
    shown = ", ".join(names[:20])
    return shown + (f", ... ({len(names)} in all)" if len(names) > 20 else "")


def _read_table(path: Path, cfg: DataConfig) -> Loaded:
    """A CSV or Parquet table: ``target`` names the label column, ``features`` selects columns."""
    import pandas as pd

    try:
        frame = pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_parquet(path)
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "no detail"
        raise DataError(f"{path}: cannot read the file ({type(exc).__name__}: {detail})", field="data.source") from None
    if cfg.target is None:
        raise DataError(f"{path}: data.target must name the label column. Columns: {_columns(frame)}", field="data.target")
    if cfg.target not in frame.columns:
        raise DataError(f"{path}: data.target column {cfg.target!r} not found. Columns: {_columns(frame)}", field="data.target")
    if cfg.features is not None:
        if not cfg.features:
            raise DataError(
                f"{path}: data.features is an empty list; name at least one column, or leave it out to use all",
                field="data.features",
            )
        missing = [c for c in cfg.features if c not in frame.columns]
        if missing:
            raise DataError(
                f"{path}: data.features column {missing[0]!r} not found. Columns: {_columns(frame)}", field="data.features"
            )
        if cfg.target in cfg.features:
            # The label as an input would be a perfect, useless model.
            raise DataError(
                f"{path}: data.features includes the target column {cfg.target!r}; the label cannot also be an input",
                field="data.features",
            )
        if len(set(cfg.features)) != len(cfg.features):
            dup = next(c for c in cfg.features if cfg.features.count(c) > 1)
            raise DataError(f"{path}: data.features names column {dup!r} twice", field="data.features")
        features = list(cfg.features)
    else:
        # A column with no header is almost always a DataFrame index saved by `to_csv()` without
        # index=False: row numbers, which track the label whenever the file is sorted by it.
        unnamed = [c for c in frame.columns if str(c).startswith("Unnamed: ") and c != cfg.target]
        if unnamed:
            log.warning(
                "%s: column(s) without a header (%s) left out of the features; they look like a saved index. "
                "List them in data.features to use them.",
                path,
                ", ".join(map(str, unnamed)),
            )
        features = [c for c in frame.columns if c != cfg.target and c not in unnamed]
    if not features:
        raise DataError(f"{path}: no feature columns besides the target {cfg.target!r}", field="data.features")
    if frame.empty:
        raise DataError(f"{path}: the file has a header but no rows", field="data.source")
    x_frame = frame[features]
    non_numeric = [c for c in features if not pd.api.types.is_numeric_dtype(x_frame[c])]
    if non_numeric:
        sample = x_frame[non_numeric[0]].dropna().astype(str).head(1).tolist()
        more = f" (and {len(non_numeric) - 1} more: {', '.join(map(str, non_numeric[1:4]))})" if len(non_numeric) > 1 else ""
        raise DataError(
            f"{path}: feature column {str(non_numeric[0])!r} is not numeric (e.g. {sample[0] if sample else ''!r}){more}. "
            "Encode it as numbers, or leave it out with data.features",
            field="data.features",
        )
    for column in [*features, cfg.target]:
        missing_rows = frame[column].isna()
        if missing_rows.any():
            # +2: one for the header line and one because people count rows from 1.
            first = int(np.flatnonzero(missing_rows.to_numpy())[0]) + 2
            raise DataError(
                f"{path}: column {str(column)!r} has {int(missing_rows.sum())} missing (NaN) value(s), the first on line {first}; "
                "fill or drop them first",
                field="data.source",
            )
    x = x_frame.to_numpy(dtype="float32")
    if not np.isfinite(x).all():
        row, col = np.argwhere(~np.isfinite(x))[0]
        raise DataError(
            f"{path}: column {str(features[col])!r} has an infinite or too large value on line {row + 2}", field="data.source"
        )
    y, task, class_names = _target(frame[cfg.target].to_numpy(), cfg, f"{path}: target column {cfg.target!r}")
    return x, y, task, class_names, [str(c) for c in features]


def _target(values: np.ndarray, cfg: DataConfig, where: str) -> tuple[np.ndarray, str, list[str] | None]:
    """Infer the task from a target column and encode it.

    A float target means regression unless ``task:`` says otherwise; anything else (ints,
    strings, booleans) is a class label, encoded as 0..k-1 in sorted order of the labels.
    """
    is_float = np.issubdtype(values.dtype, np.floating)
    task = cfg.task or (REGRESSION if is_float else CLASSIFICATION)
    if task == REGRESSION:
        try:
            y = values.astype("float32")
        except (TypeError, ValueError):
            example = next(iter(values), "")
            raise DataError(
                f"{where} is not numeric (e.g. {str(example)!r}), so it cannot be a regression target", field="data.target"
            ) from None
        if not np.isfinite(y).all():
            raise DataError(f"{where} has missing (NaN) or infinite values; fill or drop them first", field="data.target")
        return y, task, None
    if is_float and np.isnan(values).any():
        raise DataError(f"{where} has missing (NaN) values; fill or drop them first", field="data.target")
    try:
        uniques, codes = np.unique(values, return_inverse=True)
    except TypeError:  # mixed types in an object column, e.g. 1 and "a": compare them as text
        uniques, codes = np.unique(values.astype(str), return_inverse=True)
    if len(uniques) > 100 and np.issubdtype(values.dtype, np.number):
        log.warning(
            "%s has %d distinct values and is treated as class labels; set data.task: regression if it is a quantity",
            where,
            len(uniques),
        )
    return codes.reshape(-1).astype("int64"), task, [_label(u) for u in uniques]


def _label(value: Any) -> str:
    # 1.0 → "1", so float-coded class labels read as the integers they are.
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _read_npz(path: Path, cfg: DataConfig) -> Loaded:
    """An ``.npz`` archive with arrays ``x`` (samples first) and ``y``."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            if "x" not in keys or "y" not in keys:
                raise DataError(
                    f"{path}: an .npz source needs arrays 'x' and 'y'. Found: {', '.join(keys) or 'none'}", field="data.source"
                )
            x, y = archive["x"], archive["y"]
    except DataError:
        raise
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "no detail"
        raise DataError(f"{path}: cannot read the file ({type(exc).__name__}: {detail})", field="data.source") from None
    if x.ndim == 0 or y.ndim == 0:
        raise DataError(f"{path}: 'x' and 'y' must be arrays with one row per sample", field="data.source")
    if len(x) != len(y):
        raise DataError(f"{path}: x has {len(x)} rows but y has {len(y)}", field="data.source")
    if y.ndim > 1:
        if int(np.prod(y.shape[1:])) != 1:
            raise DataError(
                f"{path}: 'y' must hold one label or target per sample. Received shape {y.shape}", field="data.source"
            )
        y = y.reshape(-1)
    if x.ndim == 1:
        x = x.reshape(-1, 1)  # one feature per sample
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise DataError(f"{path}: array 'x' is not numeric (dtype {x.dtype})", field="data.source")
    x = x.astype("float32")
    if np.isnan(x).any():
        raise DataError(f"{path}: array 'x' has {int(np.isnan(x).sum())} missing (NaN) value(s)", field="data.source")
    if not np.isfinite(x).all():
        raise DataError(f"{path}: array 'x' has infinite or too large values", field="data.source")
    y, task, class_names = _target(y, cfg, f"{path}: array 'y'")
    return x, y, task, class_names, None


# ---------------------------------------------------------------------------- splitting


def _split(
    x: np.ndarray, y: np.ndarray, task: str, cfg: DataConfig, seed: int, where: str, class_names: list[str] | None
) -> tuple:
    """Seeded train/validation(/test) split, stratified for classification."""
    from sklearn.model_selection import train_test_split

    n = len(x)
    n_test = int(round(n * cfg.test_split))
    n_val = int(round(n * cfg.validation_split))
    n_train = n - n_val - n_test
    empty = [
        name
        for name, size in (("training", n_train), ("validation", n_val), ("test", n_test if cfg.test_split else 1))
        if size < 1
    ]
    if empty:
        raise DataError(
            f"{where}: {n} sample(s) with validation_split={cfg.validation_split:g} and test_split={cfg.test_split:g} "
            f"leave the {empty[0]} split empty; use more data or {'smaller' if empty[0] == 'training' else 'larger'} splits",
            field="data.test_split" if empty[0] == "test" else "data.validation_split",
        )
    stratify = task == CLASSIFICATION
    if stratify:
        counts = np.bincount(y)
        present = np.flatnonzero(counts)
        smallest = int(present[np.argmin(counts[present])])
        needed = 3 if n_test else 2
        if counts[smallest] < needed:
            label = class_names[smallest] if class_names else str(smallest)
            raise DataError(
                f"{where}: class {label!r} has only {int(counts[smallest])} sample(s); a stratified split needs at least "
                f"{needed} per class (one in each split). Drop or merge that class, or add samples"
                + (" (if the target is a quantity, set data.task: regression)" if len(present) > 20 else ""),
                field="data.target",
            )
        k = len(present)
        for label, size in (("training", n_train), ("validation", n_val), ("test", n_test)):
            if (label != "test" or n_test) and size < k:
                raise DataError(
                    f"{where}: the {label} split would hold {size} sample(s), fewer than the {k} classes, so it cannot "
                    "be stratified; use more data or a larger split",
                    field="data.test_split" if label == "test" else "data.validation_split",
                )
    x_test = y_test = None
    try:
        if n_test:
            x, x_test, y, y_test = train_test_split(x, y, test_size=n_test, random_state=seed, stratify=y if stratify else None)
        x_train, x_val, y_train, y_val = train_test_split(
            x, y, test_size=n_val, random_state=seed, stratify=y if stratify else None
        )
    except ValueError as exc:  # anything sklearn still refuses, in its words
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
    if cfg.source in BUILTIN:
        name, source = cfg.source, cfg.source
        x, y, task, class_names, feature_names = BUILTIN[cfg.source](cfg, seed)
        if cfg.task and cfg.task != task:
            raise DataError(f"data.task: {cfg.source!r} is a {task} dataset. Received: {cfg.task!r}", field="data.task")
    else:
        path = Path(cfg.source).expanduser()
        if not path.is_file():
            raise DataError(
                f"data.source: file not found: {cfg.source!r} (looked for {path.resolve()}; "
                "a relative path is read from the current directory)",
                field="data.source",
            )
        name, source = path.stem, str(path.resolve())
        if path.suffix.lower() == ".npz":
            x, y, task, class_names, feature_names = _read_npz(path, cfg)
        else:
            x, y, task, class_names, feature_names = _read_table(path, cfg)
    if len(x) == 0:
        raise DataError(f"{source}: the data has no rows", field="data.source")
    if task == CLASSIFICATION and class_names is None:
        class_names = [str(i) for i in range(int(y.max()) + 1)]
    splits = _split(x, y, task, cfg, seed, where=source, class_names=class_names)
    dataset = Dataset(name, source, task, *splits, class_names=class_names, feature_names=feature_names)
    log.info("data %s: %s, input shape %s, %s", name, task, dataset.input_shape, dataset.sizes)
    return dataset


def make_pipeline(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, shuffle: bool = True) -> Any:
    """A cached, seeded-shuffle, batched, prefetched ``tf.data.Dataset`` for one split.

    The result is a plain batched dataset, so ``Model.fit`` distributes it under whatever
    strategy scope the model was built in (each replica gets ``batch_size / replicas``).

    Args:
        x: Features.
        y: Labels or targets.
        batch_size: The global batch.
        seed: The shuffle seed.
        shuffle: Whether to reshuffle each epoch (the order stays reproducible from the seed).
            Defaults to True.

    Returns:
        The pipeline.
    """
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y)).cache()
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def describe_sources() -> list[dict[str, Any]]:
    """Every registered source with its size and task, for ``toolkit datasets``.

    Shipped and synthetic sets are loaded (a fraction of a second); Keras sets are described
    from what is known of them, and marked cached or not, so nothing is downloaded.
    """
    rows = []
    for name in SHIPPED_DATASETS + SYNTHETIC_DATASETS:
        x, y, task, names, _ = BUILTIN[name](DataConfig(source=name), 0)
        kind = "shipped" if name in SHIPPED_DATASETS else "synthetic"
        classes = len(names) if names else (len(np.unique(y)) if task == CLASSIFICATION else 0)
        rows.append(
            {
                "name": name,
                "kind": kind,
                "samples": len(x),
                "features": int(np.prod(x.shape[1:])),
                "task": task,
                "classes": classes,
            }
        )
    for name in KERAS_DATASETS:
        spec = _KERAS_SETS[name]
        # Short enough that the table fits 80 columns; the size is what a download would cost.
        kind = "keras (cached)" if keras_cached(name) else f"keras ({spec.size})"
        rows.append(
            {
                "name": name,
                "kind": kind,
                "samples": spec.samples,
                "features": spec.features,
                "task": CLASSIFICATION,
                "classes": 10,
            }
        )
    return rows
