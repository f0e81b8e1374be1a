"""Where a search's MLflow store is: the tracking URI, its local folder and one client per URI."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import closing, contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from toolkit.config import ConfigError
from toolkit.security import redact_uri

if TYPE_CHECKING:
    from toolkit.config import ExperimentConfig

log = logging.getLogger(__name__)

DEFAULT_STORE_DIR = Path("mlruns")
# Well under the 15 s a user waits before calling a store unreachable; MLflow's own client
# retries for minutes before it gives up.
PROBE_TIMEOUT_S = 5.0
SQLITE_HEADER = b"SQLite format 3\x00"
_DEFAULT_PORTS = {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "mssql": 1433}


def tracking_uri(cfg: ExperimentConfig | None = None) -> str:
    """The tracking URI: the card's, else ``MLFLOW_TRACKING_URI``, else SQLite in ``mlruns/``.

    The file store is deprecated in MLflow 3, so the embedded default is SQLite.
    """
    if cfg is not None and cfg.tracking.uri:
        return cfg.tracking.uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    # The folder is made by ensure_store, when a search first writes: naming the store creates
    # nothing, so reading commands leave no empty store behind.
    return f"sqlite:///{(DEFAULT_STORE_DIR / 'mlflow.db').resolve()}"


def store_dir(uri: str) -> Path:
    """The local folder that holds tuner state and artifacts for a tracking URI.

    For a SQLite store it is the database's folder; for a server it is ``./mlruns``.
    """
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :]).parent
    return DEFAULT_STORE_DIR


@lru_cache(maxsize=8)
def client(uri: str):
    """One cached client per URI (kept out of callbacks so they stay deep-copyable).

    MLflow creates a SQLite database on first use, so a client of a store that does not exist
    yet is refused: only :func:`ensure_store` creates one (a search's first write), and a
    reading command (``toolkit report``, the analysis) never leaves an empty database behind.

    Raises:
        ConfigError: When ``uri`` names a SQLite file that does not exist yet.
    """
    from mlflow import MlflowClient

    path = sqlite_path(uri)
    if path is not None and not _store_ready(path):
        raise ConfigError(
            f"there is no MLflow store at {path} (tracking URI {redact_uri(uri)}): run a search first "
            "(toolkit tune EXP), or set MLFLOW_TRACKING_URI to the store a search wrote to",
            field="MLFLOW_TRACKING_URI",
        )
    return MlflowClient(tracking_uri=uri)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, or None for other stores (and in-memory SQLite)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def _store_ready(path: Path) -> bool:
    # SQLite leaves a 0-byte file when a connection opens a missing database and writes nothing.
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


def check_store(uri: str, field: str = "MLFLOW_TRACKING_URI", must_exist: bool = False) -> None:
    """Refuse, within seconds, a store that a search could not write to or a server that does not answer.

    Without this, MLflow's client retries for minutes and then fails with a message that names
    neither the URI nor the setting. Call it before anything runs.

    - ``sqlite:///``: the database's folder exists or can be made, and a file can be written
      in it; an existing database is a readable, writable SQLite file.
    - ``http(s)://``: the server answers ``GET <uri>/health`` within :data:`PROBE_TIMEOUT_S`.
    - ``postgresql://``, ``mysql://``, ``mssql://``: a TCP connection to the host opens.
    - anything else (``databricks``, ...) is left to MLflow.
    - for writing (not ``must_exist``): ``MLFLOW_ENABLE_ASYNC_LOGGING``, when set, is a value
      MLflow can read (see :func:`toolkit.tracking.values.check_logging_switch`).

    Args:
        uri: The tracking URI.
        field: The setting the URI came from, named in the message. Defaults to
            ``MLFLOW_TRACKING_URI``; ``tracking.uri`` when the card set it.
        must_exist: For reading commands: refuse a SQLite store that does not exist yet.
            Defaults to False.

    Raises:
        ConfigError: Naming the setting, the URI (without credentials) and the reason.
    """
    if not must_exist:
        from toolkit.tracking.values import check_logging_switch  # values imports this module

        check_logging_switch()
    path = sqlite_path(uri)
    if path is not None and must_exist and not _store_ready(path):
        raise ConfigError(
            f"{field}={redact_uri(uri)}: there is no MLflow store at {path} yet. Run a search first "
            "(toolkit tune EXP), or point it at the store a search wrote to",
            field=field,
        )
    if path is not None:
        reason = _sqlite_problem(path)
    else:
        scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
        if scheme in ("http", "https"):
            reason = _bounded(lambda: _http_problem(uri))
        elif scheme in _DEFAULT_PORTS:
            reason = _bounded(lambda: _tcp_problem(uri, _DEFAULT_PORTS[scheme]))
        else:
            reason = None
    if reason:
        raise ConfigError(
            f"{field}={redact_uri(uri)}: {reason}. Accepted: a sqlite:/// path in a writable folder "
            "or the URL of a running MLflow tracking server",
            field=field,
        )


def _sqlite_problem(path: Path) -> str | None:
    if path.is_dir():
        return f"{path} is a folder, not a database file"
    if path.exists():
        if not os.access(path, os.R_OK | os.W_OK):
            return f"the database {path} cannot be read and written by this user"
        try:
            with open(path, "rb") as handle:
                header = handle.read(len(SQLITE_HEADER))
        except OSError as exc:
            return f"the database {path} cannot be read ({exc.strerror or exc})"
        if header and header != SQLITE_HEADER:
            return f"{path} is not an SQLite database"
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # SQLite writes a journal beside the database, so the folder itself must take new files.
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".toolkit-write-check-"):
            pass
    except OSError as exc:
        return f"the folder {folder} cannot hold the database ({exc.strerror or exc})"
    return None


def _bounded(probe) -> str | None:
    # Socket timeouts do not cover name resolution, so the probe runs on a thread with a deadline.
    outcome: list[str | None] = []
    thread = threading.Thread(target=lambda: outcome.append(probe()), daemon=True)
    thread.start()
    thread.join(2 * PROBE_TIMEOUT_S)
    if not outcome:
        return f"no answer within {2 * PROBE_TIMEOUT_S:.0f} s"
    return outcome[0]


def _http_problem(uri: str) -> str | None:
    import ssl

    parts = urllib.parse.urlsplit(uri)
    url = urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path.rstrip("/") + "/health", "", ""))
    context = None
    if parts.scheme == "https":
        # The same TLS settings MLflow's client honours.
        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("1", "true"):
            context = ssl._create_unverified_context()
        else:
            context = ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None)
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S, context=context):
            return None
    except urllib.error.HTTPError as exc:
        # Any answer but a server error means a server is there (a proxy may hide /health, or
        # want credentials that MLflow's client sends itself).
        return f"the server answered {exc.code} {exc.reason} to GET {url}" if exc.code >= 500 else None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, (TimeoutError, socket.timeout)):
            return f"no tracking server answered within {PROBE_TIMEOUT_S:.0f} s"
        text = getattr(reason, "strerror", None) or str(reason)
        return f"no tracking server answers there ({text})"


def _tcp_problem(uri: str, default_port: int) -> str | None:
    parts = urllib.parse.urlsplit(uri)
    try:
        host, port = parts.hostname or "localhost", parts.port or default_port
    except ValueError as exc:
        return f"the address cannot be read ({exc})"
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return None
    except OSError as exc:
        return f"no database server answers at {host}:{port} ({exc.strerror or exc})"


def ensure_store(uri: str) -> None:
    """Create a new SQLite store once, safely when several processes start on it at once.

    MLflow builds a new database's schema with migrations that race when processes run them
    together (``table _alembic_tmp_... already exists``), leaving a half-migrated store no later
    command can use. So one process, holding a lock file beside the database, builds the schema
    in a temporary file and renames it into place: the database appears complete or not at all,
    even if that process is killed. Other stores are left to MLflow.

    Args:
        uri: The tracking URI.
    """
    path = sqlite_path(uri)
    if path is None or _store_ready(path):
        return
    # A store the toolkit creates is private to the user: its folder 0700, its database 0600.
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _file_lock(path.with_name(path.name + ".lock")):
        if _store_ready(path):  # another process made it while this one waited
            return
        scratch = path.with_name(f".{path.name}.{os.getpid()}.new")
        try:
            _build_schema(scratch, path.parent)
            os.chmod(scratch, 0o600)
            os.replace(scratch, path)
        finally:
            scratch.unlink(missing_ok=True)
    log.info("created the MLflow store %s", path)


def _build_schema(db: Path, folder: Path) -> None:
    """An empty store at ``db``: a copy of this MLflow version's empty schema, made once per machine.

    MLflow builds a new schema by running every migration since its first release, some 4-5 s
    (a quarter of a short search). The empty result depends only on MLflow's version, so it is
    built once into :func:`schema_template` and copied: milliseconds. The copy's Default
    experiment then gets its own artifact folder.
    """
    import sqlite3

    db.unlink(missing_ok=True)
    # The Default experiment's artifacts live beside the database too, not in ./mlruns of
    # whatever folder the first search ran from.
    artifacts = (folder.resolve() / "artifacts").as_uri()
    template = schema_template()
    if template is None:
        _migrate(db, artifacts)
        return
    shutil.copyfile(template, db)
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0", (artifacts,))


def _migrate(db: Path, artifacts: str) -> None:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(f"sqlite:///{db}", artifacts)
    store.engine.dispose()


def schema_template() -> Path | None:
    """This MLflow version's empty SQLite schema, in the toolkit's cache; built on first use.

    The cache is ``TOOLKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/toolkit``, else ``~/.cache/toolkit``.
    None when that folder cannot be written (the store is then migrated in place, as MLflow does).
    """
    from importlib.metadata import version

    base = os.environ.get("TOOLKIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "toolkit"
    )
    keyed = f"mlflow-{version('mlflow')}-sqlalchemy-{version('sqlalchemy')}-empty.db"
    template = Path(base) / keyed
    if _store_ready(template):
        return template
    try:
        template.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with _file_lock(template.with_name(keyed + ".lock")):
            if not _store_ready(template):
                scratch = template.with_name(f".{keyed}.{os.getpid()}.new")
                try:
                    _migrate(scratch, (template.parent / "artifacts").as_uri())
                    os.chmod(scratch, 0o600)
                    os.replace(scratch, template)
                finally:
                    scratch.unlink(missing_ok=True)
    except OSError as exc:
        log.debug("no schema template in %s: %s", template.parent, exc)
        return None
    return template


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` across processes, held for the block (released if the holder dies)."""
    with open(path, "a+b") as handle:
        try:
            import fcntl
        except ImportError:  # Windows
            import msvcrt

            handle.seek(0)
            while True:
                try:
                    msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
                    break
                except OSError:  # LK_LOCK gives up after 10 s; keep waiting for the holder
                    continue
            try:
                yield
            finally:
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
            return
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """Use ``uri`` as MLflow's global tracking URI for a block, then restore exactly what was there.

    ``mlflow.set_tracking_uri`` also writes (or, given None, removes) ``MLFLOW_TRACKING_URI``
    in the environment, so restoring through it would lose a URI that came from the environment.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils

    saved_uri, saved_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        utils._tracking_uri = saved_uri
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env
