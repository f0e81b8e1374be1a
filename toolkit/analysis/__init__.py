"""What a search found, from MLflow alone: the trials table, importance, plots and the report.

Everything here reads the tracking store, never the tuner, so ``toolkit report EXP`` rebuilds a
report for any search that was logged, and a notebook can do the same with :func:`trials_table`.

The report answers the practitioner's questions in the essay's terms: which activation, depth,
optimizer and L1/L2 strength won and by how much; whether gradients vanished; whether the model
overfit and whether regularization helped. Each finding states its numbers and how many trials
they rest on, and says "not enough trials to say" where the trials cannot support a claim.
"""

from __future__ import annotations

import base64
import html
import logging
import math
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from toolkit import tracking
from toolkit.config import ConfigError, ExperimentConfig, objective_direction

log = logging.getLogger(__name__)

NOT_ENOUGH = "not enough trials to say"
# A comparison of two groups rests on at least this many finished trials in each.
MIN_GROUP = 2
# The random-forest surrogate needs a few trials per hyperparameter to mean anything.
MIN_IMPORTANCE_TRIALS = 8
# A first-layer gradient this much smaller than the last layer's is called vanishing.
VANISHING_RATIO = 0.1
# A claim about L1/L2 rests on a rank correlation over at least this many trials; weaker
# correlations than WEAK_CORRELATION are reported as no clear relation.
MIN_REGULARIZATION_TRIALS = 6
WEAK_CORRELATION = 0.3
# Learning curves drawn for the best trials.
TOP_CURVES = 5
# Epochs-to-target: a max objective must reach this share of the best value seen; a min objective
# must come within this factor of the best (lowest) value seen.
TARGET_SHARE = 0.95
TARGET_FACTOR = 1.10
# An epoch's validation loss this far above its minimum, with the training loss still falling,
# counts as overfitting.
OVERFIT_RISE = 0.05
CURVE_METRICS = ("loss", "val_loss")
PLOT_DIR = "report"


# ---------------------------------------------------------------------------- loading


@dataclass
class SearchData:
    """One search as read back from MLflow.

    Attributes:
        name: The experiment's name.
        parent_run_id: The search's parent run.
        objective: The metric the tuner optimized.
        direction: ``"max"`` or ``"min"``.
        table: One row per trial run (see :func:`trials_table`).
        hyperparameters: The table's hyperparameter columns.
        curves: Per trial run id, per metric, the values by epoch.
    """

    name: str
    parent_run_id: str
    objective: str
    direction: str
    table: pd.DataFrame
    hyperparameters: list[str]
    curves: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    @property
    def finished(self) -> pd.DataFrame:
        """The trials that finished with a finite objective."""
        table = self.table
        if table.empty:
            return table
        mask = (table["status"] == "FINISHED") & np.isfinite(table["objective"].astype(float))
        return table[mask]

    @property
    def varying(self) -> list[str]:
        """The hyperparameters that took more than one value among the finished trials."""
        done = self.finished
        # A conditional hyperparameter with one value where present (momentum: 0.9 for the SGD
        # family) only restates the choice it depends on.
        return [h for h in self.hyperparameters if h in done and done[h].nunique() > 1]

    def better(self, a: float, b: float) -> bool:
        """Whether objective value ``a`` is better than ``b``."""
        return a > b if self.direction == "max" else a < b


def find_search(experiment: str, uri: str | None = None) -> str:
    """The id of the latest search (parent run tagged ``toolkit.role=search``) of an experiment.

    Args:
        experiment: The experiment's name.
        uri: The tracking URI. Defaults to :func:`toolkit.tracking.tracking_uri`.

    Returns:
        The parent run's id.

    Raises:
        ConfigError: When the experiment or its searches do not exist.
    """
    uri = uri or tracking.tracking_uri()
    client = tracking.client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ConfigError(
            f"no experiment {experiment!r} in the tracking store {uri}; run `toolkit tune {experiment}` first", field="EXP"
        )
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`{tracking.ROLE}` = 'search'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise ConfigError(f"experiment {experiment!r} has no search run yet; run `toolkit tune {experiment}` first", field="EXP")
    return runs[0].info.run_id


