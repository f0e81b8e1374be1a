"""Trial and search results: what a trial produced, read from Keras histories, the oracle or MLflow."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from toolkit.config import MEASURES, ExperimentConfig, objective_direction

if TYPE_CHECKING:
    from toolkit import tracking

# KerasTuner's trial status → the MLflow run status it ends with.
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
    # tuner.pruning: the epoch (0-based) the trial was stopped after; None if it ran them all.
    pruned_epoch: int | None = None
    # tuner.constraints: whether the trial met them; None without constraints (or unfinished).
    feasible: bool | None = None


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
    # Each trial's epochs (train.epochs; None under Hyperband, which sets its own).
    epochs: int | None = None
    # The MLflow UI's view of the trials, within the UI: "#/experiments/<id>/runs?viewStateShareKey=...".
    ui_view: str | None = None


def _nan_epoch(history: Any) -> int | None:
    for values in getattr(history, "history", {}).values():
        for epoch, value in enumerate(values):
            if not math.isfinite(float(value)):
                return epoch
    return None


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


@dataclass
class FoldSummary:
    """A ``train.folds`` trial's folds, summed up (see :func:`fold_summary`).

    Attributes:
        reported: Every metric's mean over folds at the best epoch: what the oracle hears.
        curves: Every metric's per-epoch mean over folds: the run's plain-named curves.
        metrics: ``<objective>_std``, ``<objective>_ci_low``/``_ci_high`` (the 95% t interval of
            the mean over folds) and ``fold_<i>/best_<objective>`` (each fold at the best epoch).
        best_epoch: The best epoch of the mean objective curve.
    """

    reported: dict[str, float]
    curves: dict[str, np.ndarray]
    metrics: dict[str, float]
    best_epoch: int


def fold_summary(histories: list[Any], folds: int, objective: str, direction: str) -> FoldSummary:
    """Sum up a trial trained once per fold (and ``executions_per_trial`` times in each).

    Each fold's curve is the mean over its executions; the trial's curve is the mean over folds,
    cut to the shortest fold (early stopping may end folds at different epochs). The trial's score
    is that curve at its best epoch, the same epoch for every fold, so the spread over folds is
    the spread of one model choice.

    Args:
        histories: The Keras histories, fold by fold (``folds`` × executions).
        folds: The number of folds.
        objective: The objective's name.
        direction: ``"min"`` or ``"max"``.
    """
    from toolkit.data.folds import fold_statistics

    per = max(len(histories) // folds, 1)
    fold_curves: list[dict[str, np.ndarray]] = []
    for i in range(folds):
        runs = [getattr(h, "history", {}) for h in histories[i * per : (i + 1) * per]]
        names = set.intersection(*(set(r) for r in runs)) if runs else set()
        curves = {}
        for name in names:
            length = min(len(r[name]) for r in runs)
            curves[name] = np.mean([np.asarray(r[name][:length], dtype="float64") for r in runs], axis=0)
        fold_curves.append(curves)
    names = sorted(set.intersection(*(set(c) for c in fold_curves)))
    length = min((len(c[n]) for c in fold_curves for n in names), default=0)
    mean = {n: np.mean([c[n][:length] for c in fold_curves], axis=0) for n in names}
    curve = mean.get(objective, np.array([]))
    finite = np.isfinite(curve)
    if not finite.any():
        return FoldSummary({n: float("nan") for n in names}, mean, {}, 0)
    masked = np.where(finite, curve, np.inf if direction == "min" else -np.inf)
    best = int(np.argmin(masked) if direction == "min" else np.argmax(masked))
    values = [float(c[objective][best]) for c in fold_curves]
    stats = fold_statistics(values)
    metrics = {
        f"{objective}_std": stats["std"],
        f"{objective}_ci_low": stats["ci_low"],
        f"{objective}_ci_high": stats["ci_high"],
        **{f"fold_{i}/best_{objective}": v for i, v in enumerate(values)},
    }
    return FoldSummary({n: float(c[best]) for n, c in mean.items()}, mean, metrics, best)


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


def oracle_summaries(trial: Any, objective: str, direction: str) -> dict[str, float]:
    """What the oracle recorded of a trial's objective: ``best_<objective>`` and ``best_epoch``.

    KerasTuner reports a trial to its oracle once, at its best epoch, so this is the oracle's
    verdict on the objective, not a history. It stands when MLflow's copy of the run's history
    is short (a process or the tracking server died before the last epochs were flushed).
    """
    history = trial.metrics.metrics.get(objective)
    if history is None:
        return {}
    points = [(int(obs.step), float(np.mean(obs.value))) for obs in history.get_history()]
    points = [(step, value) for step, value in points if math.isfinite(value)]
    if not points:
        return {}
    step, value = (min if direction == "min" else max)(points, key=lambda sv: sv[1])
    return {f"best_{objective}": value, "best_epoch": step}


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
                "pruned_epoch": "" if t.pruned_epoch is None else t.pruned_epoch,
                **{name: t.metrics.get(name, "") for name in MEASURES},
                "feasible": "" if t.feasible is None else str(t.feasible).lower(),
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
    metrics = {k: float(v) for k, v in data.items() if k.startswith("best_") or f"best_{k}" in data or k in MEASURES}
    trials = getattr(tuner.oracle, "trials", {})
    trial = trials.get(tid) if isinstance(trials, dict) else None
    hps = dict(trial.hyperparameters.values) if trial is not None else dict(run.data.params)
    seconds = data.get("trial_seconds")
    if seconds is None:
        seconds = (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else 0.0
    best_epoch = int(data["best_epoch"]) if "best_epoch" in data else None
    pruned = run.data.tags.get("toolkit.pruned_epoch")
    feasible = run.data.tags.get("toolkit.feasible")
    return TrialResult(
        tid,
        run.info.status,
        hps,
        metrics,
        best_epoch,
        float(seconds),
        run.data.tags.get("toolkit.failure"),
        run.info.run_id,
        pruned_epoch=int(pruned) if pruned is not None and pruned.isdigit() else None,
        feasible=None if feasible is None else feasible == "true",
    )


def _best(trials: list[TrialResult], cfg: ExperimentConfig, tuner: Any = None) -> TrialResult | None:
    """The best FINISHED trial (under tuner.constraints, the best feasible one), as KerasTuner's oracle ranks it."""
    finished = {t.trial_id: t for t in trials if t.status == "FINISHED"}
    if cfg.tuner.constraints:
        # A trial without the tag ran before constraints existed for it: it proved nothing.
        finished = {tid: t for tid, t in finished.items() if t.feasible}
    if tuner is not None:
        # The oracle heard the worst score so far for an infeasible trial; a tie may still rank one first.
        for trial in tuner.oracle.get_best_trials(len(trials) + 1):
            if trial.trial_id in finished:
                return finished[trial.trial_id]
    key = f"best_{cfg.objective}"
    scored = [t for t in finished.values() if math.isfinite(t.metrics.get(key, float("nan")))]
    if not scored:
        return None
    pick = min if cfg.direction == "min" else max
    return pick(scored, key=lambda t: t.metrics[key])
