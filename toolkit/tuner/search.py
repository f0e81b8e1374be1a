"""The search: a card → data, HyperModel, strategy and a tracked tuner → a tracked search and its results."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras

from toolkit import models, tracking
from toolkit.config import MEASURES, ConfigError, ExperimentConfig
from toolkit.data import Dataset, load_dataset, make_pipeline
from toolkit.data.folds import fold_indices
from toolkit.data.pipeline import epoch_pipeline
from toolkit.strategy import StrategyInfo, make_strategy
from toolkit.tuner.lock import SearchLock
from toolkit.tuner.results import (
    SearchResult,
    TrialResult,
    _all_trials,
    _best,
    _failure_reason,
    oracle_summaries,
    trials_rows,
)
from toolkit.tuner.resume import _read_state, project_dir, search_id
from toolkit.tuner.tracked import frozen_heap, prune_checkpoints, tracked_tuner

log = logging.getLogger(__name__)


def task_metrics(task: str) -> list[str]:
    """The per-epoch metrics a task produces, i.e. the valid objectives."""
    base = ["loss", "accuracy"] if task == "classification" else ["loss", "mae"]
    return base + [f"val_{m}" for m in base]


def check_objective(cfg: ExperimentConfig, task: str) -> None:
    """Fail before any training when the objective, a constraint or a Pareto entry is not a metric the task produces."""
    valid = task_metrics(task)
    if cfg.objective not in valid:
        raise ConfigError(
            f"tuner.objective: {cfg.objective!r} is not a metric of this {task} task. Accepted: {', '.join(valid)}",
            field="tuner.objective",
        )
    measured = [*valid, *MEASURES]
    for where, names in (("tuner.constraints", list(cfg.tuner.constraints or ())), ("tuner.pareto", cfg.tuner.pareto or [])):
        for name in names:
            if name not in measured:
                raise ConfigError(
                    f"{where}: {name!r} is neither a measure nor a metric of this {task} task. Accepted: {', '.join(measured)}",
                    field=where,
                )


def run_search(
    cfg: ExperimentConfig,
    fresh: bool = False,
    on_trial: Callable[[TrialResult], None] | None = None,
    uri: str | None = None,
    *,
    workdir: Path | None = None,
    parent_run_id: str | None = None,
    serve: Callable[[Any, tracking.SearchTracker], None] | None = None,
    hypermodel: Any = None,
    oracle: str | None = None,
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
        hypermodel: The user's own model, in place of the card's ``model`` section: a function
            ``build(hp) -> keras.Model``, a ``kt.HyperModel`` subclass or instance, or a reference
            ``"file.py:build"`` / ``"package.module:build"``. A model it returns uncompiled is
            compiled with the card's optimizer, learning-rate and L1/L2 space. Defaults to None.
        oracle: A distributed chief's oracle address, which a second command of the same card
            is told so that it can join as a worker. Defaults to None.

    Returns:
        The search's trials, best trial and run ids.

    Raises:
        ConfigError: For a bad card, bad data or a builder that cannot be resolved, before any run is
            created; :class:`~toolkit.tuner.lock.SearchRunning` when this card's search already runs on this store.
    """
    started = time.perf_counter()
    uri = uri or tracking.tracking_uri(cfg)
    # Everything that can reject the card happens before the first MLflow call.
    dataset = load_dataset(cfg.data, cfg.seed)
    # Record the task the data turned out to have (a float target → regression), so the default
    # objective is val_loss for it and the logged card says which task was trained.
    cfg.data.task = cfg.data.task or dataset.task
    custom = hypermodel is not None or cfg.model.builder is not None
    if not custom:
        # A user's compiled model may log metrics of its own, so only the shipped families are checked here.
        check_objective(cfg, dataset.task)
    if cfg.train.folds is not None:
        fold_indices(dataset, cfg.train.folds, cfg.seed)  # too few rows (of a class) for the folds: a card error
    model = models.for_card(cfg, dataset, hypermodel)
    info = make_strategy(cfg.strategy)
    # batch_size is the global batch; a batch smaller than the replicas is a card error, caught here.
    # (The precision policy is set by the HyperModel for each build: KerasTuner resets a global one.)
    log.info("%s: global batch %d, %d per replica", info, cfg.train.batch_size, info.per_replica_batch(cfg.train.batch_size))
    keras.utils.set_random_seed(cfg.seed)
    if parent_run_id is not None:  # a distributed worker: the chief owns the parent, the folder's state and the summary
        return join_search(cfg, dataset, info, parent_run_id, uri, workdir or project_dir(uri, cfg), on_trial, model)

    workdir = workdir or project_dir(uri, cfg)
    # One search per card per store: a second command of this card exits 2 naming the first,
    # before it could delete a live folder or share its parent run.
    with SearchLock(workdir, cfg.name).acquire(oracle=oracle):
        return _search(cfg, dataset, info, model, uri, workdir, fresh, on_trial, serve, started)


