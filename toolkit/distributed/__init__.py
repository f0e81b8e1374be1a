"""Distributed tuning on KerasTuner's own engine: a chief serves the oracle over gRPC, workers run trials.

Three ways in, one search in MLflow:

- **Local** (``toolkit tune EXP --workers N``): this process is the chief, on a free port on
  127.0.0.1, and it starts N worker processes that wait for it to serve. Over a SQLite store it also
  runs ``mlflow server`` on loopback for the length of the search, so one process writes the file.
  Processes writing one SQLite file directly can hit "database is locked" (SQLite waits 5 s for a
  lock): a direct client gets an error and the point is lost, while behind the server MLflow
  answers 503 (TEMPORARILY_UNAVAILABLE), which MLflow clients retry.
- **Across hosts**: ``--role chief --bind HOST:PORT`` and ``--role worker --oracle HOST:PORT``, or
  KerasTuner's own ``KERASTUNER_TUNER_ID``, ``KERASTUNER_ORACLE_IP`` and ``KERASTUNER_ORACLE_PORT``.
- Every process logs to ``MLFLOW_TRACKING_URI``. The chief creates the parent run and hands its
  id (with the search id, its tracking URI and its tuner folder) to each worker in a handshake on
  the oracle's own gRPC channel, so workers need no shared file and a worker started with another
  card is refused.

What the chief adds to KerasTuner's ``oracle_chief`` (1.4.8), and why:

- **Lost workers end their trial.** KerasTuner's chief stops only when no trial is ongoing and no
  worker is registered, so a worker killed mid-trial makes it wait forever (KerasTuner #915). Here
  a local worker process that exits, or any worker whose heartbeats stop for
  ``TOOLKIT_WORKER_LEASE`` seconds, has its trial ended INVALID: the oracle retries it
  (``tuner.max_retries_per_trial``) or records it FAILED, and its MLflow run is closed KILLED or
  FAILED with the reason.
- **Idle workers linger** while other trials still run, instead of leaving at once, so a trial lost
  with its worker has a worker to retry it.
- **The oracle's lock is released on errors.** ``@synchronized`` does not release it when the
  call raises (as ``end_trial`` does after too many consecutive failures), which would stall every
  later call.
- The chief notices the end within a second (KerasTuner polls every 20 s).

Workers give up when the chief cannot be reached within ``TOOLKIT_ORACLE_TIMEOUT`` seconds (default
60; 600 for local workers, which the launcher stops itself) instead of KerasTuner's hour, both at
start and on every later call.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc
from keras_tuner.src import protos
from keras_tuner.src.distribute import oracle_chief, oracle_client
from keras_tuner.src.engine import oracle as oracle_module
from keras_tuner.src.engine import trial as trial_module

from toolkit import progress, tracking
from toolkit import tuner as tuning
from toolkit.config import ConfigError, ExperimentConfig

log = logging.getLogger(__name__)

ENV_TUNER_ID = "KERASTUNER_TUNER_ID"
ENV_ORACLE_IP = "KERASTUNER_ORACLE_IP"
ENV_ORACLE_PORT = "KERASTUNER_ORACLE_PORT"
ENV_ORACLE_TIMEOUT = "TOOLKIT_ORACLE_TIMEOUT"
ENV_WORKER_LEASE = "TOOLKIT_WORKER_LEASE"

# Long enough for a chief on another host to load its data and start serving, short enough that
# a typo in --oracle is reported within a minute.
DEFAULT_ORACLE_TIMEOUT = 60.0
# Six missed heartbeats: a worker busy in a long TensorFlow op still gets the GIL far more often.
DEFAULT_WORKER_LEASE = 30.0
HEARTBEAT_EVERY = 5.0
# How long an idle worker waits before asking again while other trials run (its answer is IDLE).
LINGER = 1.0

_META_TUNER = "toolkit-tuner-id"
_META_HEARTBEAT = "toolkit-heartbeat"
_META_HELLO = "toolkit-hello-bin"  # "-bin": gRPC metadata values must be ASCII unless binary

EXIT_OK, EXIT_FAILURE = 0, 1
Status = trial_module.TrialStatus


class ChiefUnreachable(RuntimeError):
    """A worker could not reach the chief's oracle, or lost it during the search."""


# ---------------------------------------------------------------------------------------- CLI


