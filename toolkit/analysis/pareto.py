"""Constraints and Pareto fronts over trials: which trials are feasible, which are non-dominated.

A trial's value of a measure (``toolkit.config.MEASURES``: ``model_params``, ``model_size_mb``,
``latency_ms``) is the measure itself; of a Keras metric (``val_accuracy``, ``loss``, ...), its
best value over the trial's epochs (``best_<metric>``, as the trial's run logs it). Measures are
better low; a metric is better as the objective's rule says (``val_accuracy`` high, losses low).
Nothing here imports TensorFlow: the tuner tags trials with it and the report reads them back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from toolkit.config import MEASURES, objective_direction

FEASIBLE_TAG = "toolkit.feasible"
INFEASIBLE_TAG = "toolkit.infeasible"  # why, when it is not
PARETO_TAG = "toolkit.pareto"


def direction_of(name: str, objective: str | None = None, direction: str | None = None) -> str:
    """``"min"`` or ``"max"``: whether ``name`` is better low or high.

    Args:
        name: A measure or a metric.
        objective: The search's objective; its ``direction`` wins for it. Defaults to None.
        direction: The objective's direction. Defaults to None.
    """
    if name in MEASURES:
        return "min"
    if name == objective and direction in ("min", "max"):
        return direction
    return objective_direction(name)


def trial_value(metrics: Mapping[str, Any], name: str) -> float:
    """A trial's value of a measure or metric (NaN when it has none); see the module's docstring."""
    value = metrics.get(name) if name in MEASURES else metrics.get(f"best_{name}", metrics.get(name))
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _bounds(bound: Any) -> tuple[float | None, float | None]:
    if isinstance(bound, Mapping):
        return bound.get("min"), bound.get("max")
    return bound.min, bound.max


def violations(metrics: Mapping[str, Any], constraints: Mapping[str, Any]) -> list[str]:
    """The constraints a trial breaks, in words; empty when it is feasible.

    Args:
        metrics: The trial's metrics and measures.
        constraints: Name → bound (``toolkit.config.Bound`` or ``{"min": .., "max": ..}``).

    Returns:
        One line per broken constraint, e.g. ``"latency_ms 3.1 > max 2"``. A value the trial
        lacks (or that is not finite) breaks its constraint.
    """
    broken = []
    for name, bound in constraints.items():
        low, high = _bounds(bound)
        value = trial_value(metrics, name)
        if not math.isfinite(value):
            broken.append(f"{name} has no value")
        elif high is not None and value > high:
            broken.append(f"{name} {value:.4g} > max {high:g}")
        elif low is not None and value < low:
            broken.append(f"{name} {value:.4g} < min {low:g}")
    return broken


def non_dominated(points: Any, directions: Sequence[str]) -> np.ndarray:
    """Which rows of ``points`` no other row dominates.

    Row ``a`` dominates ``b`` when it is at least as good in every column and better in one.
    A row with a missing (NaN) value is never on the front, and dominates nothing.

    Args:
        points: ``(n, k)`` values, one column per measure.
        directions: ``"min"`` or ``"max"`` per column.

    Returns:
        A boolean array of length ``n``.
    """
    values = np.asarray(points, dtype="float64").reshape(len(points), len(directions))
    signs = np.array([1.0 if d == "min" else -1.0 for d in directions])
    costs = values * signs  # lower is better in every column
    complete = np.all(np.isfinite(costs), axis=1)
    front = complete.copy()
    rows = costs[complete]
    for i in np.flatnonzero(complete):
        no_worse = np.all(rows <= costs[i], axis=1)
        better = np.any(rows < costs[i], axis=1)
        front[i] = not np.any(no_worse & better)
    return front


def pareto_flags(
    trials: Sequence[Mapping[str, Any]], names: Sequence[str], objective: str | None = None, direction: str | None = None
) -> list[bool]:
    """Per trial, whether it is on the Pareto front of ``names``.

    Args:
        trials: Each trial's metrics and measures (only the candidates: finished, feasible).
        names: Two or three measures or metrics.
        objective: The search's objective (its direction is the card's). Defaults to None.
        direction: The objective's direction. Defaults to None.
    """
    if not trials:
        return []
    points = [[trial_value(t, n) for n in names] for t in trials]
    return [bool(f) for f in non_dominated(points, [direction_of(n, objective, direction) for n in names])]


# ------------------------------------------------------------------------------------ the report


def _card_list(data: Any, key: str) -> list[str]:
    import json

    raw = data.card.get(key)
    try:
        value = json.loads(raw) if raw else None
    except ValueError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def _flag(column: Any) -> Any:
    return column.astype(str).str.lower() == "true"


def constraints_text(data: Any) -> str:
    """The card's ``tuner.constraints`` in words (``model_params <= 20000, ...``), from the parent's params."""
    parts = []
    for key, value in sorted(data.card.items()):
        if key.startswith("tuner.constraints.") and value not in ("None", ""):
            name, side = key[len("tuner.constraints.") :].rsplit(".", 1)
            parts.append(f"{name} {'<=' if side == 'max' else '>='} {float(value):g}")
    return ", ".join(parts)


def constraint_findings(data: Any) -> list[str]:
    """How many trials met ``tuner.constraints``, and what the constraints cost the objective."""
    done = data.finished
    words = constraints_text(data)
    if not words or done.empty or "feasible" not in done:
        return []
    feasible = done[_flag(done["feasible"])]
    order = data.direction == "min"
    text = f"{len(feasible)} of {len(done)} finished trial(s) met the constraints ({words})"
    if feasible.empty:
        return [f"{text}: no champion was logged."]
    best_all = done.sort_values("objective", ascending=order).iloc[0]
    best = feasible.sort_values("objective", ascending=order).iloc[0]
    text += f"; the champion is the best feasible trial, {best['trial_id']} ({data.objective} {best['objective']:.4g})"
    if best_all["trial_id"] != best["trial_id"]:
        why = best_all.get("infeasible", "")
        text += f", against {best_all['objective']:.4g} for the best trial overall, {best_all['trial_id']}" + (
            f" ({why})" if isinstance(why, str) and why else ""
        )
    return [text + "."]


def pareto_candidates(data: Any) -> tuple[list[str], Any]:
    """The card's ``tuner.pareto`` names and the trials the front is taken over (finished, feasible)."""
    names = _card_list(data, "tuner.pareto")
    done = data.finished
    if not names or done.empty:
        return names, done.iloc[:0]
    if "feasible" in done and constraints_text(data):
        done = done[_flag(done["feasible"])]
    return names, done