def _search(
    cfg: ExperimentConfig,
    dataset: Dataset,
    info: StrategyInfo,
    model: Any,
    uri: str,
    workdir: Path,
    fresh: bool,
    on_trial: Callable[[TrialResult], None] | None,
    serve: Callable[[Any, tracking.SearchTracker], None] | None,
    started: float,
) -> SearchResult:
    """The search itself, run while this process holds the card's lock (see :func:`run_search`)."""
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

    parent = tracker.start_search(
        sid,
        parent_run_id=state.get("parent_run_id"),
        extra_tags={"toolkit.strategy": info.name, "toolkit.model": models.describe(model, cfg)},
    )
    resumed = resumed and parent == state.get("parent_run_id")
    workdir.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"search_id": sid, "parent_run_id": parent}))
    result = SearchResult(cfg.name, cfg.objective, cfg.direction, parent, tracker.ensure_experiment(), resumed=resumed)
    result.epochs = None if cfg.tuner.algorithm == "hyperband" else cfg.train.epochs
    result.ui_view = _trials_view(tracker, [])
    # Searches that resume add up their time.
    earlier_seconds = tracker.parent_metric("search_seconds") if resumed else 0.0
    status, reason = "FAILED", "the search failed"
    try:
        tracker.log_json(tracking.environment(info), "environment.json")
        tracker.log_data_summary(dataset)
        if cfg.train.folds is not None:
            # Which rows (of the training rows, then the validation rows, joined) each fold validates on.
            validation = [va.tolist() for _, va in fold_indices(dataset, cfg.train.folds, cfg.seed)]
            tracker.log_json({"folds": cfg.train.folds, "seed": cfg.seed, "validation_rows": validation}, "folds.json")
        tuner = tracked_tuner(cfg, dataset, info, tracker, workdir, model, on_trial)
        if resumed:
            trials = tuner.oracle.trials
            completed = {
                tid: oracle_summaries(t, cfg.objective, cfg.direction) for tid, t in trials.items() if t.status == "COMPLETED"
            }
            failed = {tid: _failure_reason(t.message) for tid, t in trials.items() if t.status == "FAILED"}
            closed = tracker.close_stale_trials(completed, failed)
            if closed:
                log.info("closed %d trial run(s) an interrupted search left open", closed)
        try:
            if serve is not None:  # the distributed chief: workers run the trials while it serves the oracle
                serve(tuner, tracker)
            else:
                fit_args, fit_kwargs = search_inputs(cfg, dataset)
                with frozen_heap():
                    tuner.search(*fit_args, **fit_kwargs)
        except RuntimeError as exc:
            if "consecutive failures" not in str(exc):
                raise
            result.stopped_reason = f"stopped after {cfg.tuner.max_consecutive_failed_trials} consecutive failed trials (tuner.max_consecutive_failed_trials)"
            tracker.client.set_tag(parent, "toolkit.stopped", result.stopped_reason)
        result.trials = _all_trials(tuner, tracker)
        result.best = _best(result.trials, cfg, tuner)
        metrics = finish_search(tuner, tracker, cfg, dataset, result, workdir)
        result.ui_view = _trials_view(tracker, result.trials) or result.ui_view
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


