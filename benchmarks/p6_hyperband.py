"""P6: Hyperband's epochs to reach within 0.5 pp of random search's best val_accuracy ÷ the
epochs random search spent. Same space (the quickstart card's), digits. Goal ≤ 0.4.

Random search: 12 trials x 27 epochs = 324 epochs. Hyperband: max_epochs 27, factor 3 (one
iteration, about the same total budget). Hyperband's epochs are counted trial by trial in the
order they ran, from each trial's per-epoch val_accuracy in MLflow; a trial that continues a
previous one from `tuner/initial_epoch` is charged only the epochs it trained.

    python benchmarks/p6_hyperband.py
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from harness import ROOT, TOOLKIT, fresh_store_env

RANDOM_TRIALS, EPOCHS = 12, 27


def search(overrides: list[str]) -> str:
    env = fresh_store_env()
    cmd = [
        *TOOLKIT,
        "tune",
        "quickstart",
        *[a for o in overrides for a in ("--set", o)],
        "--set",
        "tracking.log_model=false",
        "--set",
        "tracking.report=false",
    ]
    print("  " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env={**__import__("os").environ, **env}, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"search failed: {proc.stderr[-2000:]}")
    return env["MLFLOW_TRACKING_URI"]


def trial_curves(uri: str) -> list[tuple[int, list[float]]]:
    """(initial_epoch, val_accuracy per trained epoch) for each trial, in the order they started."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("quickstart")
    runs = client.search_runs(
        [experiment.experiment_id],
        "tags.`toolkit.role` = 'trial' and attributes.status = 'FINISHED'",
        max_results=5000,
        order_by=["attributes.start_time ASC"],
    )
    curves = []
    for run in runs:
        history = sorted(client.get_metric_history(run.info.run_id, "val_accuracy"), key=lambda m: m.step)
        initial = int(run.data.params.get("tuner/initial_epoch", 0))
        curves.append((initial, [m.value for m in history if m.step >= initial]))
    return curves


def main() -> float:
    print(f"P6: Hyperband vs random search on digits, quickstart space, {EPOCHS} epochs max")
    random_uri = search(["tuner.algorithm=random", f"tuner.max_trials={RANDOM_TRIALS}", f"train.epochs={EPOCHS}"])
    random_curves = trial_curves(random_uri)
    random_epochs = sum(len(c) for _, c in random_curves)
    random_best = max(max(c) for _, c in random_curves if c)
    target = random_best - 0.005
    hb_uri = search(["tuner.algorithm=hyperband", f"train.epochs={EPOCHS}", "tuner.factor=3"])
    spent, reached = 0, None
    hb_curves = trial_curves(hb_uri)
    for _, curve in hb_curves:
        for value in curve:
            spent += 1
            if reached is None and value >= target:
                reached = spent
    hb_best = max(max(c) for _, c in hb_curves if c)
    print(f"random search: best val_accuracy {random_best:.4f} in {random_epochs} epochs ({len(random_curves)} trials)")
    print(f"hyperband: best val_accuracy {hb_best:.4f}; {spent} epochs in all over {len(hb_curves)} trials")
    if reached is None:
        print(f"P6: hyperband never reached {target:.4f} (random's best - 0.5 pp); ratio > {spent / random_epochs:.2f}")
        return float("inf")
    ratio = reached / random_epochs
    print(
        f"P6 = {reached} / {random_epochs} = {ratio:.2f} epochs to reach {target:.4f} (goal <= 0.4: {'meets the goal' if ratio <= 0.4 else 'MISSES the goal'})"
    )
    return ratio


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__).parse_args()
    main()
