"""The ``toolkit`` command: parses arguments and calls library functions.

Exit codes (contract): 0 success, 2 bad card or usage, 1 other failure, 130 interrupted.
TensorFlow is imported only by commands that train, so ``validate`` and ``--help`` stay fast.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import signal
import sys
from typing import Any

from toolkit.config import ConfigError, load_config

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # bad usage is exit 2 with one line, as for a bad card
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="toolkit", description="Experiment cards → KerasTuner searches tracked in MLflow.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    tune = sub.add_parser("tune", help="run (or resume) the search an experiment card describes")
    tune.add_argument("exp", metavar="EXP", help="a card name in experiments/ or a path to a YAML card")
    tune.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a card field, e.g. --set tuner.max_trials=2 (repeatable)",
    )
    tune.add_argument("--fresh", action="store_true", help="start a new search and parent run instead of resuming")
    tune.add_argument("--workers", type=int, default=0, metavar="N", help="run N local tuner workers under a chief on 127.0.0.1")
    tune.add_argument("--role", choices=["chief", "worker"], help="for searches across hosts: this process's role")
    tune.add_argument("--bind", metavar="HOST:PORT", help="chief: the address the oracle listens on")
    tune.add_argument("--oracle", metavar="HOST:PORT", help="worker: the chief's oracle address")
    tune.add_argument(
        "--token-file", metavar="PATH", help="chief and worker: a 0600 file with the oracle's token (else $TOOLKIT_ORACLE_TOKEN)"
    )
    tune.add_argument("--insecure", action="store_true", help="chief: serve a non-loopback address without a token")
    tune.add_argument("--tls-cert", metavar="PEM", help="chief: its TLS certificate chain (with --tls-key)")
    tune.add_argument("--tls-key", metavar="PEM", help="chief: its TLS private key")
    tune.add_argument("--tls-ca", metavar="PEM", help="worker: the CA that signed the chief's TLS certificate")
    tune.add_argument("--verbose", action="store_true", help="show TensorFlow's and KerasTuner's own output")

    validate = sub.add_parser("validate", help="check a card and print the resolved config (no TensorFlow import)")
    validate.add_argument("exp", metavar="EXP")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    sub.add_parser("datasets", help="list the data sources with their sizes and tasks")

    report = sub.add_parser("report", help="regenerate a search's report from MLflow")
    report.add_argument("exp", metavar="EXP")
    report.add_argument(
        "--against",
        action="append",
        default=[],
        metavar="EXPERIMENT",
        help="set another experiment's latest search beside this one (repeatable; adds to tracking.compare_with)",
    )
    report.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def _quiet_tensorflow(verbose: bool) -> None:
    if verbose:
        return
    # Must be set before TensorFlow is imported to silence its C++ start-up logs.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.ERROR)
    _import_tensorflow_quietly()
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)


def _import_tensorflow_quietly() -> None:
    """Import TensorFlow with fd 2 captured: its C++ start-up lines come before absl logging
    is set up, so no environment variable silences them. If the import fails, the captured
    output is replayed, so errors are never hidden."""
    import tempfile

    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        except BaseException:
            os.dup2(saved, 2)
            capture.seek(0)
            sys.stderr.write(capture.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def cmd_validate(args: argparse.Namespace) -> int:
    import yaml

    from toolkit.data import check_source

    cfg = load_config(args.exp, args.overrides)
    check_source(cfg.data)  # the data file and its header: no rows read, no TensorFlow
    print(_redact(yaml.safe_dump(cfg.to_dict(), sort_keys=False)), end="")
    print(f"# valid: objective {cfg.objective} ({cfg.direction})", file=sys.stderr)
    return EXIT_OK


def cmd_datasets(args: argparse.Namespace) -> int:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from toolkit.data import describe_sources

    # A light box so the table fits 80 columns (a pipe or CI log) without truncating a word.
    table = Table(title="data sources (or give a path to a .csv, .npz or .parquet file)", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("name", "kind", "samples", "features", "task", "classes"):
        table.add_column(column)
    for row in describe_sources():
        table.add_row(*(str(row[c]) for c in ("name", "kind", "samples", "features", "task", "classes")))
    Console().print(table)
    return EXIT_OK


def cmd_tune(args: argparse.Namespace) -> int:
    cfg = load_config(args.exp, args.overrides)  # a bad card fails here, before TensorFlow loads
    if args.workers < 0:
        raise ConfigError(f"--workers must be 0 or more. Received: {args.workers}", field="--workers")
    from toolkit.strategy import check_available

    check_available(cfg.strategy)  # no TPU, no TF_CONFIG: said within a second, before TensorFlow loads
    if args.role != "worker" and os.environ.get("KERASTUNER_TUNER_ID", "chief") == "chief":
        # An unwritable or unreachable store, said within seconds instead of after MLflow's
        # minutes of retries. Workers skip it: the chief's private server may still be starting.
        from toolkit import tracking

        tracking.check_store(tracking.tracking_uri(cfg), field="tracking.uri" if cfg.tracking.uri else "MLFLOW_TRACKING_URI")
    _quiet_tensorflow(args.verbose)
    from toolkit.security import has_credentials

    if has_credentials(cfg.tracking.uri) or has_credentials(os.environ.get("MLFLOW_TRACKING_URI")):
        # MLflow prints a "View run at" link to each run it closes, built from the tracking URI.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    if (
        args.workers or args.role or os.environ.get("KERASTUNER_ORACLE_IP")
    ):  # KerasTuner's own variables also make a chief or worker
        from toolkit import distributed

        return distributed.main(cfg, args)

    from toolkit import progress
    from toolkit.tuner import run_search

    reporter = progress.make_reporter(cfg)
    with reporter:
        result = run_search(cfg, fresh=args.fresh, on_trial=reporter.trial_done)
    progress.print_summary(result)
    return EXIT_OK if result.best is not None else EXIT_FAILURE


def cmd_report(args: argparse.Namespace) -> int:
    cfg = load_config(args.exp, args.overrides)
    if args.against:
        # Checked as the card's own list is: experiment names, not this card's own.
        merged = json.dumps([*cfg.tracking.compare_with, *args.against])
        cfg = load_config(args.exp, [*args.overrides, f"tracking.compare_with={merged}"])
    from toolkit import tracking

    # Reading never creates a store: a missing one is said as such, and no empty file is left.
    tracking.check_store(
        tracking.tracking_uri(cfg), field="tracking.uri" if cfg.tracking.uri else "MLFLOW_TRACKING_URI", must_exist=True
    )
    _quiet_tensorflow(True)
    from toolkit import analysis

    path = analysis.regenerate(cfg)
    print(f"report written to {path} and logged to the search's parent run")
    return EXIT_OK


COMMANDS = {"tune": cmd_tune, "validate": cmd_validate, "datasets": cmd_datasets, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code."""
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    if hasattr(signal, "SIGHUP"):  # a closed terminal or a dropped SSH session: stop and clean up as for SIGTERM
        signal.signal(signal.SIGHUP, _interrupt)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"error: {_redact(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        exp = getattr(args, "exp", "")
        print(
            f"\ninterrupted: open runs were marked KILLED. Resume with: toolkit tune {exp} (or make tune EXP={exp})",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except Exception as exc:  # any other failure: one line, no traceback unless asked for
        if os.environ.get("TOOLKIT_DEBUG") or getattr(args, "verbose", False):
            raise
        from toolkit.data import DatasetUnavailable

        kind = "" if isinstance(exc, DatasetUnavailable) else f"{type(exc).__name__}: "
        print(f"error: {kind}{_redact(str(exc))}", file=sys.stderr)
        return EXIT_FAILURE


def _redact(text: str) -> str:
    """``text`` with any credentials in the URIs it quotes stripped (an error may name the tracking URI)."""
    from toolkit.security import redact_uri

    return redact_uri(text)


def entrypoint() -> None:
    """The console script: :func:`main`, then an exit that skips the interpreter's teardown.

    Tearing down a process that loaded TensorFlow, MLflow and a search's heap takes about 2 s
    (finalizing every module and collecting every object), longer than a short trial, and it
    writes nothing. So once every other exit handler has run (MLflow's async queue, temporary
    folders, logging) the process ends with ``os._exit``. Registered first, the handler runs last;
    an exception that escapes ``main`` (``TOOLKIT_DEBUG``) gets the normal exit and its traceback.
    """
    atexit.register(_exit_without_teardown)
    code = main()
    _EXIT_CODE.append(code)
    sys.exit(code)


_EXIT_CODE: list[int] = []


def _exit_without_teardown() -> None:
    if not _EXIT_CODE or os.environ.get("TOOLKIT_FULL_TEARDOWN"):
        return
    logging.shutdown()  # registered before this handler, so it would otherwise run after it
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to lose
            pass
    os._exit(_EXIT_CODE[0])


if __name__ == "__main__":
    entrypoint()
