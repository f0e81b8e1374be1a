"""One search per card per store at a time, and a changed experiment never adopts another's parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, shrunk

from toolkit.config import ConfigError
from toolkit.tuner.lock import SearchLock, SearchRunning

PYTHON = sys.executable
QUICKSTART = str(ROOT / "experiments" / "quickstart.yaml")


def test_a_held_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    workdir = tmp_path / "tuner" / "card"
    with SearchLock(workdir, "card").acquire(oracle="10.0.0.5:8000"):
        with pytest.raises(SearchRunning, match=rf"pid {os.getpid()}.*--role worker --oracle 10.0.0.5:8000"):
            SearchLock(workdir, "card").acquire()
        assert issubclass(SearchRunning, ConfigError)  # exit code 2
    # Released: the next search takes it; the record is private to the user.
    with SearchLock(workdir, "card").acquire() as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        assert lock.path.stat().st_mode & 0o077 == 0


def test_a_dead_holder_leaves_no_stale_lock(tmp_path):
    workdir = tmp_path / "tuner" / "card"
    code = (
        "import os, pathlib; from toolkit.tuner.lock import SearchLock; "
        f"SearchLock(pathlib.Path({str(workdir)!r}), 'card').acquire(); os.kill(os.getpid(), 9)"
    )
    subprocess.run([PYTHON, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)})
    SearchLock(workdir, "card").acquire().release()


def _tune(tmp_path: Path, store_dir: Path, *sets: str, background: bool = False):
    cmd = [PYTHON, "-m", "toolkit.cli", "tune", QUICKSTART]
    for kv in ("train.diagnostics=false", "tracking.log_model=false", "tracking.report=false", *sets):
        cmd += ["--set", kv]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store_dir / 'mlflow.db'}", "PYTHONPATH": str(ROOT)}
    if background:
        return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_a_second_tune_of_a_running_card_exits_2_and_touches_nothing(tmp_path, store, mlflow_client):
    store_dir = Path(store.removeprefix("sqlite:///")).parent
    first = _tune(tmp_path, store_dir, "tuner.max_trials=2", "train.epochs=200", background=True)
    try:
        lock = store_dir / "tuner" / ".quickstart.lock"
        deadline = time.time() + 90
        while time.time() < deadline and not (lock.exists() and lock.read_text()):
            time.sleep(0.2)
        assert json.loads(lock.read_text())["pid"] == first.pid
        while time.time() < deadline and not (store_dir / "tuner" / "quickstart" / "toolkit_search.json").exists():
            time.sleep(0.2)
        # The same card, and a changed one: both refused, and the live folder stays.
        for extra in ((), ("train.epochs=3",)):
            second = _tune(tmp_path, store_dir, "tuner.max_trials=2", *extra)
            assert second.returncode == 2, second.stderr
            assert f"pid {first.pid}" in second.stderr and "already running" in second.stderr
            assert len(second.stderr.strip().splitlines()) == 1
            assert (store_dir / "tuner" / "quickstart" / "toolkit_search.json").exists()
        parents = [
            r
            for r in mlflow_client.search_runs([mlflow_client.get_experiment_by_name("quickstart").experiment_id])
            if r.data.tags.get("toolkit.role") == "search"
        ]
        assert len(parents) == 1 and "toolkit.abandoned" not in parents[0].data.tags
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)


def test_a_changed_experiment_starts_its_own_search(store, mlflow_client):
    from toolkit.tuner import run_search

    sets = ("train.diagnostics=false", "tracking.log_model=false", "tracking.report=false", "tuner.max_trials=1")
    first = run_search(shrunk("quickstart", *sets))
    second = run_search(shrunk("quickstart", *sets, "tracking.experiment=other"))
    assert second.parent_run_id != first.parent_run_id
    a = mlflow_client.get_run(first.parent_run_id)
    b = mlflow_client.get_run(second.parent_run_id)
    assert mlflow_client.get_experiment(b.info.experiment_id).name == "other"
    assert mlflow_client.get_experiment(a.info.experiment_id).name == "quickstart"
    assert a.info.status == b.info.status == "FINISHED"
    assert a.data.metrics["trials_completed"] == b.data.metrics["trials_completed"] == 1
