"""How Keras executes a compiled model: steps per ``tf.function`` call and XLA, chosen from model and data size."""

from __future__ import annotations

import math
from typing import Any


def auto_steps_per_execution(n_train: int, batch_size: int, setting: int | str = "auto") -> int:
    """Steps run per ``tf.function`` call.

    Small models are bound by per-step Python and dispatch overhead, so running several steps per
    call is faster and changes no update: the same batches meet the same weights in the same order.

    Args:
        n_train: Training samples.
        batch_size: The global batch.
        setting: The card's value: an int, or ``"auto"``. Defaults to ``"auto"``.

    Returns:
        The number of steps per execution.
    """
    if setting != "auto":
        return int(setting)
    steps = max(1, math.ceil(n_train / batch_size))
    # One call per epoch at most; 32 keeps per-epoch callbacks and the last partial batch cheap.
    return max(1, min(32, steps))


def auto_jit_compile(params_estimate: int, setting: bool | str = "auto") -> bool:
    """XLA pays off only for compute-bound models; on tiny ones it costs compile time."""
    if setting != "auto":
        return bool(setting)
    return params_estimate >= 1_000_000


def task_loss(task: str) -> tuple[str, list[str]]:
    """The loss and metrics every model of a task compiles with (so every task logs the same names)."""
    if task == "classification":
        return "sparse_categorical_crossentropy", ["accuracy"]
    return "mse", ["mae"]


def compile_settings(model: Any, train: Any, n_train: int) -> dict[str, Any]:
    """``steps_per_execution`` and ``jit_compile`` for ``model.compile``, from the card and the sizes.

    KerasTuner builds inside the strategy's scope, which decides how many steps can run per call.
    """
    from toolkit.strategy import steps_per_execution_for

    return {
        "steps_per_execution": steps_per_execution_for(
            auto_steps_per_execution(n_train, train.batch_size, train.steps_per_execution)
        ),
        "jit_compile": auto_jit_compile(model.count_params(), train.jit_compile),
    }
