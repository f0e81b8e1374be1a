"""The MLP HyperModel builds and trains one step for every activation × optimizer."""

from __future__ import annotations

import itertools

import keras
import keras_tuner as kt
import numpy as np
import pytest

from toolkit.config import ACTIVATIONS, OPTIMIZERS, validate
from toolkit.models import MLPHyperModel, auto_steps_per_execution


def hypermodel(task="classification", **space):
    cfg = validate({"name": "t", "data": {"source": "iris"}, "space": {"depth": 2, "units": 8, **space}})
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    return MLPHyperModel(cfg.space, (4,), task, n_classes=3, mean=x.mean(0), variance=x.var(0), train=cfg.train, n_train=32), x


# The fast suite trains a covering set: every activation once, each paired with the next optimizer
# in turn, so every optimizer is trained too (9 of 63 pairs; each pair traces its own train step,
# seconds apiece on 2 cores). The other pairs of the product run with the slow tests.
_COVERING = {(activation, OPTIMIZERS[i % len(OPTIMIZERS)]) for i, activation in enumerate(ACTIVATIONS)}
assert {o for _, o in _COVERING} == set(OPTIMIZERS)


@pytest.mark.parametrize(
    "activation, optimizer",
    [
        pytest.param(a, o, marks=() if (a, o) in _COVERING else pytest.mark.slow)
        for a, o in itertools.product(ACTIVATIONS, OPTIMIZERS)
    ],
)
def test_every_activation_and_optimizer_builds_and_trains_one_step(activation, optimizer):
    hm, x = hypermodel(activation=activation, optimizer=optimizer, learning_rate=0.01, l1=1e-5, l2=1e-4)
    model = hm.build(kt.HyperParameters())
    y = np.arange(32) % 3
    before = [w.copy() for w in model.get_weights()]
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    after = model.get_weights()
    assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=True)), "one step must change the weights"
    assert model.layers[-1].activation.__name__ == "softmax"
    assert model.loss == "sparse_categorical_crossentropy"
    keras.backend.clear_session()


def test_regression_head_is_linear_with_mse_and_mae():
    hm, x = hypermodel(task="regression")
    model = hm.build(kt.HyperParameters())
    y = x.sum(axis=1)
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert model.loss == "mse"
    assert "mae" in history.history
    assert model.predict(x, verbose=0).shape == (32,)


def test_depth_and_units_shape_the_network():
    hm, _ = hypermodel(depth=3, units=5)
    model = hm.build(kt.HyperParameters())
    dense = [layer for layer in model.layers if layer.name.startswith("dense_")]
    assert [layer.units for layer in dense] == [5, 5, 5]


def test_steps_per_execution_auto_never_exceeds_an_epoch():
    assert auto_steps_per_execution(1437, 64) == 23
    assert auto_steps_per_execution(60000, 64) == 32
    assert auto_steps_per_execution(10, 64) == 1
    assert auto_steps_per_execution(1437, 64, 4) == 4


def test_steps_per_execution_auto_is_one_for_a_trial_too_short_to_repay_the_loops_tracing():
    # 23 steps an epoch: 2 epochs (46 steps) and 10 (230) run one step per call, 20 (460) run 23.
    assert auto_steps_per_execution(1437, 64, epochs=2) == 1
    assert auto_steps_per_execution(1437, 64, epochs=10) == 1
    assert auto_steps_per_execution(1437, 64, epochs=20) == 23
    assert auto_steps_per_execution(1437, 64, 16, epochs=2) == 16  # a number set on the card is kept
