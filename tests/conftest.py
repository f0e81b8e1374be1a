"""Shared fixtures: a real MLflow store in tmp_path, fixed seeds, quiet TensorFlow."""

from __future__ import annotations

import os
import random
import signal
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings as hypothesis_settings
from hypothesis.configuration import set_hypothesis_home_dir

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
# The empty-schema template new stores are copied from (toolkit.tracking.store.schema_template)
# is built in a cache of this session's own, never in the user's ~/.cache; child processes inherit it.
os.environ["TOOLKIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="toolkit-test-cache-")

ROOT = Path(__file__).resolve().parents[1]

# A runner started in the background of a script (`cmd &`) ignores SIGINT, and an ignored signal
# stays ignored in every child: the searches that the tests stop with Ctrl-C would never see it.
# A handler here is reset to the default in each child at exec, so they handle SIGINT again.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Hypothesis keeps its example database and caches outside the checkout: a test run writes
# nothing there.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "toolkit-hypothesis")
hypothesis_settings.register_profile("toolkit", database=None)
hypothesis_settings.load_profile("toolkit")


# A test writes only under tmp_path: after the suite, no file in the checkout is new or changed,
# ignored ones included (mlruns/ above all). Only these may change.
_MAY_CHANGE = {".venv", ".git", "__pycache__", ".pytest_cache", ".ruff_cache", "toolkit.egg-info"}


def _checkout_files() -> dict[str, tuple[int, int]]:
    files = {}
    for folder, subdirs, names in os.walk(ROOT):
        subdirs[:] = [d for d in subdirs if d not in _MAY_CHANGE]
        for name in names:
            path = os.path.join(folder, name)
            try:
                stat = os.stat(path)
            except OSError:
                continue
            files[os.path.relpath(path, ROOT)] = (stat.st_mtime_ns, stat.st_size)
    return files


def pytest_sessionstart(session: pytest.Session) -> None:
    # Under pytest-xdist the controller's session spans every worker's: it alone checks.
    if hasattr(session.config, "workerinput"):
        return
    session.config._checkout_before = _checkout_files()  # type: ignore[attr-defined]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = getattr(session.config, "_checkout_before", None)
    if before is None or os.environ.get("TOOLKIT_SKIP_CHECKOUT_CHECK"):
        return
    after = _checkout_files()
    written = sorted(path for path, stamp in after.items() if before.get(path) != stamp)
    if written:
        shown = ", ".join(written[:10]) + (f" and {len(written) - 10} more" if len(written) > 10 else "")
        session.config.get_terminal_writer().line(
            f"\ntests wrote into the checkout (a test must write only under tmp_path): {shown}", red=True
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def _seeds() -> None:
    random.seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def _empty_store_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty SQLite store with MLflow's schema, made once: creating the schema (its
    migrations) takes seconds, copying the file takes milliseconds."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _empty_store_db: Path) -> str:
    """A fresh SQLite MLflow store under tmp_path, set as MLFLOW_TRACKING_URI.

    KerasTuner state and artifacts land beside the database, so nothing touches ./mlruns.
    """
    import shutil

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    shutil.copyfile(_empty_store_db, tmp_path / "store" / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def mlflow_client(store: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=store)


def shrunk(name: str = "quickstart", *overrides: str):
    """A shipped card shrunk for tests: 2 trials x 1 epoch unless overridden."""
    from toolkit.config import load_config

    base = ["tuner.max_trials=2", "train.epochs=1"]
    return load_config(name, [*base, *overrides], experiments_dir=ROOT / "experiments")


@pytest.fixture(scope="session")
def _quickstart_search(tmp_path_factory: pytest.TempPathFactory, _empty_store_db: Path):
    """One finished quickstart search (2 trials x 2 epochs, diagnostics, system metrics and report
    on, no model logged), run once for the tests that only read it: test_end_to_end and
    test_analysis used to run this same search each."""
    import shutil

    from toolkit.tuner import run_search

    folder = tmp_path_factory.mktemp("quickstart-search") / "store"
    folder.mkdir()
    shutil.copyfile(_empty_store_db, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        result = run_search(shrunk("quickstart", "train.epochs=2", "tracking.log_model=false"))
    return uri, result


@pytest.fixture
def quickstart_search(_quickstart_search, monkeypatch: pytest.MonkeyPatch):
    """The shared quickstart search, its store set as MLFLOW_TRACKING_URI for this test.

    Returns:
        (uri, result, client): the store's URI, run_search's result and an MlflowClient on it.
    """
    from mlflow import MlflowClient

    uri, result = _quickstart_search
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri, result, MlflowClient(tracking_uri=uri)


@pytest.fixture
def cli_in_process(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """``toolkit <args>`` run by ``toolkit.cli.main`` in this process: (exit code, stdout, stderr).

    For exit-code checks of errors found after TensorFlow is imported, where a new process would
    spend ~6 s importing it again. The process contract itself (the exit status a shell sees, no
    traceback) is checked by the subprocess tests of tests/test_cli.py; ``main`` is what the
    console script calls and returns the code it exits with. The signal handlers ``main``
    installs are put back.
    """
    from toolkit import cli

    def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[int, str, str]:
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        if cwd is not None:
            monkeypatch.chdir(cwd)
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
        capsys.readouterr()
        try:
            code = cli.main(list(args))
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        out, err = capsys.readouterr()
        return code, out, err

    return run
