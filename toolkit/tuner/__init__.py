"""The search: a card → data, HyperModel, strategy and a tracked KerasTuner tuner → results."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import keras_tuner as kt
import numpy as np
import yaml
from keras_tuner.src import config as kt_config

from toolkit import tracking
from toolkit.config import FILE_SUFFIXES, ConfigError, ExperimentConfig, objective_direction
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
    model_uri: str | None = None


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
    A user's data file counts by content: the same card over an edited file is a new search,
    since resuming would mix trials trained on different data.
    """
    card = cfg.to_dict()
    card["tuner"].pop("max_trials", None)
    card.pop("tracking", None)
    source = Path(cfg.data.source).expanduser()
    if cfg.data.source.lower().endswith(FILE_SUFFIXES) and source.is_file():
        card["data"]["content_sha256"] = _file_sha256(source)
    digest = hashlib.sha256(json.dumps(card, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.name}-{digest}"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _nan_epoch(history: Any) -> int | None:
    for values in getattr(history, "history", {}).values():
        for epoch, value in enumerate(values):
            if not math.isfinite(float(value)):
                return epoch
    return None


class QuietTerminateOnNaN(keras.callbacks.TerminateOnNaN):
    """``TerminateOnNaN`` without its print: the trial's FAILED status and reason tell the story."""

    def on_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.model.stop_training = True


class EpochLogger(keras.callbacks.Callback):
    """Logs Keras' own metric names every epoch, with ``step=epoch``, in one batched call.

    Args:
        uri: The tracking URI.
        run_id: The trial's run.
    """

    def __init__(self, uri: str, run_id: str) -> None:
        super().__init__()
        self.uri = uri
        self.run_id = run_id

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        metrics = tracking.finite_metrics(logs or {})
        if metrics:
            # Queued, not awaited: an epoch's end must not wait for the store.
            tracking.log_metrics(self.uri, self.run_id, metrics, step=epoch, synchronous=False)


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
        super().__init__(*args, **kwargs)

    def on_trial_begin(self, trial: kt.engine.trial.Trial) -> None:
        super().on_trial_begin(trial)
        tags = {
            **self.strategy_info.tags(),
            "toolkit.batch_size_per_replica": str(self.strategy_info.per_replica_batch(self.card.train.batch_size)),
            "toolkit.worker": self.tuner_id,
        }
        run_id = self.tracker.start_trial(trial.trial_id, trial.hyperparameters.values, tags)
        self.tracker.log_datasets(run_id, self.dataset, ("training", "validation"))
        self._runs[trial.trial_id] = run_id
        self._started[trial.trial_id] = time.perf_counter()

    def run_trial(self, trial: kt.engine.trial.Trial, *args: Any, **kwargs: Any) -> Any:
        run_id = self._runs[trial.trial_id]
        kwargs["callbacks"] = [
            *kwargs.get("callbacks", []),
            QuietTerminateOnNaN(),
            EpochLogger(self.tracker.uri, run_id),
        ]
        if self.card.train.diagnostics:
            from toolkit.diagnostics import DiagnosticsCallback

            kwargs["callbacks"].append(DiagnosticsCallback.from_dataset(self.dataset, self.tracker.uri, run_id))
        histories = super().run_trial(trial, *args, **kwargs)
        self._histories[trial.trial_id] = histories if isinstance(histories, list) else [histories]
        for history in histories if isinstance(histories, list) else [histories]:
            epoch = _nan_epoch(history)
            if epoch is not None:
                raise kt.errors.FailedTrialError(f"the loss became NaN or infinite at epoch {epoch} (learning rate too high?)")
        return histories

    def on_trial_end(self, trial: kt.engine.trial.Trial) -> None:
        run_id = self._runs.pop(trial.trial_id)
        seconds = time.perf_counter() - self._started.pop(trial.trial_id)
        histories = self._histories.pop(trial.trial_id, None)
        stop: RuntimeError | None = None
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
        summary = {k: v for k, v in metrics.items() if k.startswith("best_")}
        summary["trial_seconds"] = seconds
        if best_epoch is not None:
            summary["best_epoch"] = best_epoch
        self.tracker.end_trial(run_id, status, failure=failure, metrics=summary, details=trial.message if failure else None)
        result = TrialResult(
            trial.trial_id, status, dict(trial.hyperparameters.values), metrics, best_epoch, seconds, failure, run_id
        )
        self.results.append(result)
        self._prune_checkpoints()
        # Free the trial's graphs: KerasTuner searches otherwise grow in memory.
        keras.backend.clear_session(free_memory=False)
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
        best = {t.trial_id for t in self.oracle.get_best_trials(1)}
        for result in self.results:
            if result.trial_id not in best:
                _remove_checkpoint(self._get_checkpoint_fname(result.trial_id))


def _remove_checkpoint(path: str | Path) -> None:
    # TF-format checkpoints are a prefix with several files; Keras 3 writes one .weights.h5 file.
    for candidate in Path(path).parent.glob(Path(path).name + "*"):
        candidate.unlink(missing_ok=True)


def prune_checkpoints(directory: Path, keep: set[str]) -> int:
    """Delete every trial checkpoint under a KerasTuner project except those of ``keep``.

    Args:
        directory: The project folder (``<store>/tuner/<name>``).
        keep: Trial ids whose checkpoints stay (the best trial's).

    Returns:
        The number of files removed.
    """
    removed = 0
    for trial_dir in directory.glob("trial_*"):
        if trial_dir.name[len("trial_") :] in keep:
            continue
        for checkpoint in trial_dir.glob("checkpoint*"):
            checkpoint.unlink(missing_ok=True)
            removed += 1
    return removed


def _history_metrics(histories: list[Any] | None, objective: str, direction: str) -> tuple[dict[str, float], int | None]:
    """Final and best value of every Keras metric, and the objective's best epoch.

    With several executions per trial, each epoch's values are averaged across executions
    (as KerasTuner averages their scores).

    Returns:
        ``({"val_loss": final, "best_val_loss": best, ...}, best_epoch)``.
    """
    curves: dict[str, list[list[float]]] = {}
    for history in histories or []:
        for name, values in getattr(history, "history", {}).items():
            curves.setdefault(name, []).append([float(v) for v in values])
    metrics: dict[str, float] = {}
    best_epoch = None
    for name, runs in curves.items():
        epochs = min(len(r) for r in runs)
        if epochs == 0:
            continue
        mean = np.mean([r[:epochs] for r in runs], axis=0)
        metrics[name] = float(mean[-1])
        finite = np.where(np.isfinite(mean), mean, np.nan)
        if np.all(np.isnan(finite)):
            metrics[f"best_{name}"] = float("nan")
            continue
        lower = (direction if name == objective else objective_direction(name)) == "min"
        index = int(np.nanargmin(finite) if lower else np.nanargmax(finite))
        metrics[f"best_{name}"] = float(finite[index])
        if name == objective:
            best_epoch = index
    return metrics, best_epoch


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
    on_trial: Callable[[TrialResult], None] | None = None,
) -> kt.Tuner:
    """The card's tracked tuner over its HyperModel, resuming the project in ``workdir``.

    The same in one process, in a distributed chief and in every worker.
    """
    return make_tuner(
        cfg,
        build_hypermodel(cfg, dataset),
        workdir.parent,
        workdir.name,
        overwrite=False,
        tracker=tracker,
        strategy_info=info,
        dataset=dataset,
        card=cfg,
        on_trial=on_trial,
    )


