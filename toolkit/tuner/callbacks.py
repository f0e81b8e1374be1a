"""Keras callbacks the tracked tuner adds to every trial's ``fit``."""

from __future__ import annotations

import logging
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

from toolkit import tracking

log = logging.getLogger(__name__)
# Latency: calls not timed (the first builds what a call needs), then calls timed; the median counts.
LATENCY_WARMUP = 3
LATENCY_REPEATS = 15


class QuietTerminateOnNaN(keras.callbacks.TerminateOnNaN):
    """``TerminateOnNaN`` without its print: the trial's FAILED status and reason tell the story."""

    def on_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.model.stop_training = True


class EpochLogger(keras.callbacks.Callback):
    """Logs Keras' own metric names every epoch, with ``step=epoch``, in one batched call.

    Before the first epoch it logs ``model_params``, the model's parameter count.

    Args:
        uri: The tracking URI.
        run_id: The trial's run.
        prefix: Put before every metric's name (``fold_2/`` under ``train.folds``). Defaults to "".
        log_size: Log ``model_params`` before the first epoch. Defaults to True.
    """

    def __init__(self, uri: str, run_id: str, prefix: str = "", log_size: bool = True) -> None:
        super().__init__()
        self.uri = uri
        self.run_id = run_id
        self.prefix = prefix
        self.log_size = log_size

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        # The model's size, whatever built it: the report sets trials of similar size side by side.
        if self.log_size:
            size = {"model_params": float(self.model.count_params())}
            tracking.log_metrics(self.uri, self.run_id, size, step=0, synchronous=False)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        metrics = {self.prefix + k: v for k, v in tracking.finite_metrics(logs or {}).items()}
        if metrics:
            # Queued, not awaited: an epoch's end must not wait for the store.
            tracking.log_metrics(self.uri, self.run_id, metrics, step=epoch, synchronous=False)


def measure_model(model: keras.Model, batch: Any) -> dict[str, float]:
    """The toolkit's measures of a trained model (``toolkit.config.MEASURES``).

    ``model_params`` is its parameter count; ``model_size_mb`` the size of its saved weights
    (``save_weights``, Keras' ``.weights.h5``) in megabytes; ``latency_ms`` the median, over
    :data:`LATENCY_REPEATS` calls after :data:`LATENCY_WARMUP` untimed ones (the first traces the
    model's predict function, some 20-50 ms), of ``model.predict_on_batch`` on one batch of
    ``train.batch_size`` rows: Keras' compiled inference step, as ``predict`` and a served model
    run it, with its output back on the host as numpy.

    Args:
        model: The trained model.
        batch: One batch of inputs (an array, or a structure of arrays for several inputs).

    Returns:
        Measure name → value.
    """
    out = {"model_params": float(model.count_params())}
    with tempfile.TemporaryDirectory(prefix="toolkit-measure-") as tmp:
        path = Path(tmp) / "model.weights.h5"
        model.save_weights(path)
        out["model_size_mb"] = path.stat().st_size / 1e6
    for _ in range(LATENCY_WARMUP):
        model.predict_on_batch(batch)
    times = []
    for _ in range(LATENCY_REPEATS):
        start = time.perf_counter()
        model.predict_on_batch(batch)  # returns numpy: the device has finished
        times.append(time.perf_counter() - start)
    out["latency_ms"] = statistics.median(times) * 1000.0
    return out


def one_batch(x: Any, size: int) -> Any:
    """The first ``size`` rows of ``x`` (repeated when it has fewer): the latency measure's batch."""
    rows = len(keras.tree.flatten(x)[0])
    index = np.arange(size) % max(rows, 1)
    return keras.tree.map_structure(lambda a: np.take(np.asarray(a), index, axis=0), x)


class TrialMeasures(keras.callbacks.Callback):
    """Measures the trained model once per trial, when its first ``fit`` ends (see :func:`measure_model`).

    KerasTuner deep-copies a trial's callbacks for every execution; the copies are this one, so
    ``into`` holds the first execution's measures. A measure that fails is logged and left out:
    it never fails the trial.

    Args:
        batch: One batch of inputs (see :func:`one_batch`).
        into: Trial id → measures, filled here.
        trial_id: The trial.
    """

    def __init__(self, batch: Any, into: dict[str, dict[str, float]], trial_id: str) -> None:
        super().__init__()
        self.batch = batch
        self.into = into
        self.trial_id = trial_id

    def __deepcopy__(self, memo: dict[int, Any]) -> TrialMeasures:
        return self

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self.trial_id in self.into:
            return
        try:
            self.into[self.trial_id] = measure_model(self.model, self.batch)
        except Exception as exc:  # a model that cannot be saved or predict still trained
            log.warning("trial %s: could not measure the model: %s: %s", self.trial_id, type(exc).__name__, exc)
            self.into[self.trial_id] = {"model_params": float(self.model.count_params())}


class EpochKey(keras.callbacks.Callback):
    """Sets an :func:`toolkit.data.pipeline.epoch_pipeline`'s epoch at each epoch's beginning.

    ``fit`` makes an epoch's iterator after its ``on_epoch_begin`` callbacks, so that iterator
    shuffles with the epoch's own key: the order is the same in any process, for any trial, and
    for a trial resumed at ``initial_epoch``.

    Args:
        epoch: The pipeline's ``toolkit_epoch`` variable.
    """

    def __init__(self, epoch: Any) -> None:
        super().__init__()
        self.epoch = epoch

    def __deepcopy__(self, memo: dict[int, Any]) -> EpochKey:
        return self  # the copy KerasTuner makes for each execution must set the same pipeline's variable

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.epoch.assign(epoch)
