"""P3: trials per minute with 2 local workers ÷ with 1 worker, same card, side by side. Goal ≥ 1.6.

Runs ``toolkit tune quickstart --workers 1`` and ``--workers 2`` as whole processes, alternated
1 2 1 2 ..., each in a fresh SQLite store (so each is a whole search, not a resume), and reads
every trial run's start and end back from MLflow:

- **trials/min** (the P3 figure): finished trials ÷ the search's trial phase, from the first
  trial's start to the last trial's end. It is what N workers buy in a search long enough that
  start-up is paid once.
- **whole command**: finished trials ÷ the wall time of the process, start-up (TensorFlow's import
  in every process, the loopback ``mlflow server``) and the chief's summary included; shown
  beside it, since a short search pays those costs in full.

Each figure is the ratio of the medians over the rounds. The machine is shared and noisy, so
the load average is printed before and after: compare figures from one run only.

    python benchmarks/p3_workers.py [--rounds 3] [--trials 8] [--epochs 3]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from harness import ROOT, TOOLKIT, fresh_store_env, machine, median, timed, verdict

sys.path.insert(0, str(ROOT))

GOAL = 1.6


def _load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def trial_phase(uri: str) -> tuple[int, float]:
    """(finished trials, seconds from the first trial's start to the last trial's end) in a store."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("quickstart")
    runs = client.search_runs(
        [exp.experiment_id], "tags.`toolkit.role` = 'trial' and attributes.status = 'FINISHED'", max_results=10_000
    )
    if not runs:
        raise RuntimeError(f"no finished trial in {uri}")
    start = min(r.info.start_time for r in runs)
    end = max(r.info.end_time for r in runs)
    return len(runs), (end - start) / 1000


def main(rounds: int = 3, trials: int = 8, epochs: int = 3) -> float:
    print(f"P3: trials/min with 2 workers ÷ 1 worker — quickstart, {trials} trials × {epochs} epochs, {rounds} rounds alternated")
    print(f"machine: {machine()}; load average (1, 5, 15 min) before: {_load()}")
    sets = [arg for kv in (f"tuner.max_trials={trials}", f"train.epochs={epochs}") for arg in ("--set", kv)]
    commands = {n: [*TOOLKIT, "tune", "quickstart", *sets, "--workers", str(n)] for n in (1, 2)}
    for n, cmd in commands.items():
        print(f"  {n} worker(s): MLFLOW_TRACKING_URI=sqlite:///<fresh tmp>/mlflow.db {shlex.join(cmd)}", flush=True)
    phase: dict[int, list[float]] = {1: [], 2: []}
    whole: dict[int, list[float]] = {1: [], 2: []}
    for round_ in range(rounds):
        for n, cmd in commands.items():
            env = fresh_store_env()
            seconds = timed(cmd, env=env)
            done, span = trial_phase(env["MLFLOW_TRACKING_URI"])
            phase[n].append(60 * done / span)
            whole[n].append(60 * done / seconds)
            print(
                f"    round {round_ + 1}, {n} worker(s): {done} trials, trial phase {span:.1f}s → {phase[n][-1]:.1f} trials/min; whole command {seconds:.1f}s → {whole[n][-1]:.1f} trials/min",
                flush=True,
            )
    ratio = median(phase[2]) / median(phase[1])
    whole_ratio = median(whole[2]) / median(whole[1])
    print(f"load average after: {_load()}")
    print(f"trials/min, median: 1 worker {median(phase[1]):.1f}, 2 workers {median(phase[2]):.1f}")
    print(
        f"whole command trials/min, median: 1 worker {median(whole[1]):.1f}, 2 workers {median(whole[2]):.1f} (ratio {whole_ratio:.2f})"
    )
    print(f"P3 = {ratio:.2f} (goal >= {GOAL}: {verdict(ratio, GOAL, smaller_is_better=False)})")
    return ratio


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    main(args.rounds, args.trials, args.epochs)