@dataclass(frozen=True)
class Address:
    """A ``HOST:PORT`` for the oracle's gRPC server."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, flag: str) -> Address:
        """Parse ``HOST:PORT`` (``[::1]:8000`` for IPv6).

        Args:
            text: The address.
            flag: The option it came from, named in the error.

        Raises:
            ConfigError: When it is not ``HOST:PORT`` with a port in 0-65535.
        """
        host, sep, port = text.strip().rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"{flag} must be HOST:PORT, e.g. 10.0.0.5:8000. Received: {text!r}", field=flag)
        return cls(host, int(port))

    @property
    def target(self) -> str:
        """The address as gRPC spells it."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return self.target


def main(cfg: ExperimentConfig, args: Any) -> int:
    """``toolkit tune`` with ``--workers``, ``--role`` or KerasTuner's environment variables.

    Args:
        cfg: The validated card.
        args: The parsed ``tune`` arguments.

    Returns:
        The exit code: 0 when the search finished with a scored trial (or a worker ran its share).

    Raises:
        ConfigError: For bad usage (exit code 2).
    """
    role = args.role or _env_role()
    if args.workers:
        if args.role or args.bind or args.oracle:
            raise ConfigError(
                f"--workers {args.workers} runs the chief and the workers on this machine, so it takes no --role, --bind or --oracle. "
                "Across hosts, start one `--role chief --bind HOST:PORT` and workers with `--role worker --oracle HOST:PORT`",
                field="--workers",
            )
        return _report(
            cfg,
            lambda on_trial: run_local(
                cfg, args.workers, args.exp, args.overrides, fresh=args.fresh, verbose=args.verbose, on_trial=on_trial
            ),
        )
    if role == "chief":
        if args.oracle:
            raise ConfigError(
                f"--oracle is for workers; the chief listens on --bind. Received: --role chief --oracle {args.oracle}",
                field="--oracle",
            )
        bind = Address.parse(args.bind, "--bind") if args.bind else _env_address("--bind")
        return _report(cfg, lambda on_trial: run_chief(cfg, bind, fresh=args.fresh, on_trial=on_trial))
    if role == "worker":
        if args.bind:
            raise ConfigError(
                f"--bind is for the chief; a worker names the chief with --oracle. Received: --role worker --bind {args.bind}",
                field="--bind",
            )
        oracle = Address.parse(args.oracle, "--oracle") if args.oracle else _env_address("--oracle")
        tuner_id = os.environ.get(ENV_TUNER_ID) or default_tuner_id()
        if "chief" in tuner_id:  # KerasTuner treats any id containing "chief" as the chief
            raise ConfigError(f"{ENV_TUNER_ID} of a worker must not contain 'chief'. Received: {tuner_id!r}", field=ENV_TUNER_ID)
        # A worker has nothing to say on stdout (the chief reports progress); muted, it does not
        # repeat MLflow's run links or KerasTuner's stray prints (see Chief.__call__).
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(sys.stdout if args.verbose else devnull):
            run_worker(cfg, oracle, tuner_id)
        return EXIT_OK
    raise ConfigError("a distributed search needs --workers N, --role chief or --role worker", field="--role")


def _report(cfg: ExperimentConfig, search: Callable[[Callable[[Any], None]], tuning.SearchResult]) -> int:
    reporter = progress.make_reporter(cfg)
    with reporter:
        result = search(reporter.trial_done)
    progress.print_summary(result)
    return EXIT_OK if result.best is not None else EXIT_FAILURE


def _env_role() -> str | None:
    """The role KerasTuner's environment variables give, as ``keras_tuner.src.distribute.utils`` reads them."""
    if not os.environ.get(ENV_ORACLE_IP):
        return None
    for name in (ENV_ORACLE_PORT, ENV_TUNER_ID):
        if not os.environ.get(name):
            raise ConfigError(
                f"{ENV_ORACLE_IP} is set but {name} is not: set {ENV_TUNER_ID}, {ENV_ORACLE_IP} and {ENV_ORACLE_PORT} together",
                field=name,
            )
    return "chief" if "chief" in os.environ[ENV_TUNER_ID] else "worker"