def load_search(
    parent_run_id: str, uri: str | None = None, objective: str | None = None, direction: str | None = None
) -> SearchData:
    """Read a search's trials and their curves from MLflow.

    Args:
        parent_run_id: The search's parent run.
        uri: The tracking URI. Defaults to :func:`toolkit.tracking.tracking_uri`.
        objective: The objective. Defaults to the parent's ``toolkit.objective`` tag.
        direction: ``"max"`` or ``"min"``. Defaults to the parent's ``toolkit.direction`` tag.

    Returns:
        The search, with a per-epoch curve of the objective, loss and val_loss for every
        finished trial.
    """
    uri = uri or tracking.tracking_uri()
    client = tracking.client(uri)
    parent = client.get_run(parent_run_id)
    tags = parent.data.tags
    objective = objective or tags.get("toolkit.objective") or "val_loss"
    direction = direction or tags.get("toolkit.direction") or objective_direction(objective)
    experiment = client.get_experiment(parent.info.experiment_id).name
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{tracking.PARENT_TAG}` = '{parent_run_id}'",
        max_results=50_000,
    )
    runs = [r for r in runs if r.data.tags.get(tracking.ROLE, "trial") == "trial"]

    rows = []
    hyperparameters: list[str] = []
    curves: dict[str, dict[str, np.ndarray]] = {}
    for run in runs:
        for name in run.data.params:
            if name not in hyperparameters:
                hyperparameters.append(name)
        row: dict[str, Any] = {
            "trial_id": run.data.tags.get("toolkit.trial_id", ""),
            "run_id": run.info.run_id,
            "status": run.info.status,
            **{k: _parse_param(v) for k, v in run.data.params.items()},
            **run.data.metrics,
        }
        if run.info.status == "FINISHED":
            curves[run.info.run_id] = {
                m: _history(client, run.info.run_id, m) for m in dict.fromkeys((objective, *CURVE_METRICS))
            }
            curve = curves[run.info.run_id][objective]
            if curve.size:
                pick = np.nanargmax if direction == "max" else np.nanargmin
                best = int(pick(curve)) if np.isfinite(curve).any() else 0
                row["objective"] = float(curve[best])
                row["best_epoch"] = best
                row["epochs"] = int(curve.size)
        rows.append(row)
    table = pd.DataFrame(rows)
    for column in ("objective", "best_epoch", "epochs"):
        if column not in table:
            table[column] = np.nan
    if not table.empty:
        table = table.sort_values("trial_id", key=lambda s: s.map(_trial_sort_key)).reset_index(drop=True)
        for name in hyperparameters:
            table[name] = _coerce(table[name])
    lead = ["trial_id", "run_id", "status", *hyperparameters, "objective", "best_epoch", "epochs"]
    table = table[[c for c in lead if c in table] + sorted(c for c in table if c not in lead)]
    table.attrs.update(objective=objective, direction=direction, hyperparameters=list(hyperparameters))
    return SearchData(experiment, parent_run_id, objective, direction, table, hyperparameters, curves)


def trials_table(search: str, uri: str | None = None) -> pd.DataFrame:
    """The trials of a search as a DataFrame, one row per trial run.

    Columns: ``trial_id``, ``run_id``, ``status``, one per hyperparameter (numbers as numbers),
    ``objective`` (the best value over the trial's epochs), ``best_epoch`` (0-based), ``epochs``,
    then every metric's last logged value (``loss``, ``val_loss``, ``gap_loss``,
    ``grad_norm/dense_0``, ...). ``table.attrs`` holds ``objective``, ``direction`` and
    ``hyperparameters``.

    Args:
        search: A parent run id, or an experiment name (its latest search is used).
        uri: The tracking URI. Defaults to :func:`toolkit.tracking.tracking_uri`.

    Returns:
        The table.
    """
    uri = uri or tracking.tracking_uri()
    parent = search
    if tracking.client(uri).get_experiment_by_name(search) is not None:
        parent = find_search(search, uri)
    return load_search(parent, uri).table


def _history(client: Any, run_id: str, metric: str) -> np.ndarray:
    """A metric's values by step; a step logged twice keeps its latest value."""
    by_step: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, metric):
        if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
            by_step[m.step] = (m.timestamp, m.value)
    return np.array([by_step[s][1] for s in sorted(by_step)], dtype="float64")


def _parse_param(value: str) -> Any:
    try:
        number = float(value)
    except ValueError:
        return value
    return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number


def _coerce(column: pd.Series) -> pd.Series:
    """A hyperparameter column as numbers when every value is one, else as text."""
    values = column.dropna()
    if len(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return pd.to_numeric(column)
    return column.map(lambda v: v if pd.isna(v) else str(v))


def _trial_sort_key(trial_id: Any) -> tuple[int, Any]:
    text = str(trial_id)
    return (0, int(text)) if text.isdigit() else (1, text)


# ---------------------------------------------------------------------------- formatting


def _is_share(metric: str) -> bool:
    return "accuracy" in metric


def _value(metric: str, value: float) -> str:
    """An objective value: three decimals for shares, four significant digits otherwise."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.3f}" if _is_share(metric) else f"{value:.4g}"


def _diff(metric: str, delta: float) -> str:
    """A difference of objective values: percentage points for shares."""
    return f"{abs(delta) * 100:.1f} pp" if _is_share(metric) else f"{abs(delta):.4g}"


def _num(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        if value == 0 or not math.isfinite(value):
            return f"{value:g}"
        return f"{value:.3g}"
    return str(value)


def _setting(row: pd.Series, hyperparameters: list[str]) -> str:
    return ", ".join(f"{h}={_num(row[h])}" for h in hyperparameters if h in row and not _missing(row[h]))


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _ratio_words(ratio: float) -> str:
    if ratio <= 0 or not math.isfinite(ratio):
        return f"ratio {ratio:.3g}"
    if 0.8 <= ratio <= 1.25:
        return "about the same as the last layer's"
    if ratio < 1:
        return f"{1 / ratio:.3g}× smaller than the last layer's"
    return f"{ratio:.3g}× the last layer's"


# ---------------------------------------------------------------------------- findings


def best_trial_finding(data: SearchData) -> list[str]:
    """Which trial won, with what, and by how much over the runner-up."""
    done = data.finished
    if done.empty:
        return [f"No trial finished with a finite {data.objective}; there is nothing to rank."]
    ranked = done.sort_values("objective", ascending=data.direction == "min")
    best = ranked.iloc[0]
    text = (
        f"Best: trial {best['trial_id']} ({_setting(best, data.varying or data.hyperparameters)}) reached "
        f"{data.objective} {_value(data.objective, best['objective'])} at epoch {int(best['best_epoch']) + 1}"
    )
    if len(ranked) > 1:
        second = ranked.iloc[1]
        text += f"; the runner-up, trial {second['trial_id']}, was {_diff(data.objective, best['objective'] - second['objective'])} behind"
    failed = int((data.table["status"] == "FAILED").sum())
    tail = f" ({len(done)} finished trial(s)" + (f", {failed} failed)." if failed else ").")
    return [text + tail]


def _comparison(data: SearchData, stats: pd.DataFrame, a: Any, b: Any) -> str:
    """``a`` against ``b`` by mean objective, with a caveat when either rests on too few trials."""
    mean_a, mean_b = float(stats.loc[a, "mean"]), float(stats.loc[b, "mean"])
    n_a, n_b = int(stats.loc[a, "count"]), int(stats.loc[b, "count"])
    what = f"mean {data.objective}" if max(n_a, n_b) > 1 else data.objective
    numbers = f"({_value(data.objective, mean_a)} vs {_value(data.objective, mean_b)}, n={n_a} and {n_b})"
    if mean_a == mean_b:
        text = f"{a} and {b} tied in {what} {numbers}"
    else:
        verb = "beat" if data.better(mean_a, mean_b) else "trailed"
        text = f"{a} {verb} {b} by {_diff(data.objective, mean_a - mean_b)} in {what} {numbers}"
    if min(n_a, n_b) < MIN_GROUP:
        text += f"; with fewer than {MIN_GROUP} trials per value there are {NOT_ENOUGH} whether that holds beyond these runs"
    return text


def _group_stats(data: SearchData, part: pd.DataFrame, name: str) -> pd.DataFrame:
    stats = part.groupby(name)["objective"].agg(["mean", "count"])
    return stats.sort_values("mean", ascending=data.direction == "min")


def choice_findings(data: SearchData) -> list[str]:
    """For each text hyperparameter (activation, optimizer, ...): how its values ranked."""
    done = data.finished
    out = []
    for name in data.varying:
        if pd.api.types.is_numeric_dtype(done[name]) or done[name].nunique() < 2:
            continue
        stats = _group_stats(data, done, name)
        listing = ", ".join(f"{v} {_value(data.objective, r['mean'])} (n={int(r['count'])})" for v, r in stats.iterrows())
        out.append(f"{name}: {_comparison(data, stats, stats.index[0], stats.index[-1])}. All values: {listing}.")
    return out


def numeric_findings(data: SearchData) -> list[str]:
    """For each numeric hyperparameter (depth, learning rate, ...): where it was best, and the trend."""
    done = data.finished
    out = []
    for name in data.varying:
        column = done[name]
        if not pd.api.types.is_numeric_dtype(column) or column.nunique() < 3:
            continue
        best = done.sort_values("objective", ascending=data.direction == "min").iloc[0]
        rho = _spearman(column, done["objective"])
        text = f"{name}: the best trial used {_num(best[name])}; Spearman ρ between {name} and {data.objective} = {rho:.2f} over {len(done)} trials"
        if column.nunique() <= 8:
            means = done.groupby(name)["objective"].agg(["mean", "count"])
            listing = ", ".join(
                f"{_num(v)}: {_value(data.objective, r['mean'])} (n={int(r['count'])})" for v, r in means.iterrows()
            )
            text += f". Mean {data.objective} by value: {listing}"
        out.append(text + ".")
    return out


def _deep_threshold(depths: pd.Series) -> int | None:
    """The depth from which a trial counts as deep: the upper half of the depths tried."""
    values = sorted(int(v) for v in depths.dropna().unique())
    if not values:
        return None
    return values[len(values) // 2] if len(values) > 1 else values[0]


def activation_depth_findings(data: SearchData) -> list[str]:
    """Whether the activations rank differently when the network is deep."""
    done = data.finished
    if "activation" not in done or "depth" not in done or done["activation"].nunique() < 2:
        return []
    deep_from = _deep_threshold(done["depth"])
    if deep_from is None or done["depth"].nunique() < 2:
        return []  # one depth: the activation finding above says it all
    out = []
    for label, part in (
        (f"depth ≥ {deep_from}", done[done["depth"] >= deep_from]),
        (f"depth < {deep_from}", done[done["depth"] < deep_from]),
    ):
        stats = _group_stats(data, part, "activation")
        if len(stats) < 2:
            out.append(f"At {label}: {NOT_ENOUGH} how the activations compare (only {', '.join(stats.index) or 'no trials'}).")
            continue
        a, b = ("relu", "sigmoid") if {"relu", "sigmoid"} <= set(stats.index) else (stats.index[0], stats.index[-1])
        out.append(f"At {label}, {_comparison(data, stats, a, b)}.")
    return out


def gradient_findings(data: SearchData) -> list[str]:
    """Whether gradients vanished (first/last gradient norm ratio) and how many ReLUs died."""
    done = data.finished
    if "grad_ratio_first_last" not in done or done["grad_ratio_first_last"].isna().all():
        return ["Gradients: no diagnostics were recorded (train.diagnostics is off, or the trials predate it)."]
    out = []
    group = "activation" if "activation" in done else None
    parts = done.groupby(group) if group else [("all trials", done)]
    deep_from = _deep_threshold(done["depth"]) if "depth" in done else None
    for value, part in parts:
        if deep_from is not None and "depth" in part and (part["depth"] >= max(2, deep_from)).any():
            part = part[part["depth"] >= max(2, deep_from)]
            where = f" at depth ≥ {max(2, deep_from)}"
        else:
            where = ""
        ratios = part["grad_ratio_first_last"].dropna()
        if ratios.empty:
            continue
        median = float(ratios.median())
        flag = " — vanishing" if median < VANISHING_RATIO else ""
        label = f"{value}: " if group else ""
        out.append(
            f"Gradients, {label}the first layer's gradient norm was {_ratio_words(median)} at the last epoch "
            f"(median ratio {median:.3g} over {len(ratios)} trial(s){where}){flag}."
        )
    dead_cols = [c for c in done if c.startswith("dead_relu/")]
    if dead_cols:
        dead = done[dead_cols].mean(axis=1, skipna=True)
        dead = dead[np.isfinite(dead)]
        if not dead.empty and dead.max() == 0:
            out.append(
                f"Dead units: none — every ReLU-family hidden unit was active for some probe sample ({len(dead)} trial(s))."
            )
        elif not dead.empty:
            worst = done.loc[dead.idxmax()]
            worst_layer = max(dead_cols, key=lambda c: -1 if _missing(worst[c]) else worst[c])
            out.append(
                f"Dead units: at the last epoch a median {dead.median() * 100:.1f}% of ReLU-family hidden units output 0 for every "
                f"probe sample (over {len(dead)} trial(s)); the most was trial {worst['trial_id']} with {worst[worst_layer] * 100:.1f}% "
                f"in {worst_layer.split('/', 1)[1]}."
            )
    return out


def overfitting_findings(data: SearchData) -> list[str]:
    """Whether trials overfit: validation loss rising from its minimum while training loss falls."""
    done = data.finished
    if done.empty:
        return []
    overfit, checked = [], 0
    for _, row in done.iterrows():
        curve = data.curves.get(row["run_id"], {})
        val, train = curve.get("val_loss", np.array([])), curve.get("loss", np.array([]))
        if val.size < 3 or train.size != val.size:
            continue
        checked += 1
        low = int(np.nanargmin(val))
        rise = (val[-1] - val[low]) / max(abs(val[low]), 1e-12)
        if low < val.size - 1 and rise > OVERFIT_RISE and train[-1] < train[low]:
            overfit.append((rise, low, row))
    if checked == 0:
        return ["Overfitting: not enough epochs to say (curves of at least 3 epochs are needed)."]
    out = []
    if overfit:
        rise, low, row = max(overfit, key=lambda t: t[0])
        out.append(
            f"Overfitting: {len(overfit)} of {checked} trial(s) overfit — their val_loss rose more than {OVERFIT_RISE:.0%} above its "
            f"minimum while the training loss kept falling. The worst, trial {row['trial_id']} ({_setting(row, data.varying)}), "
            f"rose {rise:.0%} after epoch {low + 1}."
        )
    else:
        out.append(f"Overfitting: none of {checked} trial(s) had val_loss rise more than {OVERFIT_RISE:.0%} above its minimum.")
    best = done.sort_values("objective", ascending=data.direction == "min").iloc[0]
    if "gap_loss" in best and not _missing(best["gap_loss"]):
        text = f"The best trial ended with gap_loss {best['gap_loss']:.3g} (val_loss − loss)"
        if "gap_accuracy" in best and not _missing(best["gap_accuracy"]):
            text += f" and gap_accuracy {best['gap_accuracy'] * 100:.1f} pp (accuracy − val_accuracy)"
        out.append(text + ".")
    return out


def _spearman(a: pd.Series, b: pd.Series) -> float:
    ranks_a, ranks_b = a.rank(), b.rank()
    if ranks_a.std() == 0 or ranks_b.std() == 0:
        return float("nan")
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def _total_weight_l2(table: pd.DataFrame) -> pd.Series:
    cols = [c for c in table if c.startswith("weight_l2/")]
    if not cols:
        return pd.Series(np.nan, index=table.index)
    return np.sqrt((table[cols] ** 2).sum(axis=1, min_count=1))


def regularization_findings(data: SearchData) -> list[str]:
    """Whether stronger L1/L2 went with a smaller train/validation gap and smaller weights."""
    done = data.finished
    out = []
    for name in ("l1", "l2"):
        if name not in done or not pd.api.types.is_numeric_dtype(done[name]):
            continue
        if done[name].nunique() < 2:
            continue
        part = done[[name, "objective"]].assign(gap=done.get("gap_loss"), weights=_total_weight_l2(done)).dropna(subset=[name])
        if "gap_loss" not in done or part["gap"].isna().all():
            out.append(f"{name.upper()}: no gap_loss was recorded, so its effect on overfitting cannot be read.")
            continue
        part = part.dropna(subset=["gap"])
        cut = float(part[name].median())
        strong, weak = part[part[name] > cut], part[part[name] <= cut]
        if len(part) < MIN_REGULARIZATION_TRIALS or len(strong) < MIN_GROUP or len(weak) < MIN_GROUP:
            out.append(
                f"{name.upper()}: {NOT_ENOUGH} ({len(part)} trial(s); need {MIN_REGULARIZATION_TRIALS}, "
                f"with {MIN_GROUP} on each side of the median strength)."
            )
            continue
        rho = _spearman(part[name], part["gap"])
        if abs(rho) < WEAK_CORRELATION:
            relation = f"showed no clear relation to gap_loss (Spearman ρ = {rho:.2f} over {len(part)} trials)"
        else:
            relation = (
                f"went with a {'smaller' if rho < 0 else 'larger'} gap_loss (Spearman ρ = {rho:.2f} over {len(part)} trials)"
            )
        text = (
            f"{name.upper()}: stronger {name} {relation}; "
            f"median gap_loss {strong['gap'].median():.3g} with {name} > {cut:.3g} (n={len(strong)}) vs {weak['gap'].median():.3g} "
            f"at or below (n={len(weak)})"
        )
        if part["weights"].notna().any():
            text += f"; median total weight L2 norm {strong['weights'].median():.3g} vs {weak['weights'].median():.3g}"
        text += (
            f"; median {data.objective} {_value(data.objective, strong['objective'].median())} vs "
            f"{_value(data.objective, weak['objective'].median())}."
        )
        out.append(text)
    if out:
        # Keras adds the penalty to both loss and val_loss, so they are not comparable across
        # strengths; their difference, the gap, mostly cancels it.
        out.append("Keras' loss and val_loss include the L1/L2 penalty: compare gap_loss, not val_loss, across strengths.")
    return out


def _target(data: SearchData) -> float | None:
    done = data.finished
    if done.empty:
        return None
    if data.direction == "max":
        best = float(done["objective"].max())
        return TARGET_SHARE * best
    best = float(done["objective"].min())
    return best * TARGET_FACTOR if best > 0 else best + (TARGET_FACTOR - 1) * abs(best)


def epochs_to_target(curve: np.ndarray, target: float, direction: str) -> int | None:
    """The first epoch (1-based) at which a curve reached the target, or None if it never did."""
    reached = curve >= target if direction == "max" else curve <= target
    hits = np.flatnonzero(reached)
    return int(hits[0]) + 1 if hits.size else None


def optimizer_ranking(data: SearchData) -> pd.DataFrame | None:
    """Optimizers ranked by the epochs their fastest trial took to reach the target.

    Returns:
        One row per optimizer: ``optimizer``, ``epochs_to_target`` (None: never), the fastest
        trial's ``trial_id`` and ``learning_rate``, the optimizer's best objective and its trial
        count; or None when the search did not vary the optimizer.
    """
    done = data.finished
    if "optimizer" not in done or done["optimizer"].nunique() < 2:
        return None
    target = _target(data)
    rows = []
    for name, part in done.groupby("optimizer"):
        options = []
        for _, row in part.iterrows():
            curve = data.curves.get(row["run_id"], {}).get(data.objective, np.array([]))
            epochs = epochs_to_target(curve, target, data.direction) if curve.size else None
            options.append(
                (math.inf if epochs is None else epochs, -row["objective"] if data.direction == "max" else row["objective"], row)
            )
        epochs, _, fastest = min(options, key=lambda t: (t[0], t[1]))
        best = part["objective"].max() if data.direction == "max" else part["objective"].min()
        rows.append(
            {
                "optimizer": name,
                "epochs_to_target": None if epochs == math.inf else int(epochs),
                "trial_id": fastest["trial_id"],
                "learning_rate": fastest.get("learning_rate"),
                f"best_{data.objective}": float(best),
                "trials": len(part),
            }
        )
    table = pd.DataFrame(rows)
    table["_rank"] = table["epochs_to_target"].fillna(math.inf)
    table["_best"] = -table[f"best_{data.objective}"] if data.direction == "max" else table[f"best_{data.objective}"]
    table = table.sort_values(["_rank", "_best"]).drop(columns=["_rank", "_best"]).reset_index(drop=True)
    table.attrs["target"] = target
    return table


def optimizer_findings(data: SearchData, ranking: pd.DataFrame | None) -> list[str]:
    if ranking is None:
        return []
    target = ranking.attrs["target"]
    reach = "reach" if data.direction == "max" else "come down to"
    items = []
    for _, row in ranking.iterrows():
        epochs = (
            "never"
            if row["epochs_to_target"] is None or _missing(row["epochs_to_target"])
            else f"{int(row['epochs_to_target'])} epoch(s)"
        )
        items.append(
            f"{row['optimizer']} {epochs} (best {_value(data.objective, row[f'best_{data.objective}'])}, n={row['trials']})"
        )
    share = f"{TARGET_SHARE:.0%} of the best" if data.direction == "max" else f"within {TARGET_FACTOR - 1:.0%} of the best"
    text = (
        f"Optimizers, ranked by the epochs their fastest trial took to {reach} {data.objective} {_value(data.objective, target)} ({share}): "
        + "; ".join(items)
        + "."
    )
    if int(ranking["trials"].min()) < MIN_GROUP:
        text += " Some optimizers rest on a single trial, so read the order as one run's evidence, not a trend."
    return [text]


@dataclass
class Importance:
    """Hyperparameter importance from a random-forest surrogate with permutation importance."""

    table: pd.DataFrame | None
    reason: str | None = None
    oob_r2: float | None = None
    n_trials: int = 0


def hyperparameter_importance(data: SearchData, seed: int = 0) -> Importance:
    """How much each hyperparameter explains of the objective.

    A random forest (sklearn, 100 trees) is fitted to map the varied hyperparameters to the
    objective. Each hyperparameter's importance is the mean drop in the forest's R² when that
    column is shuffled (permutation importance, 10 repeats). Both are computed on the trials
    themselves: there are too few for a held-out split, so the forest's out-of-bag R² is reported
    alongside as the measure of how much to trust the ranking.

    Args:
        data: The search.
        seed: Seeds the forest and the permutations. Defaults to 0.

    Returns:
        The importances, or the reason there are none.
    """
    done = data.finished
    features = data.varying
    if len(done) < MIN_IMPORTANCE_TRIALS or not features:
        enough = len(done) >= MIN_IMPORTANCE_TRIALS
        why = (
            "no hyperparameter was varied"
            if enough
            else f"{len(done)} finished trial(s); the surrogate needs {MIN_IMPORTANCE_TRIALS}"
        )
        return Importance(None, f"{NOT_ENOUGH} ({why}).", n_trials=len(done))
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.inspection import permutation_importance

    x = pd.DataFrame(index=done.index)
    for name in features:
        column = done[name]
        if pd.api.types.is_numeric_dtype(column):
            # Conditional hyperparameters (momentum) are absent for some trials: a value below
            # the range keeps "absent" distinct without claiming an order.
            x[name] = column.fillna(column.min() - 1 if column.notna().any() else -1)
        else:
            x[name] = pd.Categorical(column.fillna("absent")).codes
    y = done["objective"].astype(float).to_numpy()
    forest = RandomForestRegressor(n_estimators=100, random_state=seed, oob_score=True, min_samples_leaf=1, n_jobs=1)
    forest.fit(x.to_numpy(), y)
    result = permutation_importance(forest, x.to_numpy(), y, n_repeats=10, random_state=seed, n_jobs=1)
    table = pd.DataFrame({"hyperparameter": features, "importance": result.importances_mean, "std": result.importances_std})
    table = table.sort_values("importance", ascending=False).reset_index(drop=True)
    return Importance(table, oob_r2=float(forest.oob_score_), n_trials=len(done))


def importance_findings(importance: Importance) -> list[str]:
    if importance.table is None:
        return [f"Hyperparameter importance: {importance.reason}"]
    listing = ", ".join(f"{r['hyperparameter']} {r['importance']:.3f}" for _, r in importance.table.iterrows())
    trust = "a weak hint" if (importance.oob_r2 or 0) < 0.2 else "usable"
    return [
        f"Hyperparameter importance (random-forest surrogate, permutation importance = drop in R² when shuffled, "
        f"{importance.n_trials} trials): {listing}. The surrogate's out-of-bag R² is {importance.oob_r2:.2f}, so the ranking is {trust}."
    ]


# ---------------------------------------------------------------------------- plots


def _figure(width: float = 6.4, height: float = 4.0) -> Any:
    # The object-oriented API with the Agg canvas: no pyplot state, no GUI backend, and a
    # notebook's own backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path


def _label(row: pd.Series, names: list[str]) -> str:
    return f"trial {row['trial_id']}: " + ", ".join(_num(row[h]) for h in names if h in row and not _missing(row[h]))


def plot_learning_curves(data: SearchData, out: Path) -> Path | None:
    """The objective and the train/validation loss by epoch for the top trials."""
    done = data.finished
    if done.empty:
        return None
    top = done.sort_values("objective", ascending=data.direction == "min").head(TOP_CURVES)
    fig = _figure(11, 4)
    ax_obj, ax_loss = fig.subplots(1, 2)
    colors = _colors(len(top))
    for color, (_, row) in zip(colors, top.iterrows(), strict=False):
        curve = data.curves.get(row["run_id"], {})
        label = _label(row, data.varying)
        obj = curve.get(data.objective, np.array([]))
        ax_obj.plot(np.arange(1, obj.size + 1), obj, marker="o", ms=3, color=color, label=label)
        for metric, style in (("loss", "-"), ("val_loss", "--")):
            values = curve.get(metric, np.array([]))
            ax_loss.plot(np.arange(1, values.size + 1), values, style, color=color)
    ax_obj.set(xlabel="epoch", ylabel=data.objective, title=f"{data.objective}, top {len(top)} trials")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss (solid) and val_loss (dashed)")
    ax_obj.legend(fontsize=7)
    return _save(fig, out / "learning_curves.png")


def plot_objective_vs_hyperparameters(data: SearchData, out: Path) -> Path | None:
    """One panel per hyperparameter: each trial's objective against its value."""
    done = data.finished
    names = data.varying or [h for h in data.hyperparameters if h in done]
    if done.empty or not names:
        return None
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = _figure(4 * cols, 3.2 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).reshape(-1)
    rng = np.random.default_rng(0)
    for ax, name in zip(axes, names, strict=False):
        column = done[name]
        y = done["objective"].to_numpy(dtype=float)
        if pd.api.types.is_numeric_dtype(column):
            x = column.to_numpy(dtype=float)
            ax.scatter(x, y, s=18, alpha=0.8)
            positive = x[np.isfinite(x) & (x > 0)]
            if positive.size and positive.max() / positive.min() > 30:
                ax.set_xscale("symlog", linthresh=positive.min()) if (x[np.isfinite(x)] <= 0).any() else ax.set_xscale("log")
        else:
            levels = sorted(column.dropna().unique())
            index = column.map({v: i for i, v in enumerate(levels)}).to_numpy(dtype=float)
            ax.scatter(index + rng.uniform(-0.12, 0.12, size=index.size), y, s=18, alpha=0.8)
            means = [np.nanmean(y[index == i]) for i in range(len(levels))]
            ax.scatter(range(len(levels)), means, marker="_", s=400, color="black", label="mean")
            ax.set_xticks(range(len(levels)), levels, rotation=30)
        ax.set(xlabel=name, ylabel=data.objective)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    fig.suptitle(f"{data.objective} against each hyperparameter ({len(done)} trials)")
    return _save(fig, out / "objective_vs_hyperparameters.png")


def plot_activation_depth(data: SearchData, out: Path) -> Path | None:
    """A heatmap of the mean objective per activation and depth, with trial counts."""
    done = data.finished
    if done.empty or "activation" not in done or "depth" not in done:
        return None
    if done["activation"].nunique() < 2 and done["depth"].nunique() < 2:
        return None  # one cell: the heatmap would say nothing
    mean = done.pivot_table(index="activation", columns="depth", values="objective", aggfunc="mean")
    count = done.pivot_table(index="activation", columns="depth", values="objective", aggfunc="count")
    fig = _figure(1.6 + 1.1 * mean.shape[1], 1.4 + 0.6 * mean.shape[0])
    ax = fig.subplots()
    cmap = "viridis" if data.direction == "max" else "viridis_r"
    image = ax.imshow(mean.to_numpy(dtype=float), cmap=cmap, aspect="auto")
    for i in range(mean.shape[0]):
        for j in range(mean.shape[1]):
            value, n = mean.iat[i, j], count.iat[i, j]
            if not _missing(value):
                # Dark text on the bright end of the colour map, light text on the dark end.
                shade = image.norm(value)
                bright = shade > 0.5 if data.direction == "max" else shade < 0.5
                text = f"{_value(data.objective, value)}\nn={int(n)}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="black" if bright else "white")
    ax.set_xticks(range(mean.shape[1]), [str(int(d)) for d in mean.columns])
    ax.set_yticks(range(mean.shape[0]), list(mean.index))
    ax.set(xlabel="depth (hidden layers)", ylabel="activation", title=f"mean {data.objective}")
    fig.colorbar(image, ax=ax)
    return _save(fig, out / "activation_depth_heatmap.png")


def _layer_order(name: str) -> tuple[int, int, str]:
    match = re.fullmatch(r"dense_(\d+)", name)
    return (0, int(match.group(1)), name) if match else (1, 0, name)


def plot_gradient_norms(data: SearchData, out: Path) -> Path | None:
    """Each trial's gradient norm per Dense layer (input → output), coloured by activation."""
    from matplotlib.ticker import MaxNLocator

    done = data.finished
    cols = sorted((c for c in done if c.startswith("grad_norm/")), key=lambda c: _layer_order(c.split("/", 1)[1]))
    if done.empty or not cols:
        return None
    fig = _figure(7, 4.2)
    ax = fig.subplots()
    groups = sorted(done["activation"].dropna().unique()) if "activation" in done else ["all"]
    colors = dict(zip(groups, _colors(len(groups)), strict=True))
    seen = set()
    for _, row in done.iterrows():
        values = [row[c] for c in cols if not _missing(row[c])]
        if not values:
            continue
        group = row["activation"] if "activation" in done else "all"
        ax.plot(
            range(1, len(values) + 1),
            values,
            marker="o",
            ms=3,
            alpha=0.7,
            color=colors.get(group, "grey"),
            label=None if group in seen else group,
        )
        seen.add(group)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="Dense layer (1 = first hidden; the last point is the output layer)", ylabel="gradient norm (last epoch)")
    ax.set_title("gradient norm by layer, per activation")
    ax.legend(fontsize=8)
    return _save(fig, out / "gradient_norm_by_layer.png")


def plot_gap_vs_regularization(data: SearchData, out: Path) -> Path | None:
    """gap_loss (val_loss − loss) against the L1 and L2 strengths."""
    done = data.finished
    names = [n for n in ("l1", "l2") if n in done and pd.api.types.is_numeric_dtype(done[n])]
    if done.empty or "gap_loss" not in done or not any(done[n].nunique() > 1 for n in names):
        return None  # no L1/L2 strength was varied: nothing to plot against
    fig = _figure(5 * len(names), 3.6)
    axes = np.atleast_1d(fig.subplots(1, len(names)))
    for ax, name in zip(axes, names, strict=True):
        x = done[name].to_numpy(dtype=float)
        y = done["gap_loss"].to_numpy(dtype=float)
        ax.scatter(x, y, s=18)
        positive = x[x > 0]
        if positive.size and (positive.max() / positive.min() > 30 or (x == 0).any()):
            ax.set_xscale("symlog", linthresh=positive.min())
        ax.axhline(0, color="grey", lw=0.8)
        rho = _spearman(done[name], done["gap_loss"]) if len(done) > 2 else float("nan")
        ax.set(xlabel=f"{name} strength", ylabel="gap_loss (val_loss − loss)", title=f"{name}: Spearman ρ = {rho:.2f}")
    return _save(fig, out / "gap_vs_regularization.png")


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


PLOTS = (
    ("Learning curves of the top trials", plot_learning_curves),
    ("Objective against each hyperparameter", plot_objective_vs_hyperparameters),
    ("Activation × depth", plot_activation_depth),
    ("Gradient norm by layer, per activation", plot_gradient_norms),
    ("Train/validation gap against L1 and L2", plot_gap_vs_regularization),
)


# ---------------------------------------------------------------------------- the report


@dataclass
class Report:
    """A report as blocks that render to Markdown and to HTML alike."""

    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def add(self, kind: str, content: Any) -> None:
        self.blocks.append((kind, content))

    def markdown(self) -> str:
        lines = [f"# {self.title}", ""]
        for kind, content in self.blocks:
            if kind == "h2":
                lines += [f"## {content}", ""]
            elif kind == "p":
                lines += [content, ""]
            elif kind == "ul":
                lines += [f"- {item}" for item in content] + [""]
            elif kind == "table":
                lines += [_markdown_table(content), ""]
            elif kind == "img":
                caption, rel, _ = content
                lines += [f"![{caption}]({rel})", ""]
        return "\n".join(lines)

    def html(self) -> str:
        parts = [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>{html.escape(self.title)}</title>",
            "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
            "table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:right}"
            "th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3;padding:0 .2em}</style></head><body>",
            f"<h1>{html.escape(self.title)}</h1>",
        ]
        for kind, content in self.blocks:
            if kind == "h2":
                parts.append(f"<h2>{html.escape(content)}</h2>")
            elif kind == "p":
                parts.append(f"<p>{_inline(content)}</p>")
            elif kind == "ul":
                parts.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in content) + "</ul>")
            elif kind == "table":
                parts.append(content.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}", border=0))
            elif kind == "img":
                caption, _, path = content
                encoded = base64.b64encode(Path(path).read_bytes()).decode()
                parts.append(
                    f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{encoded}'><figcaption>{html.escape(caption)}</figcaption></figure>"
                )
        parts.append("</body></html>")
        return "\n".join(parts)


def _inline(text: str) -> str:
    """Escape text for HTML, keeping Markdown's `code` spans."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _markdown_table(table: pd.DataFrame) -> str:
    def cell(value: Any) -> str:
        if _missing(value):
            return ""
        if isinstance(value, (float, np.floating)):
            return f"{value:.4g}"
        return str(value).replace("|", "\\|")

    header = "| " + " | ".join(str(c) for c in table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def build_report(data: SearchData, out: Path) -> Report:
    """Compute the findings, draw the plots into ``out/report/`` and assemble the report.

    Args:
        data: The search.
        out: The folder the report is written to; plots go to ``out/report/``.

    Returns:
        The report.
    """
    plot_dir = out / PLOT_DIR
    plot_dir.mkdir(parents=True, exist_ok=True)
    done = data.finished
    report = Report(f"Search report: {data.name}")
    report.add(
        "p",
        f"Parent run `{data.parent_run_id}`; objective `{data.objective}` ({'higher' if data.direction == 'max' else 'lower'} is better); "
        f"{len(done)} finished of {len(data.table)} trial run(s). Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from MLflow alone.",
    )
    importance = hyperparameter_importance(data)
    ranking = optimizer_ranking(data)
    sections = [
        ("Best trial", best_trial_finding(data)),
        ("Hyperparameter choices", choice_findings(data) + activation_depth_findings(data) + numeric_findings(data)),
        ("Gradients (vanishing and dead units)", gradient_findings(data)),
        ("Overfitting and regularization", overfitting_findings(data) + regularization_findings(data)),
        ("Optimizers", optimizer_findings(data, ranking)),
        ("Hyperparameter importance", importance_findings(importance)),
    ]
    report.add("h2", "Findings")
    report.add("ul", [item for _, items in sections for item in items])
    if importance.table is not None:
        report.add("h2", "Hyperparameter importance")
        report.add(
            "p",
            "Method: a random forest (scikit-learn, 100 trees) maps the varied hyperparameters to the objective; each "
            "hyperparameter's importance is the mean drop in the forest's R² when its column is shuffled (permutation "
            "importance, 10 repeats). It is computed on the trials themselves; the out-of-bag R² says how much of the "
            f"objective the forest explains ({importance.oob_r2:.2f}). With few trials, treat it as a hint.",
        )
        report.add("table", importance.table)
    if ranking is not None:
        report.add("h2", "Optimizers: epochs to target")
        report.add("table", ranking)
    plots = []
    for caption, draw in PLOTS:
        try:
            path = draw(data, plot_dir)
        except Exception as exc:  # one plot that cannot be drawn must not cost the report
            log.warning("could not draw %r: %s", caption, exc)
            path = None
        if path is not None:
            plots.append((caption, f"{PLOT_DIR}/{path.name}", path))
    if plots:
        report.add("h2", "Plots")
        for caption, rel, path in plots:
            report.add("img", (caption, rel, path))
    if not done.empty:
        report.add("h2", f"Top trials by {data.objective}")
        columns = ["trial_id", *data.varying, "objective", "best_epoch", "gap_loss", "grad_ratio_first_last"]
        top = done.sort_values("objective", ascending=data.direction == "min").head(10)
        top = top[[c for c in columns if c in top]].assign(best_epoch=top["best_epoch"] + 1)
        report.add("p", "Epochs count from 1; gap_loss and the gradient ratio are at the last epoch.")
        report.add("table", top)
    return report


def write_report(parent_run_id: str, uri: str | None = None, out: Path | None = None, log_to_mlflow: bool = True) -> Path:
    """Build a search's report from MLflow, write it and log it to the parent run.

    Writes ``report.md``, ``report.html`` (plots inline) and ``report/*.png``. On the parent run
    they are logged as ``report.md``, ``report.html`` and ``report/<plot>.png``.

    Args:
        parent_run_id: The search's parent run.
        uri: The tracking URI. Defaults to :func:`toolkit.tracking.tracking_uri`.
        out: The folder to write into. Defaults to a new temporary folder.
        log_to_mlflow: Log the files to the parent run. Defaults to True.

    Returns:
        The path of ``report.md``.
    """
    uri = uri or tracking.tracking_uri()
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="toolkit-report-"))
    out.mkdir(parents=True, exist_ok=True)
    data = load_search(parent_run_id, uri)
    report = build_report(data, out)
    md = out / "report.md"
    md.write_text(report.markdown(), encoding="utf-8")
    (out / "report.html").write_text(report.html(), encoding="utf-8")
    if log_to_mlflow:
        client = tracking.client(uri)
        client.log_artifact(parent_run_id, str(md))
        client.log_artifact(parent_run_id, str(out / "report.html"))
        client.log_artifacts(parent_run_id, str(out / PLOT_DIR), PLOT_DIR)
    return md


def log_search_report(uri: str, parent_run_id: str, cfg: ExperimentConfig | None = None) -> str | None:
    """Write and log the report at the end of a search; a failure is logged, never raised.

    Args:
        uri: The tracking URI.
        parent_run_id: The search's parent run.
        cfg: The card. Defaults to None.

    Returns:
        The report's artifact URI (``runs:/<parent>/report.md``), or None if it could not be made.
    """
    try:
        with tempfile.TemporaryDirectory(prefix="toolkit-report-") as tmp:
            write_report(parent_run_id, uri, Path(tmp))
        return f"runs:/{parent_run_id}/report.md"
    except Exception as exc:
        name = cfg.name if cfg is not None else parent_run_id
        log.warning("the report for %s could not be made: %s: %s", name, type(exc).__name__, exc)
        return None


def regenerate(cfg: ExperimentConfig, uri: str | None = None) -> Path:
    """Rebuild the report of a card's latest search from MLflow alone and log it again.

    Args:
        cfg: The card; its experiment name (``tracking.experiment`` or ``name``) picks the search.
        uri: The tracking URI. Defaults to the card's, else :func:`toolkit.tracking.tracking_uri`.

    Returns:
        The path of the written ``report.md`` (under ``<store>/reports/<experiment>/``).

    Raises:
        ConfigError: When the experiment has no search yet.
    """
    uri = uri or tracking.tracking_uri(cfg)
    experiment = cfg.tracking.experiment or cfg.name
    parent = find_search(experiment, uri)
    out = tracking.store_dir(uri) / "reports" / experiment
    return write_report(parent, uri, out)
