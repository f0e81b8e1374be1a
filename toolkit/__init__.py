"""Experiment cards → KerasTuner searches under tf.distribute, tracked in MLflow.

Light helpers import eagerly; those that need TensorFlow load on first use, so
``import toolkit`` stays fast::

    from toolkit import load_config, run_search
    cfg = load_config("quickstart", ["tuner.max_trials=2"])
    result = run_search(cfg)
"""

from __future__ import annotations

import os
from typing import Any

# gRPC (imported by KerasTuner) restarts its poller thread in a forked child by default; when
# subprocess then closes the child's file descriptors before exec, the poller finds its epoll fd
# gone and aborts the child (SIGABRT, "epoll_wait error: Bad file descriptor"; grpc/grpc#43055).
# The chief forks its workers and the tracking server (their preexec_fn forces a fork), so a
# worker could die before it ran. Measured: 13 of 1000 such forks from a process serving gRPC
# aborted by default, none of 3000 with gRPC's fork support off. Set before gRPC is imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

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
