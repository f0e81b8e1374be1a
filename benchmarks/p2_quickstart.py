"""P2: wall time of `make tune EXP=quickstart` with .venv present, median of 3 whole processes.

Goal ≤ 30 s on this 2-core machine. Each run uses a fresh store, so it is a whole search
(a rerun on the same store would resume and finish at once).

    python benchmarks/p2_quickstart.py [--runs 3]
"""

from __future__ import annotations

import argparse

from harness import alternate, median, verdict


def main(runs: int = 3) -> float:
    print("P2: make tune EXP=quickstart (fresh MLflow store per run)")
    times = alternate({"make tune": ["make", "--no-print-directory", "tune", "EXP=quickstart"]}, pairs=runs)
    seconds = median(times["make tune"])
    print(
        f"P2 = {seconds:.1f}s median of {runs} (runs: {', '.join(f'{t:.1f}' for t in times['make tune'])}; goal <= 30 s: {verdict(seconds, 30)})"
    )
    return seconds


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    main(parser.parse_args().runs)
