"""The source registry: the shipped scikit-learn sets, the synthetic generators and the Keras sets.

:data:`BUILTIN` maps each built-in source name to its loader ``(cfg, seed) -> Loaded``;
:func:`describe_sources` lists them for ``toolkit datasets`` without downloading anything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from toolkit.config import IMAGE_SOURCES, KERAS_DATASETS, SHAPES_SIDE, SHIPPED_DATASETS, SYNTHETIC_DATASETS, DataConfig
from toolkit.data.dataset import CLASSIFICATION, REGRESSION, DataError, Loaded
from toolkit.data.keras_sets import _KERAS_SETS, _keras, keras_cached


def _sklearn(name: str) -> Callable[[DataConfig, int], Loaded]:
    def load(cfg: DataConfig, seed: int) -> Loaded:
        from sklearn import datasets

        bunch = getattr(datasets, f"load_{name}")()
        names = [str(n) for n in bunch.target_names]
        features = [str(f) for f in getattr(bunch, "feature_names", [])] or None
        x = bunch.data.astype("float32")
        if name in IMAGE_SOURCES:
            # digits are 8x8 images with one channel (raw intensities 0-16): a CNN sees their
            # layout, and an MLP flattens them in its first layer.
            x = x.reshape(-1, *IMAGE_SOURCES[name])
            features = None
        return x, bunch.target.astype("int64"), CLASSIFICATION, names, features

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


SHAPE_NAMES = ["circle", "square", "triangle"]


def _shapes(cfg: DataConfig, seed: int) -> Loaded:
    """Generated grey images of one filled circle, square or triangle each (classes in that order).

    Each shape has a random centre, size and brightness on a noisy background, so where a shape
    is says nothing of what it is: convolution (local, shared filters) learns it from few samples,
    while an MLP must learn every position apart. Pixels are raw, 0-255, shape (N, S, S, 1).
    ``image_size`` sets S (default 32), ``noise`` the background's standard deviation in units of
    the brightest pixel (default 0.1).
    """
    rng = np.random.default_rng(seed)
    n = cfg.n_samples or 1500
    side = cfg.image_size or SHAPES_SIDE
    noise = 0.1 if cfg.noise is None else cfg.noise
    y = np.arange(n) % len(SHAPE_NAMES)
    rng.shuffle(y)
    rows, cols = np.mgrid[0:side, 0:side].astype("float32") + 0.5
    x = np.empty((n, side, side), dtype="float32")
    for i, label in enumerate(y):
        radius = rng.uniform(0.15, 0.3) * side
        cy, cx = rng.uniform(radius, side - radius, size=2)
        dy, dx = rows - cy, cols - cx
        if label == 0:
            mask = dy**2 + dx**2 <= radius**2
        elif label == 1:
            half = radius * 0.85  # about the circle's area
            mask = (np.abs(dy) <= half) & (np.abs(dx) <= half)
        else:
            # An upward triangle: below the two slanted edges and above the base.
            height = radius * 1.8
            top = -height / 2
            mask = (dy <= height / 2) & (np.abs(dx) <= (dy - top) / np.sqrt(3) * 1.15) & (dy >= top)
        brightness = rng.uniform(0.5, 1.0)
        x[i] = np.where(mask, brightness, 0.0) + rng.normal(0.0, noise, (side, side))
    x = (np.clip(x, 0.0, 1.0) * 255.0).astype("float32")[..., None]
    return x, y.astype("int64"), CLASSIFICATION, list(SHAPE_NAMES), None


BUILTIN: dict[str, Callable[[DataConfig, int], Loaded]] = {
    **{name: _sklearn(name) for name in SHIPPED_DATASETS},
    "spirals": _spirals,
    "moons": _moons,
    "circles": _circles,
    "xor": _xor,
    "friedman": _friedman,
    "shapes": _shapes,
    **{name: _keras(name) for name in KERAS_DATASETS},
}
assert set(BUILTIN) == set(SHIPPED_DATASETS + SYNTHETIC_DATASETS + KERAS_DATASETS)


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
