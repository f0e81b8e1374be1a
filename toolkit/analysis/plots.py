"""The report's plots, drawn with matplotlib's object-oriented API onto an Agg canvas."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from toolkit.analysis.findings import (
    _categorical,
    _has_activation_and_depth,
    _missing,
    _num,
    _spearman,
    _value,
    depth_knob,
    gradient_layers,
    regularization_knobs,
)
from toolkit.analysis.load import SearchData

# Learning curves drawn for the best trials.
TOP_CURVES = 5


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
    """A heatmap of the mean objective per activation and depth, with trial counts.

    Drawn only for a search with a categorical ``activation`` and a numeric ``depth`` (or, for a
    CNN, ``conv_blocks``) knob.
    """
    done = data.finished
    if done.empty or not _has_activation_and_depth(done):
        return None
    column, words = depth_knob(done)  # a CNN's conv_blocks when it varies, else depth
    if done["activation"].nunique() < 2 and done[column].nunique() < 2:
        return None  # one cell: the heatmap would say nothing
    mean = done.pivot_table(index="activation", columns=column, values="objective", aggfunc="mean")
    count = done.pivot_table(index="activation", columns=column, values="objective", aggfunc="count")
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
    xlabel = "depth (hidden layers)" if column == "depth" else words
    ax.set(xlabel=xlabel, ylabel="activation", title=f"mean {data.objective}")
    fig.colorbar(image, ax=ax)
    return _save(fig, out / "activation_depth_heatmap.png")


def plot_gradient_norms(data: SearchData, out: Path) -> Path | None:
    """Each trial's gradient norm per layer with a kernel (input → output), coloured by activation.

    Layers are whatever the diagnostics logged as ``grad_norm/<layer>``, in
    :func:`~toolkit.analysis.findings.layer_order`; trials are coloured by ``activation`` only
    where the search had that knob.
    """
    from matplotlib.ticker import MaxNLocator

    done = data.finished
    cols = gradient_layers(done)
    if done.empty or not cols:
        return None
    fig = _figure(7, 4.2)
    ax = fig.subplots()
    by_activation = "activation" in done and _categorical(done["activation"])
    groups = sorted(done["activation"].dropna().unique()) if by_activation else ["all trials"]
    colors = dict(zip(groups, _colors(len(groups)), strict=True))
    seen = set()
    for _, row in done.iterrows():
        values = [row[c] for c in cols if not _missing(row[c])]
        if not values:
            continue
        group = row["activation"] if by_activation else "all trials"
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
    names = [c.split("/", 1)[1] for c in cols]
    # Layer names label the axis only when every trial has every layer; with a varied depth the
    # points are positions from the input side.
    if len(names) <= 12 and done[cols].notna().all().all():
        ax.set_xticks(range(1, len(names) + 1), names, rotation=30, fontsize=7)
    ax.set(xlabel="layer (input side first; the last is the output layer)", ylabel="gradient norm (last epoch)")
    ax.set_title("gradient norm by layer" + (", per activation" if by_activation else ""))
    ax.legend(fontsize=8)
    return _save(fig, out / "gradient_norm_by_layer.png")


def plot_gap_vs_regularization(data: SearchData, out: Path) -> Path | None:
    """gap_loss (val_loss − loss) against each varied L1/L2 strength the search had."""
    done = data.finished
    names = [n for n in regularization_knobs(data) if done[n].nunique() > 1]
    if done.empty or "gap_loss" not in done or not names:
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
    ("Gradient norm by layer", plot_gradient_norms),
    ("Train/validation gap against L1/L2 strength", plot_gap_vs_regularization),
)
