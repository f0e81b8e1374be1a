"""The multilayer perceptron HyperModel."""

from __future__ import annotations

from typing import Any

import keras
import keras_tuner as kt
import numpy as np

from toolkit import space as blocks
from toolkit.config import SpaceConfig, TrainConfig
from toolkit.models.execution import batch_size, build_precision, compile_settings, rebatch, task_loss


class MLPHyperModel(kt.HyperModel):
    """A multilayer perceptron over flattened inputs, standardized inside the model.

    Args:
        space: The card's search space.
        input_shape: The shape of one sample.
        task: ``"classification"`` or ``"regression"``.
        n_classes: The number of classes (classification only). Defaults to 0.
        mean: Per-feature means of the training split, for the ``Normalization`` layer.
        variance: Per-feature variances of the training split.
        train: The card's training section. Defaults to ``TrainConfig()``.
        n_train: Training samples, used to choose ``steps_per_execution``. Defaults to 1000.
        target_stats: Training targets' mean and standard deviation (regression). Defaults to (0, 1).
    """

    def __init__(
        self,
        space: SpaceConfig,
        input_shape: tuple[int, ...],
        task: str,
        n_classes: int = 0,
        mean: np.ndarray | None = None,
        variance: np.ndarray | None = None,
        train: TrainConfig | None = None,
        n_train: int = 1000,
        target_stats: tuple[float, float] = (0.0, 1.0),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.space = space
        self.input_shape = tuple(input_shape)
        self.task = task
        self.n_classes = n_classes
        self.mean = mean
        self.variance = variance
        self.train = train or TrainConfig()
        self.n_train = n_train
        self.target_stats = target_stats

    @classmethod
    def from_card(cls, cfg: Any, dataset: Any) -> MLPHyperModel:
        """The HyperModel for a card and its resolved dataset.

        Args:
            cfg: The validated card; its ``space`` and ``train`` sections are used.
            dataset: The loaded dataset; its shape, task and training-split statistics are used.

        Returns:
            The HyperModel.
        """
        mean, variance = dataset.feature_stats()
        return cls(
            cfg.space,
            dataset.input_shape,
            dataset.task,
            n_classes=dataset.n_classes,
            mean=mean,
            variance=variance,
            train=cfg.train,
            n_train=len(dataset.x_train),
            target_stats=dataset.target_stats() if dataset.task == "regression" else (0.0, 1.0),
        )

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        with build_precision(self.train.precision):
            return self._build_model(hp)

    def _build_model(self, hp: kt.HyperParameters) -> keras.Model:
        n_layers = blocks.depth(hp, self.space)
        width = blocks.units(hp, self.space)
        act = blocks.activation(hp, self.space)
        reg = blocks.regularizer(hp, self.space)
        rate = blocks.dropout(hp, self.space)
        optimizer = blocks.optimizer(hp, self.space)

        inputs = keras.Input(shape=self.input_shape, name="features")
        x = keras.layers.Flatten(name="flatten")(inputs) if len(self.input_shape) > 1 else inputs
        if self.mean is not None:
            # Training-split statistics only: a logged model then serves raw inputs and
            # validation data never leaks into the scaling.
            x = keras.layers.Normalization(mean=self.mean, variance=np.maximum(self.variance, 1e-12), name="standardize")(x)
        x = dense_stack(x, n_layers, width, act, reg, rate)
        # The output layer stays float32 under mixed precision for a stable softmax and loss.
        if self.task == "classification":
            outputs = keras.layers.Dense(self.n_classes, activation="softmax", dtype="float32", name="output")(x)
        else:
            dense = keras.layers.Dense(1, dtype="float32", name="output_dense")(x)
            # The network predicts a standardized target and this layer puts it back in the
            # data's units (training statistics only), so a target in the hundreds starts at
            # its mean and trains as fast as one near zero, and the model serves raw units.
            mean, std = self.target_stats
            rescaled = keras.layers.Rescaling(scale=std, offset=mean, dtype="float32", name="unstandardize")(dense)
            outputs = keras.layers.Reshape((), dtype="float32", name="output")(rescaled)
        model = keras.Model(inputs, outputs, name="mlp")
        loss, metrics = task_loss(self.task)
        settings = compile_settings(model, self.train, self.n_train, batch_size(hp, self.train))
        model.compile(optimizer=optimizer, loss=loss, metrics=metrics, **settings)
        return model

    def fit(self, hp: kt.HyperParameters, model: keras.Model, x: Any = None, *args: Any, **kwargs: Any) -> Any:
        """Train in the trial's batch (``train.batch_size`` may be a list: then it is a hyperparameter)."""
        return model.fit(rebatch(x, hp, self.train), *args, **kwargs)


def dense_stack(x: Any, n_layers: int, units: int, act: str, reg: Any, rate: float) -> Any:
    """``n_layers`` Dense layers ``dense_<i>`` of ``units``, each followed by ``dropout_<i>`` when ``rate`` > 0.

    The MLP's hidden layers and the CNN's dense head.
    """
    for i in range(n_layers):
        x = keras.layers.Dense(
            units,
            activation=blocks.activation_fn(act),
            kernel_regularizer=reg,
            kernel_initializer=_initializer(act),
            name=f"dense_{i}",
        )(x)
        if rate > 0:
            x = keras.layers.Dropout(rate, name=f"dropout_{i}")(x)
    return x


def _initializer(activation: str) -> str:
    # He initialization suits the ReLU family; Glorot suits saturating and linear units.
    return "he_normal" if activation in ("relu", "elu", "leaky_relu", "gelu", "swish") else "glorot_uniform"