def _env_address(flag: str) -> Address:
    ip, port = os.environ.get(ENV_ORACLE_IP), os.environ.get(ENV_ORACLE_PORT)
    if not ip or not port:
        raise ConfigError(f"{flag} HOST:PORT is required (or set {ENV_ORACLE_IP} and {ENV_ORACLE_PORT})", field=flag)
    return Address.parse(f"{ip}:{port}", f"{ENV_ORACLE_IP}/{ENV_ORACLE_PORT}")


def default_tuner_id() -> str:
    """A worker id unique across hosts: ``tuner-<host>-<pid>`` (never containing "chief")."""
    host = socket.gethostname().split(".")[0].replace("chief", "chf") or "host"
    return f"tuner-{host}-{os.getpid()}"


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ConfigError(f"{name} must be a number of seconds above 0. Received: {raw!r}", field=name)
    return value


# ---------------------------------------------------------------------------------------- chief


@contextlib.contextmanager
def _locked(oracle: Any) -> Iterator[None]:
    """Hold the oracle's lock as KerasTuner's ``@synchronized`` does, but release it on errors too.

    Calls to the oracle's own synchronized methods inside see this thread as the holder and do
    not take the lock again.
    """
    name = threading.current_thread().name
    if oracle_module.THREADS[oracle] == name:
        yield
        return
    oracle_module.LOCKS[oracle].acquire()
    oracle_module.THREADS[oracle] = name
    try:
        yield
    finally:
        oracle_module.THREADS[oracle] = None
        oracle_module.LOCKS[oracle].release()


@dataclass
class _Ended:
    """A trial that reached its final status (COMPLETED or FAILED), for the progress display."""

    trial: Any
    seconds: float


