"""Faults in a distributed search: every trial exactly once, and nothing outlives the chief.

Real ``toolkit tune --workers 2`` processes over a SQLite store (so the chief runs its private
``mlflow server``), read back with ``MlflowClient``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections import Counter

import pytest
from test_distributed import _alive, _descendants, _launch, _mid_trial, _search, _tune

from toolkit import distributed
from toolkit.distributed import processes
from toolkit.distributed.servicer import Status, _Servicer


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """One real ``mlflow server`` over SQLite for the tests that watch a search live."""
    root = tmp_path_factory.mktemp("server")
    server = distributed.TrackingServer(
        f"sqlite:///{root / 'mlflow.db'}", artifacts=root / "artifacts", log_path=root / "server.log"
    )
    uri = server.start()
    yield uri
    server.stop()


def test_the_kernel_stops_a_child_when_its_parent_dies():
    assert processes._PRCTL is not None  # Linux: PR_SET_PDEATHSIG is there
    assert not processes.parent_gone(os.getppid())
    assert processes.parent_gone(os.getppid() + 1)


def test_a_stopping_chief_hands_out_no_trial(tmp_path):
    import keras_tuner as kt

    hp = kt.HyperParameters()
    hp.Int("units", 1, 4)
    oracle = kt.oracles.RandomSearchOracle(objective="loss", max_trials=5, hyperparameters=hp)
    oracle._set_project_dir(str(tmp_path), "p")
    servicer = _Servicer(oracle, b"{}")
    servicer.stopping = True

    class Context:
        def invocation_metadata(self):
            return ()

        def set_trailing_metadata(self, meta):
            pass

    from keras_tuner.src import protos

    answer = servicer.CreateTrial(protos.get_service().CreateTrialRequest(tuner_id="tuner0"), Context())
    from keras_tuner.src.engine import trial as trial_module

    assert trial_module.Trial.from_proto(answer.trial).status == Status.STOPPED and not oracle.ongoing_trials


@pytest.mark.slow
def test_rerunning_a_completed_parallel_search_runs_nothing_again(tmp_path, store, mlflow_client):
    sets = ("data.source=iris", "tuner.max_trials=3", "train.epochs=1")
    first = _tune(tmp_path, store, 2, *sets)
    assert first.returncode == 0, first.stderr
    _, trials = _search(mlflow_client)
    assert len(trials) == 3
    again = _tune(tmp_path, store, 2, *sets)
    assert again.returncode == 0, again.stderr
    parents, rerun = _search(mlflow_client)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    finished = Counter(t.data.tags["toolkit.trial_id"] for t in rerun if t.info.status == "FINISHED")
    assert finished == Counter({"0": 1, "1": 1, "2": 1}), finished
    assert len(rerun) == 3, "the rerun trained a trial again"


@pytest.mark.slow
def test_kill_9_of_the_chief_leaves_no_worker_and_no_tracking_server(tmp_path, store, mlflow_client):
    launcher = _launch(tmp_path, store, "quickstart", "tuner.max_trials=4", "train.epochs=300")
    children: dict[int, str] = {}
    try:
        _mid_trial(mlflow_client, "quickstart", launcher, children)
        tree = _descendants(launcher.pid)
        assert sum(b"mlflow" in argv for argv in tree.values()) >= 2, tree  # the server and its uvicorn
        launcher.kill()
        launcher.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and [p for p in tree if _alive(p)]:
            time.sleep(0.5)
        left = {p: tree[p] for p in tree if _alive(p)}
    finally:
        for pid in tree:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert not left, f"outlived the chief: {left}"


@pytest.mark.slow
def test_sighup_stops_the_chief_like_sigterm(tmp_path, tracking_server):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_server)
    launcher = _launch(tmp_path, tracking_server, "hangup", "tuner.max_trials=4", "train.epochs=300")
    children: dict[int, str] = {}
    try:
        _mid_trial(client, "hangup", launcher, children)
        launcher.send_signal(signal.SIGHUP)
        _, stderr = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 130, stderr
    assert not [p for p in children if _alive(p)], "a worker outlived the chief"
    parents, trials = _search(client, "hangup")
    assert [p.info.status for p in parents] == ["KILLED"]
    assert trials and "RUNNING" not in {t.info.status for t in trials}


@pytest.mark.slow
def test_ctrl_c_hands_out_no_new_trial_and_exits_within_seconds(tmp_path, tracking_server):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_server)
    launcher = _launch(tmp_path, tracking_server, "ctrlc", "tuner.max_trials=6", "train.epochs=300")
    children: dict[int, str] = {}
    try:
        _mid_trial(client, "ctrlc", launcher, children)
        signalled = time.time()
        launcher.send_signal(signal.SIGINT)
        _, stderr = launcher.communicate(timeout=60)
        took = time.time() - signalled
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 130, stderr
    assert took < 20, f"exit {took:.1f}s after Ctrl-C"
    assert not [p for p in children if _alive(p)], "a worker outlived the chief"
    _, trials = _search(client, "ctrlc")
    late = [t for t in trials if t.info.start_time / 1000 > signalled]
    assert not late, "a trial started after Ctrl-C"
    assert "FINISHED" not in {t.info.status for t in trials}
    assert "RUNNING" not in {t.info.status for t in trials}


@pytest.mark.slow
def test_workers_of_a_killed_chief_close_their_runs_killed_saying_the_chief_is_gone(tmp_path, tracking_server):
    from mlflow import MlflowClient

    from toolkit.distributed.worker import CHIEF_GONE

    client = MlflowClient(tracking_server)
    launcher = _launch(tmp_path, tracking_server, "orphans", "tuner.max_trials=4", "train.epochs=300")
    children: dict[int, str] = {}
    try:
        _mid_trial(client, "orphans", launcher, children)
        launcher.kill()
        launcher.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and [p for p in children if _alive(p)]:
            time.sleep(0.5)
        left = [p for p in children if _alive(p)]
    finally:
        for pid in children:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert not left, "a worker outlived the chief"
    _, trials = _search(client, "orphans")
    assert trials and {t.info.status for t in trials} == {"KILLED"}
    assert {t.data.tags.get("toolkit.failure") for t in trials} == {CHIEF_GONE}, [
        (t.data.tags, t.info.start_time, t.info.end_time) for t in trials
    ]


def _summary_counts(output: str) -> tuple[int, int]:
    import re

    found = re.search(r"(\d+) trial\(s\) finished, (\d+) failed", output)
    assert found, output
    return int(found.group(1)), int(found.group(2))


def _oracle_status(root, trial_id: str) -> str:
    import json

    (path,) = root.glob(f"**/trial_{trial_id}/trial.json")
    return json.loads(path.read_text())["status"]


def _trials_csv(client, parent) -> list[dict[str, str]]:
    import csv

    path = client.download_artifacts(parent.info.run_id, "trials.csv", dst_path=None)
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_sigterm_to_one_worker_gives_the_same_verdict_in_summary_store_csv_and_oracle(tmp_path, store, mlflow_client):
    launcher = _launch(tmp_path, store, "termed", "tuner.max_trials=3", "train.epochs=60")
    children: dict[int, str] = {}
    try:
        # Whichever worker is mid-trial: under load one worker may run every trial before the other starts.
        tags = _mid_trial(mlflow_client, "termed", launcher, children).data.tags
        victim, worker = tags["toolkit.trial_id"], tags["toolkit.worker"]
        os.kill(next(p for p, tuner in children.items() if tuner == worker), signal.SIGTERM)
        stdout, stderr = launcher.communicate(timeout=240)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, stderr
    parents, trials = _search(mlflow_client, "termed")
    runs = [t for t in trials if t.data.tags["toolkit.trial_id"] == victim]
    assert [t.info.status for t in runs] == ["FAILED"], [(t.info.status, t.data.tags.get("toolkit.failure")) for t in runs]
    assert f"worker {worker} exited" in runs[0].data.tags["toolkit.failure"]
    assert _oracle_status(tmp_path / "store", victim) == "FAILED"
    finished = sum(t.info.status == "FINISHED" for t in trials)
    failed = sum(t.info.status == "FAILED" for t in trials)
    assert (finished, failed) == (2, 1)
    assert _summary_counts(stdout + stderr) == (finished, failed)
    rows = {row["trial_id"]: row["status"] for row in _trials_csv(mlflow_client, parents[0])}
    assert rows[victim] == "FAILED" and len(rows) == 3
    assert "RUNNING" not in {t.info.status for t in trials}
    assert not [p for p in children if _alive(p)]


@pytest.mark.slow
def test_a_hung_worker_is_written_off_killed_and_its_run_keeps_the_chiefs_verdict(tmp_path, store, mlflow_client):
    launcher = _launch(tmp_path, store, "hung", "tuner.max_trials=3", "train.epochs=60", env={"TOOLKIT_WORKER_LEASE": "12"})
    children: dict[int, str] = {}
    try:
        run = _mid_trial(mlflow_client, "hung", launcher, children)
        hung = next(p for p, tuner in children.items() if tuner == run.data.tags["toolkit.worker"])
        os.kill(hung, signal.SIGSTOP)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and mlflow_client.get_run(run.info.run_id).info.status == "RUNNING":
            time.sleep(0.5)
        verdict = mlflow_client.get_run(run.info.run_id)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(hung):
            time.sleep(0.2)
        assert not _alive(hung), "a written-off local worker was left running"
        with contextlib.suppress(ProcessLookupError):
            os.kill(hung, signal.SIGCONT)  # too late: nothing can come back to rewrite the run
        revived = time.monotonic()
        stdout, stderr = launcher.communicate(timeout=240)
        after = time.monotonic() - revived
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if launcher.poll() is None:
            launcher.kill()
    assert verdict.info.status == "FAILED", verdict.data.tags
    assert "sent no heartbeat" in verdict.data.tags["toolkit.failure"]
    assert launcher.returncode == 0, stderr
    assert after < 50, f"the search took {after:.0f}s more after the worker was written off"
    closed = mlflow_client.get_run(run.info.run_id)
    assert (closed.info.status, closed.data.tags["toolkit.failure"]) == ("FAILED", verdict.data.tags["toolkit.failure"])
    parents, trials = _search(mlflow_client, "hung")
    finished = Counter(t.data.tags["toolkit.trial_id"] for t in trials if t.info.status == "FINISHED")
    assert all(n == 1 for n in finished.values()) and len(finished) == 2
    assert _summary_counts(stdout + stderr) == (2, 1)
    assert "RUNNING" not in {t.info.status for t in trials}
    assert not [p for p in children if _alive(p)]


@pytest.mark.slow
def test_a_killed_tracking_server_stops_the_search_in_seconds_and_the_resume_trusts_the_oracle(tmp_path, store, mlflow_client):
    launcher = _launch(tmp_path, store, "serverless", "tuner.max_trials=3", "train.epochs=60")
    children: dict[int, str] = {}
    try:
        _mid_trial(mlflow_client, "serverless", launcher, children)
        tree = _descendants(launcher.pid)
        # `mlflow server` itself, not the guard whose argv holds the same command.
        (server,) = [pid for pid, argv in tree.items() if b"-m\0mlflow\0server" in argv and b"guard.py" not in argv]
        os.kill(server, signal.SIGKILL)
        killed = time.monotonic()
        stdout, stderr = launcher.communicate(timeout=120)
        took = time.monotonic() - killed
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and [p for p in tree if _alive(p)]:
            time.sleep(0.5)
        left = {p: tree[p] for p in tree if _alive(p)}
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for pid in tree:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert launcher.returncode == 1, stderr
    assert took < 30, f"exit {took:.1f}s after the tracking server died"
    assert "tracking server" in stderr and "exited" in stderr and "Traceback" not in stderr
    assert not left, f"outlived the chief: {left}"
    parents, trials = _search(mlflow_client, "serverless")
    assert parents and "RUNNING" not in {r.info.status for r in [*parents, *trials]}

    again = _tune(
        tmp_path, store, 2, "data.source=iris", "tracking.experiment=serverless", "tuner.max_trials=3", "train.epochs=60"
    )
    assert again.returncode == 0, again.stderr
    parents, trials = _search(mlflow_client, "serverless")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    finished = Counter(t.data.tags["toolkit.trial_id"] for t in trials if t.info.status == "FINISHED")
    assert finished == Counter({"0": 1, "1": 1, "2": 1}), finished
    assert "RUNNING" not in {t.info.status for t in trials}
