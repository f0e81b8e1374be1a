"""Distributed tuning on KerasTuner's own engine: a chief serves the oracle over gRPC, workers run trials.

Three ways in, one search in MLflow:

- **Local** (``toolkit tune EXP --workers N``): this process is the chief, on a port of 127.0.0.1
  it binds before anything else starts, and it starts N worker processes that wait for it to
  serve, with a fresh token for the search in their environment. Over a SQLite store it also
  runs ``mlflow server`` on loopback for the length of the search, so one process writes the file.
  Processes writing one SQLite file directly can hit "database is locked" (SQLite waits 5 s for a
  lock): a direct client gets an error and the point is lost, while behind the server MLflow
  answers 503 (TEMPORARILY_UNAVAILABLE), which MLflow clients retry.
- **Across hosts**: ``--role chief --bind HOST:PORT`` and ``--role worker --oracle HOST:PORT``, or
  KerasTuner's own ``KERASTUNER_TUNER_ID``, ``KERASTUNER_ORACLE_IP`` and ``KERASTUNER_ORACLE_PORT``.
- Every process logs to ``MLFLOW_TRACKING_URI``. The chief creates the parent run and hands its
  id (with the search id and its tuner folder, never a URI or other credential) to each worker in
  a handshake on the oracle's own gRPC channel, so workers need no shared file and a worker
  started with another card is refused.

Trust (see :mod:`~toolkit.distributed.auth` and :mod:`~toolkit.distributed.servicer`): every RPC
carries the search's token (``TOOLKIT_ORACLE_TOKEN`` or ``--token-file``), checked before any
oracle code runs; TLS is optional (``--tls-cert``/``--tls-key`` on the chief, ``--tls-ca`` on
workers). A chief that binds a non-loopback address without a token refuses to start unless
``--insecure``. Only the worker that was given a trial may report on it, and both the worker and
the chief check the trial's values against the card's space (:mod:`~toolkit.distributed.checks`).

Modules: :mod:`~toolkit.distributed.address` (addresses, environment), ``auth`` (token, TLS,
channels), ``checks`` (values against the space), ``servicer`` (the oracle over gRPC), ``chief``,
``worker``, ``launcher`` (local mode), ``server`` (the private ``mlflow server``), ``processes``.

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
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from toolkit import progress
from toolkit import tuner as tuning
from toolkit.config import ConfigError, ExperimentConfig
from toolkit.distributed.address import (
    DEFAULT_ORACLE_TIMEOUT,
    DEFAULT_WORKER_LEASE,
    ENV_ORACLE_IP,
    ENV_ORACLE_PORT,
    ENV_ORACLE_TIMEOUT,
    ENV_TUNER_ID,
    ENV_WORKER_LEASE,
    HEARTBEAT_EVERY,
    Address,
    ChiefUnreachable,
    _env_address,
    _env_role,
    _env_seconds,
    default_tuner_id,
)
from toolkit.distributed.auth import ClientTLS, ServerTLS, TokenCheck, connect, is_loopback, server_tls
from toolkit.distributed.checks import check_values
from toolkit.distributed.chief import Chief, run_chief
from toolkit.distributed.launcher import LocalWorkers, run_local
from toolkit.distributed.processes import _free_port, _stop_group
from toolkit.distributed.server import TrackingServer
from toolkit.distributed.servicer import LINGER, OracleServer, _locked, _Servicer
from toolkit.distributed.worker import WorkerClient, _Heartbeat, _rpc_error, handshake, limit_threads, run_worker, worker_client
from toolkit.security import ENV_TOKEN, read_token

__all__ = [
    "DEFAULT_ORACLE_TIMEOUT",
    "DEFAULT_WORKER_LEASE",
    "ENV_ORACLE_IP",
    "ENV_ORACLE_PORT",
    "ENV_ORACLE_TIMEOUT",
    "ENV_TUNER_ID",
    "ENV_WORKER_LEASE",
    "HEARTBEAT_EVERY",
    "LINGER",
    "Address",
    "ClientTLS",
    "ServerTLS",
    "TokenCheck",
    "WorkerClient",
    "check_values",
    "connect",
    "is_loopback",
    "worker_client",
    "Chief",
    "ChiefUnreachable",
    "LocalWorkers",
    "OracleServer",
    "TrackingServer",
    "default_tuner_id",
    "handshake",
    "limit_threads",
    "main",
    "run_chief",
    "run_local",
    "run_worker",
    # private names the tests reach through the package
    "_Heartbeat",
    "_Servicer",
    "_env_address",
    "_env_role",
    "_env_seconds",
    "_free_port",
    "_locked",
    "_rpc_error",
    "_stop_group",
]

EXIT_OK, EXIT_FAILURE = 0, 1

log = logging.getLogger(__name__)


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
        if getattr(args, "token_file", None) or any(getattr(args, f, None) for f in ("tls_cert", "tls_key", "tls_ca")):
            raise ConfigError(
                f"--workers {args.workers} makes its own token for each search and serves on loopback: "
                "--token-file and --tls-* are for --role chief and --role worker",
                field="--workers",
            )
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
        if getattr(args, "tls_ca", None):
            raise ConfigError("--tls-ca is for workers; the chief takes --tls-cert and --tls-key", field="--tls-ca")
        bind = Address.parse(args.bind, "--bind") if args.bind else _env_address("--bind")
        token = _token(args)
        if token is None:
            if not is_loopback(bind.host) and not getattr(args, "insecure", False):
                raise ConfigError(
                    f"a chief on {bind.host} (not loopback) needs a token, or anyone who reaches the port can fake results: "
                    f"run `python -c 'import secrets; print(secrets.token_urlsafe(32))' > oracle.token && chmod 600 oracle.token`, "
                    f"then start the chief and every worker with --token-file oracle.token (or set {ENV_TOKEN}); "
                    "--insecure serves without one",
                    field="--bind",
                )
            log.warning(
                "the oracle on %s checks no token (%s or --token-file): anyone who reaches it can take trials", bind, ENV_TOKEN
            )
        tls = server_tls(getattr(args, "tls_cert", None), getattr(args, "tls_key", None))
        return _report(cfg, lambda on_trial: run_chief(cfg, bind, fresh=args.fresh, on_trial=on_trial, token=token, tls=tls))
    if role == "worker":
        if args.bind:
            raise ConfigError(
                f"--bind is for the chief; a worker names the chief with --oracle. Received: --role worker --bind {args.bind}",
                field="--bind",
            )
        if getattr(args, "tls_cert", None) or getattr(args, "tls_key", None):
            raise ConfigError("--tls-cert and --tls-key are for the chief; a worker takes --tls-ca", field="--tls-cert")
        oracle = Address.parse(args.oracle, "--oracle") if args.oracle else _env_address("--oracle")
        token = _token(args)
        tls = ClientTLS(Path(args.tls_ca)) if getattr(args, "tls_ca", None) else None
        if tls is not None:
            tls.credentials()  # an unreadable file is a usage error now
        tuner_id = os.environ.get(ENV_TUNER_ID) or default_tuner_id()
        if "chief" in tuner_id:  # KerasTuner treats any id containing "chief" as the chief
            raise ConfigError(f"{ENV_TUNER_ID} of a worker must not contain 'chief'. Received: {tuner_id!r}", field=ENV_TUNER_ID)
        # A worker has nothing to say on stdout (the chief reports progress); muted, it does not
        # repeat MLflow's run links or KerasTuner's stray prints (see Chief.__call__).
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(sys.stdout if args.verbose else devnull):
            run_worker(cfg, oracle, tuner_id, token=token, tls=tls)
        return EXIT_OK
    raise ConfigError("a distributed search needs --workers N, --role chief or --role worker", field="--role")


def _token(args: Any) -> str | None:
    """The token from ``--token-file``, else ``TOOLKIT_ORACLE_TOKEN``, else None."""
    return read_token(getattr(args, "token_file", None))


def _report(cfg: ExperimentConfig, search: Callable[[Callable[[Any], None]], tuning.SearchResult]) -> int:
    reporter = progress.make_reporter(cfg)
    with reporter:
        result = search(reporter.trial_done)
    progress.print_summary(result)
    return EXIT_OK if result.best is not None else EXIT_FAILURE
