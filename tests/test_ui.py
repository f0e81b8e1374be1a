"""The MLflow UI over a real search: REST API checks, then a real headless Chromium render."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import shrunk

from toolkit.tuner import run_search

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Without the background-networking switches Chromium keeps dialling out on a closed network.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,900",
    "--virtual-time-budget=20000",
]

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(base: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def render(url: str, profile: Path, extra: list[str]) -> str:
    proc = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url], capture_output=True, text=True, timeout=120
    )
    return proc.stdout


@pytest.fixture
def ui(store: str, tmp_path: Path):
    port = free_port()
    log = open(tmp_path / "ui.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the MLflow UI did not start: " + (tmp_path / "ui.log").read_text()[-2000:])
        yield base
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_ui_shows_the_search_and_its_nested_trials(store, ui, tmp_path):
    result = run_search(shrunk("quickstart", "tracking.log_model=false", "tracking.report=false"))

    experiment = api(ui, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=quickstart")["experiment"]
    runs = api(ui, "/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]
    tags = [{t["key"]: t["value"] for t in run["data"].get("tags", [])} for run in runs]
    parents = [run for run, t in zip(runs, tags, strict=True) if t.get("toolkit.role") == "search"]
    children = [run for run, t in zip(runs, tags, strict=True) if t.get("mlflow.parentRunId") == result.parent_run_id]
    assert len(parents) == 1 and parents[0]["info"]["run_id"] == result.parent_run_id
    assert len(children) == 2

    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium); the REST checks above passed")
    eid = experiment["experiment_id"]
    dom = render(f"{ui}/#/experiments/{eid}/runs", tmp_path / "profile-list", ["--dump-dom"])
    assert "search-quickstart" in dom, "the parent run's name must render in the runs table"
    for child in children:
        name = child["info"]["run_name"]
        page = render(f"{ui}/#/experiments/{eid}/runs/{child['info']['run_id']}", tmp_path / f"profile-{name}", ["--dump-dom"])
        assert name in page, f"the nested run {name} must render on its page"
    shot = tmp_path / "experiment.png"
    render(f"{ui}/#/experiments/{eid}/runs", tmp_path / "profile-shot", [f"--screenshot={shot}"])
    assert shot.exists() and shot.stat().st_size > 10_000
