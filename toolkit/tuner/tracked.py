"""The tracked KerasTuner tuner: MLflow runs through the trial hooks, and checkpoint pruning."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import keras
import keras_tuner as kt
import numpy as np
from keras_tuner.src import config as kt_config
from keras_tuner.src.engine import tuner_utils

from toolkit import tracking
from toolkit.analysis.pareto import FEASIBLE_TAG, INFEASIBLE_TAG, violations
from toolkit.config import ALGORITHMS, ConfigError, ExperimentConfig
from toolkit.data import Dataset
from toolkit.strategy import StrategyInfo
from toolkit.tracking.system import sampling_interval, start_monitor
from toolkit.tuner.callbacks import EpochKey, EpochLogger, QuietTerminateOnNaN, TrialMeasures, one_batch
from toolkit.tuner.epoch_state import RESUMED_FOLD_TAG, RESUMED_TAG, STATE_DIR, StateSaver, TrialState, done_history
from toolkit.tuner.pruning import PRUNED_EPOCH_TAG, PRUNED_TAG, FinishedCurves, Pruner
from toolkit.tuner.results import (
    STATUS,
    FoldSummary,
    TrialResult,
    _failure_reason,
    _history_metrics,
    _nan_epoch,
    _trial_metrics,
    fold_summary,
)

log = logging.getLogger(__name__)


class TrackedTunerMixin:
    """Adds MLflow tracking to a KerasTuner tuner through its trial hooks.

    ``on_trial_begin`` opens a nested run, ``run_trial`` adds the per-epoch logger and turns a
    NaN loss into a failed trial, ``on_trial_end`` closes the run with the trial's status.
    """

    def __init__(
        self,
        *args: Any,
        tracker: tracking.SearchTracker,
        strategy_info: StrategyInfo,
        dataset: Dataset,
        card: ExperimentConfig,
        on_trial: Callable[[TrialResult], None] | None = None,
        **kwargs: Any,
    ) -> None:
        self.tracker = tracker
        self.strategy_info = strategy_info
        self.dataset = dataset
        self.card = card
        self.on_trial = on_trial
        self.results: list[TrialResult] = []
        self._runs: dict[str, str] = {}
        self._started: dict[str, float] = {}
        self._histories: dict[str, list[Any]] = {}
        self._logged_params: dict[str, set[str]] = {}
        # tuner.pruning: the epoch each pruned trial stopped at, and the search's finished curves.
        self._pruned: dict[str, int] = {}
        self._finished_curves: FinishedCurves | None = None
        # tracking.system_metrics: MLflow's monitor per trial run, sampled at a tenth of the last trial's length.
        self._monitors: dict[str, Any] = {}
        self._last_seconds: float | None = None
        # Each trial's measures (model_params, model_size_mb, latency_ms), and under
        # tuner.constraints the ones it broke (empty: feasible).
        self._measures: dict[str, dict[str, float]] = {}
        self._broken: dict[str, list[str]] = {}
        self._latency_batch: Any = None
        # train.folds: each fold's (train, validation) pipelines, and each trial's summary over folds.
        self._folds: list[tuple[Any, Any]] | None = None
        self._fold_summaries: dict[str, FoldSummary] = {}
        # train.epoch_state: each running trial's saved state (resume inside a trial).
        self._states: dict[str, TrialState] = {}
        super().__init__(*args, **kwargs)

    def on_trial_begin(self, trial: kt.engine.trial.Trial) -> None:
        self._custom_gradients = custom_gradient_names()
        super().on_trial_begin(trial)
        # A listed train.batch_size makes the global batch the trial's batch_size hyperparameter.
        batch = int(trial.hyperparameters.values.get("batch_size", self.card.train.batch_size))
        tags = {
            **self.strategy_info.tags(),
            "toolkit.batch_size_per_replica": str(self.strategy_info.per_replica_batch(batch)),
            "toolkit.worker": self.tuner_id,
        }
        run_id = self.tracker.start_trial(trial.trial_id, trial.hyperparameters.values, tags)
        self._logged_params[trial.trial_id] = set(trial.hyperparameters.values)
        self.tracker.log_datasets(run_id, self.dataset, ("training", "validation"))
        self._runs[trial.trial_id] = run_id
        self._started[trial.trial_id] = time.perf_counter()
        if self.card.tracking.system_metrics:
            monitor = start_monitor(run_id, self.tracker.uri, sampling_interval(self._last_seconds))
            if monitor is not None:
                self._monitors[trial.trial_id] = monitor

    def run_trial(self, trial: kt.engine.trial.Trial, *args: Any, **kwargs: Any) -> Any:
        # A distributed worker's oracle client vets the values the chief sent before anything is built.
        check = getattr(self.oracle, "check_trial", None)
        reason = check(trial) if check is not None else None
        if reason:
            raise kt.errors.FailedTrialError(reason)
        run_id = self._runs[trial.trial_id]
        if self.card.train.epoch_state is not None:
            key = {"trial_id": trial.trial_id, "parent_run_id": self.tracker.parent_run_id, "hp": trial.hyperparameters.values}
            state = TrialState(self.get_trial_dir(trial.trial_id), key)
            self._states[trial.trial_id] = state
            if state.measures is not None:
                self._measures[trial.trial_id] = state.measures
        if self._latency_batch is None:
            x = self.dataset.x_val if len(self.dataset.y_val) else self.dataset.x_train
            self._latency_batch = one_batch(x, self.card.train.batch_size)
        shared = [
            *kwargs.get("callbacks", []),
            QuietTerminateOnNaN(),
            TrialMeasures(self._latency_batch, self._measures, trial.trial_id),
        ]
        if self.card.tuner.pruning is not None:
            if self._finished_curves is None:
                objective = self.oracle.objective
                self._finished_curves = FinishedCurves(
                    self.tracker.uri, self.tracker.parent_run_id, objective.name, objective.direction
                )
            epochs = int(kwargs.get("epochs", self.card.train.epochs))
            shared.append(Pruner(self.card.tuner.pruning, self._finished_curves, run_id, self._pruned, trial.trial_id, epochs))

        def callbacks(fold: int | None) -> list[Any]:
            # Under train.folds each fold logs its curves as fold_<i>/<metric>; the diagnostics
            # probe the first fold's models only.
            prefix = "" if fold is None else f"fold_{fold}/"
            extra = [EpochLogger(self.tracker.uri, run_id, prefix=prefix, log_size=not fold)]
            if self.card.train.diagnostics and not fold:
                from toolkit.diagnostics import DiagnosticsCallback

                extra.append(DiagnosticsCallback.from_dataset(self.dataset, self.tracker.uri, run_id))
            return [*shared, *extra]

        if self.card.train.folds is None:
            out = super().run_trial(trial, *args, **{**kwargs, "callbacks": callbacks(None)})
            histories = out if isinstance(out, list) else [out]
        else:
            histories = []
            for fold, (train_ds, val_ds) in enumerate(self._fold_inputs()):
                fold_kwargs = {**kwargs, "validation_data": val_ds, "callbacks": callbacks(fold)}
                out = super().run_trial(trial, train_ds, *args[1:], **fold_kwargs)
                histories.extend(out if isinstance(out, list) else [out])
        self._histories[trial.trial_id] = histories
        for history in histories:
            epoch = _nan_epoch(history)
            if epoch is not None:
                raise kt.errors.FailedTrialError(f"the loss became NaN or infinite at epoch {epoch} (learning rate too high?)")
        reported: Any = histories
        if self.card.train.folds is not None:
            # The oracle hears the mean over folds at the best epoch of the mean curve: what the run logs.
            objective = self.oracle.objective
            summed = fold_summary(histories, self.card.train.folds, objective.name, objective.direction)
            self._fold_summaries[trial.trial_id] = summed
            reported = summed.reported
        constraints = self.card.tuner.constraints
        if constraints:
            objective = self.oracle.objective
            values, _ = _history_metrics(histories, objective.name, objective.direction)
            broken = violations({**values, **self._measures.get(trial.trial_id, {})}, constraints)
            self._broken[trial.trial_id] = broken
            if broken:
                return self._penalized(reported)
        return reported

    def _build_and_fit_model(self, trial: kt.engine.trial.Trial, *args: Any, **kwargs: Any) -> Any:
        """One fit of the trial (a fold, or an execution), keyed to the epoch and resumable.

        The training pipeline's order follows the epoch (:class:`EpochKey`). Under
        ``train.epoch_state`` a fit that ended in an interrupted attempt is not run again (its
        saved history stands for it), a fit that was cut continues from its last saved epoch,
        and the epochs it does not train again are logged to the new run from the saved state.
        """
        callbacks = list(kwargs.get("callbacks", []))
        epoch = getattr(args[0], "toolkit_epoch", None) if args else None
        if epoch is not None:
            callbacks.insert(0, EpochKey(epoch))
        state = self._states.get(trial.trial_id)
        if state is None:
            return super()._build_and_fit_model(trial, *args, **{**kwargs, "callbacks": callbacks})
        fit = state.next_fit
        state.next_fit += 1
        run_id = self._runs[trial.trial_id]
        prefix = "" if self.card.train.folds is None else f"fold_{fit}/"
        if fit < len(state.fits_done):
            history = state.fits_done[fit]
            self._log_saved_epochs(run_id, history, prefix, len(next(iter(history.values()), [])), fit, 0)
            return done_history(history)
        progress = state.progress if state.progress is not None and state.progress.fit == fit else None
        if progress is not None:
            self._log_saved_epochs(run_id, progress.history, prefix, progress.next_epoch, fit, progress.next_epoch)
            kwargs["initial_epoch"] = max(int(kwargs.get("initial_epoch", 0)), progress.next_epoch)
            objective = self.oracle.objective
            values = [float(v) for v in progress.history.get(objective.name, [])]
            for callback in callbacks:
                # KerasTuner's best-epoch checkpoint and the pruner go on from the saved epochs.
                if isinstance(callback, tuner_utils.SaveBestEpoch) and values:
                    best = max(values) if objective.direction == "max" else min(values)
                    if objective.better_than(best, callback.best_value):
                        callback.best_value = best
                if isinstance(callback, Pruner):
                    callback._values = list(values)
        budget = self.card.train.epoch_state.budget
        callbacks.append(StateSaver(state, fit, budget, progress, self._measures, trial.trial_id))
        out = super()._build_and_fit_model(trial, *args, **{**kwargs, "callbacks": callbacks})
        if progress is not None and hasattr(out, "history"):
            # fit's History holds the epochs it trained; the trial's history is all of them.
            out.history = {k: [*progress.history.get(k, []), *v] for k, v in out.history.items()}
            out.epoch = list(range(len(next(iter(out.history.values()), []))))
        return out

    def _log_saved_epochs(
        self, run_id: str, history: dict[str, list[float]], prefix: str, epochs: int, fit: int, resumed: int
    ) -> None:
        """Log to the trial's new run the epochs an earlier attempt trained, and tag where it resumed."""
        for step in range(epochs):
            metrics = tracking.finite_metrics({prefix + k: v[step] for k, v in history.items() if step < len(v)})
            if metrics:
                tracking.log_metrics(self.tracker.uri, run_id, metrics, step=step, synchronous=False)
        tags = {RESUMED_TAG: str(resumed)}
        if self.card.train.folds is not None:
            tags[RESUMED_FOLD_TAG] = str(fit)
        self.tracker.set_tags(tags, run_id)

    def _fold_inputs(self) -> list[tuple[Any, Any]]:
        """The (train, validation) pipelines of each fold (see :func:`toolkit.data.folds.fold_indices`), made once."""
        if self._folds is None:
            from toolkit.data import make_pipeline
            from toolkit.data.folds import fold_indices, joined
            from toolkit.data.pipeline import epoch_pipeline

            x, y = joined(self.dataset)
            batch, seed = self.card.train.batch_size, self.card.seed
            self._folds = [
                (epoch_pipeline(x[tr], y[tr], batch, seed), make_pipeline(x[va], y[va], batch, seed, shuffle=False))
                for tr, va in fold_indices(self.dataset, self.card.train.folds, seed)
            ]
        return self._folds

    def _penalized(self, histories: Any) -> dict[str, float]:
        """What the oracle hears of an infeasible trial: its metrics, with the worst score so far.

        The objective becomes the worst score among the trials the oracle has completed (this
        trial's own when that is worse), so the Bayesian oracle's model sees the region as poor
        and Hyperband does not carry the trial on. The trial's run keeps what it really scored.
        """
        objective = self.oracle.objective
        reported = dict(tuner_utils.convert_to_metrics_dict(histories, objective))
        scores = [float(reported[objective.name])]
        for other in self.oracle.get_best_trials(1_000_000):  # a distributed worker asks the chief
            if other.status == "COMPLETED" and other.score is not None and np.isfinite(other.score):
                scores.append(float(other.score))
        reported[objective.name] = max(scores) if objective.direction == "min" else min(scores)
        return reported

    def on_trial_end(self, trial: kt.engine.trial.Trial) -> None:
        run_id = self._runs.pop(trial.trial_id)
        seconds = time.perf_counter() - self._started.pop(trial.trial_id)
        self._last_seconds = seconds
        monitor = self._monitors.pop(trial.trial_id, None)
        if monitor is not None:
            monitor.finish()  # its last samples go in before the run closes
        histories = self._histories.pop(trial.trial_id, None)
        stop: RuntimeError | None = None
        pruned_epoch = self._pruned.pop(trial.trial_id, None)
        if pruned_epoch is not None and trial.status == "COMPLETED":
            # Tagged before the oracle hears of the end: a distributed chief reads it from the run.
            self.tracker.set_tags({PRUNED_TAG: "true", PRUNED_EPOCH_TAG: str(pruned_epoch)}, run_id)
        else:
            pruned_epoch = None
        broken = self._broken.pop(trial.trial_id, None)
        if broken is not None and trial.status == "COMPLETED":
            # Before the oracle's end too: the chief picks the champion among the feasible runs.
            feasible = {FEASIBLE_TAG: str(not broken).lower()}
            if broken:
                feasible[INFEASIBLE_TAG] = "; ".join(broken)
            self.tracker.set_tags(feasible, run_id)
        try:
            # The oracle records the trial first. If the process dies (or is interrupted) before
            # the run is closed, the run stays open: run_search's cleanup or the next resume
            # closes it by the oracle's word, so a finished trial is never rerun and no trial is
            # FINISHED twice.
            super().on_trial_end(trial)
        except RuntimeError as exc:
            # KerasTuner stops the search after too many consecutive failures, once it has
            # counted this (failed) trial: close its run, then let run_search record the stop.
            if "consecutive failures" not in str(exc):
                raise
            stop = exc
        status = STATUS.get(trial.status, "FAILED")
        failure = None
        if status != "FINISHED":
            failure = _failure_reason(trial.message)
            if trial.status == "INVALID":
                # KerasTuner queued it for another attempt (tuner.max_retries_per_trial).
                failure += " (the trial is retried)"
        objective = self.oracle.objective
        metrics, best_epoch = _history_metrics(histories, objective.name, objective.direction)
        if not metrics:
            metrics, best_epoch = _trial_metrics(trial, objective.name)
        measures = self._measures.pop(trial.trial_id, {})
        metrics.update(measures)
        folds = {}
        summed = self._fold_summaries.pop(trial.trial_id, None)
        if summed is not None:
            # The plain-named curves are the mean over folds, logged once the last fold is done.
            for step in range(min((len(c) for c in summed.curves.values()), default=0)):
                means = tracking.finite_metrics({name: curve[step] for name, curve in summed.curves.items()})
                tracking.log_metrics(self.tracker.uri, run_id, means, step=step, synchronous=False)
            folds = summed.metrics
            metrics.update(folds)
        summary = {k: v for k, v in metrics.items() if k.startswith("best_")}
        summary.update(folds)
        # model_params is already on the run: EpochLogger logs it before the first epoch.
        summary.update({k: v for k, v in measures.items() if k != "model_params"})
        summary["trial_seconds"] = seconds
        state = self._states.pop(trial.trial_id, None)
        if state is not None:
            # What saving the state cost this trial, over all its attempts; nothing is left to resume.
            saving = {"state_saving_seconds": state.saving_seconds, "state_saves": float(state.saves)}
            metrics.update(saving)
            summary.update(saving)
            state.clear()
        if best_epoch is not None:
            summary["best_epoch"] = best_epoch
        # A hyperparameter first declared while this trial built its model (a conditional that
        # became active, say) has its value only now: log it with the others.
        logged = self._logged_params.pop(trial.trial_id, set())
        late = {k: v for k, v in trial.hyperparameters.values.items() if k not in logged}
        if late:
            tracking.log_params(self.tracker.uri, run_id, late, synchronous=False)
        if status != "FINISHED":
            pruned_epoch = None
        self.tracker.end_trial(run_id, status, failure=failure, metrics=summary, details=trial.message if failure else None)
        result = TrialResult(
            trial.trial_id,
            status,
            dict(trial.hyperparameters.values),
            metrics,
            best_epoch,
            seconds,
            failure,
            run_id,
            pruned_epoch=pruned_epoch,
            feasible=None if broken is None or status != "FINISHED" else not broken,
        )
        self.results.append(result)
        self._prune_checkpoints()
        # Free the trial's graphs: KerasTuner searches otherwise grow in memory. Inside frozen_heap
        # no collection of our own: KerasTuner's next build runs two (clear_session, gc.collect),
        # and each walks only what the trials made.
        keras.backend.clear_session(free_memory=False)
        # clear_session does not free the trial's traced graphs: TensorFlow keeps them in its
        # global gradient registry (see drop_custom_gradients), so they are released here.
        drop_custom_gradients(getattr(self, "_custom_gradients", set()))
        if not _frozen:
            gc.collect()
        if self.on_trial:
            self.on_trial(result)
        if stop is not None:
            raise stop

    def _prune_checkpoints(self) -> None:
        """Delete the checkpoints of this process's trials that are not the best so far.

        KerasTuner keeps one per trial and never deletes any (keras-team/keras-tuner#172).
        Only the best is needed, for the best model. Hyperband is left alone until the search
        ends: its later rounds load earlier trials' weights.
        """
        if isinstance(self, kt.Hyperband):
            return
        infeasible = {r.trial_id for r in self.results if r.feasible is False}
        ranked = [t.trial_id for t in self.oracle.get_best_trials(len(infeasible) + 1) if t.trial_id not in infeasible]
        best = set(ranked[:1])
        for result in self.results:
            if result.trial_id not in best:
                _remove_checkpoint(self._get_checkpoint_fname(result.trial_id))


