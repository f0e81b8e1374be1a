"""The convolutional network HyperModel for image-shaped data, built from the card's knobs."""

from __future__ import annotations

from typing import Any

import keras
import keras_tuner as kt
import numpy as np

from toolkit import space as blocks
from toolkit.config import ConfigError, SpaceConfig, TrainConfig, check_image_family
from toolkit.models.execution import batch_size, build_precision, compile_settings, rebatch, task_loss


def image_input(image_shape: tuple[int, ...], input_shape: tuple[int, ...], mean: Any, variance: Any) -> tuple[Any, Any]:
    """The input of an image model: raw pixels in, scaled per channel inside the model.

    Args:
        image_shape: One sample as (H, W, C).
        input_shape: One sample as the data holds it: (H, W, C) or (H, W).
        mean: Per-channel means of the training pixels, or None to leave them unscaled.
        variance: Per-channel variances of the training pixels.

    Returns:
        ``(inputs, x)``: the ``keras.Input`` and the scaled image tensor.
    """
    inputs = keras.Input(shape=input_shape, name="pixels")
    x = inputs if tuple(input_shape) == tuple(image_shape) else keras.layers.Reshape(image_shape, name="channel")(inputs)
    if mean is not None:
        # Training-split statistics only: the model serves raw pixels (0-255, or digits' 0-16)
        # and validation data never leaks into the scaling.
        x = keras.layers.Normalization(axis=-1, mean=mean, variance=np.maximum(variance, 1e-12), name="scale_pixels")(x)
    return inputs, x


def augmentation(hp: kt.HyperParameters, image_shape: tuple[int, ...]) -> keras.Model:
    """KerasTuner's ``HyperImageAugment`` as it ships: rotation, translation and contrast, tuned.

    Its layers are active in training only, so a logged model predicts on the images it is given.
    Each transform's strength is a trial hyperparameter (``factor_rotate``, ``factor_translate_x``,
    ``factor_translate_y``, ``factor_contrast``; 0 turns it off).
    """
    # augment_layers=0 applies every transform in turn. The default, KerasTuner's RandAugment,
    # makes its Keras layers inside call(), which Keras 3 refuses under tf.function ("tf.function
    # only supports singleton tf.Variables"), so every such trial would fail.
    return kt.applications.HyperImageAugment(input_shape=image_shape, augment_layers=0).build(hp)


