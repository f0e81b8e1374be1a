"""The CLI contract: exit codes, one clear message, no traceback, no MLflow run on bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT


def toolkit(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT, timeout: int = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "toolkit.cli", *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout
    )


def no_runs_created(store_dir: Path) -> bool:
    """A bad card must not even create the store, let alone a run."""
    db = store_dir / "mlflow.db"
    if not db.exists():
        return True
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    return not client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.parametrize(
    "args, message",
    [
        (["tune", "quickstart", "--set", "space.activation=relux"], "space.activation: unknown activation 'relux'"),
        (["tune", "quickstart", "--set", "tuner.max_trials=0"], "tuner.max_trials"),
        (["tune", "quickstart", "--set", "spaace.depth=2"], "spaace: unknown field"),
        (["tune", "quickstart", "--set", "strategy=warp"], "strategy.name"),
        (["tune", "no_such_card"], "unknown experiment 'no_such_card'. Cards that exist:"),
        (["tune", "quickstart", "--set", "oops"], "--set expects dotted.key=value"),
        (["tune", "quickstart", "--workers", "-1"], "--workers must be 0 or more"),
        (["validate", "quickstart", "--set", "train.epochs=-3"], "train.epochs"),
        (["report", "cnn_vs_mlp", "--against", "cnn_vs_mlp"], "tracking.compare_with: names other experiments"),
        (["report", "quickstart", "--against", "../etc"], "Received: '../etc'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_card_or_usage_exits_2_with_one_message_and_no_run(tmp_path, args, message):
    store = tmp_path / "store"
    store.mkdir()
    proc = toolkit(*args, env={"MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"})
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert no_runs_created(store)


def test_an_objective_the_model_does_not_log_exits_2_with_one_message_and_no_run(tmp_path, cli_in_process):
    # Found only once the model's metrics are known, after TensorFlow is imported: run in this
    # process (the exit status a shell sees is checked by the subprocess cases above).
    store = tmp_path / "store"
    store.mkdir()
    code, out, err = cli_in_process(
        "tune",
        "quickstart",
        "--set",
        "tuner.objective=val_acuracy",
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"},
    )
    assert code == 2, err
    assert "tuner.objective: 'val_acuracy' is not a metric" in err
    assert "Traceback" not in err + out
    assert no_runs_created(store)


def test_validate_prints_the_resolved_card():
    proc = toolkit("validate", "quickstart", "--set", "train.epochs=7")
    assert proc.returncode == 0, proc.stderr
    assert "epochs: 7" in proc.stdout
    assert "objective val_accuracy (max)" in proc.stderr


def test_help_is_fast_and_lists_commands():
    proc = toolkit("--help")
    assert proc.returncode == 0
    for command in ("tune", "validate", "datasets", "report"):
        assert command in proc.stdout


def test_validate_refuses_a_card_whose_data_file_does_not_exist(tmp_path):
    card = tmp_path / "card.yaml"
    card.write_text(f"name: nodata\ndata: {{source: {tmp_path / 'nope.csv'}, target: label}}\n")
    store = tmp_path / "store"
    store.mkdir()
    proc = toolkit("validate", str(card), env={"MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: data.source: file not found: ") and "nope.csv" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr + proc.stdout
    assert proc.stdout == ""  # nothing printed as if the card were valid
    assert no_runs_created(store)


CONSOLE_SCRIPT = """
import atexit, sys
from toolkit import cli

handler, finalizer, card = sys.argv[1:4]

class Finalized:  # a global of __main__: only the interpreter's teardown finalizes it
    def __init__(self, path):
        self.path, self.open = path, open

    def __del__(self):
        with self.open(self.path, "w") as out:
            out.write("finalized")

keep = Finalized(finalizer)
run = cli.main

def main(argv=None):
    code = run(argv)
    atexit.register(lambda: open(handler, "w").write("ran"))  # as MLflow's async queue registers its flush
    print("last line")
    return code

cli.main = main
sys.argv = ["toolkit", "validate", card]
cli.entrypoint()
"""


@pytest.mark.parametrize("teardown", [False, True])
def test_the_console_script_runs_every_exit_handler_and_skips_only_the_interpreters_teardown(tmp_path, teardown):
    handler, finalizer = tmp_path / "handler", tmp_path / "finalizer"
    script = tmp_path / "console.py"
    script.write_text(CONSOLE_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(handler), str(finalizer), str(ROOT / "experiments/quickstart.yaml")],
        capture_output=True,
        text=True,
        env={**os.environ, "TOOLKIT_FULL_TEARDOWN": "1" if teardown else ""},
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("last line")  # buffered output is flushed before the exit
    assert handler.read_text() == "ran"
    assert finalizer.exists() == teardown
