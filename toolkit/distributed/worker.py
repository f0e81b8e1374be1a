"""The worker: the handshake with the chief, heartbeats, and trials run until the chief says stop.

Every call to the chief, KerasTuner's own included, carries the search's token and this worker's
id (:func:`~toolkit.distributed.auth.connect`); reports on a trial carry the key the chief handed
out with it. Each trial's values are checked against this worker's own card before it is built.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from keras_tuner.src import protos
from keras_tuner.src.distribute import oracle_client
from keras_tuner.src.engine import trial as trial_module

from toolkit import tracking
from toolkit import tuner as tuning
from toolkit.config import ExperimentConfig
from toolkit.distributed.address import (
    DEFAULT_ORACLE_TIMEOUT,
    ENV_ORACLE_IP,
    ENV_ORACLE_PORT,
    ENV_ORACLE_TIMEOUT,
    ENV_TUNER_ID,
    HEARTBEAT_EVERY,
    Address,
    ChiefUnreachable,
    _env_seconds,
)
from toolkit.distributed.auth import META_HEARTBEAT, META_HELLO, META_TRIAL_KEY, ClientTLS, connect
from toolkit.distributed.checks import check_values
from toolkit.distributed.processes import ENV_PARENT_PID, parent_gone
from toolkit.security import redact_uri

log = logging.getLogger(__name__)

# Set by the local launcher only: where its workers log (its own loopback server) and the store
# whose folders they may share with the chief.
ENV_WORKER_URI = "TOOLKIT_WORKER_TRACKING_URI"
ENV_WORKER_STORE = "TOOLKIT_WORKER_STORE"

CHIEF_GONE = "the chief is gone (its process died): this worker stopped; rerun the chief's command to resume"
# Once the chief is gone, how long the worker may take to close its own runs before it exits anyway.
FAREWELL = 8.0


class ChiefGone(KeyboardInterrupt):
    """The worker stops because its chief died; ``reason`` is what its open runs are closed with."""

    reason = CHIEF_GONE


_gone = threading.Event()


def _leave_for_a_dead_chief() -> None:
    """Stop this worker for good: its runs are closed KILLED with :data:`CHIEF_GONE`, quickly, and it exits."""
    if _gone.is_set():
        return
    _gone.set()
    os.environ["TOOLKIT_STOP_REASON"] = CHIEF_GONE  # read where the worker closes its runs (join_search)
    # The chief's private tracking server dies with it: no minutes of MLflow retries.
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "3"

    def _exit_anyway() -> None:
        time.sleep(FAREWELL)
        os._exit(130)

    threading.Thread(target=_exit_anyway, name="farewell", daemon=True).start()


def _parent_dies_soon(wait: float = 0.5) -> bool:
    """Whether a local worker's launcher is gone, or goes within ``wait`` seconds (a SIGTERM from the
    kernel can arrive a moment before this process sees its new parent)."""
    if not os.environ.get(ENV_PARENT_PID, "").isdigit():
        return False
    deadline = time.monotonic() + wait
    while not parent_gone():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _on_signal(signum: int, frame: Any) -> None:
    if _gone.is_set() or parent_gone() or (signum == signal.SIGTERM and _parent_dies_soon()):
        _leave_for_a_dead_chief()
        raise ChiefGone(CHIEF_GONE)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def handshake(
    oracle: Address, tuner_id: str, timeout: float, *, token: str | None = None, tls: ClientTLS | None = None
) -> dict[str, str]:
    """Wait for the chief's oracle and receive the search to join.

    Args:
        oracle: The chief's address.
        tuner_id: This worker's id.
        timeout: Seconds to wait for the chief.
        token: The search's token. Defaults to None (a chief started with ``--insecure``).
        tls: The CA that signed the chief's certificate. Defaults to None (plain TCP).

    Returns:
        ``parent_run_id``, ``search_id`` and ``workdir`` of the chief (no credentials).

    Raises:
        ChiefUnreachable: When the chief does not answer in time, refuses the token, or is not a
            toolkit chief.
    """
    channel = connect(oracle, token, tuner_id, tls)
    try:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            hint = " and that --tls-ca holds the CA that signed the chief's certificate" if tls is not None else ""
            raise ChiefUnreachable(
                f"could not reach the chief's oracle at {oracle} within {timeout:g}s ({ENV_ORACLE_TIMEOUT}). "
                f"Check that `toolkit tune EXP --role chief --bind {oracle}` is running and that this host can reach that address and port{hint}"
            ) from None
        stub = protos.get_service_grpc().OracleStub(channel)
        _, call = stub.GetSpace.with_call(protos.get_service().GetSpaceRequest(), timeout=timeout)
        trailing = dict(call.trailing_metadata() or ())
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise ChiefUnreachable(
                f"the chief's oracle at {oracle} refused this worker's token: set TOOLKIT_ORACLE_TOKEN (or --token-file) "
                "to the token the chief was started with"
            ) from None
        raise ChiefUnreachable(f"the chief's oracle at {oracle} did not answer: {_rpc_error(exc)}") from None
    finally:
        channel.close()
    if META_HELLO not in trailing:
        raise ChiefUnreachable(
            f"the oracle at {oracle} sent no search to join: start the chief with `toolkit tune EXP --role chief --bind {oracle}`"
        )
    return json.loads(trailing[META_HELLO])


def _rpc_error(exc: grpc.RpcError) -> str:
    code = getattr(exc, "code", lambda: None)()
    details = getattr(exc, "details", lambda: "")()
    return f"{code.name if code else 'error'}: {details}"


class _Heartbeat:
    """Tells the chief this worker is alive, from a daemon thread, even during a long epoch
    (KerasTuner's workers speak to the chief only between trials)."""

    def __init__(
        self,
        oracle: Address,
        tuner_id: str,
        every: float = HEARTBEAT_EVERY,
        *,
        token: str | None = None,
        tls: ClientTLS | None = None,
    ) -> None:
        self.oracle = oracle
        self.tuner_id = tuner_id
        self.every = every
        self.token = token
        self.tls = tls
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{tuner_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.every + 1)

    def _run(self) -> None:
        channel = connect(self.oracle, self.token, self.tuner_id, self.tls)
        stub = protos.get_service_grpc().OracleStub(channel)
        meta = ((META_HEARTBEAT, "1"),)
        try:
            while True:
                try:
                    stub.GetSpace(protos.get_service().GetSpaceRequest(), metadata=meta, timeout=self.every)
                except grpc.RpcError:
                    pass  # the worker's own next call to the chief reports a lost chief, with its deadline
                next_beat = time.monotonic() + self.every
                while time.monotonic() < next_beat:
                    if parent_gone():  # a local worker whose launcher died (the portable fallback)
                        if not _gone.is_set():  # else the kernel's SIGTERM is already being handled
                            log.warning("worker %s: the chief is gone; stopping", self.tuner_id)
                            _leave_for_a_dead_chief()
                            os.kill(os.getpid(), signal.SIGTERM)
                        return
                    if self._stop.wait(min(0.5, self.every)):
                        return
        finally:
            channel.close()


class WorkerClient(oracle_client.OracleClient):
    """KerasTuner's worker-side oracle client, over a channel that carries the token and the tuner id.

    It also keeps the key each trial came with (reports on the trial must show it), and vets each
    trial's values against this worker's own space (``check_trial``, called by the tracked tuner
    before it builds a model).

    Use :func:`worker_client` to give KerasTuner this class in place of its own.

    Args:
        oracle: The worker's local oracle (its space is the card's, built here).
    """

    oracle_address: Address | None = None
    token: str | None = None
    tls: ClientTLS | None = None

    def __init__(self, oracle: Any) -> None:  # not super(): KerasTuner's opens a plain channel
        self._oracle = oracle
        self.tuner_id = os.environ[ENV_TUNER_ID]
        address = self.oracle_address or Address(os.environ[ENV_ORACLE_IP], int(os.environ[ENV_ORACLE_PORT]))
        self._channel = connect(address, self.token, self.tuner_id, self.tls)
        self.stub = protos.get_service_grpc().OracleStub(self._channel)
        self.multi_worker = False
        self.should_report = True
        self._keys: dict[str, str] = {}

    def _key(self, trial_id: str) -> tuple[tuple[str, str], ...]:
        key = self._keys.get(trial_id)
        return ((META_TRIAL_KEY, key),) if key else ()

    def _lost(self, exc: grpc.RpcError) -> Exception:
        """A readable error for a chief that stopped answering, else ``exc`` itself."""
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return ChiefUnreachable(f"worker {self.tuner_id} lost the chief's oracle: {_rpc_error(exc)}")
        return exc

    def create_trial(self, tuner_id: str) -> Any:
        try:
            return self._create_trial(tuner_id)
        except grpc.RpcError as exc:
            raise self._lost(exc) from None

    def update_trial(self, trial_id: str, metrics: dict[str, float], step: int = 0) -> Any:
        try:
            return self._update_trial(trial_id, metrics, step)
        except grpc.RpcError as exc:
            raise self._lost(exc) from None

    def end_trial(self, trial: Any) -> None:
        try:
            self._end_trial(trial)
        except grpc.RpcError as exc:
            raise self._lost(exc) from None

    def _create_trial(self, tuner_id: str) -> Any:
        response, call = self.stub.CreateTrial.with_call(
            protos.get_service().CreateTrialRequest(tuner_id=tuner_id), wait_for_ready=True, timeout=oracle_client.TIMEOUT
        )
        trial = trial_module.Trial.from_proto(response.trial)
        key = dict(call.trailing_metadata() or ()).get(META_TRIAL_KEY)
        if key:
            self._keys[trial.trial_id] = key
        return trial

    def _update_trial(self, trial_id: str, metrics: dict[str, float], step: int = 0) -> Any:
        response = self.stub.UpdateTrial(
            protos.get_service().UpdateTrialRequest(trial_id=trial_id, metrics=metrics, step=step),
            metadata=self._key(trial_id),
            wait_for_ready=True,
            timeout=oracle_client.TIMEOUT,
        )
        return trial_module.Trial.from_proto(response.trial)

    def _end_trial(self, trial: Any) -> None:
        self.stub.EndTrial(
            protos.get_service().EndTrialRequest(trial=trial.to_proto()),
            metadata=self._key(trial.trial_id),
            wait_for_ready=True,
            timeout=oracle_client.TIMEOUT,
        )
        self._keys.pop(trial.trial_id, None)

    def check_trial(self, trial: Any) -> str | None:
        """Why this worker must not build ``trial`` (values outside its card's space), or None."""
        reason = check_values(self._oracle.hyperparameters, trial.hyperparameters.values)
        if reason is not None:
            log.warning("worker %s refuses trial %s: %s", self.tuner_id, trial.trial_id, reason)
        return reason

    def close(self) -> None:
        self._channel.close()


@contextlib.contextmanager
def worker_client(oracle: Address, token: str | None = None, tls: ClientTLS | None = None) -> Iterator[type[WorkerClient]]:
    """Make KerasTuner build :class:`WorkerClient` (for ``oracle``, with ``token`` and ``tls``) for a block.

    KerasTuner's tuner creates its ``OracleClient`` itself, from ``keras_tuner.src.distribute.
    oracle_client``; it is swapped there for the block and put back after.
    """
    cls = type("WorkerClient", (WorkerClient,), {"oracle_address": oracle, "token": token, "tls": tls})
    saved = oracle_client.OracleClient
    oracle_client.OracleClient = cls
    try:
        yield cls
    finally:
        oracle_client.OracleClient = saved


def _own_workdir(offered: str | None, store: Path) -> Path | None:
    """The chief's folder when it exists here and lies under this worker's store, else None."""
    if not offered:
        return None
    try:
        folder = Path(offered).resolve()
        root = store.resolve()
    except (OSError, RuntimeError):
        return None
    if folder.is_dir() and folder.is_relative_to(root):
        return folder
    log.warning("the chief's folder %s is not under this worker's store %s: the worker keeps its own", folder, root)
    return None


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


def run_worker(
    cfg: ExperimentConfig, oracle: Address, tuner_id: str, *, token: str | None = None, tls: ClientTLS | None = None
) -> tuning.SearchResult:
    """Run trials for the chief at ``oracle`` until it says stop, nested under its parent run.

    Args:
        cfg: The card; it must be the chief's (``tuner.max_trials`` and ``tracking`` may differ).
        oracle: The chief's address.
        tuner_id: This worker's id, unique in the search.
        token: The search's token. Defaults to None (a chief started with ``--insecure``).
        tls: The CA that signed the chief's certificate. Defaults to None (plain TCP).

    Returns:
        The search as this worker saw it.

    Raises:
        ChiefUnreachable: When the chief cannot be reached in ``TOOLKIT_ORACLE_TIMEOUT`` seconds.
        ConfigError: When the card is not the chief's (checked against the parent run's search id).
    """
    timeout = _env_seconds(ENV_ORACLE_TIMEOUT, DEFAULT_ORACLE_TIMEOUT)
    limit_threads()
    hello = handshake(oracle, tuner_id, timeout, token=token, tls=tls)
    # The card is checked against the parent's search id once the data is loaded (the task it
    # infers is part of the search).
    # A worker logs where its own settings say (the launcher's server for a local worker): the
    # chief sends no URI, since a URI can hold credentials.
    own = tracking.tracking_uri(cfg)
    uri = os.environ.get(ENV_WORKER_URI) or own
    if uri.startswith("sqlite:"):
        log.warning(
            "worker %s logs straight to SQLite (%s): several processes on one SQLite file can fail with 'database is locked'; use an MLflow server",
            tuner_id,
            redact_uri(uri),
        )
    # The chief's folder is shared when it exists here (same machine or a shared file system) and
    # lies under this worker's own store, so the chief finds the workers' checkpoints; otherwise
    # the worker keeps its own. A chief cannot make a worker write anywhere else.
    store = Path(os.environ.get(ENV_WORKER_STORE) or tracking.store_dir(own))
    workdir = _own_workdir(hello.get("workdir"), store)
    os.environ.update({ENV_TUNER_ID: tuner_id, ENV_ORACLE_IP: oracle.host, ENV_ORACLE_PORT: str(oracle.port)})
    # KerasTuner waits up to an hour on each call to the chief (oracle_client.TIMEOUT, read at call
    # time): bound it, so a worker whose chief died stops instead of hanging.
    oracle_client.TIMEOUT = timeout
    # SIGTERM (and SIGHUP) from the kernel when a local launcher dies (PR_SET_PDEATHSIG), or from
    # the heartbeat's own watch: the runs say the chief is gone, not "interrupted".
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and threading.current_thread() is threading.main_thread():
            signal.signal(sig, _on_signal)
    beat = _Heartbeat(oracle, tuner_id, token=token, tls=tls)
    beat.start()
    try:
        with worker_client(oracle, token, tls):
            return tuning.run_search(cfg, uri=uri, workdir=workdir, parent_run_id=hello["parent_run_id"])
    except grpc.RpcError as exc:
        raise ChiefUnreachable(f"worker {tuner_id} lost the chief's oracle at {oracle}: {_rpc_error(exc)}") from None
    finally:
        beat.stop()
