"""Findings: what a search shows, in sentences that state their numbers and trial counts."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pandas as pd

from toolkit.analysis.load import SearchData
from toolkit.data.folds import fold_statistics

NOT_ENOUGH = "not enough trials to say"
# A comparison of two groups rests on at least this many finished trials in each.
MIN_GROUP = 2
# A first-layer gradient this much smaller than the last layer's is called vanishing.
VANISHING_RATIO = 0.1
# A claim about L1/L2 rests on a rank correlation over at least this many trials; weaker
# correlations than WEAK_CORRELATION are reported as no clear relation.
MIN_REGULARIZATION_TRIALS = 6
WEAK_CORRELATION = 0.3
# Epochs-to-target: a max objective must reach this share of the best value seen; a min objective
# must come within this factor of the best (lowest) value seen.
TARGET_SHARE = 0.95
TARGET_FACTOR = 1.10
# An epoch's validation loss this far above its minimum, with the training loss still falling,
# counts as overfitting.
OVERFIT_RISE = 0.05
# A numeric hyperparameter's trend (its Spearman correlation with the objective) rests on at
# least this many finished trials.
MIN_TREND_TRIALS = 5
# Hyperparameters read as an L1 or L2 strength: ``l1``, ``l2``, ``kernel_l2``, ``conv_l1``,
# ``l2_penalty``, ... (a token ``l1``/``l2`` at the end, or before a regularization word).
REGULARIZATION_NAME = re.compile(r"(?:^|.*[_./-])(l[12])(?:[_./-](?:reg|regularization|regularizer|penalty|strength))?")
# Layer names that say they are the output layer, and name parts of layers that sit on the input
# side of a network; they order gradient norms when the diagnostics' own ratio is missing.
OUTPUT_LAYER = re.compile(r"(output|out|logits|predictions?|head|classifier)([_./-].*)?")
INPUT_SIDE_LAYER = re.compile(r".*(conv|embedding|lstm|gru|rnn|attention|stem).*")


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
    spread = f"{data.objective}_std"
    if spread in best and math.isfinite(float(best[spread])):
        k = len(fold_columns(data, ranked))
        low, high = best.get(f"{data.objective}_ci_low"), best.get(f"{data.objective}_ci_high")
        text += f" (mean over {k} folds, std {_value(data.objective, float(best[spread]))}"
        if low is not None and math.isfinite(float(low)):
            text += f", 95% CI {_value(data.objective, float(low))}–{_value(data.objective, float(high))}"
        text += ")"
    if len(ranked) > 1:
        second = ranked.iloc[1]
        text += f"; the runner-up, trial {second['trial_id']}, was {_diff(data.objective, best['objective'] - second['objective'])} behind"
        pair = ranked.iloc[:2].assign(_which=["best", "runner-up"])
        interval = _interval(data, pair, "_which", "best", "runner-up")
        if interval is not None:
            scale, unit = (100.0, " pp") if _is_share(data.objective) else (1.0, "")
            low, high, over = interval
            text += f" (95% CI of the lead {low * scale:+.1f} to {high * scale:+.1f}{unit}, {over}"
            text += "; it crosses zero)" if low <= 0 <= high else ")"
    failed = int((data.table["status"] == "FAILED").sum())
    tail = f" ({len(done)} finished trial(s)" + (f", {failed} failed)." if failed else ").")
    return [text + tail]


def system_findings(data: SearchData) -> list[str]:
    """The best trial's peak memory and mean CPU, from MLflow's system metrics (when they were logged)."""
    done = data.finished
    if done.empty:
        return []
    best = done.sort_values("objective", ascending=data.direction == "min").iloc[0]
    curves = data.curves.get(best["run_id"], {})
    cpu, memory = curves.get("system/cpu_utilization_percentage"), curves.get("system/system_memory_usage_megabytes")
    if cpu is None or memory is None or not cpu.size or not memory.size:
        return []
    return [
        f"While the best trial, {best['trial_id']}, trained, the machine's memory in use peaked at {np.nanmax(memory):,.0f} MB "
        f"and its CPUs were {np.nanmean(cpu):.0f}% busy on average ({cpu.size} sample(s) of MLflow's system metrics)."
    ]


def pruning_findings(data: SearchData) -> list[str]:
    """How many trials ``tuner.pruning`` stopped, and the epochs that saved."""
    rule = data.card.get("tuner.pruning.rule")
    done = data.finished
    if not rule or rule == "None" or done.empty:
        return []
    planned = int(float(data.card.get("train.epochs", "0") or 0))
    words = f"{rule} rule" + (f" at {float(data.card['tuner.pruning.percentile']):g}%" if rule == "percentile" else "")
    words += f", from epoch {data.card.get('tuner.pruning.min_epochs', '?')}"
    pruned = done[done["pruned_epoch"].notna()] if "pruned_epoch" in done else done.iloc[:0]
    if pruned.empty:
        return [f"Pruning ({words}) stopped none of the {len(done)} finished trial(s)."]
    text = f"Pruning ({words}) stopped {len(pruned)} of {len(done)} finished trial(s)"
    if planned:
        saved = int(sum(planned - int(e) - 1 for e in pruned["pruned_epoch"]))
        text += f", saving {saved} of {planned * len(done)} epochs ({saved / (planned * len(done)):.0%})"
    best = done.sort_values("objective", ascending=data.direction == "min").iloc[0]
    ran = "was itself pruned" if best["trial_id"] in set(pruned["trial_id"]) else "ran all its epochs"
    return [f"{text}; the best trial, {best['trial_id']}, {ran}."]


def _comparison(data: SearchData, stats: pd.DataFrame, a: Any, b: Any, part: pd.DataFrame | None = None, name: str = "") -> str:
    """``a`` against ``b`` by mean objective, with a 95% interval where there is one and a caveat when either rests on too few trials.

    Args:
        data: The search.
        stats: :func:`_group_stats` of ``part`` by ``name``.
        a: The value set against ``b``.
        b: The other value.
        part: The trials compared, for the interval. Defaults to None (no interval).
        name: The hyperparameter whose values ``a`` and ``b`` are. Defaults to "".
    """
    mean_a, mean_b = float(stats.loc[a, "mean"]), float(stats.loc[b, "mean"])
    n_a, n_b = int(stats.loc[a, "count"]), int(stats.loc[b, "count"])
    what = f"mean {data.objective}" if max(n_a, n_b) > 1 else data.objective
    numbers = f"({_value(data.objective, mean_a)} vs {_value(data.objective, mean_b)}, n={n_a} and {n_b})"
    interval = _interval(data, part, name, a, b) if part is not None and name else None
    if mean_a == mean_b:
        text = f"{a} and {b} tied in {what} {numbers}"
    else:
        verb = "beat" if data.better(mean_a, mean_b) else "trailed"
        text = f"{a} {verb} {b} by {_diff(data.objective, mean_a - mean_b)} in {what} {numbers}"
    if interval is not None:
        low, high, over = interval
        share = _is_share(data.objective)
        scale, unit = (100.0, " pp") if share else (1.0, "")
        text += f" (95% CI of {a} − {b}, better positive: {low * scale:+.1f} to {high * scale:+.1f}{unit}, {over})"
        if low <= 0 <= high:
            text += "; the interval crosses zero, so these trials do not establish a difference"
    elif min(n_a, n_b) < MIN_GROUP:
        text += f"; with fewer than {MIN_GROUP} trials per value there are {NOT_ENOUGH} whether that holds beyond these runs"
    return text


def fold_columns(data: SearchData, table: pd.DataFrame) -> list[str]:
    """The ``fold_<i>/best_<objective>`` columns of a ``train.folds`` search, in fold order."""
    pattern = re.compile(rf"fold_(\d+)/best_{re.escape(data.objective)}")
    found = [(int(m.group(1)), c) for c in table.columns if (m := pattern.fullmatch(str(c)))]
    return [c for _, c in sorted(found)]


def _interval(data: SearchData, part: pd.DataFrame, name: str, a: Any, b: Any) -> tuple[float, float, str] | None:
    """The 95% t interval of (``a`` − ``b``) in objective, signed so that positive means ``a`` is better.

    Over trials (Welch's interval of the two means) when each value has two trials or more; over
    folds (paired: the same folds, the difference per fold) when each has one trial of a
    ``train.folds`` search; else None.
    """
    from scipy import stats as scipy_stats

    sign = 1.0 if data.direction == "max" else -1.0
    rows_a, rows_b = part[part[name] == a], part[part[name] == b]
    va, vb = rows_a["objective"].astype(float).to_numpy(), rows_b["objective"].astype(float).to_numpy()
    if len(va) >= MIN_GROUP and len(vb) >= MIN_GROUP:
        diff = sign * (va.mean() - vb.mean())
        se_a, se_b = va.var(ddof=1) / len(va), vb.var(ddof=1) / len(vb)
        se = math.sqrt(se_a + se_b)
        if se == 0:
            return diff, diff, f"over trials, n={len(va)} and {len(vb)}"
        dof = (se_a + se_b) ** 2 / (se_a**2 / (len(va) - 1) + se_b**2 / (len(vb) - 1))  # Welch–Satterthwaite
        half = float(scipy_stats.t.ppf(0.975, dof)) * se
        return diff - half, diff + half, f"over trials, n={len(va)} and {len(vb)}"
    columns = fold_columns(data, part)
    if len(va) == 1 and len(vb) == 1 and len(columns) >= 2:
        d = sign * (rows_a[columns].iloc[0].astype(float).to_numpy() - rows_b[columns].iloc[0].astype(float).to_numpy())
        d = d[np.isfinite(d)]
        if len(d) < 2:
            return None
        interval = fold_statistics(d.tolist())
        return interval["ci_low"], interval["ci_high"], f"over {len(d)} folds, paired"
    return None


def _group_stats(data: SearchData, part: pd.DataFrame, name: str) -> pd.DataFrame:
    """Per value of ``name``: the mean and best objective and the trial count, best mean first."""
    stats = part.groupby(name)["objective"].agg(["mean", "count", "max", "min"])
    stats["best"] = stats["max"] if data.direction == "max" else stats["min"]
    stats = stats.drop(columns=["max", "min"])
    return stats.sort_values("mean", ascending=data.direction == "min")


def _listing(data: SearchData, stats: pd.DataFrame) -> str:
    """Each value's mean and best objective with its trial count."""

    def one(value: Any, row: pd.Series) -> str:
        n = int(row["count"])
        if n == 1:
            return f"{_num(value)} {_value(data.objective, row['mean'])} (n=1)"
        return f"{_num(value)} mean {_value(data.objective, row['mean'])}, best {_value(data.objective, row['best'])} (n={n})"

    return ", ".join(one(v, r) for v, r in stats.iterrows())


def _categorical(column: pd.Series) -> bool:
    return not pd.api.types.is_numeric_dtype(column)


def choice_findings(data: SearchData) -> list[str]:
    """For each categorical hyperparameter: how its values ranked by mean objective.

    Returns:
        One finding per varied categorical hyperparameter, whatever its name: the best value
        against the worst, then every value's mean and best objective with its trial count.
    """
    done = data.finished
    out = []
    for name in data.varying:
        if not _categorical(done[name]) or done[name].nunique() < 2:
            continue
        stats = _group_stats(data, done, name)
        listing = _listing(data, stats)
        out.append(f"{name}: {_comparison(data, stats, stats.index[0], stats.index[-1], done, name)}. All values: {listing}.")
    return out


def numeric_findings(data: SearchData) -> list[str]:
    """For each numeric hyperparameter: where it was best, and its trend with the objective.

    Returns:
        One finding per varied numeric hyperparameter, whatever its name: the best trial's value,
        the Spearman correlation with the objective in words, and for a few values each value's
        mean and best objective with its trial count.
    """
    done = data.finished
    out = []
    for name in data.varying:
        if _categorical(done[name]):
            continue
        # A conditional hyperparameter is absent from some trials: its trend is over the rest.
        part = done.dropna(subset=[name])
        column = part[name]
        best = part.sort_values("objective", ascending=data.direction == "min").iloc[0]
        rho = _spearman(column, part["objective"])
        over = f"Spearman ρ = {rho:.2f} over {len(part)} trials"
        if not math.isfinite(rho) or abs(rho) < WEAK_CORRELATION:
            trend = f"no clear trend with {data.objective} ({over})"
        else:
            better = (rho > 0) == (data.direction == "max")
            trend = f"higher {name} went with {'better' if better else 'worse'} {data.objective} ({over})"
        text = f"{name}: the best trial used {_num(best[name])}; {trend}"
        if len(part) < MIN_TREND_TRIALS:
            text += f"; with fewer than {MIN_TREND_TRIALS} trials there are {NOT_ENOUGH} whether the trend holds"
        if column.nunique() <= 8:
            stats = _group_stats(data, part, name).sort_index()
            text += f". {data.objective} by value: {_listing(data, stats)}"
        out.append(text + ".")
    return out


def _deep_threshold(depths: pd.Series) -> int | None:
    """The depth from which a trial counts as deep: the upper half of the depths tried."""
    values = sorted(int(v) for v in depths.dropna().unique())
    if not values:
        return None
    return values[len(values) // 2] if len(values) > 1 else values[0]


# The knobs that make a network deep, in the order they are looked for: a CNN's conv_blocks (its
# dense head's depth matters less for vanishing gradients) when it varies, then the depth.
DEPTH_KNOBS = (("conv_blocks", "conv blocks"), ("depth", "depth"))


def depth_knob(done: pd.DataFrame) -> tuple[str, str] | None:
    """The numeric knob that sets how deep the trials' networks were, and its words; None if none."""
    numeric = [(c, w) for c, w in DEPTH_KNOBS if c in done and not _categorical(done[c]) and done[c].notna().any()]
    varied = [(c, w) for c, w in numeric if done[c].nunique() > 1]
    return (varied or numeric or [None])[0]


def _has_activation_and_depth(done: pd.DataFrame) -> bool:
    """Whether the trials had the essay's knobs: a categorical ``activation`` and a numeric depth (``depth``, ``conv_blocks``)."""
    return "activation" in done and _categorical(done["activation"]) and depth_knob(done) is not None


def activation_depth_findings(data: SearchData) -> list[str]:
    """Whether the activations rank differently when the network is deep."""
    done = data.finished
    if not _has_activation_and_depth(done) or done["activation"].nunique() < 2:
        return []
    column, words = depth_knob(done)
    deep_from = _deep_threshold(done[column])
    if deep_from is None or done[column].nunique() < 2:
        return []  # one depth: the activation finding above says it all
    out = []
    for label, part in (
        (f"{words} ≥ {deep_from}", done[done[column] >= deep_from]),
        (f"{words} < {deep_from}", done[done[column] < deep_from]),
    ):
        stats = _group_stats(data, part, "activation")
        if len(stats) < 2:
            out.append(f"At {label}: {NOT_ENOUGH} how the activations compare (only {', '.join(stats.index) or 'no trials'}).")
            continue
        a, b = ("relu", "sigmoid") if {"relu", "sigmoid"} <= set(stats.index) else (stats.index[0], stats.index[-1])
        out.append(f"At {label}, {_comparison(data, stats, a, b, part, 'activation')}.")
    return out


def layer_order(name: str) -> tuple[int, str, int, str]:
    """A sort key that puts layer names in input-to-output order, as far as names can tell.

    Keras names layers ``<kind>``, ``<kind>_1``, ... in creation order, so within a kind the
    number orders them. Across kinds, convolutional, embedding and recurrent layers come first,
    layers named as outputs (``output``, ``logits``, ``head``, ...) last, the rest in between.
    """
    match = re.fullmatch(r"(.*?)(?:_(\d+))?", name)
    kind, index = match.group(1), int(match.group(2) or 0)
    if OUTPUT_LAYER.fullmatch(name):
        rank = 2
    elif INPUT_SIDE_LAYER.fullmatch(kind):
        rank = 0
    else:
        rank = 1
    return rank, kind, index, name


def gradient_layers(table: pd.DataFrame) -> list[str]:
    """The ``grad_norm/<layer>`` columns of a table, input side first (see :func:`layer_order`)."""
    return sorted((c for c in table if c.startswith("grad_norm/")), key=lambda c: layer_order(c.split("/", 1)[1]))


def gradient_ratios(table: pd.DataFrame) -> tuple[pd.Series, str]:
    """Each trial's first-layer over last-layer gradient norm at the last epoch.

    The diagnostics' own ``grad_ratio_first_last`` knows the model's layer order and is used
    where it was logged; otherwise the ratio is taken from the ``grad_norm/<layer>`` metrics in
    :func:`layer_order`.

    Returns:
        The ratios (NaN where unknown), and a note on how they were read ("" for the diagnostics'
        own ratio).
    """
    if "grad_ratio_first_last" in table and table["grad_ratio_first_last"].notna().any():
        return table["grad_ratio_first_last"].astype(float), ""
    cols = gradient_layers(table)
    if len(cols) < 2:
        return pd.Series(np.nan, index=table.index), ""
    first, last = table[cols[0]].astype(float), table[cols[-1]].astype(float)
    ratios = (first / last.where(last > 0)).where(np.isfinite(first))
    note = f"; first and last layer by name: {cols[0].split('/', 1)[1]} and {cols[-1].split('/', 1)[1]}"
    return ratios, note


def gradient_findings(data: SearchData) -> list[str]:
    """Whether gradients vanished (first/last gradient norm ratio) and how many ReLUs died.

    Read from the diagnostics' metrics (``grad_norm/<layer>``, ``grad_ratio_first_last``,
    ``dead_relu/<layer>``) whatever the layers are called; left out when there are none. Trials
    are grouped by ``activation`` and narrowed to the deep ones only where those knobs exist.
    """
    done = data.finished
    ratios, note = gradient_ratios(done)
    out = []
    group = "activation" if "activation" in done and _categorical(done["activation"]) else None
    with_ratio = done.assign(_ratio=ratios)
    if ratios.isna().all():
        parts = []
    elif group:
        parts = with_ratio.groupby(group)
    else:
        parts = [("all trials", with_ratio)]
    knob = depth_knob(done)
    column, words = knob if knob else ("depth", "depth")
    deep_from = _deep_threshold(done[column]) if knob else None
    for value, part in parts:
        if deep_from is not None and (part[column] >= max(2, deep_from)).any():
            part = part[part[column] >= max(2, deep_from)]
            where = f" at {words} ≥ {max(2, deep_from)}"
        else:
            where = ""
        part_ratios = part["_ratio"].dropna()
        if part_ratios.empty:
            continue
        median = float(part_ratios.median())
        flag = " — vanishing" if median < VANISHING_RATIO else ""
        label = f"{value}: " if group else ""
        out.append(
            f"Gradients, {label}the first layer's gradient norm was {_ratio_words(median)} at the last epoch "
            f"(median ratio {median:.3g} over {len(part_ratios)} trial(s){where}{note}){flag}."
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
    """Whether trials overfit: validation loss rising from its minimum while training loss falls.

    Left out when the trials logged no per-epoch ``loss`` and ``val_loss``.
    """
    done = data.finished
    curves = [data.curves.get(run_id, {}) for run_id in done["run_id"]] if not done.empty else []
    if not any(c.get("loss", np.array([])).size and c.get("val_loss", np.array([])).size for c in curves):
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
    """Spearman's rank correlation (``scipy.stats.spearmanr``) over the pairs where both values are known.

    Returns:
        ρ, or NaN where it is undefined (fewer than two pairs, or one side constant), which the
        callers read as "no clear trend". spearmanr gives NaN there too, with a
        ConstantInputWarning that a report has no use for.
    """
    from scipy import stats as scipy_stats

    known = a.notna() & b.notna()
    x, y = a[known].to_numpy(dtype=float), b[known].to_numpy(dtype=float)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(scipy_stats.spearmanr(x, y).statistic)


def _total_weight_l2(table: pd.DataFrame) -> pd.Series:
    cols = [c for c in table if c.startswith("weight_l2/")]
    if not cols:
        return pd.Series(np.nan, index=table.index)
    return np.sqrt((table[cols] ** 2).sum(axis=1, min_count=1))


def regularization_knobs(data: SearchData) -> list[str]:
    """The numeric hyperparameters named as an L1 or L2 strength (see ``REGULARIZATION_NAME``)."""
    done = data.finished
    return [h for h in data.hyperparameters if h in done and not _categorical(done[h]) and REGULARIZATION_NAME.fullmatch(h)]


def regularization_findings(data: SearchData) -> list[str]:
    """Whether stronger L1/L2 went with a smaller train/validation gap and smaller weights.

    Only for hyperparameters named as an L1/L2 strength that were varied; left out otherwise.
    """
    done = data.finished
    out = []
    for name in regularization_knobs(data):
        if done[name].nunique() < 2:
            continue
        label = name.upper() if name in ("l1", "l2") else name
        part = done[[name, "objective"]].assign(gap=done.get("gap_loss"), weights=_total_weight_l2(done)).dropna(subset=[name])
        if "gap_loss" not in done or part["gap"].isna().all():
            out.append(f"{label}: no gap_loss was recorded, so its effect on overfitting cannot be read.")
            continue
        part = part.dropna(subset=["gap"])
        cut = float(part[name].median())
        strong, weak = part[part[name] > cut], part[part[name] <= cut]
        if len(part) < MIN_REGULARIZATION_TRIALS or len(strong) < MIN_GROUP or len(weak) < MIN_GROUP:
            out.append(
                f"{label}: {NOT_ENOUGH} ({len(part)} trial(s); need {MIN_REGULARIZATION_TRIALS}, "
                f"with {MIN_GROUP} on each side of the median strength)."
            )
            continue
        rho = _spearman(part[name], part["gap"])
        if not math.isfinite(rho) or abs(rho) < WEAK_CORRELATION:  # NaN: the gap did not vary
            relation = f"showed no clear relation to gap_loss (Spearman ρ = {rho:.2f} over {len(part)} trials)"
        else:
            relation = (
                f"went with a {'smaller' if rho < 0 else 'larger'} gap_loss (Spearman ρ = {rho:.2f} over {len(part)} trials)"
            )
        text = (
            f"{label}: stronger {name} {relation}; "
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
        trial's ``trial_id`` (and ``learning_rate``, where the search had one), the optimizer's
        best objective and its trial count; or None when the search had no ``optimizer`` knob or
        did not vary it.
    """
    done = data.finished
    if "optimizer" not in done or not _categorical(done["optimizer"]) or done["optimizer"].nunique() < 2:
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
        row = {
            "optimizer": name,
            "epochs_to_target": None if epochs == math.inf else int(epochs),
            "trial_id": fastest["trial_id"],
        }
        if "learning_rate" in done:
            row["learning_rate"] = fastest["learning_rate"]
        rows.append({**row, f"best_{data.objective}": float(best), "trials": len(part)})
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