_CUSTOM_GRADIENT = "CustomGradient-"


def custom_gradient_names() -> set[str]:
    """The names of the gradients ``tf.custom_gradient`` has registered so far in this process."""
    from tensorflow.python.framework import ops

    return {name for name in ops.gradient_registry.list() if name.startswith(_CUSTOM_GRADIENT)}


def drop_custom_gradients(keep: set[str]) -> int:
    """Unregister the ``tf.custom_gradient`` gradients registered since ``keep`` was taken.

    Every trace of a graph that calls a ``tf.custom_gradient`` function registers a gradient
    ``CustomGradient-<uid>`` in TensorFlow's global gradient registry and never removes it
    (tensorflow/tensorflow#97697, #27492). Keras' train step makes two per trial even with no
    strategy (the optimizer's all-reduce of the gradients: ``ReplicaContext.all_reduce`` is a
    custom gradient), and each closes over tensors of the trial's ``train_function`` graph, so
    every trial's graphs stayed alive: some 8,000 Python objects and 5 MB per trial, walked by
    every later collection (the per-trial drift of P10, the growth of P5). A trial's gradient is
    only looked up while its graph is traced, so once the trial has ended it can go.

    Returns:
        The number of gradients unregistered.
    """
    from tensorflow.python.framework import ops

    registry = getattr(ops.gradient_registry, "_registry", None)
    if registry is None:  # a TensorFlow whose registry changed shape: leave it alone
        return 0
    stale = custom_gradient_names() - keep
    for name in stale:
        registry.pop(name, None)
    return len(stale)


