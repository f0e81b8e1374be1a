"""The chief: the search's parent run and the oracle served to the workers until they finish."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolkit import tracking
from toolkit import tuner as tuning
from toolkit.config import ExperimentConfig
from toolkit.distributed.address import (
    DEFAULT_WORKER_LEASE,
    ENV_ORACLE_IP,
    ENV_ORACLE_PORT,
    ENV_TUNER_ID,
    ENV_WORKER_LEASE,
    Address,
    _env_seconds,
)
from toolkit.distributed.auth import ServerTLS
from toolkit.distributed.servicer import OracleServer, Status, _locked, _Servicer
from toolkit.tuner.pruning import pruned_epoch_of

if TYPE_CHECKING:
    from toolkit.distributed.launcher import LocalWorkers
    from toolkit.distributed.server import TrackingServer

log = logging.getLogger(__name__)


class TrackingServerGone(RuntimeError):
    """The search's private tracking server exited: nothing more can be recorded, so the search stops."""


class Chief:
    """Serves the oracle in place of ``tuner.search`` (the ``serve`` hook of :func:`tuning.run_search`).

    Args:
        bind: Where the oracle listens.
        on_trial: Called with each trial that reached its final status.
        workers: Local worker processes to watch: one that exits early is written off at once.
            Defaults to none (workers on other hosts join by themselves and are leased).
        lease: Seconds without a heartbeat after which a worker is written off. Defaults to
            ``TOOLKIT_WORKER_LEASE`` or 30.
        server: An :class:`OracleServer` already bound (local mode binds before it starts its
            workers). Defaults to one made here on ``bind``.
        token: The token every RPC must carry. Defaults to None (``--insecure``).
        tls: The chief's certificate and key. Defaults to None (plain TCP).
        tracking_server: The private ``mlflow server`` the search logs through, watched while
            serving: if it exits, the search stops at once (exit 1) and the chief closes its runs
            on the server's SQLite file directly. Defaults to None.
    """

    def __init__(
        self,
        bind: Address,
        on_trial: Callable[[tuning.TrialResult], None] | None = None,
        workers: LocalWorkers | None = None,
        lease: float | None = None,
        *,
        server: OracleServer | None = None,
        token: str | None = None,
        tls: ServerTLS | None = None,
        tracking_server: TrackingServer | None = None,
    ) -> None:
        self.bind = bind
        self.tracking_server = tracking_server
        self.on_trial = on_trial
        self.workers = workers
        self.lease = lease or _env_seconds(ENV_WORKER_LEASE, DEFAULT_WORKER_LEASE)
        self.server = server or OracleServer(None, bind, token=token, tls=tls)
        self.lost: dict[str, str] = {}

    def __call__(self, tuner: Any, tracker: tracking.SearchTracker) -> None:
        oracle = tuner.oracle
        oracle.verbose = 0  # progress comes from on_trial, not KerasTuner's tables
        _drop_ended_retries(oracle)
        tuner.save()  # as KerasTuner's search does before serving
        # MLflow creates a dataset's row on first use, check-then-insert: two workers starting
        # their first trials together can both insert, and one fails on the UNIQUE constraint.
        # Logged here first, on the parent, the rows exist before any worker can start a trial.
        tracker.log_datasets(tracker.parent_run_id, tuner.dataset)
        # No credentials in the hello: workers log where their own settings say, and use the
        # folder only when it lies under their own store.
        hello = {
            "parent_run_id": tracker.parent_run_id,
            "search_id": tuning.search_id(tracker.cfg),
            "workdir": str(Path(tuner.project_dir).resolve()),
        }
        finished = False
        # KerasTuner 1.4.8 prints a conditional parameter's value each time it serializes one (a
        # stray print in conditions.Parent.to_proto), i.e. on gRPC answers. Progress goes to
        # stderr, so stdout is muted while serving.
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            try:
                port = self.server.start(oracle, hello)
                address = Address(self.bind.host, port)
                tracker.client.set_tag(tracker.parent_run_id, "toolkit.oracle", address.target)
                log.info("the oracle serves on %s; parent run %s", address, tracker.parent_run_id)
                self._serve(tuner, tracker)
                finished = True
            finally:
                # After a finished search the workers leave by themselves (TensorFlow takes
                # seconds to shut down): the caller waits for them while the search is summarized.
                if not finished and self.server.servicer is not None:
                    self.server.servicer.stopping = True  # before any worker is stopped: none takes a new trial
                if self.workers is not None and not finished:
                    # Workers whose tracking server is gone cannot close their runs: no waiting for them.
                    self.workers.stop(patience=2 if self._server_gone() else 20)
                self.server.stop()
                with contextlib.suppress(Exception), _locked(oracle):
                    oracle.save()  # what the workers ended last, and no trial left "ongoing" that ended
                if not finished:
                    # The workers are gone: what they left RUNNING is closed by the oracle's word.
                    with contextlib.suppress(Exception):
                        tracker.close_stale_trials(self._completed(tuner), self._failed(tuner))
        if self.server.servicer.failure is not None:
            # run_search reports KerasTuner's "consecutive failures" as the search's stop reason.
            raise self.server.servicer.failure
        # A worker lost after its trial ended left the run open.
        tracker.close_stale_trials(self._completed(tuner), self._failed(tuner))

    @staticmethod
    def _completed(tuner: Any) -> dict[str, dict[str, float]]:
        """Completed trial id → the oracle's summaries of it."""
        objective = tuner.oracle.objective
        direction = getattr(objective, "direction", "max")
        return {
            tid: tuning.oracle_summaries(t, objective.name, direction)
            for tid, t in tuner.oracle.trials.items()
            if t.status == Status.COMPLETED
        }

    @staticmethod
    def _failed(tuner: Any) -> dict[str, str]:
        """Failed trial id → the oracle's reason."""
        return {tid: tuning._failure_reason(t.message) for tid, t in tuner.oracle.trials.items() if t.status == Status.FAILED}

    def _server_gone(self) -> bool:
        return self.tracking_server is not None and self.tracking_server.exit_code() is not None

    def _watch_tracking(self, tracker: tracking.SearchTracker) -> None:
        """Stop the search if its private tracking server exited (killed, out of memory, a crash)."""
        if not self._server_gone():
            return
        code = self.tracking_server.exit_code()
        uri, log_path = self.tracking_server.uri, self.tracking_server.log_path
        # Whatever is left of it (uvicorn) stops first: then the chief is the database's only writer,
        # and closes the runs on it directly.
        self.tracking_server.stop()
        tracker.uri = self.tracking_server.backend_uri
        raise TrackingServerGone(
            f"the search's tracking server ({uri}) exited with code {code}, so nothing more could be recorded; "
            f"the search stops and its runs are closed on {tracker.uri}. Its log: {log_path}. "
            "Rerun the same command to resume"
        )

    def _serve(self, tuner: Any, tracker: tracking.SearchTracker) -> None:
        servicer = self.server.servicer
        while True:
            self._watch_tracking(tracker)
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
            # A worker tags a pruned trial's run before it tells the oracle the trial ended.
            pruned = None
            if status == "FINISHED" and tuner.card.tuner.pruning is not None:
                pruned = pruned_epoch_of(tuner.tracker, trial.trial_id)
            self.on_trial(
                tuning.TrialResult(
                    trial.trial_id,
                    status,
                    dict(trial.hyperparameters.values),
                    metrics,
                    best_epoch,
                    ended.seconds,
                    failure,
                    pruned_epoch=pruned,
                )
            )

    def _lose(self, servicer: _Servicer, tracker: tracking.SearchTracker, tuner_id: str, why: str) -> None:
        reason = f"worker {tuner_id} {why}"
        trial = servicer.reclaim(tuner_id, reason)
        self.lost[tuner_id] = why
        if self.workers is not None:
            # A local worker written off is hung (stopped, deadlocked) or dying: it is killed now,
            # so it can neither train its lost trial on beside the retry (one checkpoint folder, two
            # writers) nor close a run after the chief. Its run is closed below, by the chief.
            self.workers.kill(tuner_id)
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
        # The worker's latest run of the trial: still RUNNING, or closed KILLED by the worker itself
        # (a SIGTERM). The oracle's verdict is the run's: KILLED when it is retried, else FAILED,
        # so the summary, trials.csv and a resume read the same state as the oracle.
        runs = [
            run
            for run in tracker.trial_runs()
            if run.data.tags.get("toolkit.trial_id") == trial.trial_id and run.data.tags.get("toolkit.worker") == tuner_id
        ]
        if not runs:
            return
        latest = max(runs, key=lambda r: r.info.start_time or 0)
        status = "KILLED" if retried else "FAILED"
        if latest.info.status == "RUNNING" or (latest.info.status == "KILLED" and status == "FAILED"):
            tracker.end_trial(latest.info.run_id, status, failure=f"{reason} during this trial; {outcome}", force=True)


