"""Keras callbacks the tracked tuner adds to every trial's ``fit``."""

from __future__ import annotations

import math
from typing import Any

import keras

from toolkit import tracking


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
    """

    def __init__(self, uri: str, run_id: str) -> None:
        super().__init__()
        self.uri = uri
        self.run_id = run_id

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        # The model's size, whatever built it: the report sets trials of similar size side by side.
        tracking.log_metrics(self.uri, self.run_id, {"model_params": float(self.model.count_params())}, step=0, synchronous=False)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        metrics = tracking.finite_metrics(logs or {})
        if metrics:
            # Queued, not awaited: an epoch's end must not wait for the store.
            tracking.log_metrics(self.uri, self.run_id, metrics, step=epoch, synchronous=False)
