"""Per-trial MLflow tracking overhead as a share of trial time, measured in one search.

Every ``MlflowClient`` call is timed while a real search runs (the default: the quickstart
card, 4 trials x 3 epochs, on a fresh SQLite store in a temporary folder). Calls made while a
trial is open (from ``on_trial_begin`` to the end of ``on_trial_end``: the nested run, its
params and datasets, the per-epoch metrics, the diagnostics, the closing summary) are the
per-trial overhead; they are divided by the trials' wall time. One-off, per-search costs (the
parent run, its artifacts, the best model, the report) are listed apart. The goal is <= 5%.

    python benchmarks/tracking_overhead.py [EXP] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

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
    """Accumulates MLflow time, split by whether a trial is open."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_trial = False
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: Counter[tuple[str, str]] = Counter()
        self.method_seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.trial_wall = 0.0
        self.trials = 0
        self._trial_started = 0.0

    def wrap(self, cls: type, name: str) -> None:
        original = getattr(cls, name, None)
        if original is None:
            return
        clock = self

        @functools.wraps(original)
        def timed(*args, **kwargs):
            if clock.depth:
                return original(*args, **kwargs)
            clock.depth += 1
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                clock.depth -= 1
                phase = "trial" if clock.in_trial else "search"
                elapsed = time.perf_counter() - started
                clock.seconds[phase] += elapsed
                clock.calls[(phase, name)] += 1
                clock.method_seconds[(phase, name)] += elapsed

        setattr(cls, name, timed)

    def wrap_trial_hooks(self, mixin: type) -> None:
        begin, end = mixin.on_trial_begin, mixin.on_trial_end
        clock = self

        def on_trial_begin(tuner, trial):
            clock.in_trial = True
            clock._trial_started = time.perf_counter()
            return begin(tuner, trial)

        def on_trial_end(tuner, trial):
            try:
                return end(tuner, trial)
            finally:
                clock.trial_wall += time.perf_counter() - clock._trial_started
                clock.trials += 1
                clock.in_trial = False

        mixin.on_trial_begin, mixin.on_trial_end = on_trial_begin, on_trial_end


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exp", nargs="?", default="quickstart")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    store = tempfile.mkdtemp(prefix="bench-tracking-")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}/mlflow.db"
    os.chdir(ROOT)

    # The CLI's import order: TensorFlow first, MLflow's client when the first run is logged.
    # It matters: with MLflow imported first, create_run measured ~85 ms instead of ~7 ms here.
    from toolkit.config import load_config  # noqa: I001
    from toolkit.tuner import TrackedTunerMixin, run_search
    from mlflow import MlflowClient

    clock = Clock()
    for name in CLIENT_METHODS:
        clock.wrap(MlflowClient, name)
    clock.wrap_trial_hooks(TrackedTunerMixin)

    cfg = load_config(args.exp, args.overrides)
    started = time.perf_counter()
    result = run_search(cfg)
    total = time.perf_counter() - started

    per_trial = clock.seconds["trial"]
    share = per_trial / clock.trial_wall if clock.trial_wall else float("nan")
    trial_calls = sum(n for (phase, _), n in clock.calls.items() if phase == "trial")
    print(f"card: {args.exp} {' '.join(args.overrides)} | store: {os.environ['MLFLOW_TRACKING_URI']}")
    print(
        f"trials: {clock.trials} ({sum(t.status == 'FINISHED' for t in result.trials)} finished), trial wall time {clock.trial_wall:.2f}s, search {total:.2f}s"
    )
    print(
        f"per-trial MLflow time: {per_trial:.3f}s in {trial_calls} calls = {1000 * per_trial / max(clock.trials, 1):.0f} ms/trial"
    )
    print(f"TRACKING OVERHEAD: {100 * share:.1f}% of trial time (goal <= 5%)")
    for (phase, name), n in sorted(clock.calls.items()):
        if phase == "trial":
            print(f"  trial  {name:<20} {n:4d} calls {1000 * clock.method_seconds[(phase, name)] / n:6.1f} ms/call")
    print(f"one-off per-search MLflow time: {clock.seconds['search']:.2f}s (parent run, artifacts, best model, report)")
    client = MlflowClient()
    parent = client.get_run(result.parent_run_id)
    if "model_log_seconds" in parent.data.metrics:
        print(f"best-model logging (log_model + registration + alias): {parent.data.metrics['model_log_seconds']:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