def _drop_ended_retries(oracle: Any) -> None:
    """On resume, keep out of the retry queue the trials that already ended.

    KerasTuner's reload queues every trial its ``oracle.json`` lists as ongoing for a retry, and an
    older chief (or one killed between KerasTuner's save and its own) can leave an ended trial
    listed: it would run again and be FINISHED twice.
    """
    queue = getattr(oracle, "_retry_queue", None)
    if not queue:
        return
    ended = (Status.COMPLETED, Status.FAILED)
    kept = [tid for tid in queue if tid not in oracle.trials or oracle.trials[tid].status not in ended]
    if len(kept) != len(queue):
        log.info("not rerunning %d trial(s) that had already ended", len(queue) - len(kept))
        queue[:] = kept


def run_chief(
    cfg: ExperimentConfig,
    bind: Address,
    *,
    fresh: bool = False,
    uri: str | None = None,
    workdir: Path | None = None,
    on_trial: Callable[[tuning.TrialResult], None] | None = None,
    workers: LocalWorkers | None = None,
    server: OracleServer | None = None,
    token: str | None = None,
    tls: ServerTLS | None = None,
    tracking_server: TrackingServer | None = None,
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
        server: The oracle's server, already bound on ``bind``. Defaults to one made on ``bind``.
        token: The token every RPC must carry. Defaults to None (``--insecure``).
        tls: The chief's certificate and key. Defaults to None (plain TCP).
        tracking_server: The private tracking server to watch. Defaults to None.

    Returns:
        The search, summarized after the last worker left.
    """
    # KerasTuner reads these when the tuner is built: the chief keeps the real oracle and saves it.
    os.environ.update({ENV_TUNER_ID: "chief", ENV_ORACLE_IP: bind.host, ENV_ORACLE_PORT: str(bind.port)})
    chief = Chief(bind, on_trial=on_trial, workers=workers, server=server, token=token, tls=tls, tracking_server=tracking_server)
    # The search's lock names this address, so a second command of the card is told how to join.
    return tuning.run_search(cfg, fresh=fresh, uri=uri, workdir=workdir, serve=chief, oracle=f"{bind.host}:{bind.port}")
