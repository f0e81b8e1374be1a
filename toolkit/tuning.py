"""The search: a card → data, HyperModel, strategy and a tracked KerasTuner tuner → results."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import keras
import keras_tuner as kt
import numpy as np
import yaml

from toolkit import tracking
from toolkit.config import ConfigError, ExperimentConfig
from toolkit.data import Dataset, load_dataset, make_pipeline
from toolkit.models import build_hypermodel
from toolkit.strategy import StrategyInfo, make_strategy

log = logging.getLogger(__name__)

STATUS = {"COMPLETED": "FINISHED", "FAILED": "FAILED", "INVALID": "FAILED", "STOPPED": "KILLED"}


@dataclass
class TrialResult:
    """One finished trial, as reported to progress callbacks and kept in the summary."""

    trial_id: str
    status: str  # MLflow status: FINISHED, FAILED or KILLED
    hyperparameters: dict[str, Any]
    metrics: dict[str, float]
    best_epoch: int | None
    seconds: float
    failure: str | None = None
    run_id: str | None = None


@dataclass
class SearchResult:
    """What a search produced."""

    name: str
    objective: str
    direction: str
    parent_run_id: str
    experiment_id: str
    trials: list[TrialResult] = field(default_factory=list)
    best: TrialResult | None = None
    seconds: float = 0.0
    resumed: bool = False
    stopped_reason: str | None = None


def task_metrics(task: str) -> list[str]:
    """The per-epoch metrics a task produces, i.e. the valid objectives."""
    base = ["loss", "accuracy"] if task == "classification" else ["loss", "mae"]
    return base + [f"val_{m}" for m in base]


def check_objective(cfg: ExperimentConfig, task: str) -> None:
    """Fail before any training when the objective is not a metric the task produces."""
    valid = task_metrics(task)
    if cfg.objective not in valid:
        raise ConfigError(
            f"tuner.objective: {cfg.objective!r} is not a metric of this {task} task. Accepted: {', '.join(valid)}",
            field="tuner.objective",
        )


def search_id(cfg: ExperimentConfig) -> str:
    """A stable id for a card's search: the same card resumes, a changed card starts anew.

    ``tuner.max_trials`` and ``tracking`` are left out, so a search can be extended and moved.
    """
    card = cfg.to_dict()
    card["tuner"].pop("max_trials", None)
    card.pop("tracking", None)
    digest = hashlib.sha256(json.dumps(card, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.name}-{digest}"


def _nan_epoch(history: Any) -> int | None:
    for key, values in getattr(history, "history", {}).items():
        for epoch, value in enumerate(values):
            if not math.isfinite(float(value)):
                return epoch
    return None


class TrackedTunerMixin:
    """Adds MLflow tracking to a KerasTuner tuner through its trial hooks.

    ``on_trial_begin`` opens a nested run, ``run_trial`` adds the per-epoch logger and turns a
    NaN loss into a failed trial, ``on_trial_end`` closes the run with the trial's status.
    """

    def __init__(self, *args: Any, tracker: tracking.SearchTracker, strategy_info: StrategyInfo, dataset: Dataset, card: ExperimentConfig, on_trial: Callable[[TrialResult], None] | None = None, **kwargs: Any) -> None:
        self.tracker = tracker
        self.strategy_info = strategy_info
        self.dataset = dataset
        self.card = card
        self.on_trial = on_trial
        self.results: list[TrialResult] = []
        self._runs: dict[str, str] = {}
        self._started: dict[str, float] = {}
        super().__init__(*args, **kwargs)

    def on_trial_begin(self, trial: kt.engine.trial.Trial) -> None:
        super().on_trial_begin(trial)
        tags = {**self.strategy_info.tags(), "toolkit.batch_size_per_replica": str(self.strategy_info.per_replica_batch(self.card.train.batch_size))}
        run_id = self.tracker.start_trial(trial.trial_id, trial.hyperparameters.values, tags)
        self.tracker.log_dataset(run_id, self.dataset, "training")
        self.tracker.log_dataset(run_id, self.dataset, "validation")
        self._runs[trial.trial_id] = run_id
        self._started[trial.trial_id] = time.perf_counter()

    def run_trial(self, trial: kt.engine.trial.Trial, *args: Any, **kwargs: Any) -> Any:
        run_id = self._runs[trial.trial_id]
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), keras.callbacks.TerminateOnNaN(), tracking.EpochLogger(self.tracker.uri, run_id)]
        if self.card.train.diagnostics:
            from toolkit.diagnostics import DiagnosticsCallback

            kwargs["callbacks"].append(DiagnosticsCallback.from_dataset(self.dataset, self.tracker.uri, run_id))
        histories = super().run_trial(trial, *args, **kwargs)
        for history in histories if isinstance(histories, list) else [histories]:
            epoch = _nan_epoch(history)
            if epoch is not None:
                raise kt.errors.FailedTrialError(f"the loss became NaN or infinite at epoch {epoch} (learning rate too high?)")
        return histories

    def on_trial_end(self, trial: kt.engine.trial.Trial) -> None:
        run_id = self._runs.pop(trial.trial_id)
        seconds = time.perf_counter() - self._started.pop(trial.trial_id)
        try:
            # The oracle records the trial first: a crash between the two then leaves a RUNNING
            # run that resume closes by the oracle's word, and never reruns a finished trial.
            super().on_trial_end(trial)
        finally:
            status = STATUS.get(trial.status, "FAILED")
            failure = _failure_reason(trial.message) if status != "FINISHED" else None
            metrics, best_epoch = _trial_metrics(trial, self.oracle.objective.name)
            self.tracker.end_trial(run_id, status, failure=failure, metrics={"trial_seconds": seconds})
            result = TrialResult(trial.trial_id, status, dict(trial.hyperparameters.values), metrics, best_epoch, seconds, failure, run_id)
            self.results.append(result)
            # Free the trial's graphs: KerasTuner searches otherwise grow in memory.
            keras.backend.clear_session(free_memory=False)
            gc.collect()
            if self.on_trial:
                self.on_trial(result)


def _failure_reason(message: str | None) -> str:
    if not message:
        return "the trial failed"
    lines = [line for line in message.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "the trial failed"


def _trial_metrics(trial: Any, objective: str) -> tuple[dict[str, float], int | None]:
    metrics = {}
    best_epoch = None
    for name, history in trial.metrics.metrics.items():
        observations = history.get_history()
        if observations:
            metrics[name] = float(np.mean(observations[-1].value))
    best = trial.metrics.metrics.get(objective)
    if best is not None:
        best_value = best.get_best_value()
        if best_value is not None:
            metrics[f"best_{objective}"] = float(best_value)
        for obs in best.get_history():
            if best_value is not None and float(np.mean(obs.value)) == best_value:
                best_epoch = int(obs.step)
    return metrics, best_epoch


_TUNERS = {"random": kt.RandomSearch, "grid": kt.GridSearch, "bayesian": kt.BayesianOptimization, "hyperband": kt.Hyperband}
_TRACKED: dict[str, type] = {}


def tuner_class(algorithm: str) -> type:
    """The tracked tuner class for an algorithm name."""
    if algorithm not in _TUNERS:
        raise ConfigError(f"tuner.algorithm: unknown {algorithm!r}. Accepted: {', '.join(_TUNERS)}", field="tuner.algorithm")
    if algorithm not in _TRACKED:
        base = _TUNERS[algorithm]
        _TRACKED[algorithm] = type(f"Tracked{base.__name__}", (TrackedTunerMixin, base), {})
    return _TRACKED[algorithm]


def make_tuner(cfg: ExperimentConfig, hypermodel: kt.HyperModel, directory: Path, project_name: str, overwrite: bool, **tracked: Any) -> kt.Tuner:
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
    cls = tuner_class(cfg.tuner.algorithm)
    if cfg.tuner.algorithm == "hyperband":
        return cls(max_epochs=cfg.train.epochs, factor=cfg.tuner.factor, **common, **tracked)
    return cls(max_trials=cfg.tuner.max_trials, **common, **tracked)


def project_dir(uri: str, cfg: ExperimentConfig) -> Path:
    """Where KerasTuner keeps this card's state: a stable path under the store, for resume."""
    return tracking.store_dir(uri) / "tuner" / cfg.name


