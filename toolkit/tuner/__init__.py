"""The tracked KerasTuner search: a card → data, HyperModel, strategy and a tracked tuner → results.

Modules, one concept each:

- :mod:`~toolkit.tuner.search`: :func:`run_search` (one process or a distributed chief),
  :func:`join_search` (a distributed worker), :func:`finish_search`, :func:`search_inputs`,
  :func:`task_metrics`, :func:`check_objective`.
- :mod:`~toolkit.tuner.tracked`: :class:`TrackedTunerMixin`, :func:`tuner_class`,
  :func:`make_tuner`, :func:`tracked_tuner`, :func:`prune_checkpoints`.
- :mod:`~toolkit.tuner.results`: :class:`TrialResult`, :class:`SearchResult`, ``STATUS``
  (KerasTuner status → MLflow status), :func:`trials_rows`, best-trial selection, metrics from
  histories and trials.
- :mod:`~toolkit.tuner.resume`: :func:`search_id`, :func:`project_dir`, the folder's state,
  :func:`resolved_card_yaml`.
- :mod:`~toolkit.tuner.callbacks`: :class:`QuietTerminateOnNaN`, :class:`EpochLogger`.

Every name is re-exported here; the private helpers other modules reach through the package
(``_trial_metrics``, ``_failure_reason`` for :mod:`toolkit.distributed`) included.
"""

from __future__ import annotations

from toolkit.tuner.callbacks import EpochLogger, QuietTerminateOnNaN
from toolkit.tuner.results import (
    STATUS,
    SearchResult,
    TrialResult,
    _all_trials,
    _best,
    _failure_reason,
    _history_metrics,
    _nan_epoch,
    _result_from_run,
    _trial_metrics,
    oracle_summaries,
    trials_rows,
)
from toolkit.tuner.resume import _file_sha256, _read_state, project_dir, resolved_card_yaml, search_id
from toolkit.tuner.search import check_objective, finish_search, join_search, run_search, search_inputs, task_metrics
from toolkit.tuner.tracked import (
    TrackedTunerMixin,
    _remove_checkpoint,
    make_tuner,
    prune_checkpoints,
    tracked_tuner,
    tuner_class,
)

__all__ = [
    "STATUS",
    "EpochLogger",
    "QuietTerminateOnNaN",
    "SearchResult",
    "TrackedTunerMixin",
    "TrialResult",
    "check_objective",
    "finish_search",
    "join_search",
    "make_tuner",
    "project_dir",
    "prune_checkpoints",
    "resolved_card_yaml",
    "run_search",
    "search_id",
    "search_inputs",
    "task_metrics",
    "tracked_tuner",
    "oracle_summaries",
    "trials_rows",
    "tuner_class",
    # Private helpers that other modules reach through the package.
    "_all_trials",
    "_best",
    "_failure_reason",
    "_file_sha256",
    "_history_metrics",
    "_nan_epoch",
    "_read_state",
    "_remove_checkpoint",
    "_result_from_run",
    "_trial_metrics",
]
