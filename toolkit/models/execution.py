"""How Keras executes a compiled model: steps per ``tf.function`` call and XLA, chosen from model and data size."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

# Below this many training steps per trial, one step per call is faster: tracing the multi-step
# loop (a while_loop around a cond) costs 0.2-0.35 s once per trial, and it saves about 1 ms per
# step on small models (benchmarks/RESULTS.md, "Steps per execution for short trials").
SHORT_TRIAL_STEPS = 300


def auto_steps_per_execution(n_train: int, batch_size: int, setting: int | str = "auto", epochs: int | None = None) -> int:
    """Steps run per ``tf.function`` call.

    Small models are bound by per-step Python and dispatch overhead, so running several steps per
    call is faster and changes no update: the same batches meet the same weights in the same order.
    A short trial is the exception: the loop costs more to trace than it saves, so a trial of
    fewer than :data:`SHORT_TRIAL_STEPS` steps runs one step per call.

    Args:
        n_train: Training samples.
        batch_size: The global batch.
        setting: The card's value: an int, or ``"auto"``. Defaults to ``"auto"``.
        epochs: The trial's epochs, when known. Defaults to None (treated as a long trial).

    Returns:
        The number of steps per execution.
    """
    if setting != "auto":
        return int(setting)
    steps = max(1, math.ceil(n_train / batch_size))
    if epochs is not None and epochs * steps < SHORT_TRIAL_STEPS:
        return 1
    # One call per epoch at most; 32 keeps per-epoch callbacks and the last partial batch cheap.
    return max(1, min(32, steps))


def auto_jit_compile(params_estimate: int, setting: bool | str = "auto", precision: str = "float32") -> bool:
    """XLA pays off only for compute-bound models; on tiny ones it costs compile time.

    Under ``mixed_bfloat16`` on a CPU, ``auto`` leaves XLA off: XLA's CPU backend runs bfloat16
    matmuls as float32 ones, so the bf16 gain is lost (``benchmarks/p11_bfloat16.py``: 0.97x with
    XLA against 1.35-1.5x on oneDNN's bf16 kernels without it, for the P4 model).
    """
    if setting != "auto":
        return bool(setting)
    if precision == "mixed_bfloat16" and not _has_gpu():
        return False
    return params_estimate >= 1_000_000


def _has_gpu() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def task_loss(task: str) -> tuple[str, list[str]]:
    """The loss and metrics every model of a task compiles with (so every task logs the same names)."""
    if task == "classification":
        return "sparse_categorical_crossentropy", ["accuracy"]
    return "mse", ["mae"]


def batch_size(hp: Any, train: Any) -> int:
    """The trial's global batch: a ``batch_size`` hyperparameter when the card lists several.

    Declared while the model is built (so ``steps_per_execution`` can follow it) and read again in
    ``fit``; a single batch size declares nothing, so a card without a list logs the params it did.

    Args:
        hp: The trial's hyperparameters.
        train: The card's training section.

    Returns:
        The global batch this trial trains with.
    """
    choices = train.batch_choices
    if len(choices) == 1:
        return choices[0]
    return int(hp.Choice("batch_size", choices))


def rebatch(x: Any, hp: Any, train: Any) -> Any:
    """The training input cut in the trial's batch.

    The input pipelines are batched in the card's smallest choice (``train.batch_size``);
    ``rebatch`` regroups those elements in order, so the seeded shuffle is kept and the global
    batch is split over the replicas as any other.

    Args:
        x: ``fit``'s first argument: a batched ``tf.data.Dataset`` (anything else is returned as is).
        hp: The trial's hyperparameters.
        train: The card's training section.

    Returns:
        The input to train on.
    """
    import tensorflow as tf

    batch = batch_size(hp, train)
    if batch == train.batch_size or not isinstance(x, tf.data.Dataset):
        return x
    return x.rebatch(batch).prefetch(tf.data.AUTOTUNE)


def compile_settings(model: Any, train: Any, n_train: int, batch: int | None = None) -> dict[str, Any]:
    """``steps_per_execution`` and ``jit_compile`` for ``model.compile``, from the card and the sizes.

    KerasTuner builds inside the strategy's scope, which decides how many steps can run per call.

    Args:
        model: The built model.
        train: The card's training section.
        n_train: Training samples.
        batch: The trial's global batch (see :func:`batch_size`). Defaults to ``train.batch_size``.
    """
    from toolkit.strategy import steps_per_execution_for

    return {
        "steps_per_execution": steps_per_execution_for(
            auto_steps_per_execution(
                n_train, batch or train.batch_size, train.steps_per_execution, getattr(train, "epochs", None)
            )
        ),
        "jit_compile": auto_jit_compile(model.count_params(), train.jit_compile, getattr(train, "precision", "float32")),
    }


@contextlib.contextmanager
def build_precision(policy: str) -> Iterator[None]:
    """The card's precision policy for one build, then the previous one back.

    KerasTuner calls ``keras.backend.clear_session()`` before every build, which resets Keras'
    global policy, so a policy set once per search would silently train float32 models; and
    restoring it keeps it from leaking into later code in the same process. Layers keep the
    policy they were built with, and ``compile()`` wraps the optimizer in a LossScaleOptimizer
    for ``mixed_float16``.
    """
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)