def _remove_checkpoint(path: str | Path) -> None:
    # TF-format checkpoints are a prefix with several files; Keras 3 writes one .weights.h5 file.
    for candidate in Path(path).parent.glob(Path(path).name + "*"):
        candidate.unlink(missing_ok=True)


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Run a search with the heap that exists before it frozen out of garbage collection.

    Every full collection (KerasTuner runs two per trial) otherwise walks the whole heap of
    TensorFlow, MLflow and scikit-learn objects, which only grows as trials go by. After one
    collection, ``gc.freeze`` moves what survives to a generation the collector skips; what the
    trials allocate is still collected as before. The heap is unfrozen when the search ends, so
    a process that runs several searches does not keep the garbage of one in the next.
    ``TOOLKIT_GC_FREEZE=0`` turns this off (the benchmarks' "before").
    """
    global _frozen
    if os.environ.get("TOOLKIT_GC_FREEZE", "1") == "0" or _frozen:
        yield
        return
    gc.collect()
    gc.freeze()
    _frozen = True
    try:
        yield
    finally:
        _frozen = False
        gc.unfreeze()


_frozen = False


def prune_checkpoints(directory: Path, keep: set[str]) -> int:
    """Delete every trial checkpoint under a KerasTuner project except those of ``keep``.

    Saved trial states (``train.epoch_state``) go too: the search has ended, nothing resumes.

    Args:
        directory: The project folder (``<store>/tuner/<name>``).
        keep: Trial ids whose checkpoints stay (the best trial's).

    Returns:
        The number of files removed.
    """
    removed = 0
    for trial_dir in directory.glob("trial_*"):
        if (trial_dir / STATE_DIR).is_dir():
            shutil.rmtree(trial_dir / STATE_DIR, ignore_errors=True)
        if trial_dir.name[len("trial_") :] in keep:
            continue
        for checkpoint in trial_dir.glob("checkpoint*"):
            checkpoint.unlink(missing_ok=True)
            removed += 1
    return removed


_TUNERS = {"random": kt.RandomSearch, "grid": kt.GridSearch, "bayesian": kt.BayesianOptimization, "hyperband": kt.Hyperband}
# The card's names (toolkit.config.ALGORITHMS, free of TensorFlow) and these classes are one set.
assert tuple(_TUNERS) == ALGORITHMS, (tuple(_TUNERS), ALGORITHMS)


_TRACKED: dict[str, type] = {}


def tuner_class(algorithm: str) -> type:
    """The tracked tuner class for an algorithm name."""
    if algorithm not in _TUNERS:
        raise ConfigError(f"tuner.algorithm: unknown {algorithm!r}. Accepted: {', '.join(_TUNERS)}", field="tuner.algorithm")
    if algorithm not in _TRACKED:
        base = _TUNERS[algorithm]
        _TRACKED[algorithm] = type(f"Tracked{base.__name__}", (TrackedTunerMixin, base), {})
    return _TRACKED[algorithm]


def make_tuner(
    cfg: ExperimentConfig, hypermodel: kt.HyperModel, directory: Path, project_name: str, overwrite: bool, **tracked: Any
) -> kt.Tuner:
    """Build the card's KerasTuner tuner, seeded, with the objective's direction inferred."""
    objective = kt.Objective(cfg.objective, direction=cfg.direction)
    common = dict(
        hypermodel=hypermodel,
        objective=objective,
        seed=cfg.seed,
        directory=str(directory),
        project_name=project_name,
        overwrite=overwrite,
        max_retries_per_trial=cfg.tuner.max_retries_per_trial,
        max_consecutive_failed_trials=cfg.tuner.max_consecutive_failed_trials,
        distribution_strategy=tracked["strategy_info"].strategy,
        executions_per_trial=cfg.tuner.executions_per_trial,
    )
    # KerasTuner prints every failed trial's traceback (its DEBUG defaults to True). The
    # traceback goes to the trial's run as failure.txt instead, and the reason to its tag.
    kt_config.DEBUG = log.isEnabledFor(logging.DEBUG)
    cls = tuner_class(cfg.tuner.algorithm)
    if cfg.tuner.algorithm == "hyperband":
        return cls(max_epochs=cfg.train.epochs, factor=cfg.tuner.factor, **common, **tracked)
    return cls(max_trials=cfg.tuner.max_trials, **common, **tracked)


def tracked_tuner(
    cfg: ExperimentConfig,
    dataset: Dataset,
    info: StrategyInfo,
    tracker: tracking.SearchTracker,
    workdir: Path,
    hypermodel: kt.HyperModel,
    on_trial: Callable[[TrialResult], None] | None = None,
) -> kt.Tuner:
    """The card's tracked tuner over a HyperModel, resuming the project in ``workdir``.

    The same in one process, in a distributed chief and in every worker.
    """
    return make_tuner(
        cfg,
        hypermodel,
        workdir.parent,
        workdir.name,
        overwrite=False,
        tracker=tracker,
        strategy_info=info,
        dataset=dataset,
        card=cfg,
        on_trial=on_trial,
    )