class CNNHyperModel(kt.HyperModel):
    """Convolutional blocks, then a dense head, over raw pixels scaled inside the model.

    Each of ``conv_blocks`` blocks is one ``kernel_size`` convolution (batch-normalized when
    ``batch_norm``) and its ``activation``, then ``pooling`` by 2. The first block has ``filters``
    filters and each later one doubles them. Pooling pads, so any number of blocks fits any image
    (a 1x1 map stays 1x1). The map is flattened into ``depth`` dense layers of ``units`` with
    ``dropout``; ``l1``/``l2`` hold on every kernel, convolutions, dense layers and the output alike.

    Args:
        space: The card's search space.
        image_shape: One sample as (H, W, C).
        n_classes: The number of classes.
        input_shape: One sample as the data holds it. Defaults to ``image_shape``.
        mean: Per-channel means of the training pixels. Defaults to None (no scaling).
        variance: Per-channel variances of the training pixels. Defaults to None.
        train: The card's training section. Defaults to ``TrainConfig()``.
        n_train: Training samples, used to choose ``steps_per_execution``. Defaults to 1000.
        augment: Start with KerasTuner's ``HyperImageAugment``. Defaults to False.
    """

    def __init__(
        self,
        space: SpaceConfig,
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
        self.space = space
        self.image_shape = tuple(image_shape)
        self.input_shape = tuple(input_shape or image_shape)
        self.n_classes = n_classes
        self.mean = mean
        self.variance = variance
        self.train = train or TrainConfig()
        self.n_train = n_train
        self.augment = augment

    @classmethod
    def from_card(cls, cfg: Any, dataset: Any) -> CNNHyperModel:
        """The HyperModel for a card and its resolved dataset.

        Raises:
            ConfigError: For data that is not image-shaped, or a regression target (``data.source``).
        """
        check_images(cfg.model.family, cfg, dataset)
        mean, variance = dataset.channel_stats()
        return cls(
            cfg.space,
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
            return self._build_model(hp)

    def _build_model(self, hp: kt.HyperParameters) -> keras.Model:
        from toolkit.models.mlp import _initializer, dense_stack

        n_blocks = blocks.conv_blocks(hp, self.space)
        width = blocks.filters(hp, self.space)
        kernel = blocks.kernel_size(hp, self.space)
        pool = blocks.pooling(hp, self.space)
        norm = blocks.batch_norm(hp, self.space)
        n_dense = blocks.depth(hp, self.space)
        units = blocks.units(hp, self.space)
        act = blocks.activation(hp, self.space)
        reg = blocks.regularizer(hp, self.space)
        rate = blocks.dropout(hp, self.space)
        optimizer = blocks.optimizer(hp, self.space)

        inputs, x = image_input(self.image_shape, self.input_shape, self.mean, self.variance)
        if self.augment:
            x = augmentation(hp, self.image_shape)(x)
        pooling_layer = keras.layers.MaxPooling2D if pool == "max" else keras.layers.AveragePooling2D
        for i in range(n_blocks):
            x = keras.layers.Conv2D(
                width * 2**i,
                kernel,
                padding="same",
                use_bias=not norm,  # batch norm's shift does a bias's work
                kernel_regularizer=reg,
                kernel_initializer=_initializer(act),
                name=f"conv_{i}",
            )(x)
            if norm:
                x = keras.layers.BatchNormalization(name=f"batch_norm_{i}")(x)
            x = keras.layers.Activation(blocks.activation_fn(act), name=f"conv_{i}_{act}")(x)
            x = pooling_layer(2, padding="same", name=f"pool_{i}")(x)
        x = keras.layers.Flatten(name="flatten")(x)
        x = dense_stack(x, n_dense, units, act, reg, rate)
        # float32 under mixed precision for a stable softmax and loss.
        outputs = keras.layers.Dense(
            self.n_classes, activation="softmax", kernel_regularizer=reg, dtype="float32", name="output"
        )(x)
        model = keras.Model(inputs, outputs, name="cnn")
        loss, metrics = task_loss("classification")
        settings = compile_settings(model, self.train, self.n_train, batch_size(hp, self.train))
        model.compile(optimizer=optimizer, loss=loss, metrics=metrics, **settings)
        return model

    def fit(self, hp: kt.HyperParameters, model: keras.Model, x: Any = None, *args: Any, **kwargs: Any) -> Any:
        """Train in the trial's batch (``train.batch_size`` may be a list: then it is a hyperparameter)."""
        return model.fit(rebatch(x, hp, self.train), *args, **kwargs)


def check_images(family: str, cfg: Any, dataset: Any) -> None:
    """Refuse a loaded dataset an image family cannot take, before any MLflow run (exit 2).

    ``toolkit validate`` checks the built-in sources from their names; this catches a user's
    ``.npz`` and says what the data turned out to be.

    Raises:
        ConfigError: On ``data.source``: not images, too small for the family, or a regression target.
    """
    # Samples of one row (N, 1, W, C) or of other ranks are not images: refused as tabular data would be.
    shape = dataset.image_shape if dataset.is_image else (None if dataset.x_train.ndim == 2 else ())
    try:
        check_image_family(family, cfg.data.source, shape)
    except ValueError as exc:
        raise ConfigError(f"data.source: {exc}", field="data.source") from None
    if dataset.task != "classification":
        raise ConfigError(
            f"data.source: model.family {family!r} classifies images; {cfg.data.source!r} is a {dataset.task} dataset. "
            "Accepted: classification data (set data.task: classification for integer labels)",
            field="data.source",
        )
