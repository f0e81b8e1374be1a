"""Diagnostics callback and gradient check on tiny real Keras models (no mocks)."""

from __future__ import annotations

import copy

import keras
import numpy as np
import pytest
import tensorflow as tf

from toolkit import DiagnosticsCallback, gradient_check
from toolkit.diagnostics import _Probe, gap_metrics


def _data(n: int = 128, features: int = 6, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("int64") + (x[:, 2] > 1).astype("int64")
    return x, np.minimum(y, classes - 1)


def _mlp(
    activation: str = "relu", depth: int = 2, units: int = 16, features: int = 6, classes: int = 3, l2: float = 0.0
) -> keras.Model:
    inputs = keras.Input((features,))
    x = keras.layers.Normalization(mean=np.zeros(features), variance=np.ones(features), name="standardize")(inputs)
    for i in range(depth):
        reg = keras.regularizers.L2(l2) if l2 else None
        x = keras.layers.Dense(units, activation=activation, kernel_regularizer=reg, name=f"dense_{i}")(x)
    outputs = keras.layers.Dense(classes, activation="softmax", name="output")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def test_callback_records_every_diagnostic_per_epoch():
    x, y = _data()
    model = _mlp()
    callback = DiagnosticsCallback(x[:64], y[:64])
    model.fit(x, y, validation_data=(x, y), epochs=3, batch_size=32, verbose=0, callbacks=[callback])

    history = callback.history
    expected = {"gap_loss", "gap_accuracy", "grad_ratio_first_last"}
    for layer in ("dense_0", "dense_1", "output"):
        expected |= {f"grad_norm/{layer}", f"weight_l1/{layer}", f"weight_l2/{layer}"}
    expected |= {"dead_relu/dense_0", "dead_relu/dense_1"}
    assert expected <= set(history)
    assert "dead_relu/output" not in history  # softmax is not ReLU-family
    for name in expected:
        assert sorted(history[name]) == [0, 1, 2], name  # measured every epoch
        assert all(np.isfinite(list(history[name].values()))), name
    kernel = model.get_layer("dense_0").kernel.numpy()
    assert history["weight_l2/dense_0"][2] == pytest.approx(np.linalg.norm(kernel), rel=1e-5)
    assert history["weight_l1/dense_0"][2] == pytest.approx(np.abs(kernel).sum(), rel=1e-5)
    ratio = history["grad_norm/dense_0"][2] / history["grad_norm/output"][2]
    assert history["grad_ratio_first_last"][2] == pytest.approx(ratio, rel=1e-5)


def _true_grad_norms(model: keras.Model, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Gradient norms of the data loss taken the plain way, through the whole model."""
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, model(x, training=False)))
    grads = tape.gradient(loss, [layer.kernel for layer in dense])
    return {f"grad_norm/{layer.name}": float(tf.norm(g)) for layer, g in zip(dense, grads, strict=True)}


def test_replayed_chain_gives_the_gradients_of_the_model():
    x, y = _data()
    model = _mlp(activation="tanh", depth=3)
    probe = _Probe(model, x, y)
    assert probe.chain is not None
    values = probe.measure()
    for key, expected in _true_grad_norms(model, x, y).items():
        assert values[key] == pytest.approx(expected, rel=1e-4), key


def test_compiled_probe_gives_the_eager_values():
    x, y = _data()
    probe = _Probe(_mlp(), x, y)
    eager = probe.measure()
    probe.compile()
    compiled = probe.measure()
    assert compiled.keys() == eager.keys()
    for key, value in eager.items():
        assert compiled[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key


def test_a_compiled_probe_is_reused_by_the_next_model_of_the_same_architecture():
    x, y = _data()
    _Probe(_mlp(depth=3, units=12), x, y).compile()
    keras.utils.set_random_seed(7)
    model = _mlp(depth=3, units=12)  # new weights, same shapes
    probe = _Probe(model, x, y)
    assert probe.compiled  # no trace for this model
    values = probe.measure()
    for key, expected in _true_grad_norms(model, x, y).items():
        assert values[key] == pytest.approx(expected, rel=1e-4), key  # its own weights, not the first model's
    assert not _Probe(_mlp(depth=2, units=12), x, y).compiled


def test_dead_relu_counts_units_silent_for_every_probe_sample():
    x, y = _data()
    model = _mlp(depth=2, units=8)
    layer = model.get_layer("dense_0")
    bias = np.zeros(8, dtype="float32")
    bias[:6] = -1e3  # these six units can never fire
    layer.bias.assign(bias)
    values = _Probe(model, x, y).measure()
    assert values["dead_relu/dense_0"] == pytest.approx(6 / 8)


def test_sigmoid_gradient_vanishes_where_relu_does_not():
    x, y = _data(n=256)
    ratios = {}
    for activation in ("sigmoid", "relu"):
        keras.utils.set_random_seed(0)
        model = _mlp(activation=activation, depth=8, units=32)
        ratios[activation] = _Probe(model, x, y).measure()["grad_ratio_first_last"]
    assert ratios["sigmoid"] < 0.01
    assert ratios["relu"] > 10 * ratios["sigmoid"]


def test_callback_survives_deepcopy_before_and_after_training():
    x, y = _data()
    callback = DiagnosticsCallback(x[:32], y[:32], uri="sqlite:///nowhere.db", run_id="abc")
    clone = copy.deepcopy(callback)
    assert clone.run_id == "abc" and clone.uri == "sqlite:///nowhere.db"
    clone.uri = None  # train without MLflow
    model = _mlp()
    model.fit(x, y, epochs=1, verbose=0, callbacks=[clone])
    assert clone._probe is None  # the model's layers are released at the end of training
    copy.deepcopy(clone)


def test_callback_logs_to_mlflow_with_epoch_steps(store, mlflow_client):
    x, y = _data()
    exp = mlflow_client.create_experiment("diag")
    run = mlflow_client.create_run(exp)
    model = _mlp()
    callback = DiagnosticsCallback(x[:64], y[:64], uri=store, run_id=run.info.run_id)
    model.fit(x, y, validation_data=(x, y), epochs=3, verbose=0, callbacks=[callback])
    mlflow_client.set_terminated(run.info.run_id)  # drains MLflow's async queue, as a trial's end does

    steps = [m.step for m in mlflow_client.get_metric_history(run.info.run_id, "grad_norm/dense_0")]
    assert sorted(steps) == [0, 1, 2]
    logged = mlflow_client.get_run(run.info.run_id).data.metrics
    assert {"gap_loss", "gap_accuracy", "grad_ratio_first_last", "dead_relu/dense_1", "weight_l2/output"} <= set(logged)
    assert 0 < logged["diagnostics_seconds"] < 5


def test_gap_metrics_sign_means_overfitting():
    gaps = gap_metrics({"loss": 0.2, "val_loss": 0.5, "accuracy": 0.99, "val_accuracy": 0.9})
    assert gaps["gap_loss"] == pytest.approx(0.3)
    assert gaps["gap_accuracy"] == pytest.approx(0.09)
    assert gap_metrics({"loss": 0.2, "mae": 0.1}) == {}


# ---------------------------------------------------------------------------- gradient check


@keras.saving.register_keras_serializable(package="toolkit_tests")
class Square(keras.layers.Layer):
    """x² with a hand-written gradient; ``wrong=True`` makes it 3x instead of 2x."""

    def __init__(self, wrong: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.wrong = wrong

    def call(self, inputs):
        factor = 3.0 if self.wrong else 2.0

        @tf.custom_gradient
        def square(t):
            def grad(upstream):
                return upstream * tf.cast(factor, t.dtype) * t

            return t * t, grad

        return square(inputs)

    def get_config(self):
        return {**super().get_config(), "wrong": self.wrong}


def _custom_model(wrong: bool) -> keras.Model:
    keras.utils.set_random_seed(1)
    inputs = keras.Input((4,))
    x = keras.layers.Dense(5, activation="tanh")(inputs)
    x = Square(wrong=wrong)(x)
    outputs = keras.layers.Dense(3, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    return model


def test_gradient_check_passes_on_an_mlp():
    x, y = _data(n=16)
    keras.utils.set_random_seed(0)
    model = _mlp(activation="tanh", depth=2, units=8, l2=1e-3)
    error = gradient_check(model, x, y)
    assert error < 1e-6


def test_gradient_check_catches_a_wrong_custom_gradient():
    x, y = _data(n=16, features=4)
    assert gradient_check(_custom_model(wrong=False), x, y) < 1e-6
    assert gradient_check(_custom_model(wrong=True), x, y) > 1e-2


def test_gradient_check_leaves_the_model_untouched():
    x, y = _data(n=16)
    model = _mlp(activation="tanh", depth=1, units=4)
    before = [w.copy() for w in model.get_weights()]
    gradient_check(model, x, y, max_checks=20)
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
        assert b.dtype == np.float32


def test_epochs_beyond_the_budget_are_skipped_but_never_the_first_or_last(monkeypatch):
    from toolkit import diagnostics

    monkeypatch.setattr(diagnostics, "BUDGET", 1e-9)  # no epoch can afford the probe
    x, y = _data()
    callback = DiagnosticsCallback(x[:32], y[:32])
    _mlp().fit(x, y, validation_data=(x, y), epochs=6, verbose=0, callbacks=[callback])
    # Epoch 0 is forced and epoch 1 measures what a computation costs; after that the budget
    # allows none until the last, which is forced.
    assert sorted(callback.history["grad_norm/dense_0"]) == [0, 1, 5]
    assert sorted(callback.history["gap_loss"]) == list(range(6))  # the gaps cost nothing: every epoch


# ---------------------------------------------------------------------------- any layer with a kernel


def _conv1d_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((16, 1)),
            keras.layers.Conv1D(6, 3, activation="relu", name="conv_a"),
            keras.layers.MaxPooling1D(2, name="pool"),
            keras.layers.Conv1D(6, 3, activation="relu", name="conv_b"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dropout(0.1, name="dropout"),
            keras.layers.Dense(3, activation="softmax", name="output"),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _conv2d_model() -> keras.Model:
    """Conv2D with its activation as a separate ReLU layer, after BatchNormalization."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="output")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _two_branch_model(features: int = 6) -> keras.Model:
    """Two Dense branches, one with ``activation=``, one with an Activation layer, concatenated."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((features,))
    left = keras.layers.Dense(8, activation="relu", name="left")(inputs)
    right = keras.layers.Dense(8, name="right")(inputs)
    right = keras.layers.Activation("relu", name="right_relu")(right)
    x = keras.layers.Concatenate(name="concat")([left, right])
    outputs = keras.layers.Dense(3, activation="softmax", name="output")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _images(shape: tuple[int, ...], n: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *shape)).astype("float32")
    flat = x.reshape(n, -1)
    y = (flat[:, 0] + flat[:, 1] > 0).astype("int64") + (flat[:, 2] > 1).astype("int64")
    return x, y


def _fit_diagnostics(model: keras.Model, x: np.ndarray, y: np.ndarray, epochs: int = 2) -> dict[str, dict[int, float]]:
    callback = DiagnosticsCallback(x[:48], y[:48])
    model.fit(x, y, validation_data=(x, y), epochs=epochs, batch_size=32, verbose=0, callbacks=[callback])
    return callback.history


def _assert_diagnosed(history: dict[str, dict[int, float]], kernels: list[str], relus: list[str], epochs: int = 2) -> None:
    for layer in kernels:
        for metric in ("grad_norm", "weight_l1", "weight_l2"):
            key = f"{metric}/{layer}"
            assert sorted(history.get(key, {})) == list(range(epochs)), key
            assert all(np.isfinite(list(history[key].values()))), key
    assert all(np.isfinite(list(history["grad_ratio_first_last"].values())))
    assert sorted(history["grad_ratio_first_last"]) == list(range(epochs))
    dead = sorted(k.split("/", 1)[1] for k in history if k.startswith("dead_relu/"))
    assert dead == sorted(relus)
    for layer in relus:
        assert all(0.0 <= v <= 1.0 for v in history[f"dead_relu/{layer}"].values()), layer
    grads = {k.split("/", 1)[1] for k in history if k.startswith("grad_norm/")}
    assert grads == set(kernels)  # every kernel layer, and nothing else


def test_callback_diagnoses_a_conv1d_stack_with_pooling():
    x, y = _images((16, 1))
    model = _conv1d_model()
    history = _fit_diagnostics(model, x, y)
    _assert_diagnosed(history, ["conv_a", "conv_b", "output"], ["conv_a", "conv_b"])
    kernel = model.get_layer("conv_a").kernel.numpy()
    assert history["weight_l2/conv_a"][1] == pytest.approx(np.linalg.norm(kernel), rel=1e-5)
    ratio = history["grad_norm/conv_a"][1] / history["grad_norm/output"][1]
    assert history["grad_ratio_first_last"][1] == pytest.approx(ratio, rel=1e-5)


def test_callback_diagnoses_a_conv2d_model_with_a_separate_relu_layer():
    x, y = _images((8, 8, 1))
    _assert_diagnosed(_fit_diagnostics(_conv2d_model(), x, y), ["conv", "output"], ["relu"])


def test_callback_diagnoses_a_two_branch_functional_model():
    x, y = _data(n=96)
    _assert_diagnosed(_fit_diagnostics(_two_branch_model(), x, y), ["left", "right", "output"], ["left", "right_relu"])


def _true_kernel_grad_norms(model: keras.Model, x: np.ndarray, y: np.ndarray, names: list[str]) -> dict[str, float]:
    kernels = [model.get_layer(name).kernel for name in names]
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, model(x, training=False)))
    grads = tape.gradient(loss, kernels)
    return {f"grad_norm/{name}": float(tf.norm(g)) for name, g in zip(names, grads, strict=True)}


@pytest.mark.parametrize(
    ("build", "shape", "kernels"),
    [
        (_conv1d_model, (16, 1), ["conv_a", "conv_b", "output"]),
        (_conv2d_model, (8, 8, 1), ["conv", "output"]),
        (_two_branch_model, (6,), ["left", "right", "output"]),
    ],
)
def test_probe_gives_the_gradients_of_the_model_eager_and_compiled(build, shape, kernels):
    x, y = _images(shape, n=32)
    model = build()
    probe = _Probe(model, x, y)
    eager = probe.measure()
    for key, expected in _true_kernel_grad_norms(model, x, y, kernels).items():
        assert eager[key] == pytest.approx(expected, rel=1e-4), key
    probe.compile()
    compiled = probe.measure()
    assert compiled.keys() == eager.keys()
    for key, value in eager.items():
        assert compiled[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key


def test_dead_units_of_a_conv_layer_are_its_channels():
    x, y = _images((16, 1), n=32)
    model = _conv1d_model()
    layer = model.get_layer("conv_a")
    bias = np.zeros(6, dtype="float32")
    bias[:2] = -1e3  # two channels never fire at any position of any sample
    layer.bias.assign(bias)
    assert _Probe(model, x, y).measure()["dead_relu/conv_a"] == pytest.approx(2 / 6)


def test_nested_models_are_opened_and_their_names_qualified_where_they_clash():
    def block(name: str) -> keras.Model:
        inputs = keras.Input((6,))
        return keras.Model(inputs, keras.layers.Dense(6, activation="relu", name="dense")(inputs), name=name)

    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    x = block("block_1")(inputs)
    x = block("block_2")(x)
    x = keras.layers.Dense(5, activation="relu", name="head")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="output")(x))
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    x_data, y_data = _data(n=32)
    values = _Probe(model, x_data, y_data).measure()
    for layer in ("block_1/dense", "block_2/dense", "head", "output"):
        assert {f"grad_norm/{layer}", f"weight_l1/{layer}", f"weight_l2/{layer}"} <= set(values), layer
    assert {"dead_relu/block_1/dense", "dead_relu/block_2/dense", "dead_relu/head"} == {
        k for k in values if k.startswith("dead_relu/")
    }
    assert np.isfinite(values["grad_ratio_first_last"])


def test_a_subclassed_model_gets_norms_without_dead_unit_counts():
    class Net(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.hidden = keras.layers.Dense(8, activation="relu", name="hidden")
            self.out = keras.layers.Dense(3, activation="softmax", name="output")

        def call(self, inputs):
            return self.out(self.hidden(inputs))

    x, y = _data(n=64)
    model = Net()
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    history = _fit_diagnostics(model, x, y, epochs=1)
    assert {"grad_norm/hidden", "grad_norm/output", "weight_l2/hidden", "grad_ratio_first_last"} <= set(history)
    assert not any(k.startswith("dead_relu/") for k in history)


@pytest.mark.parametrize(("build", "shape"), [(_conv1d_model, (16, 1)), (_conv2d_model, (8, 8, 1)), (_two_branch_model, (6,))])
def test_gradient_check_passes_on_conv_and_branching_models(build, shape):
    x, y = _images(shape, n=12)
    model = build()
    model.fit(x, y, epochs=1, verbose=0)  # BatchNormalization's statistics move off their start
    assert gradient_check(model, x, y, max_checks=60) < 1e-6