def run_search(cfg: ExperimentConfig, fresh: bool = False, on_trial: Callable[[TrialResult], None] | None = None, uri: str | None = None) -> SearchResult:
    """Run (or resume) the search a card describes, tracked in MLflow.

    Args:
        cfg: The validated card.
        fresh: Start a new search and parent run instead of resuming. Defaults to False.
        on_trial: Called with each finished trial, e.g. by the CLI's progress display.
        uri: The tracking URI. Defaults to :func:`toolkit.tracking.tracking_uri`.

    Returns:
        The search's trials, best trial and run ids.

    Raises:
        ConfigError: For a bad card or bad data, before any run is created.
    """
    started = time.perf_counter()
    uri = uri or tracking.tracking_uri(cfg)
    # Everything that can reject the card happens before the first MLflow call.
    dataset = load_dataset(cfg.data, cfg.seed)
    # Record the task the data turned out to have (a float target → regression), so the default
    # objective is val_loss for it and the logged card says which task was trained.
    cfg.data.task = cfg.data.task or dataset.task
    check_objective(cfg, dataset.task)
    info = make_strategy(cfg.strategy)
    # batch_size is the global batch; a batch smaller than the replicas is a card error, caught here.
    # (The precision policy is set by the HyperModel for each build: KerasTuner resets a global one.)
    log.info("%s: global batch %d, %d per replica", info, cfg.train.batch_size, info.per_replica_batch(cfg.train.batch_size))
    keras.utils.set_random_seed(cfg.seed)

    workdir = project_dir(uri, cfg)
    state_file = workdir / "toolkit_search.json"
    sid = search_id(cfg)
    state = _read_state(state_file)
    if fresh or state.get("search_id") != sid:
        if workdir.exists():
            shutil.rmtree(workdir)
        state = {}
    resumed = bool(state)

    tracker = tracking.SearchTracker(cfg, uri)
    parent = tracker.start_search(sid, parent_run_id=state.get("parent_run_id"), extra_tags={"toolkit.strategy": info.name})
    workdir.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"search_id": sid, "parent_run_id": parent}))
    result = SearchResult(cfg.name, cfg.objective, cfg.direction, parent, tracker.ensure_experiment(), resumed=resumed)
    status = "FAILED"
    try:
        tracker.log_data_summary(dataset)
        hypermodel = build_hypermodel(cfg, dataset)
        tuner = make_tuner(cfg, hypermodel, workdir.parent, workdir.name, overwrite=False, tracker=tracker, strategy_info=info, dataset=dataset, card=cfg, on_trial=on_trial)
        if resumed:
            completed = {tid for tid, t in tuner.oracle.trials.items() if t.status == "COMPLETED"}
            closed = tracker.close_stale_trials(completed)
            if closed:
                log.info("closed %d trial run(s) left RUNNING by an interrupted search", closed)
        train_ds = make_pipeline(dataset.x_train, dataset.y_train, cfg.train.batch_size, cfg.seed)
        val_ds = make_pipeline(dataset.x_val, dataset.y_val, cfg.train.batch_size, cfg.seed, shuffle=False)
        callbacks = []
        if cfg.train.early_stopping:
            callbacks.append(keras.callbacks.EarlyStopping(monitor=cfg.objective, mode=cfg.direction, patience=cfg.train.early_stopping))
        try:
            tuner.search(train_ds, validation_data=val_ds, epochs=cfg.train.epochs, callbacks=callbacks, verbose=0)
        except RuntimeError as exc:
            if "consecutive failures" not in str(exc):
                raise
            result.stopped_reason = f"stopped after {cfg.tuner.max_consecutive_failed_trials} consecutive failed trials (tuner.max_consecutive_failed_trials)"
            tracker.client.set_tag(parent, "toolkit.stopped", result.stopped_reason)
        result.trials = _all_trials(tuner, tracker)
        result.best = _best(result.trials, cfg)
        if cfg.tracking.report:
            from toolkit.analysis import log_search_report

            log_search_report(uri, parent, cfg)  # never raises: a report must not fail a search
        status = "FINISHED"
    finally:
        result.seconds = time.perf_counter() - started
        if status == "FINISHED":
            done = [t for t in result.trials if t.status == "FINISHED"]
            failed = [t for t in result.trials if t.status == "FAILED"]
            metrics = {"trials_completed": len(done), "trials_failed": len(failed), "search_seconds": result.seconds}
            if result.best is not None:
                metrics[f"best_{cfg.objective}"] = result.best.metrics.get(f"best_{cfg.objective}", result.best.metrics.get(cfg.objective))
            tracker.end_search("FINISHED", metrics)
        else:
            tracker.kill_open_runs("the search was interrupted" if status == "KILLED" else "the search failed")
    return result