def pareto_table(data: Any) -> Any:
    """The non-dominated trials of ``tuner.pareto``: trial id, varied hyperparameters and each measure.

    Returns:
        A DataFrame sorted by the first measure (best first), or None without ``tuner.pareto``.
    """
    names, done = pareto_candidates(data)
    if not names or done.empty:
        return None
    values = {n: [trial_value(row, n) for _, row in done.iterrows()] for n in names}
    table = done[["trial_id", *data.varying]].copy()
    for n in names:
        table[n] = values[n]
    front = non_dominated(table[names].to_numpy(), [direction_of(n, data.objective, data.direction) for n in names])
    table = table[front]
    return table.sort_values(names[0], ascending=direction_of(names[0], data.objective, data.direction) == "min")


def pareto_findings(data: Any) -> list[str]:
    """One line on the Pareto front: how many trials are on it, and its two ends."""
    table = pareto_table(data)
    if table is None or table.empty:
        return []
    names, done = pareto_candidates(data)
    ends = table.iloc[[0, -1]] if len(table) > 1 else table.iloc[[0]]
    described = [f"trial {row['trial_id']} (" + ", ".join(f"{n} {row[n]:.4g}" for n in names) + ")" for _, row in ends.iterrows()]
    return [
        f"{len(table)} of {len(done)} candidate trial(s) are on the Pareto front of {' against '.join(names)} "
        f"(no other trial is as good in every one and better in one): from {' to '.join(described)}."
    ]


def _values(trials: Any, name: str) -> list[float]:
    return [trial_value(row, name) for _, row in trials.iterrows()]


def plot_pareto(data: Any, out: Any) -> Any:
    """``pareto.png``: the first two ``tuner.pareto`` measures of every candidate, the front joined.

    A third measure colours the points. Infeasible trials are grey crosses.
    """
    from pathlib import Path

    from toolkit.analysis.plots import _figure, _save

    names, candidates = pareto_candidates(data)
    front = pareto_table(data)
    if front is None or front.empty:
        return None
    fig = _figure(6.4, 4.4)
    ax = fig.subplots()
    x_name, y_name = names[1], names[0]
    done = data.finished
    if "feasible" in done and constraints_text(data):
        rejected = done[~_flag(done["feasible"])]
        if not rejected.empty:
            ax.scatter(_values(rejected, x_name), _values(rejected, y_name), marker="x", color="0.6", label="infeasible")
    xs = _values(candidates, x_name)
    colour = _values(candidates, names[2]) if len(names) == 3 else None
    points = ax.scatter(xs, _values(candidates, y_name), c=colour, cmap="viridis" if colour else None, alpha=0.7, label="trials")
    if colour:
        fig.colorbar(points, ax=ax, label=names[2])
    line = front.sort_values(x_name)
    ax.plot(line[x_name], line[y_name], "o-", color="tab:red", mfc="none", ms=10, label="Pareto front")
    for _, row in front.iterrows():
        ax.annotate(str(row["trial_id"]), (row[x_name], row[y_name]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if x_name == "model_params" or (min(xs) > 0 and max(xs) / max(min(xs), 1e-12) > 50):
        ax.set_xscale("log")
    for axis, name in ((ax.set_xlabel, x_name), (ax.set_ylabel, y_name)):
        axis(f"{name} ({'lower' if direction_of(name, data.objective, data.direction) == 'min' else 'higher'} is better)")
    ax.set_title("Pareto front" + (f" (colour: {names[2]})" if colour else ""))
    ax.legend(fontsize=8)
    return _save(fig, Path(out) / "pareto.png")
