"""The chief's oracle over gRPC: KerasTuner's servicer with leases, lingering, the handshake and a lock that survives errors.

It trusts no client beyond its own trial:

- every call must carry the search's token (:class:`~toolkit.distributed.auth.TokenCheck`);
- each trial handed out comes with a key, and only the tuner id that took it, showing that key,
  may report on it (``UpdateTrial``, ``EndTrial``); others get ``PERMISSION_DENIED``;
- a client that took a trial is leased from then on: if it goes silent, its trial is written off;
- a reported trial keeps the values the chief handed out, and they must lie in the card's space;
- one client's run of FAILED reports cannot stop the search while other workers are there: that
  client is written off instead, and the trial is retried by another worker.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from keras_tuner.src import protos
from keras_tuner.src.distribute import oracle_chief
from keras_tuner.src.engine import metrics_tracking
from keras_tuner.src.engine import oracle as oracle_module
from keras_tuner.src.engine import trial as trial_module

from toolkit.distributed.address import Address
from toolkit.distributed.auth import META_HEARTBEAT, META_HELLO, META_TRIAL_KEY, META_TUNER, ServerTLS, TokenCheck
from toolkit.distributed.checks import check_values

log = logging.getLogger(__name__)

# How long an idle worker waits before asking again while other trials run (its answer is IDLE).
LINGER = 1.0

Status = trial_module.TrialStatus


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


def _write_whole(path: str, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: a new file, renamed over the old one."""
    part = f"{path}.{threading.get_ident()}.part"
    with open(part, "w") as out:
        out.write(text)
    os.replace(part, path)


class _LocalSaves:
    """The chief's oracle writes its state with plain file calls while it serves: the same files, at the same moments.

    KerasTuner saves the whole ``oracle.json`` in every ``create_trial`` and ``end_trial``, and a
    trial's ``trial.json`` on every report, all under the oracle's lock and through
    ``tf.io.gfile`` (which also re-creates the project folder on every call). Under 64 workers
    those saves were half of the lock's hold (``benchmarks/p12_chief.py``). Here each save still
    happens where KerasTuner makes it, before the call returns, so what a killed chief leaves on
    disk is what it left before; each file is now written in one call and renamed into place, so
    a kill during a write leaves the previous version rather than half a file. Folders are made
    once. Remote folders (``gs://``) keep KerasTuner's own saves.

    Args:
        oracle: The chief's oracle.
    """

    def __init__(self, oracle: Any) -> None:
        self.oracle = oracle
        directory = str(getattr(oracle, "_directory", None) or "")
        if not directory or "://" in directory:
            return
        self._project = os.path.join(directory, oracle._project_name)
        self._folders: set[str] = set()
        oracle.save = self.save
        oracle._save_trial = self.save_trial

    def _folder(self, path: str) -> str:
        if path not in self._folders:
            os.makedirs(path, exist_ok=True)
            self._folders.add(path)
        return path

    def save(self) -> None:
        _write_whole(os.path.join(self._folder(self._project), "oracle.json"), json.dumps(self.oracle.get_state()))

    def save_trial(self, trial: Any) -> None:
        folder = self._folder(os.path.join(self._project, f"trial_{trial.trial_id}"))
        _write_whole(os.path.join(folder, "trial.json"), json.dumps(trial.get_state()))


@contextlib.contextmanager
def _one_save(oracle: Any) -> Iterator[None]:
    """Hold back the oracle's own saves of ``oracle.json`` inside the block; the caller saves once after it."""
    saved = oracle.__dict__.get("save")
    oracle.save = lambda: None
    try:
        yield
    finally:
        if saved is None:
            del oracle.save
        else:
            oracle.save = saved


@functools.lru_cache(maxsize=256)
def _direction_of_name(name: str) -> str | None:
    return _infer_metric_direction(name)


def _metric_direction(metric: Any) -> str | None:
    """KerasTuner's direction of a metric, remembered by name.

    For a name such as ``accuracy`` KerasTuner builds a Keras metric (TensorFlow variables and
    all) to read its direction; the chief did that on every trial's first report, under the
    oracle's lock. The answer depends on the name only.
    """
    return _direction_of_name(metric) if isinstance(metric, str) else _infer_metric_direction(metric)


_infer_metric_direction = metrics_tracking.infer_metric_direction
metrics_tracking.infer_metric_direction = _metric_direction


@dataclass
class _Ended:
    """A trial that reached its final status (COMPLETED or FAILED), for the progress display."""

    trial: Any
    seconds: float


