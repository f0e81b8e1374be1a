"""P5: resident-memory growth per trial over 60 trials in one process (KerasTuner #873, #1031). Goal ≤ 1 MB per trial.

Growth is measured from the end of trial 1 (after one-time start-up: TensorFlow, the store,
the first graphs) to the end of the last trial, with full tracking on.

    python benchmarks/p5_memory.py [--trials 60]
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(trials: int = 60) -> float:
    store = tempfile.mkdtemp(prefix="bench-p5-")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}/mlflow.db"
    from toolkit.config import load_config
    from toolkit.tuner import run_search

    cfg = load_config(
        "quickstart", [f"tuner.max_trials={trials}", "train.epochs=2", "tracking.log_model=false", "tracking.report=false"]
    )
    samples: list[float] = []
    run_search(cfg, on_trial=lambda result: samples.append(rss_mb()))
    growth = samples[-1] - samples[0]
    print(f"RSS after trial 1: {samples[0]:.0f} MB, after trial {len(samples)}: {samples[-1]:.0f} MB, peak {max(samples):.0f} MB")
    print("RSS per trial (MB): " + " ".join(f"{s:.0f}" for s in samples))
    per_trial = growth / max(len(samples) - 1, 1)
    verdict = "meets the goal" if per_trial <= 1.0 else "MISSES the goal"
    print(f"P5 = {per_trial:.2f} MB per trial ({growth:.0f} MB over {len(samples)} trials; goal <= 1 MB per trial: {verdict})")
    return growth


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=60)
    main(parser.parse_args().trials)
