"""One search set beside others (``tracking.compare_with``): best against best, and at similar size."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from toolkit.analysis.findings import _diff, _value
from toolkit.analysis.load import SearchData

# Two trials count as of similar size when neither has more than this many times the other's
# parameters.
SIMILAR_SIZE = 1.5
PARAMS = "model_params"


def _params(value: float) -> str:
    """A parameter count in words: 850, 33.1k, 1.25M."""
    if value is None or not math.isfinite(value):
        return "? parameters"
    if value >= 1e6:
        return f"{value / 1e6:.3g}M parameters"
    if value >= 1e3:
        return f"{value / 1e3:.3g}k parameters"
    return f"{int(value)} parameters"


def _count(value: float) -> str:
    """A parameter count for a table cell: 850, 33.1k, 1.25M ('' when unknown)."""
    if value is None or pd.isna(value):
        return ""
    return _params(float(value)).removesuffix(" parameters")


def _label(data: SearchData) -> str:
    return f"{data.name} ({data.model})" if data.model else data.name


def _ranked(data: SearchData) -> pd.DataFrame:
    return data.finished.sort_values("objective", ascending=data.direction == "min")


def _trial(data: SearchData, row: pd.Series) -> str:
    size = _params(float(row[PARAMS])) if PARAMS in row and not pd.isna(row[PARAMS]) else "size not logged"
    return f"trial {row['trial_id']} of {_label(data)}, {size}"


def _versus(data: SearchData, a: pd.Series, other: SearchData, b: pd.Series) -> str:
    """``a`` (of ``data``) against ``b`` (of ``other``) on the objective, with both values."""
    metric = data.objective
    va, vb = float(a["objective"]), float(b["objective"])
    if va == vb:
        verdict = "tied"
    else:
        verdict = f"{data.name} {'led' if data.better(va, vb) else 'trailed'} by {_diff(metric, va - vb)}"
    return (
        f"{_trial(data, a)}, reached {metric} {_value(metric, va)}; {_trial(other, b)}, reached {_value(metric, vb)}: {verdict}"
    )


def similar_size_pair(data: SearchData, other: SearchData) -> tuple[pd.Series, pd.Series] | None:
    """The best trial of ``data`` that has a trial of similar size in ``other``, and the best such partner.

    Similar size: neither parameter count is more than :data:`SIMILAR_SIZE` times the other.
    None when the counts were not logged or no two trials are that close.
    """
    mine, theirs = _ranked(data), _ranked(other)
    if PARAMS not in mine or PARAMS not in theirs:
        return None
    mine, theirs = mine[mine[PARAMS] > 0], theirs[theirs[PARAMS] > 0]
    for _, a in mine.iterrows():
        ratio = np.maximum(theirs[PARAMS] / a[PARAMS], a[PARAMS] / theirs[PARAMS])
        partners = theirs[ratio <= SIMILAR_SIZE]
        if not partners.empty:
            return a, partners.iloc[0]
    return None


def comparison_findings(data: SearchData, others: dict[str, SearchData | None]) -> list[str]:
    """Sentences setting ``data`` beside each search of ``others`` (None: that experiment has no search yet).

    Each states the best trial of both and, where parameter counts were logged, the best pair of
    trials of similar size, with the objective values and the difference between them.
    """
    out = []
    for name, other in others.items():
        if other is None:
            out.append(
                f"{name}: no search in this store yet; run `make tune EXP={name}`, then `toolkit report {data.name}` "
                "to set the two side by side."
            )
            continue
        if other.objective != data.objective:
            out.append(f"{name} optimized {other.objective}, this search {data.objective}: their best trials are not comparable.")
            continue
        if data.finished.empty or other.finished.empty:
            empty = data.name if data.finished.empty else name
            out.append(f"{empty} has no finished trial with a finite {data.objective}: nothing to compare with {name}.")
            continue
        best, their_best = _ranked(data).iloc[0], _ranked(other).iloc[0]
        out.append(f"Best against best: {_versus(data, best, other, their_best)}.")
        pair = similar_size_pair(data, other)
        if pair is not None:
            a, b = pair
            out.append(f"At similar size (within {SIMILAR_SIZE:g}× the parameters): {_versus(data, a, other, b)}.")
        elif PARAMS in data.finished and PARAMS in other.finished:
            lo_a, hi_a = data.finished[PARAMS].min(), data.finished[PARAMS].max()
            lo_b, hi_b = other.finished[PARAMS].min(), other.finished[PARAMS].max()
            out.append(
                f"No trials of similar size (within {SIMILAR_SIZE:g}×): {data.name} spans {_params(lo_a)}–{_params(hi_a)}, "
                f"{name} {_params(lo_b)}–{_params(hi_b)}."
            )
        else:
            out.append(f"The trials of {data.name} or {name} did not log {PARAMS}; sizes cannot be matched.")
    return out


def comparison_table(data: SearchData, others: dict[str, SearchData | None]) -> pd.DataFrame | None:
    """One row per search that has finished trials: its model, trials, best value and the parameter counts."""
    rows = []
    for search in [data, *(o for o in others.values() if o is not None)]:
        done = search.finished
        if done.empty:
            continue
        best = _ranked(search).iloc[0]
        params = done[PARAMS] if PARAMS in done else pd.Series(dtype=float)
        rows.append(
            {
                "search": search.name,
                "model": search.model,
                "finished": len(done),
                f"best {data.objective}": float(best["objective"]),
                "best trial": str(best["trial_id"]),
                "its params": _count(best[PARAMS]) if PARAMS in best else "",
                "params min": _count(params.min()) if len(params) else "",
                "params max": _count(params.max()) if len(params) else "",
            }
        )
    return pd.DataFrame(rows) if len(rows) > 1 else None
