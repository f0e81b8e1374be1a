"""``tf.data`` pipelines for one split. TensorFlow is imported only when a pipeline is made."""

from __future__ import annotations

from typing import Any

import numpy as np


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