def _all_trials(tuner: Any, tracker: tracking.SearchTracker) -> list[TrialResult]:
    """Every trial of the search, including ones finished by an earlier (resumed) process."""
    by_id = {r.trial_id: r for r in tuner.results}
    for run in tracker.trial_runs():
        tid = run.data.tags.get("toolkit.trial_id")
        if tid in by_id or run.info.status not in ("FINISHED", "FAILED"):
            continue
        trial = tuner.oracle.trials.get(tid)
        metrics = {k: float(v) for k, v in run.data.metrics.items()}
        if trial is not None:
            metrics.update(_trial_metrics(trial, tuner.oracle.objective.name)[0])
        seconds = (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else 0.0
        by_id[tid] = TrialResult(tid, run.info.status, dict(trial.hyperparameters.values) if trial else dict(run.data.params), metrics, None, seconds, run.data.tags.get("toolkit.failure"), run.info.run_id)
    return sorted(by_id.values(), key=lambda r: r.trial_id)


def _best(trials: list[TrialResult], cfg: ExperimentConfig) -> TrialResult | None:
    key = f"best_{cfg.objective}"
    scored = [t for t in trials if t.status == "FINISHED" and math.isfinite(t.metrics.get(key, float("nan")))]
    if not scored:
        return None
    pick = min if cfg.direction == "min" else max
    return pick(scored, key=lambda t: t.metrics[key])


def _read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def resolved_card_yaml(cfg: ExperimentConfig) -> str:
    """The resolved card as YAML, as stored in ``experiment.yaml``."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
