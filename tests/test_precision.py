"""Under ``train.precision: mixed_bfloat16`` a training step computes in bf16 and keeps its output, loss and gradients float32.

``tests/test_strategy.py`` checks the layers' policies and the symbolic output; this runs a real
step on a tiny toolkit model and checks the tensors themselves.
"""

from __future__ import annotations

import keras
import keras_tuner as kt
import numpy as np
import tensorflow as tf

from toolkit.config import validate
from toolkit.models import MLPHyperModel


def test_bfloat16_step_keeps_output_loss_and_gradients_float32():
    cfg = validate(
        {
            "name": "t",
            "data": {"source": "digits"},
            "space": {"depth": 2, "units": 8},
            "train": {"precision": "mixed_bfloat16", "diagnostics": False, "jit_compile": False},
        }
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = np.arange(16) % 3
    model = MLPHyperModel(
        cfg.space, (4,), "classification", n_classes=3, mean=x.mean(0), variance=x.var(0), train=cfg.train
    ).build(kt.HyperParameters())
    hidden = keras.Model(model.input, model.get_layer("dense_1").output)

    with tf.GradientTape() as tape:
        y_pred = model(x, training=True)
        loss = model.compute_loss(x=x, y=y, y_pred=y_pred, training=True)  # what Keras' train_step calls
    grads = tape.gradient(loss, model.trainable_variables)

    assert hidden(x).dtype == tf.bfloat16
    assert model.get_layer("output").compute_dtype == "float32"
    assert y_pred.dtype == tf.float32
    assert loss.dtype == tf.float32
    assert {v.dtype for v in model.trainable_variables} == {"float32"}
    assert {g.dtype for g in grads} == {tf.float32}
    assert isinstance(model.optimizer, keras.optimizers.Adam)  # bf16 needs no loss scaling
    assert keras.mixed_precision.global_policy().name == "float32"  # the build restored it


def test_auto_jit_compile_leaves_xla_off_for_bfloat16_on_a_cpu():
    # XLA's CPU backend runs bf16 matmuls as float32 ones (benchmarks/p11_bfloat16.py).
    from toolkit.models import auto_jit_compile

    assert auto_jit_compile(2_000_000, "auto", "float32") is True
    assert auto_jit_compile(2_000_000, "auto", "mixed_bfloat16") is False
    assert auto_jit_compile(2_000_000, True, "mixed_bfloat16") is True  # a card's setting stands
    assert auto_jit_compile(10_000, "auto", "float32") is False