class _Servicer(oracle_chief.OracleServicer):
    """KerasTuner's servicer, plus leases, lingering, the handshake and a lock that survives errors."""

    def __init__(self, oracle: Any, hello: bytes) -> None:
        super().__init__(oracle)
        self.hello = hello
        self.lock = threading.Lock()  # guards the fields below; never held while waiting on the oracle
        self.last_seen: dict[str, float] = {}
        self.leased: set[str] = set()  # workers that send heartbeats: only these can miss them
        self.started: dict[str, float] = {}
        self.ended: list[_Ended] = []
        self.failure: RuntimeError | None = None

    # ----------------------------------------------------------------- bookkeeping

    def _seen(self, tuner_id: str | None, heartbeat: bool = False) -> None:
        if not tuner_id:
            return
        with self.lock:
            self.last_seen[tuner_id] = time.monotonic()
            if heartbeat:
                self.leased.add(tuner_id)

    def _forget(self, tuner_id: str) -> None:
        with self.lock:
            self.leased.discard(tuner_id)
            self.last_seen.pop(tuner_id, None)

    def _owner(self, trial_id: str) -> str | None:
        """The worker running a trial (call with the oracle's lock held)."""
        return next((tid for tid, trial in self.oracle.ongoing_trials.items() if trial.trial_id == trial_id), None)

    def _end(self, trial: Any, owner: str) -> None:
        """End a trial in the oracle (call with the oracle's lock held)."""
        try:
            self.oracle.end_trial(trial)
        except RuntimeError as exc:
            # Too many consecutive failures: KerasTuner raised before it released the trial and
            # saved. Release and save, and hand every worker STOPPED from now on.
            self.failure = exc
            self.oracle.ongoing_trials.pop(owner, None)
            self.oracle.save()
        final = self.oracle.trials[trial.trial_id]
        if final.status in (Status.COMPLETED, Status.FAILED):  # INVALID means queued for a retry
            with self.lock:
                seconds = time.monotonic() - self.started.pop(trial.trial_id, time.monotonic())
                self.ended.append(_Ended(final, seconds))

    # ----------------------------------------------------------------- gRPC methods

    def GetSpace(self, request: Any, context: Any) -> Any:
        meta = dict(context.invocation_metadata() or ())
        self._seen(meta.get(_META_TUNER), heartbeat=True)
        if _META_HEARTBEAT in meta:  # a heartbeat needs no answer; keep it off the oracle's lock
            return protos.get_service().GetSpaceResponse()
        context.set_trailing_metadata(((_META_HELLO, self.hello),))
        with _locked(self.oracle):
            return super().GetSpace(request, context)

    # KerasTuner serves one call at a time (a 1-thread pool), so its oracle's reads need no lock.
    # Here idle workers wait in their own threads, so reads take the oracle's lock too.

    def UpdateSpace(self, request: Any, context: Any) -> Any:
        with _locked(self.oracle):
            return super().UpdateSpace(request, context)

    def GetTrial(self, request: Any, context: Any) -> Any:
        with _locked(self.oracle):
            return super().GetTrial(request, context)

    def GetBestTrials(self, request: Any, context: Any) -> Any:
        with _locked(self.oracle):
            return super().GetBestTrials(request, context)

    def CreateTrial(self, request: Any, context: Any) -> Any:
        tuner_id = request.tuner_id
        self._seen(tuner_id)
        linger = False
        with _locked(self.oracle):
            if self.failure is not None:
                trial = trial_module.Trial(self.oracle.get_space(), status=Status.STOPPED)
                self.oracle.tuner_ids.discard(tuner_id)
            else:
                trial = self.oracle.create_trial(tuner_id)
                if trial.status == Status.STOPPED and self.oracle.ongoing_trials:
                    # KerasTuner lets an idle worker leave while others still run trials; keep it,
                    # so a trial lost with its worker can be retried.
                    self.oracle.tuner_ids.add(tuner_id)
                    linger = True
        if linger:
            time.sleep(LINGER)
            with _locked(self.oracle):
                trial = trial_module.Trial(self.oracle.get_space(), status=Status.IDLE)
        elif trial.status == Status.STOPPED:
            self.stop_triggered = True
            self._forget(tuner_id)
        elif trial.status == Status.RUNNING:
            with self.lock:
                self.started.setdefault(trial.trial_id, time.monotonic())
        return protos.get_service().CreateTrialResponse(trial=trial.to_proto())

    def UpdateTrial(self, request: Any, context: Any) -> Any:
        with _locked(self.oracle):
            owner = self._owner(request.trial_id)
            if owner is None:  # its worker was written off as lost: ignore the late report
                trial = self.oracle.trials[request.trial_id]
            else:
                trial = self.oracle.update_trial(request.trial_id, request.metrics, step=request.step)
        self._seen(owner)
        return protos.get_service().UpdateTrialResponse(trial=trial.to_proto())

    def EndTrial(self, request: Any, context: Any) -> Any:
        trial = trial_module.Trial.from_proto(request.trial)
        with _locked(self.oracle):
            owner = self._owner(trial.trial_id)
            if owner is not None:
                self._end(trial, owner)
        if owner is None:
            log.warning("ignored the result of trial %s: its worker had been written off as lost", trial.trial_id)
        self._seen(owner)
        return protos.get_service().EndTrialResponse()

    # ----------------------------------------------------------------- called by the chief

    def reclaim(self, tuner_id: str, reason: str) -> Any:
        """Write a worker off: end its trial INVALID (retried or FAILED) and stop waiting for it.

        Returns:
            The oracle's trial the worker held, after ending it, or None.
        """
        with _locked(self.oracle):
            self.oracle.tuner_ids.discard(tuner_id)
            trial = self.oracle.ongoing_trials.get(tuner_id)
            if trial is not None:
                trial.status = Status.INVALID
                trial.message = reason
                self._end(trial, tuner_id)
        self._forget(tuner_id)
        return trial

    def expired(self, lease: float) -> list[str]:
        now = time.monotonic()
        with self.lock:
            return [tid for tid in self.leased if now - self.last_seen.get(tid, now) > lease]

    def done(self) -> bool:
        with _locked(self.oracle):
            return self.stop_triggered and not self.oracle.ongoing_trials and not self.oracle.tuner_ids

    def take_ended(self) -> list[_Ended]:
        with self.lock:
            ended, self.ended = self.ended, []
        return ended


class OracleServer:
    """The chief's gRPC server over a KerasTuner oracle.

    Args:
        oracle: The chief tuner's oracle.
        bind: Where to listen; port 0 picks a free port.
        hello: What each worker receives in its handshake (parent run id, search id, ...).
    """

    def __init__(self, oracle: Any, bind: Address, hello: dict[str, str]) -> None:
        self.bind = bind
        self.servicer = _Servicer(oracle, json.dumps(hello).encode())
        self.port: int | None = None
        self._server: Any = None

    def start(self) -> int:
        """Listen and serve in background threads. Returns the port."""
        # One thread per concurrent call: idle workers hold one each while they linger.
        # No SO_REUSEPORT (gRPC's default on Linux): a second chief on the same port must fail,
        # not share the workers with the first.
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="oracle"), options=[("grpc.so_reuseport", 0)]
        )
        protos.get_service_grpc().add_OracleServicer_to_server(self.servicer, self._server)
        try:
            port = self._server.add_insecure_port(self.bind.target)
        except RuntimeError:  # newer grpc raises where older ones return 0
            port = 0
        if not port:
            self._server = None
            raise RuntimeError(
                f"the chief could not listen on {self.bind}: is the port in use, or the host not an address of this machine?"
            )
        self._server.start()
        self.port = port
        return port

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=1).wait(5)


