"""The multi-host recipe on a real PostgreSQL: ``mlflow server`` over it, one ``--role chief`` and two ``--role worker``.

A throwaway cluster (``initdb``, then ``postgres``) listens on its own port of 127.0.0.1 only, with
trust auth on loopback and its socket in its own folder; ``mlflow server`` runs on it as
``postgresql+psycopg://`` (the ``postgres`` extra's driver). The chief and the workers are real
``toolkit tune`` processes on 127.0.0.1 that log to that server, read back with ``MlflowClient``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import ROOT
from test_distributed import _env, _mid_trial, _search

from toolkit import distributed
from toolkit.distributed import processes
from toolkit.distributed.address import HEARTBEAT_EVERY
from toolkit.security import write_token

CARD = str(ROOT / "experiments" / "quickstart.yaml")
PYTHON = sys.executable
TOKEN = "test-token-0123456789"
PG_TOOLS = ("initdb", "pg_ctl", "postgres")
PG_USER = "toolkit"
# Above two of the workers' heartbeats (one every HEARTBEAT_EVERY s), so that a loaded 2-core
# machine never writes off a live worker, and short enough to keep the test quick.
LEASE = 2 * HEARTBEAT_EVERY + 2
BASE = ("data.source=iris", "train.diagnostics=false", "tracking.report=false")
KERAS_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


# ---------------------------------------------------------------------------------------- the database


def _major(bindir: Path) -> int:
    name = bindir.parent.name
    return int(name) if name.isdigit() else 0


def pg_bindir() -> Path | None:
    """The folder with PostgreSQL's server tools: beside ``initdb`` on PATH, else Debian's newest."""
    on_path = shutil.which("initdb")
    candidates = [Path(on_path).parent] if on_path else []
    # Debian's packages keep the server's tools off PATH, in one folder per major version.
    candidates += sorted((Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")), key=_major, reverse=True)
    for folder in candidates:
        if all(os.access(folder / tool, os.X_OK) for tool in PG_TOOLS):
            return folder
    return None


def _quit_with_parent() -> None:
    """``preexec_fn`` of the server: an immediate shutdown (SIGQUIT) when pytest dies, even by kill -9.

    It runs after the switch to the ``postgres`` user, which would clear a death signal set before.
    """
    if processes._PRCTL is not None:
        processes._PRCTL(1, signal.SIGQUIT, 0, 0, 0)  # PR_SET_PDEATHSIG


def _killed_with_parent() -> None:
    """``preexec_fn`` of the searches: SIGKILL when pytest dies before its finalizers run.

    Not SIGTERM (``processes._die_with_parent``): the tracking server dies with pytest too, and a
    process stopping politely would retry MLflow's calls to it for minutes.
    """
    if processes._PRCTL is not None:
        processes._PRCTL(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def _group_alive(pgid: int) -> list[int]:
    """The processes left in process group ``pgid`` (zombies aside)."""
    left = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if fields[0] != "Z" and int(fields[2]) == pgid:
                    left.append(int(entry.name))
    return left


class Cluster:
    """A throwaway PostgreSQL cluster on 127.0.0.1, run by the ``postgres`` user when we are root.

    Args:
        bindir: The folder with ``initdb``, ``pg_ctl`` and ``postgres``.
        root: A folder ``owner`` can reach and write: the data folder and the socket go there.
        log_path: The server's output.
        owner: The user that runs the server. Defaults to None (this process's user).
    """

    def __init__(self, bindir: Path, root: Path, log_path: Path, owner: pwd.struct_passwd | None = None) -> None:
        self.bindir = bindir
        self.data = root / "data"
        self.socket_dir = root / "socket"
        self.log_path = log_path
        self.owner = owner
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None

    def _as_owner(self) -> dict:
        if self.owner is None:
            return {}
        return {"user": self.owner.pw_uid, "group": self.owner.pw_gid, "extra_groups": []}

    def _run(self, tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        # cwd: the server's user must be able to stand in it (a root-only cwd makes initdb fail).
        return subprocess.run(
            [str(self.bindir / tool), *args],
            cwd=self.data.parent,
            env={**os.environ, "LC_ALL": "C"},
            capture_output=True,
            text=True,
            timeout=timeout,
            **self._as_owner(),
        )

    def start(self, timeout: float = 60) -> int:
        """Create the cluster, start its server and wait until it takes connections. Returns its port."""
        import psycopg

        # --no-sync and fsync=off: a test database need not survive a power cut, and 2 cores are slow to fsync.
        made = self._run("initdb", "-D", str(self.data), "-U", PG_USER, "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync")
        if made.returncode != 0:
            raise RuntimeError(f"initdb failed ({made.returncode}):\n{made.stdout}{made.stderr}")
        self.socket_dir.mkdir()
        if self.owner is not None:
            os.chown(self.socket_dir, self.owner.pw_uid, self.owner.pw_gid)
        self.port = processes._free_port()
        settings = {
            "listen_addresses": "127.0.0.1",  # loopback only: trust auth never faces a network
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        cmd = [str(self.bindir / "postgres"), "-D", str(self.data)]
        for key, value in settings.items():
            cmd += ["-c", f"{key}={value}"]
        # The server itself, not pg_ctl start: pg_ctl detaches it into a session of its own, where
        # nothing stops it if pytest dies. Here it leads its own group, and quits with pytest.
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                cmd,
                cwd=self.data.parent,
                env={**os.environ, "LC_ALL": "C"},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_quit_with_parent,
                **self._as_owner(),
            )
        deadline = time.monotonic() + timeout
        while self._proc.poll() is None and time.monotonic() < deadline:
            try:
                with psycopg.connect(host="127.0.0.1", port=self.port, user=PG_USER, dbname="postgres", connect_timeout=2):
                    return self.port
            except psycopg.OperationalError:
                time.sleep(0.2)
        self.stop()
        tail = self.log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"PostgreSQL did not take connections on 127.0.0.1:{self.port} within {timeout:g}s:\n{tail}")

    def create_database(self, name: str) -> str:
        """Create an empty database. Returns its SQLAlchemy URI, with MLflow's driver (psycopg 3)."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=PG_USER, dbname="postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://{PG_USER}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        """``pg_ctl stop -m immediate``, then SIGKILL to whatever is left of the server's group."""
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", timeout=40)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.2)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        left = _group_alive(proc.pid)
        assert not left, f"PostgreSQL processes outlived the cluster's stop: {left}"


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real PostgreSQL server with one empty database, ``mlflow``. Yields its SQLAlchemy URI."""
    bindir = pg_bindir()
    if bindir is None:
        pytest.skip(
            "PostgreSQL's server tools (initdb, pg_ctl, postgres) are neither on PATH nor in "
            "/usr/lib/postgresql/*/bin: `make postgres` installs them"
        )
    pytest.importorskip("psycopg", reason="psycopg 3 is missing: `make postgres` installs the postgres extra")
    here = tmp_path_factory.mktemp("postgres")
    owner, root = None, here
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and initdb refuses root: no `postgres` user to run the server as")
        # pytest's temporary folders are root's, mode 0700, up to /tmp/pytest-of-root (outside the
        # basetemp): the postgres user cannot reach them. The cluster gets a folder of its own,
        # which it owns, in the system's temporary folder; its log stays here, written through a
        # file descriptor this process opens.
        root = Path(tempfile.mkdtemp(prefix="toolkit-pg-"))
        os.chown(root, owner.pw_uid, owner.pw_gid)
    cluster = Cluster(bindir, root, here / "postgres.log", owner)
    try:
        cluster.start()
        yield cluster.create_database("mlflow")
    finally:
        try:
            cluster.stop()
        finally:
            if root != here:
                shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def tracking_server(postgres: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` over the PostgreSQL database (MLflow creates its tables), artifacts under tmp_path."""
    root = tmp_path_factory.mktemp("mlflow")
    # No password in the URI (trust auth on loopback), so it may go on the server's command line.
    server = distributed.TrackingServer(postgres, artifacts=root / "artifacts", log_path=root / "server.log")
    try:
        yield server.start(timeout=240)
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------- the search


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen]]:
    """Start ``toolkit tune`` processes in sessions of their own; every group is SIGKILLed afterwards."""
    started: list[subprocess.Popen] = []

    def start(name: str, uri: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        # Output to a file, not a pipe: nothing reads a worker's output while the chief runs.
        with open(tmp_path / f"{name}.log", "wb") as out:
            proc = subprocess.Popen(
                [PYTHON, "-m", "toolkit.cli", "tune", CARD, *args],
                cwd=tmp_path,  # every process's ./mlruns (the shared tuner folder) is the test's
                env=_env(uri, **(env or {})),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_killed_with_parent,
            )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _log(tmp_path: Path, name: str) -> str:
    return (tmp_path / f"{name}.log").read_text(errors="replace")


def _chief_and_two_workers(
    tmp_path: Path, uri: str, spawn: Callable[..., subprocess.Popen], *sets: str, chief_env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, dict[str, subprocess.Popen]]:
    """The README's recipe on one machine: a chief on a port of 127.0.0.1, two workers, one token file."""
    port = processes._free_port()
    token = write_token(tmp_path / "oracle.token", TOKEN)  # mode 600
    overrides = [arg for kv in (*BASE, *sets) for arg in ("--set", kv)]
    auth = ["--token-file", str(token)]
    chief = spawn("chief", uri, *overrides, "--role", "chief", "--bind", f"127.0.0.1:{port}", *auth, env=chief_env)
    # Started with the chief: each waits for it (TOOLKIT_ORACLE_TIMEOUT) while all three import TensorFlow.
    workers = {
        tuner_id: spawn(
            tuner_id,
            uri,
            *overrides,
            "--role",
            "worker",
            "--oracle",
            f"127.0.0.1:{port}",
            *auth,
            env={"KERASTUNER_TUNER_ID": tuner_id, "TOOLKIT_ORACLE_TIMEOUT": "120"},
        )
        for tuner_id in ("tuner0", "tuner1")
    }
    return chief, workers


@pytest.mark.slow
def test_a_chief_and_two_workers_over_postgres_lose_no_metric_and_register_the_champion(tmp_path, tracking_server, spawn):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_server)
    epochs, n = 3, 4
    chief, workers = _chief_and_two_workers(
        tmp_path, tracking_server, spawn, "tracking.experiment=pg_search", f"tuner.max_trials={n}", f"train.epochs={epochs}"
    )
    assert chief.wait(timeout=240) == 0, _log(tmp_path, "chief")[-4000:]
    for tuner_id, worker in workers.items():
        assert worker.wait(timeout=60) == 0, _log(tmp_path, tuner_id)[-4000:]
    parents, trials = _search(client, "pg_search")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert all(t.data.tags["mlflow.parentRunId"] == parent.info.run_id for t in trials)
    assert sorted(t.data.tags["toolkit.trial_id"] for t in trials) == [str(i) for i in range(n)]  # each trial once
    assert {t.info.status for t in trials} == {"FINISHED"}
    assert {t.data.tags["toolkit.worker"] for t in trials} == {"tuner0", "tuner1"}
    for trial in trials:
        for key in KERAS_METRICS:
            steps = sorted(m.step for m in client.get_metric_history(trial.info.run_id, key))
            assert steps == list(range(epochs)), (trial.data.tags["toolkit.trial_id"], key, steps)
    # The champion is registered under the card's name (the chief and the workers share ./mlruns,
    # so the chief loads the best trial's checkpoint).
    champion = client.get_model_version_by_alias("quickstart", "champion")
    assert champion.tags["toolkit.best_trial_id"] == parent.data.tags["toolkit.best_trial_id"]
    assert champion.tags["toolkit.search_id"] == parent.data.tags["toolkit.search_id"]
    assert parent.data.tags["toolkit.model_uri"] == "models:/quickstart@champion"


@pytest.mark.slow
def test_a_worker_killed_mid_trial_is_written_off_after_its_lease_and_its_trial_retried(tmp_path, tracking_server, spawn):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_server)
    chief, workers = _chief_and_two_workers(
        tmp_path,
        tracking_server,
        spawn,
        "tracking.experiment=pg_killed",
        "tracking.log_model=false",
        "tuner.max_trials=3",
        "train.epochs=60",
        "tuner.max_retries_per_trial=1",
        chief_env={"TOOLKIT_WORKER_LEASE": f"{LEASE:g}"},
    )
    # Whichever worker is mid-trial: under load one worker may take the first trials alone.
    tags = _mid_trial(client, "pg_killed", chief, {}).data.tags
    victim, lost_worker = tags["toolkit.trial_id"], tags["toolkit.worker"]
    (survivor,) = set(workers) - {lost_worker}
    os.killpg(workers[lost_worker].pid, signal.SIGKILL)  # a host lost: no exit code reaches the chief
    assert workers[lost_worker].wait(timeout=10) == -signal.SIGKILL
    assert chief.wait(timeout=240) == 0, _log(tmp_path, "chief")[-4000:]
    assert workers[survivor].wait(timeout=60) == 0, _log(tmp_path, survivor)[-4000:]
    reason = f"worker {lost_worker} sent no heartbeat for {LEASE:g}s (TOOLKIT_WORKER_LEASE)"
    assert reason in _log(tmp_path, "chief")
    parents, trials = _search(client, "pg_killed")
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert "RUNNING" not in {t.info.status for t in trials}
    assert all(t.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for t in trials)
    finished = Counter(t.data.tags["toolkit.trial_id"] for t in trials if t.info.status == "FINISHED")
    assert finished == Counter({"0": 1, "1": 1, "2": 1})  # the lost trial was retried, and each trial finished once
    runs = [t for t in trials if t.data.tags["toolkit.trial_id"] == victim]
    verdicts = sorted((t.data.tags["toolkit.worker"], t.info.status) for t in runs)
    assert verdicts == sorted([(lost_worker, "KILLED"), (survivor, "FINISHED")]), verdicts
    (lost,) = [t for t in runs if t.data.tags["toolkit.worker"] == lost_worker]
    failure = lost.data.tags["toolkit.failure"]
    assert reason in failure and "hands the trial to another worker" in failure
