"""Progress for the CLI: a rich bar in a terminal, one concise line per trial elsewhere."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from toolkit.config import ExperimentConfig


def _fmt(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.4g}"


class Reporter:
    """Counts finished trials and keeps the best objective so far.

    Args:
        cfg: The card (for the objective, direction and trial budget).
        console: Where to write. Defaults to stderr.
        live: Draw a progress bar (a terminal) instead of one line per trial.
    """

    def __init__(self, cfg: ExperimentConfig, console: Console | None = None, live: bool | None = None) -> None:
        self.cfg = cfg
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal if live is None else live
        self.total = _budget(cfg)
        self.done = 0
        self.pruned = 0
        self.best: tuple[float, str] | None = None
        self.started = time.perf_counter()
        self._progress: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> Reporter:
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[best]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(f"{self.cfg.name} trials", total=self.total, best="best —")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def trial_done(self, result: Any) -> None:
        """Record one finished trial (from any worker) and redraw."""
        self.done += 1
        key = f"best_{self.cfg.objective}"
        score = result.metrics.get(key)
        # Under tuner.constraints an infeasible trial cannot be the best (it cannot be the champion).
        counts_for_best = getattr(result, "feasible", None) is not False
        if result.status == "FINISHED" and score is not None and math.isfinite(score) and counts_for_best:
            better = self.best is None or (score < self.best[0] if self.cfg.direction == "min" else score > self.best[0])
            if better:
                self.best = (score, result.trial_id)
        best = f"best {self.cfg.objective}={_fmt(self.best[0])} (trial {self.best[1]})" if self.best else "best —"
        pruned = getattr(result, "pruned_epoch", None)
        if pruned is not None:
            self.pruned += 1
        if self._progress is not None:
            if self.pruned:
                best += f", {self.pruned} pruned"
            self._progress.update(self._task, completed=self.done, best=best)
            return
        detail = f"{self.cfg.objective}={_fmt(score)}" if result.status == "FINISHED" else f"reason: {result.failure}"
        if pruned is not None:
            detail += f" (pruned after epoch {pruned + 1})"
        if getattr(result, "feasible", None) is False:
            detail += " (infeasible)"
        total = f"/{self.total}" if self.total else ""
        counts = f"{self.done}{total} done" + (f" ({self.pruned} pruned)" if self.pruned else "")
        self.console.print(
            f"trial {result.trial_id} {result.status} {detail} {result.seconds:.1f}s | {counts}, {best}, elapsed {time.perf_counter() - self.started:.0f}s",
            highlight=False,
            soft_wrap=True,
        )


def _budget(cfg: ExperimentConfig) -> int | None:
    if cfg.tuner.algorithm == "hyperband":
        return None  # Hyperband decides its own number of trials
    return cfg.tuner.max_trials


def make_reporter(cfg: ExperimentConfig) -> Reporter:
    """The reporter for the current terminal."""
    return Reporter(cfg)


def print_summary(result: Any, console: Console | None = None) -> None:
    """The end-of-search summary: best trial, its hyperparameters, its score, how to look."""
    console = console or Console()
    done = sum(t.status == "FINISHED" for t in result.trials)
    failed = sum(t.status == "FAILED" for t in result.trials)
    pruned = [t for t in result.trials if t.status == "FINISHED" and getattr(t, "pruned_epoch", None) is not None]
    saved = ""
    if pruned:
        epochs = getattr(result, "epochs", None)
        saved = f" ({len(pruned)} pruned" + (
            f", {sum(epochs - t.pruned_epoch - 1 for t in pruned)} epochs saved)" if epochs else ")"
        )
    feasible = [t for t in result.trials if getattr(t, "feasible", None) is not None]
    if feasible:
        saved += f" ({sum(bool(t.feasible) for t in feasible)} feasible)"
    console.print(
        f"[bold]{result.name}[/bold]: {done} trial(s) finished{saved}, {failed} failed in {result.seconds:.1f}s"
        + (" (resumed)" if result.resumed else ""),
        highlight=False,
        soft_wrap=True,
    )
    if result.stopped_reason:
        console.print(f"[yellow]search {result.stopped_reason}[/yellow]", highlight=False, soft_wrap=True)
    if result.best is None and feasible:
        console.print(
            "[red]no feasible trial[/red]; each trial's toolkit.infeasible tag in MLflow says which constraint it broke",
            highlight=False,
            soft_wrap=True,
        )
    elif result.best is None:
        console.print(
            "[red]no trial finished with a score[/red]; see each trial's toolkit.failure tag in MLflow",
            highlight=False,
            soft_wrap=True,
        )
    else:
        best = result.best
        score = best.metrics.get(f"best_{result.objective}")
        params = ", ".join(f"{k}={_short(v)}" for k, v in best.hyperparameters.items() if not k.startswith("tuner/"))
        console.print(
            f"best trial {best.trial_id}: {result.objective}={_fmt(score)} ({result.direction}) with {params}",
            highlight=False,
            soft_wrap=True,
        )
    console.print(
        f"parent run {result.parent_run_id} in experiment {result.name!r}. {_browse_hint(getattr(result, 'ui_view', None))}",
        highlight=False,
        soft_wrap=True,
    )
    sys.stdout.flush()


def _browse_hint(view: str | None = None) -> str:
    """How to open the UI over the store this search wrote to, on the trials' view when there is one.

    ``make ui`` serves on ``TOOLKIT_UI_PORT`` (the Makefile passes its ``PORT``), 5000 by default.
    """
    import os

    from toolkit.security import redact_uri

    uri = redact_uri(os.environ.get("MLFLOW_TRACKING_URI", ""))  # never print a password
    view = view or ""
    if uri.startswith(("http://", "https://")):
        return f"Browse: {uri.rstrip('/')}/{view}"
    port = os.environ.get("TOOLKIT_UI_PORT", "5000")
    address = f"http://127.0.0.1:{port}/{view}"
    if uri and uri != "sqlite:///mlruns/mlflow.db" and not uri.endswith("/mlruns/mlflow.db"):
        return f"Browse: mlflow ui --backend-store-uri {uri} --port {port}, then open {address}"
    return f"Browse: make ui, then open {address}"


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
