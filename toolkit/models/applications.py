"""KerasTuner's image hypermodels, HyperResNet and HyperXception, used as they ship.

Each trial's model is the application's own ``build(hp)``, with its own hyperparameters (ResNet:
``version``, ``conv3_depth``, ``conv4_depth``, ``pooling``, ``optimizer``, ``learning_rate``;
Xception: ``activation``, ``conv2d_num_filters``, ``kernel_size``, ``initial_strides``,
``sep_num_filters``, ``num_residual_blocks``, ``pooling``, ``num_dense_layers``,
``dropout_rate``, ``dense_use_bn``, ``learning_rate``), so the card's space is empty for them.
Two things are added around it, not inside it:

- the input: raw pixels scaled per channel by a ``Normalization`` layer (training statistics),
  optionally KerasTuner's ``HyperImageAugment`` first, handed to the application as its
  ``input_tensor``;
- the compile: the applications compile for one-hot labels (``categorical_crossentropy``); the
  toolkit's labels are class indices, so the model is compiled again with the optimizer the
  application chose, the task's loss and metrics and the card's execution settings.

Weights start random (``weights=None`` in Keras' terms): nothing is ever downloaded.
"""

from __future__ import annotations

from typing import Any

import keras
import keras_tuner as kt
import numpy as np

from toolkit.config import TrainConfig
from toolkit.models.cnn import augmentation, check_images, image_input
from toolkit.models.execution import batch_size, build_precision, compile_settings, rebatch, task_loss


class _Application(kt.HyperModel):
    """One of KerasTuner's image applications over the toolkit's input and compile.

    Args:
        image_shape: One sample as (H, W, C).
        n_classes: The number of classes.
        input_shape: One sample as the data holds it. Defaults to ``image_shape``.
        mean: Per-channel means of the training pixels. Defaults to None (no scaling).
        variance: Per-channel variances of the training pixels. Defaults to None.
        train: The card's training section. Defaults to ``TrainConfig()``.
        n_train: Training samples, used to choose ``steps_per_execution``. Defaults to 1000.
        augment: Start with KerasTuner's ``HyperImageAugment``. Defaults to False.
    """

    application: type[kt.HyperModel]
    family: str

    def __init__(
        self,
        image_shape: tuple[int, ...],
        n_classes: int,
        input_shape: tuple[int, ...] | None = None,
        mean: np.ndarray | None = None,
        variance: np.ndarray | None = None,
        train: TrainConfig | None = None,
        n_train: int = 1000,
        augment: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.image_shape = tuple(image_shape)
        self.input_shape = tuple(input_shape or image_shape)
        self.n_classes = n_classes
        self.mean = mean
        self.variance = variance
        self.train = train or TrainConfig()
        self.n_train = n_train
        self.augment = augment

    @classmethod
    def from_card(cls, cfg: Any, dataset: Any) -> _Application:
        """The HyperModel for a card and its resolved dataset.

        Raises:
            ConfigError: For data that is not images of the size the application needs (``data.source``).
        """
        check_images(cls.family, cfg, dataset)
        mean, variance = dataset.channel_stats()
        return cls(
            dataset.image_shape,
            dataset.n_classes,
            input_shape=dataset.input_shape,
            mean=mean,
            variance=variance,
            train=cfg.train,
            n_train=len(dataset.x_train),
            augment=cfg.model.augment,
        )

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        with build_precision(self.train.precision):
            inputs, x = image_input(self.image_shape, self.input_shape, self.mean, self.variance)
            if self.augment:
                x = augmentation(hp, self.image_shape)(x)
            # A new application per build: its input tensor belongs to this build's graph.
            model = self.application(input_tensor=x, classes=self.n_classes, include_top=True).build(hp)
            loss, metrics = task_loss("classification")
            settings = compile_settings(model, self.train, self.n_train, batch_size(hp, self.train))
            model.compile(optimizer=model.optimizer, loss=loss, metrics=metrics, **settings)
            return model

    def fit(self, hp: kt.HyperParameters, model: keras.Model, x: Any = None, *args: Any, **kwargs: Any) -> Any:
        """Train in the trial's batch (``train.batch_size`` may be a list: then it is a hyperparameter)."""
        return model.fit(rebatch(x, hp, self.train), *args, **kwargs)


class ResNetHyperModel(_Application):
    """KerasTuner's ``HyperResNet`` (v1, v2 or ResNeXt blocks); images of at least 32x32, any channels."""

    application = kt.applications.HyperResNet
    family = "resnet"


class XceptionHyperModel(_Application):
    """KerasTuner's ``HyperXception``; images of at least 32x32, any channels."""

    application = kt.applications.HyperXception
    family = "xception"