class Chief:
    """Serves the oracle in place of ``tuner.search`` (the ``serve`` hook of :func:`tuning.run_search`).

    Args:
        bind: Where the oracle listens.
        on_trial: Called with each trial that reached its final status.
        workers: Local worker processes to watch: one that exits early is written off at once.
            Defaults to none (workers on other hosts join by themselves and are leased).
        lease: Seconds without a heartbeat after which a worker is written off. Defaults to
            ``TOOLKIT_WORKER_LEASE`` or 30.
    """

    def __init__(
        self,
        bind: Address,
        on_trial: Callable[[tuning.TrialResult], None] | None = None,
        workers: LocalWorkers | None = None,
        lease: float | None = None,
    ) -> None:
        self.bind = bind
        self.on_trial = on_trial
        self.workers = workers
        self.lease = lease or _env_seconds(ENV_WORKER_LEASE, DEFAULT_WORKER_LEASE)
        self.server: OracleServer | None = None
        self.lost: dict[str, str] = {}

    def __call__(self, tuner: Any, tracker: tracking.SearchTracker) -> None:
        oracle = tuner.oracle
        oracle.verbose = 0  # progress comes from on_trial, not KerasTuner's tables
        tuner.save()  # as KerasTuner's search does before serving
        # MLflow creates a dataset's row on first use, check-then-insert: two workers starting
        # their first trials together can both insert, and one fails on the UNIQUE constraint.
        # Logged here first, on the parent, the rows exist before any worker can start a trial.
        tracker.log_datasets(tracker.parent_run_id, tuner.dataset)
        hello = {
            "parent_run_id": tracker.parent_run_id,
            "search_id": tuning.search_id(tracker.cfg),
            "tracking_uri": tracker.uri,
            "workdir": str(Path(tuner.project_dir).resolve()),
        }
        self.server = OracleServer(oracle, self.bind, hello)
        finished = False
        # KerasTuner 1.4.8 prints a conditional parameter's value each time it serializes one (a
        # stray print in conditions.Parent.to_proto), i.e. on gRPC answers. Progress goes to
        # stderr, so stdout is muted while serving.
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            try:
                port = self.server.start()
                address = Address(self.bind.host, port)
                tracker.client.set_tag(tracker.parent_run_id, "toolkit.oracle", address.target)
                log.info("the oracle serves on %s; parent run %s", address, tracker.parent_run_id)
                self._serve(tuner, tracker)
                finished = True
            finally:
                # After a finished search the workers leave by themselves (TensorFlow takes
                # seconds to shut down): the caller waits for them while the search is summarized.
                if self.workers is not None and not finished:
                    self.workers.stop()
                self.server.stop()
        if self.server.servicer.failure is not None:
            # run_search reports KerasTuner's "consecutive failures" as the search's stop reason.
            raise self.server.servicer.failure
        completed = {tid for tid, t in oracle.trials.items() if t.status == Status.COMPLETED}
        tracker.close_stale_trials(completed)  # a worker lost after its trial ended left the run open

    def _serve(self, tuner: Any, tracker: tracking.SearchTracker) -> None:
        servicer = self.server.servicer
        while True:
            if self.workers is not None:
                for tuner_id, code in self.workers.exited():
                    if code != 0:
                        self._lose(servicer, tracker, tuner_id, f"exited with code {code}")
            for tuner_id in servicer.expired(self.lease):
                self._lose(servicer, tracker, tuner_id, f"sent no heartbeat for {self.lease:g}s ({ENV_WORKER_LEASE})")
            self._report(servicer, tuner)
            if servicer.done():
                break
            if self.workers is not None and self.workers.all_exited():
                raise RuntimeError(
                    f"all {self.workers.n} local workers stopped before the search finished; their errors are above"
                )
            time.sleep(0.25)
        self._report(servicer, tuner)

    def _report(self, servicer: _Servicer, tuner: Any) -> None:
        if self.on_trial is None:
            servicer.take_ended()
            return
        objective = tuner.oracle.objective.name
        for ended in servicer.take_ended():
            trial = ended.trial
            status = tuning.STATUS.get(trial.status, "FAILED")
            metrics, best_epoch = tuning._trial_metrics(trial, objective)
            failure = tuning._failure_reason(trial.message) if status != "FINISHED" else None
            self.on_trial(
                tuning.TrialResult(
                    trial.trial_id, status, dict(trial.hyperparameters.values), metrics, best_epoch, ended.seconds, failure
                )
            )

    def _lose(self, servicer: _Servicer, tracker: tracking.SearchTracker, tuner_id: str, why: str) -> None:
        reason = f"worker {tuner_id} {why}"
        trial = servicer.reclaim(tuner_id, reason)
        self.lost[tuner_id] = why
        if trial is None:
            log.warning("%s; it held no trial", reason)
            return
        retried = trial.status == Status.INVALID
        outcome = (
            "the oracle hands the trial to another worker"
            if retried
            else "the trial is FAILED (no retries left: tuner.max_retries_per_trial)"
        )
        log.warning("%s during trial %s; %s", reason, trial.trial_id, outcome)
        for run in tracker.trial_runs(status="RUNNING"):
            tags = run.data.tags
            if tags.get("toolkit.trial_id") == trial.trial_id and tags.get("toolkit.worker") == tuner_id:
                tracker.end_trial(
                    run.info.run_id, "KILLED" if retried else "FAILED", failure=f"{reason} during this trial; {outcome}"
                )


