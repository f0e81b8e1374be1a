"""The MLflow UI over a real search: REST API checks, then a real headless Chromium render."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
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
    # As `make ui` starts it (Makefile: UI_ENV, UI_ARGS), in its own process group as a terminal's job.
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--workers", "2", "--backend-store-uri", store]
        + ["--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        process_group=0,
    )
    base = f"http://127.0.0.1:{port}"
    base_port[0] = port
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
        started = _descendants(server.pid)
        yield base
        assert started and not [c for c in started.values() if "huey" in c], started
        # Ctrl-C in the terminal: SIGINT to the whole group; nothing may be left behind.
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=30)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and [p for p in started if _alive(p)]:
            time.sleep(0.2)
        assert not [p for p in started if _alive(p)], {p: started[p] for p in started if _alive(p)}
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=20)
        log.close()


base_port = [0]


def _descendants(pid: int) -> dict[int, str]:
    """Every process under ``pid`` with its command line, once the UI answers."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                try:
                    found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                frontier.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_ui_shows_the_search_and_its_nested_trials(store, ui, tmp_path, monkeypatch, capsys):
    from toolkit import progress

    result = run_search(shrunk("quickstart", "tracking.log_model=false", "tracking.report=false"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("TOOLKIT_UI_PORT", str(base_port[0]))
    progress.print_summary(result)
    link = capsys.readouterr().out.split("then open ", 1)[1].split()[0]
    assert link == f"{ui}/{result.ui_view}" and "viewStateShareKey=" in link

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
    assert experiment_tags(experiment)["mlflow.experimentKind"] == "custom_model_development"
    # The page the summary links to: every trial's row and the objective's columns, with no clicks.
    dom = render(link, tmp_path / "profile-view", ["--dump-dom"])
    for child in children:
        assert f">{child['info']['run_name']}<" in dom, f"trial {child['info']['run_name']} must be a row of the view"
    for column in ("metrics.`best_val_accuracy`", "metrics.`val_accuracy`", "params.`activation`"):
        assert re.search(f'role="columnheader"[^>]*col-id="{re.escape(column)}"', dom), f"{column} must be a column"
    assert "search-quickstart" not in dom, "the view lists the trials, not the parent"
    child = children[0]
    page = render(f"{ui}/#/experiments/{eid}/runs/{child['info']['run_id']}", tmp_path / "profile-run", ["--dump-dom"])
    assert child["info"]["run_name"] in page, "a trial run's own page renders"
    shot = tmp_path / "experiment.png"
    render(link, tmp_path / "profile-shot", [f"--screenshot={shot}"])
    assert shot.exists() and shot.stat().st_size > 10_000


def experiment_tags(experiment: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in experiment.get("tags", [])}
