"""Shared benchmark plumbing: whole processes alternated A B A B..., medians, printed commands.

These machines are noisy, so every figure is a ratio of two things measured side by side in
one run; never compare with a number from another run.
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TOOLKIT = [PYTHON, "-m", "toolkit.cli"]


def machine() -> str:
    """A one-line description of this machine."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Python {platform.python_version()}, {platform.system()}"


def timed(cmd: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT) -> float:
    """Seconds a whole process takes; a failing command is an error, not a fast result."""
    started = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, **(env or {})}, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark command failed ({proc.returncode}): {shlex.join(cmd)}\n{proc.stderr[-3000:]}")
    return seconds


def fresh_store_env() -> dict[str, str]:
    """A new, empty MLflow store, so every toolkit run is a fresh search rather than a resume."""
    folder = tempfile.mkdtemp(prefix="bench-store-")
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db"}


def alternate(commands: dict[str, list[str]], pairs: int = 3, fresh_store: bool = True) -> dict[str, list[float]]:
    """Run each command once per round, in turn, for ``pairs`` rounds; print and return timings."""
    for label, cmd in commands.items():
        print(f"  {label}: {shlex.join(cmd)}", flush=True)
    times: dict[str, list[float]] = {label: [] for label in commands}
    for round_ in range(pairs):
        for label, cmd in commands.items():
            seconds = timed(cmd, env=fresh_store_env() if fresh_store else None)
            times[label].append(seconds)
            print(f"    round {round_ + 1} {label}: {seconds:.2f}s", flush=True)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def verdict(value: float, goal: float, smaller_is_better: bool = True) -> str:
    ok = value <= goal if smaller_is_better else value >= goal
    return "meets the goal" if ok else "MISSES the goal"
