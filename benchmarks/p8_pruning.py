"""P8: pruning. Wall time to come within 0.5 pp of the unpruned search's best val_accuracy, pruned ÷ unpruned.

Card: benchmarks/cards/p8.yaml (the quickstart space on 20,000 spiral points, 16 random trials x
20 epochs, batch 32, seed 42), run as it is and with `tuner.pruning={rule: median, min_epochs: 2, min_trials: 3}`. The same seed
gives both searches the same trials in the same order. Each search's clock starts with its parent
run; a trial counts when its run ends. Goal <= 0.5.

    python benchmarks/p8_pruning.py [--trials 16] [--epochs 20]
"""

from __future__ import annotations

import argparse
import os
import shlex
import tempfile

from harness import ROOT, TOOLKIT, timed, verdict

CARD = ROOT / "benchmarks/cards/p8.yaml"
PRUNING = "tuner.pruning={rule: median, min_epochs: 2, min_trials: 3}"


def trials(uri: str) -> tuple[list[tuple[float, float, bool]], float]:
    """(seconds since the search started, best val_accuracy, pruned) per finished trial, by end time; total epochs."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("bench_p8")
    runs = client.search_runs([experiment.experiment_id], max_results=10_000)
    parent = next(r for r in runs if r.data.tags.get("toolkit.role") == "search")
    start = parent.info.start_time / 1000
    done = [r for r in runs if r.data.tags.get("toolkit.role") == "trial" and r.info.status == "FINISHED"]
    rows = sorted(
        (r.info.end_time / 1000 - start, r.data.metrics["best_val_accuracy"], r.data.tags.get("toolkit.pruned") == "true")
        for r in done
    )
    epochs = sum(len(client.get_metric_history(r.info.run_id, "val_accuracy")) for r in done)
    return rows, epochs


def reached(rows: list[tuple[float, float, bool]], target: float) -> float | None:
    return next((t for t, best, _ in rows if best >= target), None)


def main(n_trials: int = 16, epochs: int = 20) -> float | None:
    base = [*TOOLKIT, "tune", str(CARD), "--set", f"tuner.max_trials={n_trials}", "--set", f"train.epochs={epochs}"]
    commands = {"unpruned": base, "pruned": [*base, "--set", PRUNING]}
    print(f"P8: random search with and without pruning, {n_trials} trials x {epochs} epochs on 20,000 spiral points")
    results = {}
    whole: dict[str, float] = {}
    for label, cmd in commands.items():
        print(f"  {label}: {shlex.join(cmd)}", flush=True)
        uri = f"sqlite:///{tempfile.mkdtemp(prefix='bench-p8-')}/mlflow.db"
        seconds = timed(cmd, env={"MLFLOW_TRACKING_URI": uri})
        rows, trained = trials(uri)
        results[label] = rows
        whole[label] = seconds
        pruned = sum(p for *_, p in rows)
        print(
            f"    {label}: whole process {seconds:.1f}s, {len(rows)} trials finished ({pruned} pruned), "
            f"{trained} epochs trained, best {max(b for _, b, _ in rows):.4f}",
            flush=True,
        )
    print(
        f"    whole search, pruned ÷ unpruned: {whole['pruned']:.1f}s / {whole['unpruned']:.1f}s = {whole['pruned'] / whole['unpruned']:.2f}"
    )
    target = max(b for _, b, _ in results["unpruned"]) - 0.005
    times = {label: reached(rows, target) for label, rows in results.items()}
    for label, t in times.items():
        print(f"    {label}: within 0.5 pp of the unpruned best ({target + 0.005:.4f}) after {t if t is None else round(t, 1)}s")
    if times["pruned"] is None:
        print("P8: the pruned search never came within 0.5 pp of the unpruned best (MISSES the goal)")
        return None
    ratio = times["pruned"] / times["unpruned"]
    print(f"P8 = {times['pruned']:.1f}s / {times['unpruned']:.1f}s = {ratio:.2f} (goal <= 0.5: {verdict(ratio, 0.5)})")
    return ratio


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    main(args.trials, args.epochs)
