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


def epoch_pipeline(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int) -> Any:
    """A training pipeline whose order in epoch ``e`` is a function of ``(seed, e)`` alone.

    :func:`make_pipeline` reshuffles with every new iterator, so the order an epoch sees depends
    on how many iterators the process made before it: on the trials that ran before in the same
    process, and on how ``Model.fit`` walks a dataset (Keras 3 makes two iterators per epoch when
    the number of batches is known, one when it is not). A trial resumed in a new process, or run
    by another worker, would then see other orders. Here the order is keyed to the epoch instead:
    the returned dataset carries ``toolkit_epoch``, a ``tf.Variable`` that
    :class:`toolkit.tuner.callbacks.EpochKey` sets at each epoch's beginning, before ``fit`` makes
    that epoch's iterator, and each iterator shuffles the whole split with the seed ``(seed, epoch)``.

    Args:
        x: Features.
        y: Labels or targets.
        batch_size: The global batch.
        seed: The shuffle seed.

    Returns:
        The pipeline, with its epoch variable as ``toolkit_epoch``.
    """
    import tensorflow as tf

    with tf.init_scope():
        epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="toolkit_epoch")
    base = tf.data.Dataset.from_tensor_slices((x, y)).cache()
    rows = len(x)
    key = tf.constant(int(seed), dtype=tf.int64) * 1_000_003

    def one_epoch(_: Any) -> Any:
        # The shuffle's seed is a tensor, read when the iterator starts: its epoch's key.
        return base.shuffle(rows, seed=key + epoch.read_value(), reshuffle_each_iteration=False)

    ds = tf.data.Dataset.range(1).flat_map(one_epoch).batch(batch_size).prefetch(tf.data.AUTOTUNE)
    # flat_map hides the cardinality; it is the same as make_pipeline's, and fit uses it for its progress and steps.
    ds = ds.apply(tf.data.experimental.assert_cardinality(-(-rows // batch_size)))
    ds.toolkit_epoch = epoch
    return ds
