"""The MLflow store itself: created once under concurrent first use, bad stores refused within
seconds, reading commands never creating one.

Real processes and real SQLite files in tmp_path; a closed port on 127.0.0.1 for a dead server.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from toolkit.config import ConfigError
from toolkit.tracking import check_store, client, ensure_store, redact_uri

QUICKSTART = str(ROOT / "experiments" / "quickstart.yaml")

# Each process imports MLflow, says it is ready, waits for the go file, then creates the store
# and writes to it through both the tracking and the registry tables.
_FIRST_USE = """
import sys, time
from pathlib import Path
from mlflow import MlflowClient
from toolkit.tracking import ensure_store
uri, go, name = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
print("ready", flush=True)
while not go.exists():
    time.sleep(0.005)
ensure_store(uri)
c = MlflowClient(tracking_uri=uri)
eid = c.create_experiment(name)
run = c.create_run(eid)
c.log_metric(run.info.run_id, "x", 1.0)
c.set_terminated(run.info.run_id)
c.create_registered_model(name)
"""


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_three_processes_create_a_new_store_once_and_all_can_use_it(tmp_path):
    db = tmp_path / "store" / "mlflow.db"
    uri = f"sqlite:///{db}"
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _FIRST_USE, uri, str(go), f"exp{i}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        go.touch()  # all three start on the missing store at once
        results = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
    from mlflow import MlflowClient

    store = MlflowClient(tracking_uri=uri)
    assert {e.name for e in store.search_experiments()} == {"Default", "exp0", "exp1", "exp2"}
    assert {m.name for m in store.search_registered_models()} == {"exp0", "exp1", "exp2"}
    for i in range(3):
        runs = store.search_runs([store.get_experiment_by_name(f"exp{i}").experiment_id])
        assert [r.info.status for r in runs] == ["FINISHED"]
    # No scratch schema is left beside the database, and nothing went to ./mlruns of the cwd.
    assert sorted(p.name for p in db.parent.iterdir() if p.name.startswith(".")) == []
    assert not (tmp_path / "mlruns").exists()
    # The Default experiment's artifacts, too, live beside the database.
    assert str(db.parent) in store.get_experiment("0").artifact_location


def test_a_leftover_empty_database_file_is_replaced_by_a_complete_store(tmp_path):
    db = tmp_path / "mlflow.db"
    db.touch()  # what an MLflow client that only opened the file leaves
    ensure_store(f"sqlite:///{db}")
    assert db.read_bytes()[:16] == b"SQLite format 3\x00"
    from mlflow import MlflowClient

    assert MlflowClient(tracking_uri=f"sqlite:///{db}").create_experiment("after")


def test_a_new_store_is_private_to_the_user(tmp_path):
    db = tmp_path / "new" / "mlflow.db"
    ensure_store(f"sqlite:///{db}")
    assert db.stat().st_mode & 0o777 == 0o600
    assert db.parent.stat().st_mode & 0o077 == 0


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux's /proc")
def test_an_unwritable_sqlite_store_is_refused_at_once_naming_it():
    started = time.monotonic()
    with pytest.raises(
        ConfigError, match=r"MLFLOW_TRACKING_URI=sqlite:////proc/x\.db: the folder /proc cannot hold the database"
    ):
        check_store("sqlite:////proc/x.db")
    assert time.monotonic() - started < 2


def test_a_store_under_a_file_or_in_a_non_sqlite_file_is_refused(tmp_path):
    (tmp_path / "plain").write_text("not a folder")
    with pytest.raises(ConfigError, match=r"tracking\.uri=sqlite:///.*plain/x\.db: the folder .*plain cannot hold"):
        check_store(f"sqlite:///{tmp_path / 'plain' / 'x.db'}", field="tracking.uri")
    (tmp_path / "notes.db").write_text("hello")
    with pytest.raises(ConfigError, match=r"notes\.db is not an SQLite database"):
        check_store(f"sqlite:///{tmp_path / 'notes.db'}")
    with pytest.raises(ConfigError, match="is a folder, not a database file"):
        check_store(f"sqlite:///{tmp_path}")


def test_a_writable_new_sqlite_store_passes_and_is_not_created_by_the_check(tmp_path):
    db = tmp_path / "new" / "mlflow.db"
    check_store(f"sqlite:///{db}")
    assert not db.exists() and list(db.parent.iterdir()) == []


def test_an_unreachable_server_is_refused_within_seconds_without_its_password():
    uri = f"http://alice:s3cret@127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    with pytest.raises(
        ConfigError, match=r"MLFLOW_TRACKING_URI=http://\*\*\*@127\.0\.0\.1:\d+: no tracking server answers there"
    ) as info:
        check_store(uri)
    assert time.monotonic() - started < 15
    assert "s3cret" not in str(info.value) and "alice" not in str(info.value)


def test_a_live_server_passes(tmp_path):
    import http.server
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        check_store(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("http://bob:pw@host:5000/x", "http://***@host:5000/x"),
        ("postgresql://u:p@w@db.example/mlflow", "postgresql://***@db.example/mlflow"),
        ("https://host/?token=abc&a=1", "https://host/?token=***&a=1"),
        ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
        ("sqlite:///rel/mlflow.db", "sqlite:///rel/mlflow.db"),
    ],
)
def test_redact_uri_strips_credentials_only(uri, expected):
    assert redact_uri(uri) == expected


def test_reading_a_missing_store_is_refused_and_creates_nothing(tmp_path):
    db = tmp_path / "nothing" / "mlflow.db"
    with pytest.raises(ConfigError, match="there is no MLflow store at"):
        client(f"sqlite:///{db}")
    with pytest.raises(ConfigError, match="there is no MLflow store at .* yet"):
        check_store(f"sqlite:///{db}", must_exist=True)
    assert not db.exists()


def _toolkit(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "toolkit.cli", *args],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_toolkit_report_on_a_missing_store_exits_2_and_leaves_no_database(tmp_path):
    db = tmp_path / "store" / "mlflow.db"
    done = _toolkit("report", QUICKSTART, env={"MLFLOW_TRACKING_URI": f"sqlite:///{db}"}, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "there is no MLflow store at" in done.stderr and "Traceback" not in done.stderr
    assert not db.exists() and not (tmp_path / "mlruns").exists()


def test_toolkit_tune_on_an_unreachable_server_exits_2_within_15_s(tmp_path):
    uri = f"http://carol:hunter2@127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    done = _toolkit("tune", QUICKSTART, env={"MLFLOW_TRACKING_URI": uri}, cwd=tmp_path)
    assert time.monotonic() - started < 15
    assert done.returncode == 2, done.stderr
    assert "MLFLOW_TRACKING_URI=http://***@127.0.0.1:" in done.stderr and "no tracking server answers" in done.stderr
    assert "hunter2" not in done.stdout + done.stderr


def test_toolkit_tune_on_an_unwritable_card_store_exits_2(tmp_path):
    (tmp_path / "plain").write_text("")
    store = f"sqlite:///{tmp_path / 'plain' / 'mlflow.db'}"
    done = _toolkit("tune", QUICKSTART, "--set", f"tracking.uri={store}", env={}, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert f"tracking.uri={store}: the folder" in done.stderr


def test_a_new_store_is_a_copy_of_the_cached_empty_schema_with_its_own_artifact_folder(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from toolkit.tracking.store import schema_template

    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    ensure_store(f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}")
    template = schema_template()
    assert template is not None and template.parent == tmp_path / "cache"
    built = template.stat().st_mtime_ns
    started = time.perf_counter()
    ensure_store(f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}")
    copied = time.perf_counter() - started
    assert template.stat().st_mtime_ns == built, "the template is built once"
    assert copied < 1.0, f"a copy, not MLflow's migrations: {copied:.2f}s"
    for name in ("a", "b"):
        store = MlflowClient(f"sqlite:///{tmp_path / name / 'mlflow.db'}")
        assert store.get_experiment("0").artifact_location == (tmp_path / name / "artifacts").resolve().as_uri()
        run = store.create_run(store.create_experiment("x"))
        store.log_metric(run.info.run_id, "m", 1.0)
        assert store.get_run(run.info.run_id).data.metrics == {"m": 1.0}


def test_an_unwritable_cache_falls_back_to_migrating_the_store_in_place(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(blocker / "cache"))  # a folder under a file cannot exist
    ensure_store(f"sqlite:///{tmp_path / 's' / 'mlflow.db'}")
    assert client(f"sqlite:///{tmp_path / 's' / 'mlflow.db'}").search_experiments()
