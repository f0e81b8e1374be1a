"""The model registry: a family name → a ``kt.HyperModel`` for a card and its dataset.

Exports :data:`FAMILIES` (family name → HyperModel class: ``mlp``, ``cnn``, KerasTuner's
``resnet`` and ``xception``), :func:`get` (keras
``optimizers.get`` style) and :func:`build_hypermodel` (the card's HyperModel), and re-exports
:class:`~toolkit.models.mlp.MLPHyperModel` and the execution helpers
:func:`~toolkit.models.execution.auto_steps_per_execution` and
:func:`~toolkit.models.execution.auto_jit_compile`.
"""

from __future__ import annotations

from typing import Any

import keras_tuner as kt

from toolkit.config import MODEL_FAMILIES, ConfigError
from toolkit.models import builder
from toolkit.models.applications import ResNetHyperModel, XceptionHyperModel
from toolkit.models.cnn import CNNHyperModel
from toolkit.models.execution import auto_jit_compile, auto_steps_per_execution
from toolkit.models.mlp import MLPHyperModel, _initializer

__all__ = [
    "FAMILIES",
    "CNNHyperModel",
    "MLPHyperModel",
    "ResNetHyperModel",
    "XceptionHyperModel",
    "auto_jit_compile",
    "auto_steps_per_execution",
    "build_hypermodel",
    "builder",
    "describe",
    "for_card",
    "get",
    # Private helpers that other modules reach through the package.
    "_initializer",
]

# Each family's class builds itself from a card and its dataset with ``from_card``.
FAMILIES: dict[str, type[kt.HyperModel]] = {
    "mlp": MLPHyperModel,
    "cnn": CNNHyperModel,
    "resnet": ResNetHyperModel,
    "xception": XceptionHyperModel,
}
# The card's names (toolkit.config, free of TensorFlow) and the classes must be the same set.
assert set(FAMILIES) == set(MODEL_FAMILIES), (sorted(FAMILIES), MODEL_FAMILIES)


def get(family_or_builder: Any, cfg: Any, dataset: Any) -> kt.HyperModel:
    """The HyperModel for a card and its dataset: one door for shipped families and the user's own models.

    Args:
        family_or_builder: A family name (one of :data:`FAMILIES`); a builder reference
            ``"file.py:build"`` or ``"package.module:build"``; or the object itself: a function
            ``build(hp) -> keras.Model``, a ``kt.HyperModel`` subclass or an instance.
        cfg: The validated card.
        dataset: The loaded dataset.

    Returns:
        The family's HyperModel, or the user's wrapped in :class:`~toolkit.models.builder.CardCompiled`
        (built under the card's precision; compiled with the card's optimizer space if it comes back uncompiled).

    Raises:
        ConfigError: For an unknown family or a builder that cannot be resolved (field ``model``).
    """
    if isinstance(family_or_builder, str) and ":" not in family_or_builder:
        if family_or_builder not in FAMILIES:
            raise ConfigError(
                f"model.family: unknown {family_or_builder!r}. Accepted: {', '.join(FAMILIES)}", field="model.family"
            )
        return FAMILIES[family_or_builder].from_card(cfg, dataset)
    if isinstance(family_or_builder, str):
        family_or_builder = builder.resolve(family_or_builder)
    inner = builder.as_hypermodel(family_or_builder)
    return builder.CardCompiled(inner, cfg.space, dataset.task, train=cfg.train, n_train=len(dataset.x_train))


def for_card(cfg: Any, dataset: Any, hypermodel: Any = None) -> kt.HyperModel:
    """The card's HyperModel: ``hypermodel`` when given (the Python door), else ``model.builder``, else ``model.family``."""
    if hypermodel is not None:
        return get(hypermodel, cfg, dataset)
    return get(cfg.model.builder or cfg.model.family, cfg, dataset)


def describe(hypermodel: kt.HyperModel, cfg: Any) -> str:
    """What built the trials, for the search's ``toolkit.model`` tag: a family name or the user's builder."""
    if isinstance(hypermodel, builder.CardCompiled):
        return cfg.model.builder or builder.describe(hypermodel)
    return cfg.model.family


def build_hypermodel(cfg: Any, dataset: Any) -> kt.HyperModel:
    """The HyperModel for a card and its resolved dataset (its builder or family)."""
    return for_card(cfg, dataset)
