"""Experiment cards → KerasTuner searches under tf.distribute, tracked in MLflow.

Light helpers import eagerly; those that need TensorFlow load on first use, so
``import toolkit`` stays fast::

    from toolkit import load_config, run_search
    cfg = load_config("quickstart", ["tuner.max_trials=2"])
    result = run_search(cfg)
"""

from __future__ import annotations

from typing import Any

from toolkit.config import ConfigError, ExperimentConfig, load_config

__version__ = "0.1.0"

_LAZY = {
    "run_search": "toolkit.tuner",
    "load_dataset": "toolkit.data",
    "make_pipeline": "toolkit.data",
    "MLPHyperModel": "toolkit.models",
    "make_strategy": "toolkit.strategy",
    "SearchTracker": "toolkit.tracking",
    "make_optimizer": "toolkit.space",
    "gradient_check": "toolkit.diagnostics",
    "DiagnosticsCallback": "toolkit.diagnostics",
    "trials_table": "toolkit.analysis",
}

__all__ = ["ConfigError", "ExperimentConfig", "load_config", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'toolkit' has no attribute {name!r}")