def run_chief(
    cfg: ExperimentConfig,
    bind: Address,
    *,
    fresh: bool = False,
    uri: str | None = None,
    workdir: Path | None = None,
    on_trial: Callable[[tuning.TrialResult], None] | None = None,
    workers: LocalWorkers | None = None,
) -> tuning.SearchResult:
    """Run the chief: create (or resume) the search's parent run and serve the oracle until the workers finish.

    Args:
        cfg: The validated card.
        bind: Where the oracle listens (port 0: a free port).
        fresh: Start a new search instead of resuming. Defaults to False.
        uri: The tracking URI. Defaults to :func:`toolkit.tracking.tracking_uri`.
        workdir: KerasTuner's project folder. Defaults to :func:`toolkit.tuner.project_dir`.
        on_trial: Called with each trial that reached its final status.
        workers: Local workers (already started) to watch. Defaults to none.

    Returns:
        The search, summarized after the last worker left.
    """
    # KerasTuner reads these when the tuner is built: the chief keeps the real oracle and saves it.
    os.environ.update({ENV_TUNER_ID: "chief", ENV_ORACLE_IP: bind.host, ENV_ORACLE_PORT: str(bind.port)})
    chief = Chief(bind, on_trial=on_trial, workers=workers)
    return tuning.run_search(cfg, fresh=fresh, uri=uri, workdir=workdir, serve=chief)


# ---------------------------------------------------------------------------------------- worker


