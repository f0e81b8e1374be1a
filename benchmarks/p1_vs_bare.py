"""P1: whole-process `toolkit tune` (tracked in full) ÷ a bare KerasTuner script, same trials.

Goal ≤ 0.8. Card: benchmarks/cards/p1.yaml (digits, 4 trials x 10 epochs, batch 64). The
toolkit also runs with `train.steps_per_execution=23` and TOOLKIT_FULL_TEARDOWN=1: the "before"
of one step per call for short trials and of the exit without the interpreter's teardown.

    python benchmarks/p1_vs_bare.py [--pairs 3]
"""

from __future__ import annotations

import argparse

from harness import PYTHON, ROOT, TOOLKIT, alternate, median, verdict


def main(pairs: int = 3) -> float:
    print("P1: toolkit tune (MLflow tracking, best model, report) vs bare KerasTuner, no tracking")
    times = alternate(
        {
            "toolkit": [*TOOLKIT, "tune", str(ROOT / "benchmarks/cards/p1.yaml")],
            "toolkit, 23 steps per call, full teardown": [
                "env",
                "TOOLKIT_FULL_TEARDOWN=1",
                *TOOLKIT,
                "tune",
                str(ROOT / "benchmarks/cards/p1.yaml"),
                "--set",
                "train.steps_per_execution=23",
            ],
            "bare": [
                PYTHON,
                str(ROOT / "benchmarks/bare_kerastuner.py"),
                "--trials",
                "4",
                "--epochs",
                "10",
                "--batch-size",
                "64",
            ],
        },
        pairs=pairs,
    )
    ratio = median(times["toolkit"]) / median(times["bare"])
    before = median(times["toolkit, 23 steps per call, full teardown"]) / median(times["bare"])
    print(f"    23 steps per call, full teardown: {before:.2f}")
    print(
        f"P1 = {median(times['toolkit']):.2f}s / {median(times['bare']):.2f}s = {ratio:.2f} (goal <= 0.8: {verdict(ratio, 0.8)})"
    )
    return ratio


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=3)
    main(parser.parse_args().pairs)
