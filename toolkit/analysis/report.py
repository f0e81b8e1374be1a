"""The report: findings, importance, plots and the top trials, as Markdown and HTML on the parent run."""

from __future__ import annotations

import base64
import html
import logging
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from toolkit import tracking
from toolkit.analysis.compare import comparison_findings, comparison_table
from toolkit.analysis.findings import (
    _missing,
    activation_depth_findings,
    best_trial_finding,
    choice_findings,
    gradient_findings,
    numeric_findings,
    optimizer_findings,
    optimizer_ranking,
    overfitting_findings,
    pruning_findings,
    regularization_findings,
    system_findings,
)
from toolkit.analysis.importance import Importance, hyperparameter_importance, importance_findings
from toolkit.analysis.load import SearchData, find_search, load_search
from toolkit.analysis.pareto import constraint_findings, pareto_findings, pareto_table, plot_pareto
from toolkit.analysis.plots import PLOTS
from toolkit.config import ConfigError, ExperimentConfig

log = logging.getLogger(__name__)

PLOT_DIR = "report"


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


def build_report(data: SearchData, out: Path, others: dict[str, SearchData | None] | None = None) -> Report:
    """Compute the findings, draw the plots into ``out/report/`` and assemble the report.

    Args:
        data: The search.
        out: The folder the report is written to; plots go to ``out/report/``.
        others: Searches to set beside this one, by experiment name (None where that experiment
            has no search yet). Defaults to none.

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
    importance = _safely(hyperparameter_importance, data, default=Importance(None, "it could not be computed (see the log)."))
    ranking = _safely(optimizer_ranking, data, default=None)
    # Each finding is given whatever hyperparameters and metrics the trials had; the essay's
    # (activation × depth, gradients, L1/L2, optimizers) return nothing where their knobs or
    # diagnostics are absent.
    sections = [
        ("Best trial", [best_trial_finding, constraint_findings, pruning_findings, system_findings]),
        ("Hyperparameter choices", [choice_findings, activation_depth_findings, numeric_findings]),
        ("Gradients (vanishing and dead units)", [gradient_findings]),
        ("Overfitting and regularization", [overfitting_findings, regularization_findings]),
    ]
    items = [item for _, finders in sections for finder in finders for item in _safely(finder, data, default=[])]
    items += _safely(optimizer_findings, data, ranking, default=[]) + importance_findings(importance)
    report.add("h2", "Findings")
    report.add("ul", items)
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
    if others:
        report.add("h2", "Against " + ", ".join(others))
        report.add("ul", _safely(comparison_findings, data, others, default=[]))
        table = _safely(comparison_table, data, others, default=None)
        if table is not None:
            report.add("table", table)
    front = _safely(pareto_table, data, default=None)
    if front is not None and not front.empty:
        report.add("h2", "Pareto front")
        report.add("ul", _safely(pareto_findings, data, default=[]))
        report.add("table", front)
        try:
            path = plot_pareto(data, plot_dir)
        except Exception as exc:  # as for every plot: the report stands without it
            log.warning("could not draw the Pareto front: %s", exc)
            path = None
        if path is not None:
            report.add("img", ("Pareto front", f"{PLOT_DIR}/{path.name}", path))
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
        measured = [c for c in ("gap_loss", "grad_ratio_first_last") if c in top]
        verb = "are" if len(measured) > 1 else "is"
        note = f"; {' and '.join(measured)} {verb} at the last epoch" if measured else ""
        report.add("p", f"Epochs count from 1{note}.")
        report.add("table", top)
    return report


def _safely(finder: Any, *args: Any, default: Any) -> Any:
    """A finding that cannot be computed for this search is logged and left out, never raised."""
    try:
        return finder(*args)
    except Exception as exc:
        log.warning("could not compute %s: %s: %s", finder.__name__, type(exc).__name__, exc)
        return default


def load_others(names: list[str], uri: str, skip: str | None = None) -> dict[str, SearchData | None]:
    """The latest search of each named experiment (None for one that has none yet), leaving out ``skip``'s."""
    others: dict[str, SearchData | None] = {}
    for name in dict.fromkeys(names):
        try:
            parent = find_search(name, uri)
        except ConfigError:
            others[name] = None
            continue
        if parent != skip:
            others[name] = load_search(parent, uri)
    return others


def write_report(
    parent_run_id: str,
    uri: str | None = None,
    out: Path | None = None,
    log_to_mlflow: bool = True,
    compare_with: list[str] | None = None,
) -> Path:
    """Build a search's report from MLflow, write it and log it to the parent run.

    Writes ``report.md``, ``report.html`` (plots inline) and ``report/*.png``. On the parent run
    they are logged as ``report.md``, ``report.html`` and ``report/<plot>.png``.

    Args:
        parent_run_id: The search's parent run.
        uri: The tracking URI. Defaults to :func:`toolkit.tracking.tracking_uri`.
        out: The folder to write into. Defaults to a new temporary folder.
        log_to_mlflow: Log the files to the parent run. Defaults to True.
        compare_with: Experiments whose latest searches are set beside this one. Defaults to none.

    Returns:
        The path of ``report.md``.
    """
    uri = uri or tracking.tracking_uri()
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="toolkit-report-"))
    out.mkdir(parents=True, exist_ok=True)
    data = load_search(parent_run_id, uri)
    report = build_report(data, out, load_others(compare_with or [], uri, skip=parent_run_id))
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
            write_report(parent_run_id, uri, Path(tmp), compare_with=cfg.tracking.compare_with if cfg is not None else None)
        return f"runs:/{parent_run_id}/report.md"
    except Exception as exc:
        name = cfg.name if cfg is not None else parent_run_id
        log.warning("the report for %s could not be made: %s: %s", name, type(exc).__name__, exc)
        return None


def regenerate(cfg: ExperimentConfig, uri: str | None = None, compare_with: list[str] | None = None) -> Path:
    """Rebuild the report of a card's latest search from MLflow alone and log it again.

    Args:
        cfg: The card; its experiment name (``tracking.experiment`` or ``name``) picks the search.
        uri: The tracking URI. Defaults to the card's, else :func:`toolkit.tracking.tracking_uri`.
        compare_with: More experiments to set beside it, after the card's ``tracking.compare_with``.
            Defaults to none.

    Returns:
        The path of the written ``report.md`` (under ``<store>/reports/<experiment>/``).

    Raises:
        ConfigError: When the experiment has no search yet.
    """
    uri = uri or tracking.tracking_uri(cfg)
    experiment = cfg.tracking.experiment or cfg.name
    parent = find_search(experiment, uri)
    out = tracking.store_dir(uri) / "reports" / experiment
    return write_report(parent, uri, out, compare_with=[*cfg.tracking.compare_with, *(compare_with or [])])
