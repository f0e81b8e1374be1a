"""Local mode: the chief in this process and N worker processes on 127.0.0.1, started and stopped together."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from toolkit import tracking
from toolkit import tuner as tuning
from toolkit.config import ExperimentConfig
from toolkit.distributed.address import ENV_ORACLE_IP, ENV_ORACLE_PORT, ENV_ORACLE_TIMEOUT, ENV_TUNER_ID, Address
from toolkit.distributed.chief import run_chief
from toolkit.distributed.processes import ENV_PARENT_PID, _cores, _die_with_parent, _relay, _stop_group
from toolkit.distributed.server import TrackingServer
from toolkit.distributed.servicer import OracleServer
from toolkit.distributed.worker import ENV_WORKER_STORE, ENV_WORKER_URI
from toolkit.security import ENV_TOKEN, make_token

log = logging.getLogger(__name__)


class LocalWorkers:
    """N worker processes on this machine, stopped together.

    Each runs ``toolkit tune EXP --role worker`` with TensorFlow limited to its share of the cores.
    They start before the chief serves (TensorFlow's import then overlaps the chief's start) and
    wait for it: the launcher, not a timeout, stops them if the chief fails.

    Args:
        n: How many workers.
        exp: The card, as given to ``toolkit tune``.
        overrides: The ``--set`` overrides, passed on unchanged.
        verbose: Pass ``--verbose`` on, and relay the workers' stdout too.
    """

    def __init__(self, n: int, exp: str, overrides: Sequence[str] = (), verbose: bool = False) -> None:
        self.n = n
        self.exp = exp
        self.overrides = list(overrides)
        self.verbose = verbose
        self.procs: dict[str, subprocess.Popen] = {}
        self.codes: dict[str, int] = {}
        self._relays: list[threading.Thread] = []
        self._stopping = threading.Event()  # once set, the workers' farewells are not relayed
        # Workers the chief wrote off (no heartbeat within the lease, say): hung, so not waited for.
        self.written_off: set[str] = set()

    def start(self, oracle: Address, uri: str, token: str | None = None, store: Path | None = None) -> None:
        """Start the workers against the oracle at ``oracle``, logging to ``uri``.

        Everything secret (the token, a URI that may hold credentials) goes through the workers'
        environment, never their argv (which every local user can read in ``ps``).

        Args:
            oracle: The chief's address.
            uri: Where the workers log.
            token: The search's token. Defaults to None.
            store: The chief's store: the workers may share its folders. Defaults to None.
        """
        threads = str(max(1, _cores() // self.n))
        for i in range(self.n):
            tuner_id = f"tuner{i}"
            env = {
                **os.environ,
                ENV_TUNER_ID: tuner_id,
                ENV_ORACLE_IP: oracle.host,
                ENV_ORACLE_PORT: str(oracle.port),
                "MLFLOW_TRACKING_URI": uri,
                ENV_WORKER_URI: uri,
                "PYTHONUNBUFFERED": "1",
                ENV_PARENT_PID: str(os.getpid()),  # the worker exits when this process is gone
            }
            if token:
                env[ENV_TOKEN] = token
            if store is not None:
                env[ENV_WORKER_STORE] = str(store)
            env.setdefault(ENV_ORACLE_TIMEOUT, "600")
            for name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS"):
                env.setdefault(name, threads)
            # tracking.uri is outside the search id and reaches the worker through its
            # environment (ENV_WORKER_URI) even when the card names another store, so it is left
            # out of the argv, where it could show a password.
            sets = [arg for kv in self.overrides if not _is_uri_override(kv) for arg in ("--set", kv)]
            cmd = [
                sys.executable,
                "-m",
                "toolkit.cli",
                "tune",
                self.exp,
                *sets,
                "--role",
                "worker",
                "--oracle",
                oracle.target,
            ]
            if self.verbose:
                cmd.append("--verbose")
            # A session of its own: Ctrl-C reaches only the launcher, which stops workers in order.
            # It dies with the launcher all the same (SIGTERM from the kernel on Linux; elsewhere
            # the worker watches its parent's pid).
            proc = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if self.verbose else subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            self.procs[tuner_id] = proc
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    relay = threading.Thread(target=_relay, args=(stream, f"[{tuner_id}] ", self._stopping), daemon=True)
                    relay.start()
                    self._relays.append(relay)

    def exited(self) -> list[tuple[str, int]]:
        """Workers that exited since the last call, with their exit codes."""
        out = []
        for tuner_id, proc in self.procs.items():
            code = proc.poll()
            if code is not None and tuner_id not in self.codes:
                self.codes[tuner_id] = code
                out.append((tuner_id, code))
        return out

    def kill(self, tuner_id: str) -> None:
        """SIGKILL one worker's process group at once (it works on a stopped process too)."""
        self.written_off.add(tuner_id)
        proc = self.procs.get(tuner_id)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    def all_exited(self) -> bool:
        return bool(self.procs) and all(proc.poll() is not None for proc in self.procs.values())

    def stop(self, graceful: bool = False, patience: float = 20) -> None:
        """Stop every worker: wait for them when the search finished, else SIGTERM (runs are marked KILLED) then SIGKILL.

        A worker the chief wrote off is not waited for even after a finished search: it is hung
        (stopped, deadlocked), and its trial was already handed on or failed. It is stopped at once.

        Args:
            graceful: The search finished and workers are leaving by themselves. Defaults to False.
            patience: Seconds a SIGTERMed worker gets to close its runs. Defaults to 20.
        """
        deadline = time.monotonic() + 60
        hung = {tid: proc for tid, proc in self.procs.items() if tid in self.written_off}
        if not graceful:
            self._stopping.set()  # "interrupted: ..." from each worker would only repeat the launcher's message
        for tuner_id, proc in self.procs.items():  # all at once: none takes a new trial while another stops
            if proc.poll() is None and (not graceful or tuner_id in hung):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        try:
            terminated = time.monotonic() + patience  # the SIGTERMs above: runs are closed KILLED meanwhile
            for tuner_id, proc in self.procs.items():
                if tuner_id in hung:
                    _stop_group(proc, grace=2)  # a stopped process only leaves with SIGKILL
                    continue
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.1, (deadline if graceful else terminated) - time.monotonic()))
                _stop_group(proc, grace=20 if graceful else 2)
        except KeyboardInterrupt:  # interrupted while waiting: stop the rest at once
            for proc in self.procs.values():
                _stop_group(proc, grace=5)
            raise
        for tuner_id, code in self.exited():
            if code != 0 and graceful and tuner_id not in hung:
                log.warning("worker %s exited with code %d after the search", tuner_id, code)
        for relay in self._relays:
            relay.join(timeout=2)


