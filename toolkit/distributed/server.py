"""The private ``mlflow server`` a local search runs over a SQLite store."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from toolkit.distributed.processes import _die_with_parent, _free_port, _stop_group


def _write_ahead_log(backend_uri: str) -> None:
    """Put the server's SQLite store in WAL mode (it stays with the file): readers then no longer
    hold up each writer's commit. Only a local file: WAL needs shared memory, which a network file
    system cannot give."""
    if not backend_uri.startswith("sqlite:///"):
        return
    path = Path(backend_uri[len("sqlite:///") :])
    if path.exists():
        with contextlib.closing(sqlite3.connect(path, timeout=20)) as db:
            db.execute("PRAGMA journal_mode=WAL")


class TrackingServer:
    """``mlflow server`` on loopback over a SQLite store, for the length of one search.

    Args:
        backend_uri: The SQLite store.
        artifacts: Where proxied artifacts go (experiments created beforehand keep their own location).
        log_path: The server's output, shown when it fails to start.
    """

    def __init__(self, backend_uri: str, artifacts: Path, log_path: Path) -> None:
        self.backend_uri = backend_uri
        self.artifacts = artifacts
        self.log_path = log_path
        self.uri: str | None = None
        self._proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> str:
        """Start the server and wait until it answers. Returns its URI."""
        self.launch()
        return self.wait(timeout)

    def launch(self) -> str:
        """Start the server without waiting for it. Returns the URI it will answer on."""
        port = _free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # One server process, and no job runner (MLflow 3 starts one by default, for GenAI jobs
        # a search never submits): the server is then the only writer of the SQLite file, and it
        # starts several times faster. No access log: one line per request is overhead.
        # Under a guard that stops the server's whole process tree when this process dies, even by kill -9.
        cmd = [
            sys.executable,
            "-I",
            str(Path(__file__).with_name("guard.py")),
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            self.backend_uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--artifacts-destination",
            str(self.artifacts),
            "--uvicorn-opts",
            "--no-access-log",
        ]
        # MLflow's log_batch holds one pooled connection while it opens a second one to write, so
        # with its default pool (5 + 10 overflow) 15 concurrent writers hold every connection and
        # wait for a second one: each call then fails after 30 s (BAD_REQUEST "QueuePool limit"),
        # and the async queue drops those points. At 64 writers almost nothing was stored
        # (benchmarks/p12_chief.py). Without a pool each session opens its own SQLite connection
        # (cheap), and SQLite's busy timeout (20 s in MLflow) orders the writers.
        env = {
            "MLFLOW_SQLALCHEMYSTORE_POOLCLASS": "NullPool",
            **os.environ,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        _write_ahead_log(self.backend_uri)
        with open(self.log_path, "wb") as out:
            self._proc = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.uri = f"http://127.0.0.1:{port}"
        return self.uri

    def wait(self, timeout: float = 180.0) -> str:
        """Wait until the launched server answers. Returns its URI."""
        uri = self.uri
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return uri
            time.sleep(0.25)
        self.stop()
        tail = self.log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(
            f"`mlflow server` over {self.backend_uri} did not start within {timeout:g}s; its output ({self.log_path}):\n{tail}"
        )

    def exit_code(self) -> int | None:
        """The server's exit code once it has exited; None while it runs (or before it started)."""
        return self._proc.poll() if self._proc is not None else None

    def stop(self) -> None:
        if self._proc is not None:
            _stop_group(self._proc, grace=10)
            self._proc = None
