"""tuner.constraints and tuner.pareto: each trial's measures, feasibility, the champion, the front.

Real KerasTuner and MLflow in tmp_path. The front is checked against a brute-force reading of
the definition, over values read back from MLflow.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from itertools import product

import numpy as np
import pytest
from conftest import ROOT, shrunk

from toolkit import analysis
from toolkit.analysis.pareto import non_dominated, pareto_flags, violations
from toolkit.config import ConfigError, load_config
from toolkit.tuner import project_dir, run_search

QUICK = ["train.diagnostics=false", "tracking.report=false"]
# Grid order on iris (4 features, 3 classes): 4 units (35 parameters), then 64 (515), then 16 (131).
SIZES = [
    "data.source=iris",
    "tuner.algorithm=grid",
    "tuner.max_trials=3",
    "train.epochs=2",
    "space.depth=1",
    "space.units=[4, 64, 16]",
    "space.activation=relu",
    "space.optimizer=adam",
    "space.l1=0",
    "space.l2=0",
    "space.dropout=0",
    "space.learning_rate=0.05",
]


def _dominates(a, b, signs):
    a, b = [x * s for x, s in zip(a, signs, strict=True)], [x * s for x, s in zip(b, signs, strict=True)]
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def _brute_force(points, directions):
    signs = [1 if d == "min" else -1 for d in directions]
    complete = [all(math.isfinite(v) for v in p) for p in points]
    return [
        ok and not any(other_ok and _dominates(q, p, signs) for q, other_ok in zip(points, complete, strict=True))
        for p, ok in zip(points, complete, strict=True)
    ]


def _tune(tmp_path, sets, *flags):
    """``toolkit tune`` on the quickstart card with ``--set`` overrides, over a SQLite store in tmp_path."""
    cmd = [sys.executable, "-m", "toolkit.cli", "tune", str(ROOT / "experiments" / "quickstart.yaml"), *flags]
    for kv in sets:
        cmd += ["--set", kv]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KERASTUNER_", "MLFLOW_"))}
    env.update({"MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"})
    return uri, subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("directions", [("max", "min"), ("min", "min", "max")])
def test_the_front_is_what_the_definition_says(directions):
    rng = np.random.default_rng(0)
    for _ in range(30):
        # Few distinct values, so that ties (equal points, equal in one column) are common.
        points = rng.integers(0, 4, size=(12, len(directions))).astype(float)
        points[rng.random(12) < 0.1, 0] = np.nan
        assert list(non_dominated(points, directions)) == _brute_force(points.tolist(), directions)


def test_violations_name_the_measure_the_value_and_the_bound():
    bounds = {"model_params": {"max": 100}, "val_accuracy": {"min": 0.9}}
    assert violations({"model_params": 100.0, "best_val_accuracy": 0.9}, bounds) == []  # bounds are inclusive
    assert violations({"model_params": 250.0, "best_val_accuracy": 0.5}, bounds) == [
        "model_params 250 > max 100",
        "val_accuracy 0.5 < min 0.9",
    ]
    assert violations({"best_val_accuracy": 0.95}, bounds) == ["model_params has no value"]


@pytest.mark.parametrize(
    ("override", "field", "words"),
    [
        ("tuner.constraints={model_params: {}}", "tuner.constraints", "needs min, max or both"),
        ("tuner.constraints={latency_ms: {min: 3, max: 1}}", "tuner.constraints", "min must not exceed max"),
        ("tuner.constraints={latency_ms: {maximum: 1}}", "tuner.constraints", "maximum"),
        ("tuner.pareto=[val_accuracy]", "tuner.pareto", "two or three"),
        ("tuner.pareto=[val_accuracy, val_accuracy]", "tuner.pareto", "two or three different"),
    ],
)
def test_bad_constraints_and_pareto_entries_name_the_field(override, field, words):
    with pytest.raises(ConfigError) as info:
        load_config("quickstart", [override])
    assert info.value.field.startswith(field) and words in str(info.value)


def test_a_name_the_task_does_not_produce_is_refused_before_any_run(store, mlflow_client):
    cfg = shrunk("quickstart", "tuner.pareto=[val_acc, model_params]", *QUICK)
    with pytest.raises(ConfigError, match="'val_acc' is neither a measure nor a metric") as info:
        run_search(cfg)
    assert info.value.field == "tuner.pareto"
    assert mlflow_client.search_experiments(filter_string="name = 'quickstart'") == []


def test_constraints_crown_the_best_feasible_trial_and_the_pareto_tags_match_brute_force(store, mlflow_client):
    cfg = shrunk(
        "quickstart", *SIZES, *QUICK, "tuner.constraints={model_params: {max: 200}}", "tuner.pareto=[val_accuracy, model_params]"
    )
    result = run_search(cfg)
    runs = {t.trial_id: mlflow_client.get_run(t.run_id) for t in result.trials}
    assert set(runs) == {"0", "1", "2"} and all(r.info.status == "FINISHED" for r in runs.values())
    for run in runs.values():
        metrics = run.data.metrics
        assert metrics["model_size_mb"] > 0 and metrics["latency_ms"] > 0
        feasible = metrics["model_params"] <= 200
        assert run.data.tags["toolkit.feasible"] == str(feasible).lower()
        assert ("toolkit.infeasible" in run.data.tags) is not feasible
    assert [runs[t].data.metrics["model_params"] for t in "012"] == [35, 515, 131]
    assert runs["1"].data.tags["toolkit.infeasible"] == "model_params 515 > max 200"
    # The champion: the feasible trial with the best val_accuracy, whatever the infeasible one scored.
    feasible = {t: r for t, r in runs.items() if r.data.tags["toolkit.feasible"] == "true"}
    best = max(feasible, key=lambda t: (feasible[t].data.metrics["best_val_accuracy"], -int(t)))
    assert result.best.trial_id == best
    parent = mlflow_client.get_run(result.parent_run_id)
    assert parent.data.tags["toolkit.best_trial_id"] == best and parent.data.metrics["trials_feasible"] == 2
    champion = mlflow_client.get_model_version_by_alias("quickstart", "champion")
    assert champion.tags["toolkit.best_trial_id"] == best
    # The oracle heard the worst score so far for the infeasible trial, not what it reached.
    trial = json.loads((project_dir(store, cfg) / "trial_1" / "trial.json").read_text())
    reported = trial["metrics"]["metrics"]["val_accuracy"]["observations"][0]["value"][0]
    assert reported == min(runs[t].data.metrics["best_val_accuracy"] for t in "01")
    # Pareto over the feasible trials, by brute force on what MLflow holds.
    candidates = list(feasible)
    points = [[feasible[t].data.metrics["best_val_accuracy"], feasible[t].data.metrics["model_params"]] for t in candidates]
    expected = dict(zip(candidates, _brute_force(points, ("max", "min")), strict=True))
    for tid, run in runs.items():
        assert run.data.tags["toolkit.pareto"] == str(expected.get(tid, False)).lower(), tid
    assert pareto_flags(
        [{"best_val_accuracy": p[0], "model_params": p[1]} for p in points], ["val_accuracy", "model_params"]
    ) == [expected[t] for t in candidates]
    data = analysis.load_search(result.parent_run_id)
    front = analysis.pareto_table(data)
    assert sorted(front["trial_id"]) == sorted(t for t, on in expected.items() if on)
    (finding,) = analysis.constraint_findings(data)
    assert finding.startswith("2 of 3 finished trial(s) met the constraints (model_params <= 200)")


def test_a_search_without_a_feasible_trial_says_so_logs_no_champion_and_exits_1(tmp_path, store, cli_in_process):
    # In this process: the exit status a shell sees is checked by tests/test_cli.py's subprocess cases.
    sets = [*SIZES, "tuner.max_trials=2", *QUICK, "tuner.constraints={model_params: {max: 10}}"]
    args = ["tune", str(ROOT / "experiments" / "quickstart.yaml")]
    for kv in sets:
        args += ["--set", kv]
    code, out, err = cli_in_process(*args, cwd=tmp_path)
    assert code == 1, out + err
    assert "no feasible trial" in out and "(0 feasible)" in out
    assert "Traceback" not in err
    import mlflow

    client = mlflow.MlflowClient(store)
    assert client.search_registered_models() == []
    (parent,) = [r for r in client.search_runs(["1"]) if r.data.tags.get("toolkit.role") == "search"]
    assert parent.info.status == "FINISHED"
    assert "none of the 2 finished met tuner.constraints (model_params <= 10)" in parent.data.tags["toolkit.no_feasible"]
    assert "toolkit.best_trial_id" not in parent.data.tags


def test_every_combination_of_two_directions_agrees_with_the_definition():
    points = [list(p) for p in product([0.0, 1.0, 2.0], repeat=2)]
    for directions in product(("min", "max"), repeat=2):
        assert list(non_dominated(points, directions)) == _brute_force(points, directions)


@pytest.mark.slow
def test_constraints_and_the_front_under_two_workers(tmp_path):
    import mlflow

    sets = [*SIZES, *QUICK, "tuner.constraints={model_params: {max: 200}}", "tuner.pareto=[val_accuracy, model_params]"]
    uri, done = _tune(tmp_path, sets, "--workers", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(2 feasible)" in done.stdout
    client = mlflow.MlflowClient(uri)
    runs = [r for r in client.search_runs(["1"]) if r.data.tags.get("toolkit.role") == "trial"]
    parent = next(r for r in client.search_runs(["1"]) if r.data.tags.get("toolkit.role") == "search")
    by_id = {r.data.tags["toolkit.trial_id"]: r for r in runs if r.info.status == "FINISHED"}
    assert sorted(by_id) == ["0", "1", "2"]
    for run in by_id.values():
        assert run.data.tags["toolkit.feasible"] == str(run.data.metrics["model_params"] <= 200).lower()
    feasible = {t: r for t, r in by_id.items() if r.data.tags["toolkit.feasible"] == "true"}
    points = [[r.data.metrics["best_val_accuracy"], r.data.metrics["model_params"]] for r in feasible.values()]
    expected = dict(zip(feasible, _brute_force(points, ("max", "min")), strict=True))
    assert {t: r.data.tags["toolkit.pareto"] for t, r in by_id.items()} == {t: str(expected.get(t, False)).lower() for t in by_id}
    best = max(feasible, key=lambda t: feasible[t].data.metrics["best_val_accuracy"])
    assert (
        feasible[parent.data.tags["toolkit.best_trial_id"]].data.metrics["best_val_accuracy"]
        == (feasible[best].data.metrics["best_val_accuracy"])
    )