def _trials_view(tracker: tracking.SearchTracker, trials: list[TrialResult]) -> str | None:
    """The MLflow UI's view of the trials (see SearchTracker.trials_view); a failure is logged, never raised."""
    names = list(dict.fromkeys(h for t in trials for h in t.hyperparameters if not h.startswith("tuner/")))
    try:
        return tracker.trials_view(names)
    except Exception as exc:
        log.warning("could not save the MLflow UI's view of the trials: %s: %s", type(exc).__name__, exc)
        return None


def search_inputs(cfg: ExperimentConfig, dataset: Dataset) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments of ``tuner.search`` (and so of each trial's ``fit``): the same in one process and in every distributed worker."""
    # Each epoch's order is keyed to (seed, epoch): the same for a trial in any process, and on resume.
    train_ds = epoch_pipeline(dataset.x_train, dataset.y_train, cfg.train.batch_size, cfg.seed)
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
    hypermodel: Any = None,
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
        hypermodel: The HyperModel the trials build. Defaults to the card's.

    Returns:
        The trials this worker ran.
    """
    started = time.perf_counter()
    tracker = tracking.SearchTracker(cfg, uri)
    parent = tracker.attach(parent_run_id, search_id(cfg))
    result = SearchResult(cfg.name, cfg.objective, cfg.direction, parent, tracker.ensure_experiment())
    status, reason = "FAILED", "the worker failed"
    try:
        tuner = tracked_tuner(cfg, dataset, info, tracker, workdir, hypermodel or models.for_card(cfg, dataset), on_trial)
        fit_args, fit_kwargs = search_inputs(cfg, dataset)
        with frozen_heap():
            tuner.search(*fit_args, **fit_kwargs)
        result.trials = list(tuner.results)
        result.best = _best(result.trials, cfg)  # not the oracle's word: the chief may be gone
        status = "FINISHED"
    except KeyboardInterrupt as exc:  # a worker whose chief died says so (toolkit.distributed.worker.ChiefGone)
        why = getattr(exc, "reason", None) or os.environ.get("TOOLKIT_STOP_REASON")
        status, reason = "KILLED", why or "the worker was interrupted (SIGINT or SIGTERM)"
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
    if cfg.tuner.constraints:
        metrics["trials_feasible"] = sum(1 for t in done if t.feasible)
        if done and result.best is None:
            reason = f"found no feasible trial: none of the {len(done)} finished met tuner.constraints ({_constraints_text(cfg)}), so no champion is logged"
            result.stopped_reason = reason
            tracker.set_tags({"toolkit.no_feasible": reason})
    if cfg.tuner.pareto:
        _tag_pareto(tracker, cfg, result.trials)
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
            # The trial picked, not the oracle's first: under tuner.constraints they can differ.
            model = tuner.load_model(tuner.oracle.get_trial(best.trial_id))
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


def _constraints_text(cfg: ExperimentConfig) -> str:
    parts = []
    for name, bound in (cfg.tuner.constraints or {}).items():
        if bound.min is not None:
            parts.append(f"{name} >= {bound.min:g}")
        if bound.max is not None:
            parts.append(f"{name} <= {bound.max:g}")
    return ", ".join(parts)


def _tag_pareto(tracker: tracking.SearchTracker, cfg: ExperimentConfig, trials: list[TrialResult]) -> None:
    """Tag every trial run ``toolkit.pareto=true|false``: the front of ``tuner.pareto`` among the finished (feasible) trials."""
    from toolkit.analysis.pareto import PARETO_TAG, pareto_flags

    candidates = [t for t in trials if t.status == "FINISHED" and (not cfg.tuner.constraints or t.feasible)]
    flags = dict(
        zip(
            (t.trial_id for t in candidates),
            pareto_flags([t.metrics for t in candidates], cfg.tuner.pareto, cfg.objective, cfg.direction),
            strict=True,
        )
    )
    for t in trials:
        if t.run_id:
            tracker.set_tags({PARETO_TAG: str(flags.get(t.trial_id, False)).lower()}, t.run_id)
