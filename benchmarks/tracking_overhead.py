"""Per-trial MLflow tracking overhead as a share of trial time, system metrics included.

Every ``MlflowClient`` call is timed while a real search runs (the default: the quickstart
card, 4 trials x 3 epochs, each search on a fresh SQLite store in a temporary folder). Calls
made on the main thread while a trial is open (from ``on_trial_begin`` to the end of
``on_trial_end``: the nested run, its params and datasets, the per-epoch metrics, the
diagnostics, the closing summary) are the per-trial overhead; they are divided by the trials'
wall time. One-off, per-search costs (the parent run, its artifacts, the best model, the
report) are listed apart. The goal is <= 5%.

System metrics (MLflow's monitor, one per trial run) are measured directly: its wall time on
the training thread (starting it, stopping it, logging its last samples) plus the CPU time of
its own thread (reading the machine, asking MLflow whether the run still runs, logging each
sample), which is at most what that thread can take from training. The headline adds that to
the toolkit's own per-trial MLflow calls, measured with system metrics off.

The first search is measured as a fresh process runs it, and reported in full. Then the same
search runs with ``tracking.system_metrics`` on and off, alternated on/off, off/on, ... in this
process (the same seed, so both sides train the same trials): the paired ratios of trial wall
time and of process CPU time per trial are the side-by-side check on the direct figure. On a
small shared machine they swing by more than the cost they measure, so they are printed, with
a note when their median exceeds the direct figure, but not added.

    python benchmarks/tracking_overhead.py [EXP] [--set key=value ...] [--rounds 4]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

GOAL = 0.05
# MlflowClient methods the toolkit calls; nested calls inside one of them are counted once.
CLIENT_METHODS = (
    "create_run",
    "update_run",
    "set_terminated",
    "log_batch",
    "log_inputs",
    "log_outputs",
    "set_tag",
    "log_text",
    "log_dict",
    "log_artifact",
    "log_artifacts",
    "get_run",
    "search_runs",
    "get_metric_history",
    "get_experiment_by_name",
    "create_experiment",
    "set_registered_model_alias",
    "set_model_version_tag",
    "create_registered_model",
    "create_model_version",
)


class Clock:
    """Accumulates MLflow time, split by phase.

    Phases: ``trial`` (the main thread, a trial open), ``search`` (the main thread otherwise),
    ``system`` (the main thread inside the system-metrics monitor's start and stop, timed as a
    whole), ``background`` (MlflowClient calls from other threads: the monitor's) and
    ``sampling`` (the monitor reading the machine, on its thread). ``monitor_cpu`` is the CPU
    time of the monitor's thread, its whole loop; ``trial_cpu`` the process' CPU time (every
    thread) while trials are open.
    """

    def __init__(self) -> None:
        self._local = threading.local()  # nesting depth and "inside the monitor", per thread
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.in_trial = False
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: Counter[tuple[str, str]] = Counter()
        self.method_seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.trial_wall = 0.0
        self.trial_cpu = 0.0
        self.monitor_cpu = 0.0
        self.trials = 0
        self._trial_started = 0.0
        self._trial_cpu_started = 0.0

    def _add(self, phase: str, name: str | None, elapsed: float) -> None:
        with self._lock:
            self.seconds[phase] += elapsed
            if name is not None:
                self.calls[(phase, name)] += 1
                self.method_seconds[(phase, name)] += elapsed

    def _phase(self) -> str:
        if threading.current_thread() is not threading.main_thread():
            return "background"
        if getattr(self._local, "system", False):
            return "system"
        return "trial" if self.in_trial else "search"

    def wrap(self, cls: type, name: str) -> None:
        original = getattr(cls, name, None)
        if original is None:
            return
        clock = self

        @functools.wraps(original)
        def timed(*args, **kwargs):
            local = clock._local
            if getattr(local, "depth", 0):
                return original(*args, **kwargs)
            local.depth = 1
            phase = clock._phase()
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                local.depth = 0
                elapsed = time.perf_counter() - started
                if phase == "system":  # inside the monitor's start or stop, which is timed whole
                    with clock._lock:
                        clock.calls[(phase, name)] += 1
                else:
                    clock._add(phase, name, elapsed)

        setattr(cls, name, timed)

    def wrap_trial_hooks(self, mixin: type) -> None:
        begin, end = mixin.on_trial_begin, mixin.on_trial_end
        clock = self

        def on_trial_begin(tuner, trial):
            clock.in_trial = True
            clock._trial_started = time.perf_counter()
            clock._trial_cpu_started = time.process_time()
            return begin(tuner, trial)

        def on_trial_end(tuner, trial):
            try:
                return end(tuner, trial)
            finally:
                clock.trial_wall += time.perf_counter() - clock._trial_started
                clock.trial_cpu += time.process_time() - clock._trial_cpu_started
                clock.trials += 1
                clock.in_trial = False

        mixin.on_trial_begin, mixin.on_trial_end = on_trial_begin, on_trial_end

    def _system(self, fn):
        """``fn`` timed whole as the monitor's work on the training thread."""
        clock = self

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            clock._local.system = True
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock._local.system = False
                clock._add("system", None, time.perf_counter() - started)

        return timed

    def wrap_system_metrics(self, tracked: Any) -> None:
        """Time the monitor: its start and stop on the main thread, its sampling on its own."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        start = tracked.start_monitor
        clock = self

        def start_monitor(*args, **kwargs):
            monitor = clock._system(start)(*args, **kwargs)
            if monitor is not None:
                monitor.finish = clock._system(monitor.finish)  # stopping it, and its last samples
            return monitor

        tracked.start_monitor = start_monitor  # the name toolkit.tuner.tracked calls
        collect = SystemMetricsMonitor.collect_metrics

        @functools.wraps(collect)
        def collect_metrics(monitor):
            started = time.perf_counter()
            try:
                return collect(monitor)
            finally:
                clock._add("sampling", None, time.perf_counter() - started)

        SystemMetricsMonitor.collect_metrics = collect_metrics
        loop = SystemMetricsMonitor.monitor  # the thread's target, looked up when it starts

        @functools.wraps(loop)
        def monitor(monitor_):
            started = time.thread_time()
            try:
                return loop(monitor_)
            finally:
                with clock._lock:
                    clock.monitor_cpu += time.thread_time() - started

        SystemMetricsMonitor.monitor = monitor


@dataclass
class Measured:
    """One search, as the clock saw it."""

    trials: int
    finished: int
    trial_wall: float
    trial_cpu: float
    monitor_cpu: float
    total: float
    seconds: dict[str, float]
    calls: Counter = field(default_factory=Counter)
    method_seconds: dict = field(default_factory=dict)
    model_log_seconds: float | None = None

    @property
    def per_trial_wall(self) -> float:
        return self.trial_wall / max(self.trials, 1)

    @property
    def per_trial_cpu(self) -> float:
        return self.trial_cpu / max(self.trials, 1)

    def share(self, phase: str) -> float:
        return self.seconds.get(phase, 0.0) / self.trial_wall if self.trial_wall else float("nan")

    @property
    def monitor_cpu_share(self) -> float:
        return self.monitor_cpu / self.trial_wall if self.trial_wall else float("nan")

    @property
    def system_share(self) -> float:
        """System metrics' cost, measured: the monitor's wall time on the training thread plus
        its own thread's CPU time (at most what it takes from training; its waits on the store's
        disk and its sleeps cost training nothing)."""
        return self.share("system") + self.monitor_cpu_share

    def ms_per_trial(self, phase: str) -> float:
        return 1000 * self.seconds.get(phase, 0.0) / max(self.trials, 1)


def search(clock: Clock, exp: str, overrides: list[str], system_metrics: bool | None = None) -> Measured:
    """One search on a fresh store; ``system_metrics`` None keeps the card's setting."""
    from mlflow import MlflowClient

    from toolkit.config import load_config
    from toolkit.tuner import run_search

    uri = f"sqlite:///{tempfile.mkdtemp(prefix='bench-tracking-')}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    extra = [] if system_metrics is None else [f"tracking.system_metrics={str(system_metrics).lower()}"]
    cfg = load_config(exp, [*overrides, *extra])
    clock.reset()
    started = time.perf_counter()
    result = run_search(cfg, fresh=True, uri=uri)
    total = time.perf_counter() - started
    parent = MlflowClient(tracking_uri=uri).get_run(result.parent_run_id)
    return Measured(
        trials=clock.trials,
        finished=sum(t.status == "FINISHED" for t in result.trials),
        trial_wall=clock.trial_wall,
        trial_cpu=clock.trial_cpu,
        monitor_cpu=clock.monitor_cpu,
        total=total,
        seconds=dict(clock.seconds),
        calls=Counter(clock.calls),
        method_seconds=dict(clock.method_seconds),
        model_log_seconds=parent.data.metrics.get("model_log_seconds"),
    )