class _Servicer(oracle_chief.OracleServicer):
    """KerasTuner's servicer, plus leases, lingering, the handshake, trial ownership and a lock that survives errors."""

    def __init__(self, oracle: Any, hello: bytes) -> None:
        super().__init__(oracle)
        self.saves = _LocalSaves(oracle)
        self.hello = hello
        self.lock = threading.Lock()  # guards the fields below; never held while waiting on the oracle
        self.last_seen: dict[str, float] = {}
        self.leased: set[str] = set()  # clients that sent a heartbeat or took a trial: these can miss their lease
        self.started: dict[str, float] = {}
        self.ended: list[_Ended] = []
        self.failure: RuntimeError | None = None
        # Trial id → (tuner id, key) of the client running it; keys of earlier holders are retired,
        # so a lost worker's late report is ignored, not refused.
        self.keys: dict[str, tuple[str, str]] = {}
        self.retired: dict[str, set[str]] = {}
        self.failed_streak: dict[str, int] = {}  # tuner id → FAILED reports in a row
        self.banned: dict[str, str] = {}  # tuner id → why it was written off
        self.stopping = False  # set when the chief stops (Ctrl-C, SIGTERM, an error): no new trial is handed out
        # Trials a previous chief left running (a resume): their clients are leased from now, so
        # one that never comes back has its trial written off instead of holding the search.
        now = time.monotonic()
        for tuner_id in getattr(oracle, "ongoing_trials", {}):
            self.last_seen[tuner_id] = now
            self.leased.add(tuner_id)

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

    def _retire(self, trial_id: str) -> None:
        with self.lock:
            held = self.keys.pop(trial_id, None)
            if held is not None:
                self.retired.setdefault(trial_id, set()).add(held[1])

    def _caller(self, trial_id: str, context: Any) -> tuple[str | None, bool]:
        """Who reports on ``trial_id``: its owner (call with the oracle's lock held).

        Returns:
            The owner's tuner id (None when no client runs the trial) and whether the report is
            late (a key this trial had before its worker was written off).

        Aborts:
            ``PERMISSION_DENIED`` when the caller is not the client that was given the trial.
        """
        meta = dict(context.invocation_metadata() or ())
        caller, key = meta.get(META_TUNER, ""), meta.get(META_TRIAL_KEY, "")
        owner = self._owner(trial_id)
        with self.lock:
            held = self.keys.get(trial_id)
            retired = self.retired.get(trial_id, set())
        if owner is not None and held is not None and caller == held[0] == owner and hmac.compare_digest(key, held[1]):
            return owner, False
        if any(hmac.compare_digest(key, old) for old in retired):
            return None, True
        context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"trial {trial_id} is not this client's: only the worker that was given a trial may report on it",
        )
        raise AssertionError("unreachable")  # context.abort raises

    def _end(self, trial: Any, owner: str) -> None:
        """End a trial in the oracle (call with the oracle's lock held)."""
        self._retire(trial.trial_id)
        try:
            # KerasTuner saves before it drops the trial from ongoing_trials. Its save is held
            # back and made once the trial is dropped, so a resume does not find the ended trial
            # "ongoing" and run it again.
            with _one_save(self.oracle):
                self.oracle.end_trial(trial)
            self.oracle.save()
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

    def _others(self, tuner_id: str) -> set[str]:
        """The other clients still in the search (call with the oracle's lock held)."""
        with self.lock:
            alive = set(self.last_seen) | set(self.oracle.tuner_ids) | set(self.oracle.ongoing_trials)
            return alive - {tuner_id} - set(self.banned)

    def _vet(self, trial: Any, owner: str, context: Any) -> None:
        """Check a reported trial before it reaches the oracle (call with the oracle's lock held).

        Its values must be the ones the chief handed out (a client may add the values of
        parameters its build declared, never change one), and lie in the card's space. One
        client's run of FAILED reports, while other clients are there, writes that client off.
        """
        stored = self.oracle.trials[trial.trial_id].hyperparameters.values
        incoming = trial.hyperparameters.values
        changed = [f"{k}={incoming.get(k)!r} (handed out {v!r})" for k, v in stored.items() if incoming.get(k, v) != v]
        if changed:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"trial {trial.trial_id} came back with values the chief did not hand out: {', '.join(changed)}",
            )
        for name, value in stored.items():  # a trial that lost a value keeps the chief's
            trial.hyperparameters.values.setdefault(name, value)
        space = self.oracle.hyperparameters
        known = {hp.name for hp in space.space}
        reason = check_values(space, {k: v for k, v in trial.hyperparameters.values.items() if k in known})
        if reason is not None and trial.status != Status.FAILED:
            log.warning("trial %s from %s: %s; it is FAILED", trial.trial_id, owner, reason)
            trial.status, trial.message = Status.FAILED, reason
        if trial.status == Status.FAILED:
            with self.lock:
                streak = self.failed_streak[owner] = self.failed_streak.get(owner, 0) + 1
            limit = self.oracle.max_consecutive_failed_trials
            if limit and streak >= limit and self._others(owner):
                why = f"reported {streak} failed trials in a row while other workers were running"
                log.warning("worker %s %s: it is written off and trial %s is retried", owner, why, trial.trial_id)
                with self.lock:
                    self.banned[owner] = why
                self.oracle.tuner_ids.discard(owner)
                trial.status = Status.INVALID
                trial.message = f"worker {owner} {why}; it was written off and the trial is retried"
        else:
            with self.lock:
                self.failed_streak[owner] = 0

    # ----------------------------------------------------------------- gRPC methods

    def GetSpace(self, request: Any, context: Any) -> Any:
        meta = dict(context.invocation_metadata() or ())
        self._seen(meta.get(META_TUNER), heartbeat=True)
        if META_HEARTBEAT in meta:  # a heartbeat needs no answer; keep it off the oracle's lock
            return protos.get_service().GetSpaceResponse()
        context.set_trailing_metadata(((META_HELLO, self.hello),))
        with _locked(self.oracle):
            return super().GetSpace(request, context)

    # KerasTuner serves one call at a time (a 1-thread pool), so its oracle's reads need no lock.
    # Here idle workers wait in their own threads, so reads take the oracle's lock too.

    def UpdateSpace(self, request: Any, context: Any) -> Any:
        # KerasTuner's merge only adds parameters the space does not have: none can be widened.
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
        claimed = dict(context.invocation_metadata() or ()).get(META_TUNER)
        if claimed is not None and claimed != tuner_id:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"this client is {claimed!r}; it cannot take trials as {tuner_id!r}")
        self._seen(tuner_id)
        linger = False
        with _locked(self.oracle):
            if self.failure is not None or self.stopping or tuner_id in self.banned:
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
            key = secrets.token_urlsafe(16)
            with self.lock:
                self.started.setdefault(trial.trial_id, time.monotonic())
                self.keys[trial.trial_id] = (tuner_id, key)
                # A client that took a trial is leased like one that sends heartbeats: if it
                # never speaks again, its trial is written off instead of holding the search.
                self.leased.add(tuner_id)
            context.set_trailing_metadata(((META_TRIAL_KEY, key),))
        return protos.get_service().CreateTrialResponse(trial=trial.to_proto())

    def UpdateTrial(self, request: Any, context: Any) -> Any:
        with _locked(self.oracle):
            owner, late = self._caller(request.trial_id, context)
            if late:  # its worker was written off as lost: ignore the late report
                trial = self.oracle.trials[request.trial_id]
            else:
                trial = self.oracle.update_trial(request.trial_id, request.metrics, step=request.step)
        self._seen(owner)
        return protos.get_service().UpdateTrialResponse(trial=trial.to_proto())

    def EndTrial(self, request: Any, context: Any) -> Any:
        trial = trial_module.Trial.from_proto(request.trial)
        with _locked(self.oracle):
            owner, late = self._caller(trial.trial_id, context)
            if not late:
                self._vet(trial, owner, context)
                self._end(trial, owner)
        if late:
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

    It can bind before the oracle exists (:meth:`listen`), so that local workers are started
    against a port this process already holds, then serve once the chief's tuner is built
    (:meth:`start`).

    Args:
        oracle: The chief tuner's oracle. Defaults to None (given to :meth:`start` later).
        bind: Where to listen; port 0 picks a free port.
        hello: What each worker receives in its handshake (parent run id, search id, ...).
        token: The shared token every call must carry. Defaults to None: no check (``--insecure``).
        tls: The chief's certificate and key. Defaults to None (plain TCP).
    """

    def __init__(
        self,
        oracle: Any = None,
        bind: Address = Address("127.0.0.1", 0),
        hello: dict[str, str] | None = None,
        *,
        token: str | None = None,
        tls: ServerTLS | None = None,
    ) -> None:
        self.bind = bind
        self.oracle = oracle
        self.hello = hello
        self.token = token
        self.tls = tls
        self.servicer: _Servicer | None = None
        self.port: int | None = None
        self._server: Any = None

    def listen(self) -> int:
        """Bind the port (once) without serving yet. Returns the port."""
        if self._server is not None:
            return self.port
        # One thread per concurrent call: idle workers hold one each while they linger.
        # No SO_REUSEPORT (gRPC's default on Linux): a second chief on the same port must fail,
        # not share the workers with the first.
        interceptors = [TokenCheck(self.token)] if self.token else []
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="oracle"),
            interceptors=interceptors,
            options=[("grpc.so_reuseport", 0)],
        )
        try:
            if self.tls is not None:
                port = server.add_secure_port(self.bind.target, self.tls.credentials())
            else:
                port = server.add_insecure_port(self.bind.target)
        except RuntimeError:  # newer grpc raises where older ones return 0
            port = 0
        if not port:
            raise RuntimeError(
                f"the chief could not listen on {self.bind}: is the port in use, or the host not an address of this machine?"
            )
        self._server, self.port = server, port
        return port

    def start(self, oracle: Any = None, hello: dict[str, str] | None = None) -> int:
        """Serve ``oracle`` (or the one given at construction) in background threads. Returns the port."""
        self.oracle = oracle if oracle is not None else self.oracle
        self.hello = hello if hello is not None else self.hello
        port = self.listen()
        self.servicer = _Servicer(self.oracle, json.dumps(self.hello or {}).encode())
        protos.get_service_grpc().add_OracleServicer_to_server(self.servicer, self._server)
        self._server.start()
        return port

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=1).wait(5)
