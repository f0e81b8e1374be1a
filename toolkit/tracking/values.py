"""Params and metrics: flattening the card, keeping only numbers, batched logging calls."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from toolkit.tracking.store import client


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:6000]


def finite_metrics(logs: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in (logs or {}).items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        # MLflow stores NaN, but a NaN loss is reported through the FAILED status instead.
        out[key] = number if math.isfinite(number) else float("nan")
    return out


def _synchronous() -> bool:
    # Per-trial logging is asynchronous by default: MLflow's queue writes in a background thread
    # while training goes on, and closing the run (set_terminated) drains it. Set
    # TOOLKIT_ASYNC_LOGGING=0 to make every call wait for the store.
    return os.environ.get("TOOLKIT_ASYNC_LOGGING", "1") == "0"


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int = 0, synchronous: bool = True) -> None:
    """Log several metrics in one batched call.

    Args:
        uri: The tracking URI.
        run_id: The run.
        metrics: Name → value.
        step: The step (the epoch for curves). Defaults to 0.
        synchronous: Wait for the store. Defaults to True; False queues the batch in MLflow's
            async logger (drained when the run is closed).
    """
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(key, value, now, step) for key, value in metrics.items()]
    sync = synchronous or _synchronous()
    for i in range(0, len(batch), 1000):
        client(uri).log_batch(run_id, metrics=batch[i : i + 1000], synchronous=sync)


def log_params(uri: str, run_id: str, params: dict[str, Any], synchronous: bool = True) -> None:
    """Log params in batches of 100 (MLflow's per-call limit); ``synchronous`` as for :func:`log_metrics`."""
    from mlflow.entities import Param

    items = [Param(key, _param_value(value)) for key, value in params.items()]
    sync = synchronous or _synchronous()
    for i in range(0, len(items), 100):
        client(uri).log_batch(run_id, params=items[i : i + 100], synchronous=sync)