def report_one(m: Measured) -> None:
    """The figures of one search, as this script has always printed them."""
    trial_calls = sum(n for (phase, _), n in m.calls.items() if phase == "trial")
    print(f"trials: {m.trials} ({m.finished} finished), trial wall time {m.trial_wall:.2f}s, search {m.total:.2f}s")
    print(
        f"per-trial MLflow time: {m.seconds.get('trial', 0.0):.3f}s in {trial_calls} calls = {m.ms_per_trial('trial'):.0f} ms/trial"
    )
    print(f"TRACKING OVERHEAD: {100 * m.share('trial'):.1f}% of trial time (goal <= 5%), system metrics apart (below)")
    for (phase, name), n in sorted(m.calls.items()):
        if phase == "trial":
            print(f"  trial  {name:<20} {n:4d} calls {1000 * m.method_seconds[(phase, name)] / n:6.1f} ms/call")
    if m.seconds.get("system") or m.monitor_cpu:
        print(
            f"SYSTEM METRICS, measured: {100 * m.system_share:.1f}% of trial time = {m.ms_per_trial('system'):.0f} ms/trial "
            f"on the training thread (monitor start and stop, its last samples) + {1000 * m.monitor_cpu / max(m.trials, 1):.0f} ms/trial "
            f"CPU on the monitor's own thread, beside training ({m.ms_per_trial('sampling'):.0f} ms/trial reading the machine, "
            f"{m.ms_per_trial('background'):.0f} ms/trial wall in MLflow calls)"
        )
    for (phase, name), n in sorted(m.calls.items()):
        if phase == "background":
            print(f"  monitor {name:<19} {n:4d} calls {1000 * m.method_seconds[(phase, name)] / n:6.1f} ms/call")
    print(f"one-off per-search MLflow time: {m.seconds.get('search', 0.0):.2f}s (parent run, artifacts, best model, report)")
    if m.model_log_seconds is not None:
        print(f"best-model logging (log_model + registration + alias): {m.model_log_seconds:.2f}s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exp", nargs="?", default="quickstart")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--rounds", type=int, default=4, help="on/off pairs of the side-by-side system-metrics figure")
    args = parser.parse_args()
    os.chdir(ROOT)

    # The CLI's import order: TensorFlow first, MLflow's client when the first run is logged.
    # It matters: with MLflow imported first, create_run measured ~85 ms instead of ~7 ms here.
    from toolkit.config import load_config  # noqa: I001
    from toolkit.tuner import TrackedTunerMixin, tracked
    from mlflow import MlflowClient

    from harness import machine, verdict

    clock = Clock()
    for name in CLIENT_METHODS:
        clock.wrap(MlflowClient, name)
    clock.wrap_trial_hooks(TrackedTunerMixin)
    clock.wrap_system_metrics(tracked)

    card = load_config(args.exp, args.overrides)
    print(f"machine: {machine()}")
    print(f"card: {args.exp} {' '.join(args.overrides)} | a fresh SQLite store per search")
    print(
        f"\nfirst search in this process, as the card says (tracking.system_metrics={str(card.tracking.system_metrics).lower()}):"
    )
    report_one(search(clock, args.exp, args.overrides))

    print(f"\nsystem metrics on and off, {args.rounds} round(s) alternated on/off, off/on, ... in this process:", flush=True)
    on: list[Measured] = []
    off: list[Measured] = []
    for round_ in range(args.rounds):
        # A B, then B A: a load that drifts during the run then biases neither side.
        for enabled in (True, False) if round_ % 2 == 0 else (False, True):
            m = search(clock, args.exp, args.overrides, system_metrics=enabled)
            (on if enabled else off).append(m)
            print(
                f"  round {round_ + 1} system metrics {'on ' if enabled else 'off'}: {m.trials} trials, "
                f"{m.per_trial_wall:.3f}s per trial ({m.per_trial_cpu:.3f}s CPU), MLflow calls {100 * m.share('trial'):.1f}%"
                + (f", system metrics {100 * m.system_share:.1f}%" if enabled else ""),
                flush=True,
            )
    if not on or not off:
        return 0
    # Paired by round: each pair ran back to back, so the ratio is least touched by drift.
    wall = [a.per_trial_wall / b.per_trial_wall - 1 for a, b in zip(on, off, strict=True)]
    cpu = [a.per_trial_cpu / b.per_trial_cpu - 1 for a, b in zip(on, off, strict=True)]
    measured = statistics.median(m.system_share for m in on)
    mlflow_off = statistics.median(m.share("trial") for m in off)
    mlflow_on = statistics.median(m.share("trial") for m in on)
    total = mlflow_off + measured
    print(
        f"side by side, per trial, on vs off (medians; paired ratios by round): "
        f"wall {statistics.median(m.per_trial_wall for m in on):.3f}s vs {statistics.median(m.per_trial_wall for m in off):.3f}s, "
        f"{statistics.median(wall):+.1%} ({', '.join(f'{r:+.1%}' for r in wall)}); "
        f"process CPU {statistics.median(m.per_trial_cpu for m in on):.3f}s vs {statistics.median(m.per_trial_cpu for m in off):.3f}s, "
        f"{statistics.median(cpu):+.1%} ({', '.join(f'{r:+.1%}' for r in cpu)})"
    )
    print(
        f"SYSTEM METRICS: {measured:.1%} of trial time measured (median of the runs with them on: "
        f"{statistics.median(m.share('system') for m in on):.1%} on the training thread + "
        f"{statistics.median(m.monitor_cpu_share for m in on):.1%} CPU on the monitor's thread); "
        f"side by side {statistics.median(wall):+.1%} in wall time"
    )
    print(
        f"MLflow calls per trial: {mlflow_off:.1%} of trial time with system metrics off, {mlflow_on:.1%} on (the monitor apart)"
    )
    print(
        f"TRACKING OVERHEAD INCLUDING SYSTEM METRICS: {total:.1%} of trial time "
        f"(MLflow calls {mlflow_off:.1%} + system metrics {measured:.1%}; goal <= {GOAL:.0%}: {verdict(total, GOAL)})"
    )
    if statistics.median(wall) > measured:
        print(
            f"  side by side the trials took {statistics.median(wall):+.1%} longer with system metrics, more than measured: "
            "the machine's noise, or a cost the clock does not see"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
