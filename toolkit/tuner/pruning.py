"""Pruning: stop a hopeless trial early under any KerasTuner algorithm (``tuner.pruning``).

KerasTuner stops trials early only inside Hyperband. Here a Keras callback judges the trial at
each epoch's end against the finished trials of the same search, whichever worker ran them:
their curves are read from MLflow, so one process and ``--workers N`` see the same history. A
pruned trial stops training; KerasTuner scores it by the best epoch it reached, and its run
ends FINISHED with the tags ``toolkit.pruned=true`` and ``toolkit.pruned_epoch=<epoch>``.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np

from toolkit import tracking
from toolkit.config import PruningConfig

PRUNED_TAG = "toolkit.pruned"
PRUNED_EPOCH_TAG = "toolkit.pruned_epoch"


def pruned_epoch_of(tracker: tracking.SearchTracker, trial_id: str) -> int | None:
    """The epoch a trial of this search was pruned at, from its run's tag (how a distributed chief knows)."""
    query = f"tags.`{tracking.PARENT_TAG}` = '{tracker.parent_run_id}' and tags.`toolkit.trial_id` = '{trial_id}'"
    query += f" and tags.`{PRUNED_TAG}` = 'true'"
    runs = tracker.client.search_runs([tracker.ensure_experiment()], filter_string=query, max_results=10)
    epochs = [r.data.tags.get(PRUNED_EPOCH_TAG, "") for r in runs]
    return next((int(e) for e in epochs if e.isdigit()), None)


def running_best(curve: np.ndarray, direction: str) -> np.ndarray:
    """The best value so far at each epoch (NaN epochs are skipped)."""
    filled = np.where(np.isfinite(curve), curve, -np.inf if direction == "max" else np.inf)
    best = np.maximum.accumulate(filled) if direction == "max" else np.minimum.accumulate(filled)
    return np.where(np.isfinite(best), best, np.nan)


def threshold(values: list[float], rule: PruningConfig, direction: str) -> float:
    """The value a trial's best-so-far must reach: the median, or the edge of the best ``percentile`` per cent."""
    share = 50.0 if rule.rule == "median" else float(rule.percentile)
    # Optuna's convention: for a maximized objective the top p% lie above the (100 - p)th percentile.
    q = 100.0 - share if direction == "max" else share
    return float(np.percentile(values, q))


def should_prune(best_so_far: float, others: list[float], rule: PruningConfig, direction: str) -> bool:
    """Whether a trial whose best objective so far is ``best_so_far`` is worse than the rule allows."""
    if len(others) < rule.min_trials or not others:
        return False
    if not math.isfinite(best_so_far):
        return True
    edge = threshold(others, rule, direction)
    return best_so_far < edge if direction == "max" else best_so_far > edge


class FinishedCurves:
    """The objective's running best, by epoch, of a search's finished trial runs, read from MLflow.

    Finished runs do not change, so each is read once; the list of them is refreshed at most
    once per epoch of the trial being judged.

    Args:
        uri: The tracking URI (every worker's runs are there).
        parent_run_id: The search's parent run.
        objective: The objective's metric name.
        direction: ``"max"`` or ``"min"``.
    """

    def __init__(self, uri: str, parent_run_id: str, objective: str, direction: str) -> None:
        self.uri = uri
        self.parent_run_id = parent_run_id
        self.objective = objective
        self.direction = direction
        self._curves: dict[str, np.ndarray] = {}
        self._experiment_id: str | None = None

    def refresh(self, skip: str | None = None) -> None:
        client = tracking.client(self.uri)
        if self._experiment_id is None:
            self._experiment_id = client.get_run(self.parent_run_id).info.experiment_id
        runs = client.search_runs(
            [self._experiment_id],
            filter_string=f"tags.`{tracking.PARENT_TAG}` = '{self.parent_run_id}' and attributes.status = 'FINISHED'",
            max_results=50_000,
        )
        for run in runs:
            run_id = run.info.run_id
            if run_id in self._curves or run_id == skip or run.data.tags.get(tracking.ROLE, "trial") != "trial":
                continue
            by_step = {m.step: m.value for m in client.get_metric_history(run_id, self.objective)}
            curve = np.array([by_step[s] for s in sorted(by_step)], dtype="float64")
            self._curves[run_id] = running_best(curve, self.direction)

    def at(self, epoch: int) -> list[float]:
        """The finished trials' best-so-far at ``epoch`` (0-based), for those that reached it."""
        return [float(c[epoch]) for c in self._curves.values() if c.size > epoch and np.isfinite(c[epoch])]


class Pruner(keras.callbacks.Callback):
    """Stops the trial's training when the rule finds it hopeless; records the epoch in ``pruned``.

    Args:
        rule: The card's ``tuner.pruning``.
        curves: The search's finished trials.
        run_id: The trial's own run (not among the finished ones yet, but never compared with itself).
        pruned: Where the epoch is recorded, ``pruned[trial_id]``. A trial with several
            executions stops every one at the epoch the first was pruned at.
        trial_id: The trial.
        epochs: The trial's epochs (the last one is never pruned: nothing is saved).
    """

    def __init__(
        self,
        rule: PruningConfig,
        curves: FinishedCurves,
        run_id: str,
        pruned: dict[str, int],
        trial_id: str,
        epochs: int,
    ) -> None:
        super().__init__()
        self.rule = rule
        self.curves = curves
        self.run_id = run_id
        self.pruned = pruned
        self.trial_id = trial_id
        self.epochs = epochs
        self._values: list[float] = []

    def __deepcopy__(self, memo: dict[int, Any]) -> Pruner:
        # KerasTuner deep-copies a trial's callbacks for each execution: the copy must still
        # record into the tuner's ``pruned`` and share the curves read so far.
        return Pruner(self.rule, self.curves, self.run_id, self.pruned, self.trial_id, self.epochs)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        value = (logs or {}).get(self.curves.objective)
        self._values.append(float(value) if value is not None else math.nan)
        if self.trial_id in self.pruned:  # a later execution of a pruned trial
            if epoch >= self.pruned[self.trial_id]:
                self.model.stop_training = True
            return
        if epoch + 1 < self.rule.min_epochs or epoch + 1 >= self.epochs:
            return
        self.curves.refresh(skip=self.run_id)
        best = running_best(np.array(self._values), self.curves.direction)[-1]
        if should_prune(float(best), self.curves.at(epoch), self.rule, self.curves.direction):
            self.pruned[self.trial_id] = epoch
            self.model.stop_training = True
