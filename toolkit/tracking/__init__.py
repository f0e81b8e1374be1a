"""MLflow tracking: one parent run per search, one nested run per trial, per-epoch metrics.

Every call goes through an explicit :class:`mlflow.MlflowClient` with run ids, never the fluent
"active run" state, so several tuner processes can log into one search. Keras callbacks carry
only strings (a run id and a URI) and so survive KerasTuner's ``copy.deepcopy``.

Modules, by concept:

- :mod:`~toolkit.tracking.store`: where the store is (``tracking_uri``, ``store_dir``,
  ``sqlite_path``), one ``client`` per URI, refusing a bad store early (``check_store``),
  creating a new one safely (``ensure_store``); ``redact_uri`` is :func:`toolkit.security.redact_uri`.
- :mod:`~toolkit.tracking.values`: params and metrics (``flatten``, ``finite_metrics``,
  ``log_metrics``, ``log_params``).
- :mod:`~toolkit.tracking.environment`: what ran the search (``environment``, ``git_commit``,
  ``pinned_requirements``).
- :mod:`~toolkit.tracking.champion`: the best model, logged once and registered
  (``log_champion``, ``LoggedModel``).
- :mod:`~toolkit.tracking.search`: ``SearchTracker``, the parent and trial runs of one search,
  and the tags that lay them out (``ROLE``, ``PARENT_TAG``).
"""

from __future__ import annotations

from toolkit.tracking.champion import LoggedModel, log_champion
from toolkit.tracking.environment import MODEL_REQUIREMENTS, environment, git_commit, pinned_requirements
from toolkit.tracking.search import PARENT_TAG, ROLE, SearchTracker
from toolkit.tracking.store import (
    DEFAULT_STORE_DIR,
    check_store,
    client,
    ensure_store,
    redact_uri,
    sqlite_path,
    store_dir,
    tracking_uri,
)
from toolkit.tracking.values import _synchronous, finite_metrics, flatten, log_metrics, log_params

__all__ = [
    "DEFAULT_STORE_DIR",
    "MODEL_REQUIREMENTS",
    "PARENT_TAG",
    "ROLE",
    "LoggedModel",
    "SearchTracker",
    "_synchronous",  # toolkit.diagnostics batches its own metrics with the same setting
    "check_store",
    "client",
    "ensure_store",
    "environment",
    "finite_metrics",
    "flatten",
    "git_commit",
    "log_champion",
    "log_metrics",
    "log_params",
    "pinned_requirements",
    "redact_uri",
    "sqlite_path",
    "store_dir",
    "tracking_uri",
]
