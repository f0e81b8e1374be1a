"""The model registry: a family name → a ``kt.HyperModel`` for a card and its dataset.

Exports :data:`FAMILIES` (family name → HyperModel class), :func:`get` (keras
``optimizers.get`` style) and :func:`build_hypermodel` (the card's HyperModel), and re-exports
:class:`~toolkit.models.mlp.MLPHyperModel` and the execution helpers
:func:`~toolkit.models.execution.auto_steps_per_execution` and
:func:`~toolkit.models.execution.auto_jit_compile`.
"""

from __future__ import annotations

from typing import Any

import keras_tuner as kt

from toolkit.models.execution import auto_jit_compile, auto_steps_per_execution
from toolkit.models.mlp import MLPHyperModel, _initializer

__all__ = [
    "FAMILIES",
    "MLPHyperModel",
    "auto_jit_compile",
    "auto_steps_per_execution",
    "build_hypermodel",
    "get",
    # Private helpers that other modules reach through the package.
    "_initializer",
]

# Each family's class builds itself from a card and its dataset with ``from_card``.
FAMILIES: dict[str, type[kt.HyperModel]] = {"mlp": MLPHyperModel}


def get(family_or_builder: str, cfg: Any, dataset: Any) -> kt.HyperModel:
    """The HyperModel of a model family, for a card and its resolved dataset.

    Args:
        family_or_builder: A family name, one of :data:`FAMILIES`.
        cfg: The validated card.
        dataset: The loaded dataset.

    Returns:
        The family's HyperModel, built from the card's space and training section and the data.

    Raises:
        ValueError: For an unknown family name.
    """
    if not isinstance(family_or_builder, str) or family_or_builder not in FAMILIES:
        raise ValueError(f"Unknown model family. Received: family={family_or_builder!r}. Accepted: {', '.join(FAMILIES)}")
    return FAMILIES[family_or_builder].from_card(cfg, dataset)


def build_hypermodel(cfg: Any, dataset: Any) -> MLPHyperModel:
    """The HyperModel for a card and its resolved dataset (the ``mlp`` family)."""
    return get("mlp", cfg, dataset)