def project_dir(uri: str, cfg: ExperimentConfig) -> Path:
    """Where KerasTuner keeps this card's state: a stable path under the store, for resume."""
    return tracking.store_dir(uri) / "tuner" / cfg.name


def run_search(
    cfg: ExperimentConfig,
    fresh: bool = False,
    on_trial: Callable[[TrialResult], None] | None = None,
    uri: str | None = None,
    *,
    workdir: Path | None = None,
    parent_run_id: str | None = None,
    serve: Callable[[Any, tracking.SearchTracker], None] | None = None,
) -> SearchResult:
    """Run (or resume) the search a card describes, tracked in MLflow.

    Args:
        cfg: The validated card.
        fresh: Start a new search and parent run instead of resuming. Defaults to False.
        on_trial: Called with each finished trial, e.g. by the CLI's progress display.
        uri: The tracking URI. Defaults to :func:`toolkit.tracking.tracking_uri`.
        workdir: KerasTuner's project folder. Defaults to :func:`project_dir`.
        parent_run_id: Join the search of a distributed chief as a worker: run the trials its
            oracle hands out, nested under this parent run (see :func:`join_search`). Defaults
            to None.
        serve: Be the distributed chief: called with the tuner and tracker in place of
            ``tuner.search``, it serves the oracle until the workers finish (see
            :mod:`toolkit.distributed`). Defaults to None.

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
    if parent_run_id is not None:  # a distributed worker: the chief owns the parent, the folder's state and the summary
        return join_search(cfg, dataset, info, parent_run_id, uri, workdir or project_dir(uri, cfg), on_trial)

    workdir = workdir or project_dir(uri, cfg)
    state_file = workdir / "toolkit_search.json"
    sid = search_id(cfg)
    state = _read_state(state_file)
    tracker = tracking.SearchTracker(cfg, uri)
    if fresh or state.get("search_id") != sid:
        if state.get("parent_run_id"):
            # A search that is started over must not leave its old runs RUNNING forever.
            why = "--fresh started a new search" if fresh else "the card changed, so a new search started"
            tracker.abandon_search(state["parent_run_id"], why)
        if workdir.exists():
            shutil.rmtree(workdir)
        state = {}
    resumed = bool(state)

    parent = tracker.start_search(sid, parent_run_id=state.get("parent_run_id"), extra_tags={"toolkit.strategy": info.name})
    resumed = resumed and parent == state.get("parent_run_id")
    workdir.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"search_id": sid, "parent_run_id": parent}))
    result = SearchResult(cfg.name, cfg.objective, cfg.direction, parent, tracker.ensure_experiment(), resumed=resumed)
    # Searches that resume add up their time.
    earlier_seconds = tracker.parent_metric("search_seconds") if resumed else 0.0
    status, reason = "FAILED", "the search failed"
    try:
        tracker.log_json(tracking.environment(info), "environment.json")
        tracker.log_data_summary(dataset)
        tuner = tracked_tuner(cfg, dataset, info, tracker, workdir, on_trial)
        if resumed:
            trials = tuner.oracle.trials
            completed = {tid for tid, t in trials.items() if t.status == "COMPLETED"}
            failed = {tid: _failure_reason(t.message) for tid, t in trials.items() if t.status == "FAILED"}
            closed = tracker.close_stale_trials(completed, failed)
            if closed:
                log.info("closed %d trial run(s) an interrupted search left open", closed)
        try:
            if serve is not None:  # the distributed chief: workers run the trials while it serves the oracle
                serve(tuner, tracker)
            else:
                fit_args, fit_kwargs = search_inputs(cfg, dataset)
                tuner.search(*fit_args, **fit_kwargs)
        except RuntimeError as exc:
            if "consecutive failures" not in str(exc):
                raise
            result.stopped_reason = f"stopped after {cfg.tuner.max_consecutive_failed_trials} consecutive failed trials (tuner.max_consecutive_failed_trials)"
            tracker.client.set_tag(parent, "toolkit.stopped", result.stopped_reason)
        result.trials = _all_trials(tuner, tracker)
        result.best = _best(result.trials, cfg, tuner)
        metrics = finish_search(tuner, tracker, cfg, dataset, result, workdir)
        if cfg.tracking.report:
            from toolkit.analysis import log_search_report

            log_search_report(uri, parent, cfg)  # never raises: a report must not fail a search
        status = "FINISHED"
    except KeyboardInterrupt:
        status, reason = "KILLED", "interrupted (SIGINT or SIGTERM); rerun the same card to resume"
        raise
    except BaseException as exc:
        status, reason = "FAILED", f"the search failed: {type(exc).__name__}: {exc}"
        raise
    finally:
        result.seconds = time.perf_counter() - started
        if status == "FINISHED":
            metrics["search_seconds"] = earlier_seconds + result.seconds
            tracker.end_search("FINISHED", metrics)
        else:
            # Every run this process opened ends KILLED (interrupted) or FAILED (crashed), never RUNNING.
            tracker.close_open_runs(status, reason)
    return result


def search_inputs(cfg: ExperimentConfig, dataset: Dataset) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments of ``tuner.search`` (and so of each trial's ``fit``): the same in one process and in every distributed worker."""
    train_ds = make_pipeline(dataset.x_train, dataset.y_train, cfg.train.batch_size, cfg.seed)
    val_ds = make_pipeline(dataset.x_val, dataset.y_val, cfg.train.batch_size, cfg.seed, shuffle=False)
    callbacks = []
    if cfg.train.early_stopping:
        callbacks.append(
            keras.callbacks.EarlyStopping(monitor=cfg.objective, mode=cfg.direction, patience=cfg.train.early_stopping)
        )
    return (train_ds,), {"validation_data": val_ds, "epochs": cfg.train.epochs, "callbacks": callbacks, "verbose": 0}


