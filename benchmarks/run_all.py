"""`make bench`: every performance figure, each measured side by side in its own script.

Results and the machine they came from are recorded by hand in benchmarks/RESULTS.md.

    python benchmarks/run_all.py [--only p1,p2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from harness import machine

HERE = Path(__file__).resolve().parent
FIGURES = {
    "p1": ("P1 toolkit tune ÷ bare KerasTuner", "p1_vs_bare.py"),
    "p2": ("P2 make tune EXP=quickstart wall time", "p2_quickstart.py"),
    "p3": ("P3 trials/min with 2 workers ÷ 1 worker", "p3_workers.py"),
    "p4": ("P4 training GFLOP/s ÷ matmul peak", "p4_flops.py"),
    "p5": ("P5 RSS growth per trial over 60 trials", "p5_memory.py"),
    "p6": ("P6 Hyperband epochs to target ÷ random's", "p6_hyperband.py"),
    "p8": ("P8 pruned ÷ unpruned time to the unpruned best − 0.5 pp", "p8_pruning.py"),
    "state": ("train.epoch_state: state saving ÷ trial time", "state_saving.py"),
    "p11": ("P11 mixed_bfloat16 ÷ float32 training throughput on the P4 model, and digits accuracy", "p11_bfloat16.py"),
    "p12": ("P12 chief under 64 simulated workers (trials/s, p99 RPC) and the tracking server under 64 writers", "p12_chief.py"),
    "p9": ("P9 80-trial toolkit tune ÷ bare KerasTuner, with P10 (per-trial drift)", "p9_long_search.py"),
    "p7": ("P7 GPU samples/s ÷ bare fit (or 'no GPU')", "gpu_check.py"),
    "tracking": ("MLflow logging time ÷ trial time", "tracking_overhead.py"),
    "diagnostics": ("diagnostics cost ÷ trial time", "diagnostics_overhead.py"),
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="", help="comma-separated keys: " + ",".join(FIGURES))
    args = parser.parse_args()
    keys = [k for k in args.only.split(",") if k] or list(FIGURES)
    print(f"machine: {machine()}")
    failed = []
    for key in keys:
        title, script = FIGURES[key]
        print(f"\n=== {title} ({script}) ===", flush=True)
        started = time.perf_counter()
        code = subprocess.call([sys.executable, str(HERE / script)], cwd=HERE.parent)
        print(f"--- {script}: exit {code} in {time.perf_counter() - started:.0f}s", flush=True)
        if code:
            failed.append(script)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