def _is_uri_override(kv: str) -> bool:
    return kv.split("=", 1)[0].strip() == "tracking.uri"


def run_local(
    cfg: ExperimentConfig,
    n: int,
    exp: str,
    overrides: Sequence[str] = (),
    *,
    fresh: bool = False,
    verbose: bool = False,
    on_trial: Callable[[tuning.TrialResult], None] | None = None,
) -> tuning.SearchResult:
    """Run a search with a chief (this process) and ``n`` worker processes on 127.0.0.1.

    Args:
        cfg: The validated card.
        n: How many workers.
        exp: The card as given on the command line (the workers load it too).
        overrides: The ``--set`` overrides.
        fresh: Start a new search instead of resuming. Defaults to False.
        verbose: Show the workers' own output. Defaults to False.
        on_trial: Called with each trial that reached its final status.

    Returns:
        The search, summarized after every worker left.
    """
    uri = tracking.tracking_uri(cfg)
    # MLflow prints a link to each run it closes; the loopback server's links die with the search.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # The same folder a one-process search of this store uses, so either resumes the other.
    workdir = tuning.project_dir(uri, cfg)
    server = None
    if uri.startswith("sqlite:"):
        store = tracking.store_dir(uri).resolve()
        # Created here, on the file, so its artifacts live beside the database as without workers.
        tracking.SearchTracker(cfg, uri).ensure_experiment()
        server = TrackingServer(uri, artifacts=store / "artifacts", log_path=store / "mlflow-server.log")
    store = tracking.store_dir(uri).resolve()
    # A fresh token per search: only this process and its workers know it.
    token = make_token()
    # The chief's port is bound here, before any worker starts, so no other process can take it
    # in between; it serves once the tuner is built (TensorFlow's import in the workers overlaps
    # the chief's start).
    oracle_server = OracleServer(None, Address("127.0.0.1", 0), token=token)
    oracle = Address("127.0.0.1", oracle_server.listen())
    workers = LocalWorkers(n, exp, overrides, verbose=verbose)
    finished = False
    try:
        if server is not None:
            uri = server.launch()
        workers.start(oracle, uri, token=token, store=store)
        if server is not None:
            server.wait()
        result = run_chief(
            cfg,
            oracle,
            fresh=fresh,
            uri=uri,
            workdir=workdir,
            on_trial=on_trial,
            workers=workers,
            server=oracle_server,
            token=token,
            tracking_server=server,
        )
        finished = True
        return result
    finally:
        try:
            workers.stop(graceful=finished)  # after a finished search they are leaving by themselves
        finally:
            oracle_server.stop()
            if server is not None:
                server.stop()
