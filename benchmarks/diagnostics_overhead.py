"""Diagnostics cost ÷ trial time. Goal ≤ 5%.

Runs the same search with ``train.diagnostics`` on and off, alternated on/off, off/on, ... in one
process (each search in a fresh MLflow store, the same seed, so both sides train the same trials),
and compares the median total trial time (``on_trial_begin`` to ``on_trial_end``, as the tuner
measures it). Three scenarios: the quickstart card as
shipped (4 trials × 3 epochs, where the per-model costs weigh most); the same card at 30 epochs
(where the probe is compiled); and four trials of the regularization card (100 epochs of 4 steps
each, where the per-epoch costs weigh most). Each search with diagnostics on starts with no
compiled probe cached, as a fresh process would.

It also reads the cost the callback measured itself (``diagnostics_seconds``, logged on each
trial's run) over the same trials' time: the direct figure, free of run-to-run noise.

    python benchmarks/diagnostics_overhead.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
warnings.filterwarnings("ignore", category=UserWarning)

from harness import ROOT, machine, verdict  # noqa: E402

sys.path.insert(0, str(ROOT))

GOAL = 0.05
SCENARIOS = {
    "short": ("quickstart", []),
    "long": ("quickstart", ["train.epochs=30"]),
    "tiny-epoch": ("regularization", ["space.l1=0.0", "space.l2=[0.0, 0.0001, 0.001, 0.01]"]),
}


def search(card: str, overrides: list[str], diagnostics: bool) -> tuple[float, float]:
    """One search in a fresh store. Returns (total trial seconds, diagnostics seconds)."""
    from mlflow import MlflowClient

    from toolkit import diagnostics as diag
    from toolkit.config import load_config
    from toolkit.tuner import run_search

    diag._COMPILED.clear()  # every search pays its own traces, as in a fresh process
    uri = f"sqlite:///{tempfile.mkdtemp(prefix='bench-diag-')}/mlflow.db"
    cfg = load_config(
        card,
        [*overrides, f"train.diagnostics={str(diagnostics).lower()}", "tracking.log_model=false", "tracking.report=false"],
        experiments_dir=ROOT / "experiments",
    )
    result = run_search(cfg, fresh=True, uri=uri)
    trial_seconds = sum(t.seconds for t in result.trials)
    client = MlflowClient(tracking_uri=uri)
    diag_seconds = sum(client.get_run(t.run_id).data.metrics.get("diagnostics_seconds", 0.0) for t in result.trials)
    return trial_seconds, diag_seconds


def scenario(label: str, card: str, overrides: list[str], rounds: int) -> float:
    print(f"\n{label}: {card} {' '.join(overrides) or '(as shipped)'}", flush=True)
    search(card, overrides, diagnostics=False)  # warm-up: first imports and traces are paid by neither side
    on, off, direct = [], [], []
    for round_ in range(rounds):
        # A B, then B A: a load that drifts during the run then biases neither side.
        for enabled in (True, False) if round_ % 2 == 0 else (False, True):
            seconds, diag = search(card, overrides, diagnostics=enabled)
            (on if enabled else off).append(seconds)
            if enabled:
                direct.append(diag / seconds)
            print(
                f"  round {round_ + 1} diagnostics {'on ' if enabled else 'off'}: trials {seconds:.2f}s"
                + (f", of which diagnostics {diag:.3f}s" if enabled else ""),
                flush=True,
            )
    side_by_side = statistics.median(on) / statistics.median(off) - 1
    measured = statistics.median(direct)
    print(
        f"  {label}: side by side {side_by_side:+.1%} (median trial time {statistics.median(on):.2f}s on vs {statistics.median(off):.2f}s off); "
        f"measured by the callback {measured:.1%} of trial time — goal <= {GOAL:.0%}: {verdict(measured, GOAL)}",
        flush=True,
    )
    return measured


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated scenarios: " + ",".join(SCENARIOS))
    args = parser.parse_args()
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    print(f"machine: {machine()}")
    print("diagnostics cost ÷ trial time (medians; on and off alternated in one process)")
    chosen = [k for k in args.only.split(",") if k] or list(SCENARIOS)
    figures = [scenario(f"{key} trials", *SCENARIOS[key], args.rounds) for key in chosen]
    worst = max(figures)
    print(f"\ndiagnostics = {worst:.1%} of trial time at worst (goal <= {GOAL:.0%}: {verdict(worst, GOAL)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