def join_search(
    cfg: ExperimentConfig,
    dataset: Dataset,
    info: StrategyInfo,
    parent_run_id: str,
    uri: str,
    workdir: Path,
    on_trial: Callable[[TrialResult], None] | None = None,
) -> SearchResult:
    """A distributed worker's part of a search: run the trials the chief's oracle hands out.

    KerasTuner's ``KERASTUNER_*`` variables make the tuner a client of the chief's oracle. Trial
    runs nest under the chief's parent run; the parent, the project folder's state and the
    summary stay the chief's, so a worker never clears the folder nor closes the parent.

    Args:
        cfg: The chief's card.
        dataset: The loaded data.
        info: The strategy each trial trains under.
        parent_run_id: The chief's parent run.
        uri: The tracking URI (the chief's tracking server).
        workdir: KerasTuner's project folder (the chief's when it is shared).
        on_trial: Called with each trial this worker finished.

    Returns:
        The trials this worker ran.
    """
    started = time.perf_counter()
    tracker = tracking.SearchTracker(cfg, uri)
    parent = tracker.attach(parent_run_id, search_id(cfg))
    result = SearchResult(cfg.name, cfg.objective, cfg.direction, parent, tracker.ensure_experiment())
    status, reason = "FAILED", "the worker failed"
    try:
        tuner = tracked_tuner(cfg, dataset, info, tracker, workdir, on_trial)
        fit_args, fit_kwargs = search_inputs(cfg, dataset)
        tuner.search(*fit_args, **fit_kwargs)
        result.trials = list(tuner.results)
        result.best = _best(result.trials, cfg)  # not the oracle's word: the chief may be gone
        status = "FINISHED"
    except KeyboardInterrupt:
        status, reason = "KILLED", "the worker was interrupted (SIGINT or SIGTERM)"
        raise
    except BaseException as exc:
        reason = f"the worker failed: {type(exc).__name__}: {exc}"
        raise
    finally:
        result.seconds = time.perf_counter() - started
        if status != "FINISHED":
            tracker.close_open_runs(status, reason)  # only its own trial runs: the parent is the chief's
    return result


