"""P4: achieved training GFLOP/s on a compute-bound card ÷ this machine's tf.matmul peak.

A 784-1024-1024-10 MLP on 60k synthetic samples, built and compiled by the toolkit's own
HyperModel (so its automatic steps_per_execution and jit_compile choices are what is measured)
and fed by the toolkit's tf.data pipeline. The peak is a float32 tf.matmul measured in the
same process, right before. Goal ≥ 0.70.

    python benchmarks/p4_flops.py [--epochs 3] [--batch-size 512]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras_tuner as kt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from toolkit.config import validate  # noqa: E402
from toolkit.data import make_pipeline  # noqa: E402
from toolkit.models import MLPHyperModel  # noqa: E402

SIZES = [784, 1024, 1024, 10]


def matmul_peak(n: int = 2048, repeats: int = 20, dtype: str = "float32") -> float:
    """GFLOP/s of an n×n matmul chain in ``dtype`` (graph mode), the best of five timings."""
    a = tf.cast(tf.random.normal((n, n)), dtype)
    b = tf.cast(tf.random.normal((n, n)), dtype)
    scale = tf.constant(1e-3, dtype)

    @tf.function
    def chain(a, b):
        out = a
        for _ in range(repeats):
            out = tf.matmul(out, b) * scale
        return out

    chain(a, b).numpy()
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        chain(a, b).numpy()
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 * repeats / best / 1e9


def training_flops_per_sample() -> float:
    """Forward 2·in·out per layer, backward 4·in·out, less the first layer's input gradient
    (the data needs none)."""
    pairs = list(zip(SIZES[:-1], SIZES[1:], strict=True))
    return sum(6 * i * o for i, o in pairs) - 2 * pairs[0][0] * pairs[0][1]


def main(epochs: int = 3, batch_size: int = 512, n: int = 60_000) -> float:
    peak = matmul_peak()
    print(f"tf.matmul peak (float32, 2048x2048, best of 5): {peak:.1f} GFLOP/s")
    cfg = validate(
        {
            "name": "p4",
            "data": {"source": "digits"},
            "space": {"depth": 2, "units": 1024, "activation": "relu", "optimizer": "adam"},
            "train": {"batch_size": batch_size, "epochs": epochs, "diagnostics": False},
        }
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, SIZES[0])).astype("float32")
    y = rng.integers(0, SIZES[-1], size=n)
    model = MLPHyperModel(
        cfg.space,
        (SIZES[0],),
        "classification",
        n_classes=SIZES[-1],
        mean=x.mean(0),
        variance=x.var(0),
        train=cfg.train,
        n_train=n,
    ).build(kt.HyperParameters())
    print(f"model {'-'.join(map(str, SIZES))}: steps_per_execution={model.steps_per_execution}, jit_compile={model.jit_compile}")
    data = make_pipeline(x, y, batch_size, seed=0)
    model.fit(data, epochs=1, verbose=0)  # compile and warm up outside the timing
    started = time.perf_counter()
    model.fit(data, epochs=epochs, verbose=0)
    seconds = time.perf_counter() - started
    achieved = training_flops_per_sample() * n * epochs / seconds / 1e9
    ratio = achieved / peak
    print(f"training: {epochs} epochs x {n} samples in {seconds:.2f}s = {achieved:.1f} GFLOP/s")
    print(
        f"P4 = {achieved:.1f} / {peak:.1f} = {ratio:.2f} (goal >= 0.70: {'meets the goal' if ratio >= 0.7 else 'MISSES the goal'})"
    )
    return ratio


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args()
    main(args.epochs, args.batch_size)