def handshake(oracle: Address, tuner_id: str, timeout: float) -> dict[str, str]:
    """Wait for the chief's oracle and receive the search to join.

    Args:
        oracle: The chief's address.
        tuner_id: This worker's id.
        timeout: Seconds to wait for the chief.

    Returns:
        ``parent_run_id``, ``search_id``, ``tracking_uri`` and ``workdir`` of the chief.

    Raises:
        ChiefUnreachable: When the chief does not answer in time, or is not a toolkit chief.
    """
    # gRPC backs off up to 2 minutes between attempts to connect; a worker waiting for a chief
    # that is still starting should notice it within a second.
    options = [
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.min_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
    channel = grpc.insecure_channel(oracle.target, options=options)
    try:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise ChiefUnreachable(
                f"could not reach the chief's oracle at {oracle} within {timeout:g}s ({ENV_ORACLE_TIMEOUT}). "
                f"Check that `toolkit tune EXP --role chief --bind {oracle}` is running and that this host can reach that address and port"
            ) from None
        stub = protos.get_service_grpc().OracleStub(channel)
        _, call = stub.GetSpace.with_call(
            protos.get_service().GetSpaceRequest(), metadata=((_META_TUNER, tuner_id),), timeout=timeout
        )
        trailing = dict(call.trailing_metadata() or ())
    except grpc.RpcError as exc:
        raise ChiefUnreachable(f"the chief's oracle at {oracle} did not answer: {_rpc_error(exc)}") from None
    finally:
        channel.close()
    if _META_HELLO not in trailing:
        raise ChiefUnreachable(
            f"the oracle at {oracle} sent no search to join: start the chief with `toolkit tune EXP --role chief --bind {oracle}`"
        )
    return json.loads(trailing[_META_HELLO])


def _rpc_error(exc: grpc.RpcError) -> str:
    code = getattr(exc, "code", lambda: None)()
    details = getattr(exc, "details", lambda: "")()
    return f"{code.name if code else 'error'}: {details}"


class _Heartbeat:
    """Tells the chief this worker is alive, from a daemon thread, even during a long epoch
    (KerasTuner's workers speak to the chief only between trials)."""

    def __init__(self, oracle: Address, tuner_id: str, every: float = HEARTBEAT_EVERY) -> None:
        self.oracle = oracle
        self.tuner_id = tuner_id
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{tuner_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.every + 1)

    def _run(self) -> None:
        channel = grpc.insecure_channel(self.oracle.target)
        stub = protos.get_service_grpc().OracleStub(channel)
        meta = ((_META_TUNER, self.tuner_id), (_META_HEARTBEAT, "1"))
        try:
            while True:
                try:
                    stub.GetSpace(protos.get_service().GetSpaceRequest(), metadata=meta, timeout=self.every)
                except grpc.RpcError:
                    pass  # the worker's own next call to the chief reports a lost chief, with its deadline
                if self._stop.wait(self.every):
                    return
        finally:
            channel.close()


def limit_threads() -> None:
    """Apply ``TF_NUM_INTRAOP_THREADS``/``TF_NUM_INTEROP_THREADS`` before TensorFlow starts its runtime,
    so N workers on one machine share its cores instead of each taking all of them."""
    import tensorflow as tf

    for name, setter in (
        ("TF_NUM_INTRAOP_THREADS", tf.config.threading.set_intra_op_parallelism_threads),
        ("TF_NUM_INTEROP_THREADS", tf.config.threading.set_inter_op_parallelism_threads),
    ):
        value = os.environ.get(name)
        if value and value.isdigit():
            try:
                setter(int(value))
            except RuntimeError as exc:  # the runtime already started: too late to change
                log.warning("could not apply %s=%s: %s", name, value, exc)


def run_worker(cfg: ExperimentConfig, oracle: Address, tuner_id: str) -> tuning.SearchResult:
    """Run trials for the chief at ``oracle`` until it says stop, nested under its parent run.

    Args:
        cfg: The card; it must be the chief's (``tuner.max_trials`` and ``tracking`` may differ).
        oracle: The chief's address.
        tuner_id: This worker's id, unique in the search.

    Returns:
        The search as this worker saw it.

    Raises:
        ChiefUnreachable: When the chief cannot be reached in ``TOOLKIT_ORACLE_TIMEOUT`` seconds.
        ConfigError: When the card is not the chief's (checked against the parent run's search id).
    """
    timeout = _env_seconds(ENV_ORACLE_TIMEOUT, DEFAULT_ORACLE_TIMEOUT)
    limit_threads()
    hello = handshake(oracle, tuner_id, timeout)
    # The card is checked against the parent's search id once the data is loaded (the task it
    # infers is part of the search).
    # A worker logs where it is told to; one told nothing logs where the chief does.
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or hello["tracking_uri"]
    if uri.startswith("sqlite:"):
        log.warning(
            "worker %s logs straight to SQLite (%s): several processes on one SQLite file can fail with 'database is locked'; use an MLflow server",
            tuner_id,
            uri,
        )
    # The chief's folder is shared when it exists here (same machine or a shared file system), so
    # the chief finds the workers' checkpoints; otherwise the worker keeps its own.
    workdir = Path(hello["workdir"]) if Path(hello["workdir"]).is_dir() else None
    os.environ.update({ENV_TUNER_ID: tuner_id, ENV_ORACLE_IP: oracle.host, ENV_ORACLE_PORT: str(oracle.port)})
    # KerasTuner waits up to an hour on each call to the chief (oracle_client.TIMEOUT, read at call
    # time): bound it, so a worker whose chief died stops instead of hanging.
    oracle_client.TIMEOUT = timeout
    beat = _Heartbeat(oracle, tuner_id)
    beat.start()
    try:
        return tuning.run_search(cfg, uri=uri, workdir=workdir, parent_run_id=hello["parent_run_id"])
    except grpc.RpcError as exc:
        raise ChiefUnreachable(f"worker {tuner_id} lost the chief's oracle at {oracle}: {_rpc_error(exc)}") from None
    finally:
        beat.stop()


# ---------------------------------------------------------------------------------------- local


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM a child's process group (it started its own session), then SIGKILL after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


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

    def start(self, oracle: Address, uri: str) -> None:
        """Start the workers against the oracle at ``oracle``, logging to ``uri``."""
        threads = str(max(1, _cores() // self.n))
        for i in range(self.n):
            tuner_id = f"tuner{i}"
            env = {
                **os.environ,
                ENV_TUNER_ID: tuner_id,
                ENV_ORACLE_IP: oracle.host,
                ENV_ORACLE_PORT: str(oracle.port),
                "MLFLOW_TRACKING_URI": uri,
                "PYTHONUNBUFFERED": "1",
            }
            env.setdefault(ENV_ORACLE_TIMEOUT, "600")
            for name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS"):
                env.setdefault(name, threads)
            sets = [arg for kv in self.overrides for arg in ("--set", kv)]
            # tracking.uri is outside the search id, so this keeps the card's search and points
            # the worker at the chief's store even when the card names another.
            cmd = [
                sys.executable,
                "-m",
                "toolkit.cli",
                "tune",
                self.exp,
                *sets,
                "--set",
                f"tracking.uri={uri}",
                "--role",
                "worker",
                "--oracle",
                oracle.target,
            ]
            if self.verbose:
                cmd.append("--verbose")
            # A session of its own: Ctrl-C reaches only the launcher, which stops workers in order.
            proc = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if self.verbose else subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
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

    def all_exited(self) -> bool:
        return bool(self.procs) and all(proc.poll() is not None for proc in self.procs.values())

    def stop(self, graceful: bool = False) -> None:
        """Stop every worker: wait for them when the search finished, else SIGTERM (runs are marked KILLED) then SIGKILL.

        Args:
            graceful: The search finished and workers are leaving by themselves. Defaults to False.
        """
        deadline = time.monotonic() + 60
        if not graceful:
            self._stopping.set()  # "interrupted: ..." from each worker would only repeat the launcher's message
        try:
            for proc in self.procs.values():
                if graceful:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                _stop_group(proc, grace=20)
        except KeyboardInterrupt:  # interrupted while waiting: stop the rest at once
            for proc in self.procs.values():
                _stop_group(proc, grace=5)
            raise
        for tuner_id, code in self.exited():
            if code != 0 and graceful:
                log.warning("worker %s exited with code %d after the search", tuner_id, code)
        for relay in self._relays:
            relay.join(timeout=2)


def _relay(stream: IO[bytes], prefix: str, mute: threading.Event) -> None:
    """Copy a worker's output to ours, line by line, with its id in front, until ``mute`` is set."""
    with stream:
        for line in iter(stream.readline, b""):
            if not mute.is_set():
                sys.stderr.write(prefix + line.decode(errors="replace"))
                sys.stderr.flush()


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
        cmd = [
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
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.log_path, "wb") as out:
            self._proc = subprocess.Popen(
                cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
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

    def stop(self) -> None:
        if self._proc is not None:
            _stop_group(self._proc, grace=10)
            self._proc = None


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
    # Picked now so that the server, the workers and the chief all start at once.
    oracle = Address("127.0.0.1", _free_port())
    workers = LocalWorkers(n, exp, overrides, verbose=verbose)
    finished = False
    try:
        if server is not None:
            uri = server.launch()
        workers.start(oracle, uri)
        if server is not None:
            server.wait()
        result = run_chief(cfg, oracle, fresh=fresh, uri=uri, workdir=workdir, on_trial=on_trial, workers=workers)
        finished = True
        return result
    finally:
        try:
            workers.stop(graceful=finished)  # after a finished search they are leaving by themselves
        finally:
            if server is not None:
                server.stop()