def finish_search(
    tuner: Any, tracker: tracking.SearchTracker, cfg: ExperimentConfig, dataset: Dataset, result: SearchResult, workdir: Path
) -> dict[str, float]:
    """The parent run's record of a finished search: artifacts, the best model, summary metrics.

    Logs ``trials.csv`` and ``search_space.json``; evaluates the best model on the test split if
    there is one; logs and registers the best model once (a resumed search whose best trial did
    not change keeps the model it logged); then keeps only the best trial's checkpoint.

    Returns:
        The parent's summary metrics (``search_seconds`` is added by the caller).
    """
    done = [t for t in result.trials if t.status == "FINISHED"]
    failed = [t for t in result.trials if t.status == "FAILED"]
    metrics: dict[str, float] = {"trials_completed": len(done), "trials_failed": len(failed)}
    tracker.log_csv(trials_rows(result.trials), "trials.csv")
    tracker.log_json(tuner.oracle.get_space().get_config(), "search_space.json")
    best = result.best
    if best is None:
        return metrics
    key = f"best_{cfg.objective}"
    metrics[key] = best.metrics.get(key, best.metrics.get(cfg.objective, float("nan")))
    tags = {"toolkit.best_trial_id": best.trial_id, "toolkit.best_run_id": best.run_id or ""}
    tracker.set_tags(tags)
    wants_test = dataset.x_test is not None and len(dataset.x_test) > 0
    already_logged = tracker.parent_tag("toolkit.model_trial_id") == best.trial_id
    if not (wants_test or (cfg.tracking.log_model and not already_logged)):
        return metrics
    try:
        with warnings.catch_warnings():
            # The checkpoint holds the trained optimizer's slots, which a freshly compiled model
            # has not built yet; they are not needed to evaluate or serve.
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            model = tuner.get_best_models(1)[0]
    except (OSError, ValueError) as exc:
        # The trials and their record stand; only the model is missing (its checkpoint was
        # deleted by hand, say). Say so on the parent rather than fail the whole search.
        reason = f"the best trial's model could not be loaded from {workdir}: {type(exc).__name__}: {exc}"
        log.warning(reason)
        tracker.set_tags({"toolkit.model_error": reason})
        return metrics
    if wants_test:
        test_ds = make_pipeline(dataset.x_test, dataset.y_test, cfg.train.batch_size, cfg.seed, shuffle=False)
        scores = model.evaluate(test_ds, verbose=0, return_dict=True)
        metrics.update({f"test_{name}": float(value) for name, value in scores.items()})
    if cfg.tracking.log_model and not already_logged:
        version_tags = {
            **tags,
            "toolkit.search_id": search_id(cfg),
            "toolkit.objective": cfg.objective,
            key: f"{metrics[key]:.6g}",
        }
        logged = tracker.log_best_model(
            model, dataset.x_train[:5], register_as=cfg.name if cfg.tracking.register_model else None, tags=version_tags
        )
        result.model_uri = logged.champion_uri or logged.model_uri
        tracker.set_tags({"toolkit.model_trial_id": best.trial_id, "toolkit.model_uri": result.model_uri})
        metrics["model_log_seconds"] = logged.seconds
    prune_checkpoints(workdir, keep={best.trial_id})
    return metrics


