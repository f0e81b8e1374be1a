"""Params and metrics: flattening the card, keeping only numbers, batched logging calls."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

from toolkit.config import ConfigError
from toolkit.tracking.store import client

log = logging.getLogger(__name__)


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


# Per-trial logging is asynchronous by default: MLflow's queue writes in a background thread while
# training goes on, and closing the run (set_terminated) drains it. MLflow's own switch,
# MLFLOW_ENABLE_ASYNC_LOGGING, decides when it is set (false: every call waits for the store);
# MLflow's default is synchronous, the toolkit's is not (it measured 2.8% of trial time against
# 1.8-2.5%, benchmarks/RESULTS.md).
ASYNC_DEFAULT = True
# The toolkit's earlier switch (0: synchronous), still read when MLflow's is not set.
DEPRECATED_ASYNC_VARIABLE = "TOOLKIT_ASYNC_LOGGING"
_warned: set[str] = set()


def _mlflow_async() -> bool | None:
    """MLflow's switch as MLflow reads it (true/false/1/0, any case); None when unset.

    Raises:
        ValueError: MLflow's own message, for any other value.
    """
    from mlflow.environment_variables import MLFLOW_ENABLE_ASYNC_LOGGING

    return MLFLOW_ENABLE_ASYNC_LOGGING.get() if MLFLOW_ENABLE_ASYNC_LOGGING.defined else None


def check_logging_switch() -> None:
    """Refuse, before anything runs, a value of ``MLFLOW_ENABLE_ASYNC_LOGGING`` that MLflow cannot read.

    Raises:
        ConfigError: Naming the variable, the value and what is accepted.
    """
    try:
        _mlflow_async()
    except ValueError:
        value = os.environ.get("MLFLOW_ENABLE_ASYNC_LOGGING")
        raise ConfigError(
            f"MLFLOW_ENABLE_ASYNC_LOGGING must be one of true, false, 1, 0 (any case). Received: {value!r}",
            field="MLFLOW_ENABLE_ASYNC_LOGGING",
        ) from None


def _warn_once(message: str, *args: Any) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message, *args)


def _synchronous() -> bool:
    """Whether per-trial calls wait for the store: ``MLFLOW_ENABLE_ASYNC_LOGGING=false`` (or the
    deprecated ``TOOLKIT_ASYNC_LOGGING=0``) says so; otherwise they are queued."""
    try:
        enabled = _mlflow_async()
    except ValueError as exc:
        # Mid-trial, a bad value must not leave runs open: said once, and the default used.
        # (check_logging_switch refuses it before a search starts from the CLI.)
        _warn_once("%s; logging asynchronously, the toolkit's default", exc)
        return not ASYNC_DEFAULT
    if enabled is not None:
        return not enabled
    old = os.environ.get(DEPRECATED_ASYNC_VARIABLE)
    if old is not None:
        _warn_once(
            f"{DEPRECATED_ASYNC_VARIABLE} is deprecated; set MLFLOW_ENABLE_ASYNC_LOGGING=%s instead",
            "false" if old == "0" else "true",
        )
        return old == "0"
    return not ASYNC_DEFAULT


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int = 0, synchronous: bool = True) -> None:
    """Log several metrics in one batched call.

    ``MlflowClient.log_batch`` splits a batch into the store's per-request limits itself (1000
    metrics, 100 params or tags), so nothing is chunked here.

    Args:
        uri: The tracking URI.
        run_id: The run.
        metrics: Name → value.
        step: The step (the epoch for curves). Defaults to 0.
        synchronous: Wait for the store. Defaults to True; False queues the batch in MLflow's
            async logger (drained when the run is closed) unless :func:`_synchronous` says otherwise.
    """
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(key, value, now, step) for key, value in metrics.items()]
    client(uri).log_batch(run_id, metrics=batch, synchronous=synchronous or _synchronous())


def log_params(uri: str, run_id: str, params: dict[str, Any], synchronous: bool = True) -> None:
    """Log params in one call (``log_batch`` sends them 100 at a time); ``synchronous`` as for :func:`log_metrics`."""
    from mlflow.entities import Param

    items = [Param(key, _param_value(value)) for key, value in params.items()]
    client(uri).log_batch(run_id, params=items, synchronous=synchronous or _synchronous())
