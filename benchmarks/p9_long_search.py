"""P9 and P10: a long search, `toolkit tune` ÷ a bare KerasTuner script, and the per-trial cost's drift.

Card: benchmarks/cards/p9.yaml (digits, random, 80 trials x 2 epochs, depth 1-3, units 16/32/64,
relu/tanh/sigmoid, adam/sgd, log learning rate), tracked in full. The bare script is
`bare_kerastuner.py --space p9`: kt.RandomSearch over a build(hp), no tracking, no tricks.

- P9 = whole `toolkit tune` ÷ whole bare script (goal <= 0.75).
- P10 = mean wall per trial of the last tenth of the trials ÷ the first tenth (trials 71-80 ÷
  1-10 at 80 trials), read from the trial runs' start times in the toolkit's store (goal <= 1.10).
- Peak RSS of each whole process (from wait4).

Each toolkit run is also made with TOOLKIT_GC_FREEZE=0, the heap not frozen and a collection of
the toolkit's own after every trial (the "before" of the garbage-collection lever), and with
`train.steps_per_execution=23` and TOOLKIT_FULL_TEARDOWN=1 (the "before" of one step per call
for short trials and of the exit without the interpreter's teardown).

    python benchmarks/p9_long_search.py [--trials 80] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import tempfile
import time

from harness import PYTHON, ROOT, TOOLKIT, verdict

CARD = ROOT / "benchmarks/cards/p9.yaml"


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of a whole process."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env={**os.environ, **env}, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=False
    )
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"benchmark command failed ({code}): {shlex.join(cmd)}\n{proc.stderr.read().decode()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024


def drift(uri: str) -> tuple[float, float, float]:
    """Mean wall per trial of the first and the last tenth of the trials, and their ratio."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("bench_p9")
    runs = client.search_runs([experiment.experiment_id], "tags.`toolkit.role` = 'trial'", max_results=10_000)
    starts = sorted(r.info.start_time / 1000 for r in runs)
    ends = max(r.info.end_time / 1000 for r in runs)
    walls = [b - a for a, b in zip(starts, [*starts[1:], ends], strict=True)]
    tenth = max(1, len(walls) // 10)
    first, last = statistics.mean(walls[:tenth]), statistics.mean(walls[-tenth:])
    return first, last, last / first


def main(trials: int = 80, rounds: int = 1) -> float:
    print(f"P9/P10: toolkit tune vs bare KerasTuner, {trials} trials x 2 epochs on digits")
    tune = [*TOOLKIT, "tune", str(CARD), "--set", f"tuner.max_trials={trials}"]
    bare = [PYTHON, str(ROOT / "benchmarks/bare_kerastuner.py"), "--space", "p9", "--trials", str(trials), "--epochs", "2"]
    commands = {
        "toolkit": (tune, {}),
        "toolkit, heap not frozen": (tune, {"TOOLKIT_GC_FREEZE": "0"}),
        "toolkit, 23 steps per call, full teardown": (
            [*tune, "--set", "train.steps_per_execution=23"],
            {"TOOLKIT_FULL_TEARDOWN": "1"},
        ),
        "bare": (bare, {}),
    }
    for label, (cmd, env) in commands.items():
        print(f"  {label}: {' '.join(f'{k}={v}' for k, v in env.items())} {shlex.join(cmd)}".replace("  ", " ", 1))
    times: dict[str, list[float]] = {label: [] for label in commands}
    rss: dict[str, list[float]] = {label: [] for label in commands}
    drifts: dict[str, list[tuple[float, float, float]]] = {label: [] for label in commands if label != "bare"}
    for round_ in range(rounds):
        for label, (cmd, env) in commands.items():
            uri = f"sqlite:///{tempfile.mkdtemp(prefix='bench-p9-')}/mlflow.db"
            seconds, peak = run(cmd, {**env, "MLFLOW_TRACKING_URI": uri})
            times[label].append(seconds)
            rss[label].append(peak)
            line = f"    round {round_ + 1} {label}: {seconds:.1f}s, peak RSS {peak:.0f} MB"
            if label in drifts:
                drifts[label].append(drift(uri))
                first, last, ratio = drifts[label][-1]
                line += f", wall per trial first tenth {first:.2f}s, last tenth {last:.2f}s ({ratio:.2f})"
            print(line, flush=True)
    med = {label: statistics.median(values) for label, values in times.items()}
    p9 = med["toolkit"] / med["bare"]
    p10 = statistics.median(d[2] for d in drifts["toolkit"])
    before = med["toolkit, heap not frozen"] / med["bare"]
    before10 = statistics.median(d[2] for d in drifts["toolkit, heap not frozen"])
    loop = med["toolkit, 23 steps per call, full teardown"] / med["bare"]
    print(f"P9 = {med['toolkit']:.1f}s / {med['bare']:.1f}s = {p9:.2f} (goal <= 0.75: {verdict(p9, 0.75)})")
    print(f"     heap not frozen: {med['toolkit, heap not frozen']:.1f}s / {med['bare']:.1f}s = {before:.2f}")
    print(
        f"     23 steps per call, full teardown: {med['toolkit, 23 steps per call, full teardown']:.1f}s / {med['bare']:.1f}s = {loop:.2f}"
    )
    print(f"P10 = {p10:.2f} (goal <= 1.10: {verdict(p10, 1.10)}); heap not frozen: {before10:.2f}")
    print("peak RSS (MB): " + ", ".join(f"{label} {statistics.median(v):.0f}" for label, v in rss.items()))
    return p9


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    main(args.trials, args.rounds)