def trials_rows(trials: list[TrialResult]) -> list[dict[str, Any]]:
    """``trials.csv``: one row per trial with its hyperparameters, final and best metrics."""
    metric_names: dict[str, None] = {}
    hp_names: dict[str, None] = {}
    for t in trials:
        hp_names.update(dict.fromkeys(t.hyperparameters))
        metric_names.update(dict.fromkeys(k for k in t.metrics if not k.startswith("best_") and f"best_{k}" in t.metrics))
    rows = []
    for t in trials:
        row: dict[str, Any] = {"trial_id": t.trial_id, "status": t.status}
        row.update({name: t.hyperparameters.get(name, "") for name in hp_names})
        row.update({f"final_{name}": t.metrics.get(name, "") for name in metric_names})
        row.update({f"best_{name}": t.metrics.get(f"best_{name}", "") for name in metric_names})
        row.update(
            {
                "best_epoch": "" if t.best_epoch is None else t.best_epoch,
                "seconds": round(t.seconds, 3),
                "failure": t.failure or "",
                "run_id": t.run_id or "",
            }
        )
        rows.append(row)
    return rows


def _all_trials(tuner: Any, tracker: tracking.SearchTracker) -> list[TrialResult]:
    """One result per trial, including those an earlier (interrupted) process finished.

    A trial can have several runs: a KILLED one from an interrupted process, FAILED attempts
    that KerasTuner retried. The FINISHED run counts, else the latest FAILED one.
    """
    latest: dict[str, Any] = {}
    for run in tracker.trial_runs():
        tid = run.data.tags.get("toolkit.trial_id")
        if tid is None or run.info.status not in ("FINISHED", "FAILED"):
            continue
        rank = (run.info.status == "FINISHED", run.info.start_time or 0)
        if tid not in latest or rank > (latest[tid].info.status == "FINISHED", latest[tid].info.start_time or 0):
            latest[tid] = run
    by_id = {tid: _result_from_run(run, tuner) for tid, run in latest.items()}
    # This process's own results carry the Keras histories; the latest attempt wins.
    by_id.update({r.trial_id: r for r in tuner.results})
    return sorted(by_id.values(), key=lambda r: (len(r.trial_id), r.trial_id))


def _result_from_run(run: Any, tuner: Any) -> TrialResult:
    tid = run.data.tags["toolkit.trial_id"]
    data = run.data.metrics
    # Final values are the latest per-epoch ones; the best_* summaries were logged at trial end.
    metrics = {k: float(v) for k, v in data.items() if k.startswith("best_") or f"best_{k}" in data}
    trials = getattr(tuner.oracle, "trials", {})
    trial = trials.get(tid) if isinstance(trials, dict) else None
    hps = dict(trial.hyperparameters.values) if trial is not None else dict(run.data.params)
    seconds = data.get("trial_seconds")
    if seconds is None:
        seconds = (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else 0.0
    best_epoch = int(data["best_epoch"]) if "best_epoch" in data else None
    return TrialResult(
        tid, run.info.status, hps, metrics, best_epoch, float(seconds), run.data.tags.get("toolkit.failure"), run.info.run_id
    )


def _best(trials: list[TrialResult], cfg: ExperimentConfig, tuner: Any = None) -> TrialResult | None:
    """The best FINISHED trial, as KerasTuner's oracle ranks it (so it matches get_best_models)."""
    finished = {t.trial_id: t for t in trials if t.status == "FINISHED"}
    if tuner is not None:
        for trial in tuner.oracle.get_best_trials(1):
            if trial.trial_id in finished:
                return finished[trial.trial_id]
    key = f"best_{cfg.objective}"
    scored = [t for t in finished.values() if math.isfinite(t.metrics.get(key, float("nan")))]
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
