"""Search-space building blocks: each turns a card entry into ``hp.*`` calls of the same name.

A list is ``hp.Choice``, a scalar is ``hp.Fixed``, ``{min, max, step|sampling}`` is ``hp.Int``
(whole-number bounds on an integer parameter) or ``hp.Float``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from toolkit.config import INTEGER_SPACE, OPTIMIZERS, SGD_FAMILY, Range, SpaceConfig

if TYPE_CHECKING:
    import keras
    import keras_tuner as kt

INTEGER_PARAMS = INTEGER_SPACE


def declare(hp: kt.HyperParameters, name: str, spec: Any, integer: bool = False) -> Any:
    """Declare one hyperparameter from a card entry and return its value for this trial.

    Args:
        hp: The trial's hyperparameters.
        name: The hyperparameter's name (the card's name).
        spec: A list (choice), a scalar (fixed) or a ``Range``.
        integer: Whether the parameter is a whole number. Defaults to False.

    Returns:
        The value KerasTuner chose.
    """
    if isinstance(spec, Range):
        sampling = spec.sampling
        if integer:
            step = int(spec.step) if spec.step else 1
            return hp.Int(name, int(spec.min), int(spec.max), step=step, sampling=sampling)
        return hp.Float(name, spec.min, spec.max, step=spec.step, sampling=sampling)
    if isinstance(spec, list):
        values = [int(v) for v in spec] if integer else list(spec)
        if len(set(values)) == 1:
            return hp.Fixed(name, values[0])
        return hp.Choice(name, values, ordered=False if isinstance(values[0], (str, bool)) else None)
    return hp.Fixed(name, int(spec) if integer else spec)


def depth(hp: kt.HyperParameters, space: SpaceConfig) -> int:
    """The number of hidden layers."""
    return declare(hp, "depth", space.depth, integer=True)


def units(hp: kt.HyperParameters, space: SpaceConfig) -> int:
    """The width of every hidden layer."""
    return declare(hp, "units", space.units, integer=True)


def activation(hp: kt.HyperParameters, space: SpaceConfig) -> str:
    """The hidden layers' activation function."""
    return declare(hp, "activation", space.activation)


def dropout(hp: kt.HyperParameters, space: SpaceConfig) -> float:
    """The dropout rate after each hidden layer."""
    return float(declare(hp, "dropout", space.dropout))


def conv_blocks(hp: kt.HyperParameters, space: SpaceConfig) -> int:
    """The number of convolutional blocks (one convolution, then pooling by 2, each)."""
    return declare(hp, "conv_blocks", space.conv_blocks, integer=True)


def filters(hp: kt.HyperParameters, space: SpaceConfig) -> int:
    """The first convolutional block's filters; each later block doubles them."""
    return declare(hp, "filters", space.filters, integer=True)


def kernel_size(hp: kt.HyperParameters, space: SpaceConfig) -> int:
    """The side of every convolution's square kernel."""
    return declare(hp, "kernel_size", space.kernel_size, integer=True)


def pooling(hp: kt.HyperParameters, space: SpaceConfig) -> str:
    """``max`` or ``avg``: how each block halves the image."""
    return declare(hp, "pooling", space.pooling)


def batch_norm(hp: kt.HyperParameters, space: SpaceConfig) -> bool:
    """Whether each convolution is batch-normalized before its activation."""
    return bool(declare(hp, "batch_norm", space.batch_norm))


def regularizer(hp: kt.HyperParameters, space: SpaceConfig) -> keras.regularizers.Regularizer | None:
    """L1 and L2 kernel regularization, or None when both strengths are 0."""
    import keras

    l1 = float(declare(hp, "l1", space.l1))
    l2 = float(declare(hp, "l2", space.l2))
    if l1 == 0.0 and l2 == 0.0:
        return None
    return keras.regularizers.L1L2(l1=l1, l2=l2)


def optimizer(hp: kt.HyperParameters, space: SpaceConfig) -> keras.optimizers.Optimizer:
    """The optimizer with its learning rate; ``momentum`` exists only for the SGD family."""
    name = declare(hp, "optimizer", space.optimizer)
    learning_rate = float(declare(hp, "learning_rate", space.learning_rate))
    momentum = 0.0
    # Declared under a conditional scope so that it is only recorded, and only searched,
    # when an SGD-with-momentum optimizer is chosen.
    if _could_be_sgd_family(hp, space):
        with hp.conditional_scope("optimizer", list(SGD_FAMILY)):
            if name in SGD_FAMILY:
                momentum = float(declare(hp, "momentum", space.momentum))
    return make_optimizer(name, learning_rate, momentum)


def _could_be_sgd_family(hp: kt.HyperParameters, space: SpaceConfig) -> bool:
    choices = space.optimizer if isinstance(space.optimizer, list) else [space.optimizer]
    return any(c in SGD_FAMILY for c in choices)


def make_optimizer(name: str, learning_rate: float, momentum: float = 0.0) -> keras.optimizers.Optimizer:
    """The optimizer registry: a card name to a Keras optimizer.

    Args:
        name: One of ``toolkit.config.OPTIMIZERS``.
        learning_rate: The step size.
        momentum: SGD momentum, used by ``momentum`` and ``nesterov``. Defaults to 0.

    Returns:
        A new optimizer.

    Raises:
        ValueError: When the name is unknown; the message lists the valid names.
    """
    import keras

    if name not in _OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}. Accepted: {', '.join(_OPTIMIZERS)}")
    cls, options = _OPTIMIZERS[name]
    if options.get("momentum"):
        options = {**options, "momentum": momentum}
    return getattr(keras.optimizers, cls)(learning_rate, **options)


# Card name → (keras.optimizers class, its options); "momentum": True takes the card's momentum.
_OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    "sgd": ("SGD", {}),
    "momentum": ("SGD", {"momentum": True}),
    "nesterov": ("SGD", {"momentum": True, "nesterov": True}),
    "adam": ("Adam", {}),
    "adamw": ("AdamW", {}),
    "rmsprop": ("RMSprop", {}),
    "adagrad": ("Adagrad", {}),
}
# The card's names (toolkit.config.OPTIMIZERS) and this table are one set.
assert tuple(_OPTIMIZERS) == OPTIMIZERS, (tuple(_OPTIMIZERS), OPTIMIZERS)


def activation_fn(name: str) -> Any:
    """The activation registry: a card name to a Keras activation."""
    import keras

    if name == "leaky_relu":
        return keras.activations.leaky_relu
    return keras.activations.get(name)
