"""The quickstart card end to end: real KerasTuner, real MLflow in tmp_path."""

from __future__ import annotations

import yaml
from conftest import shrunk

from toolkit.tuner import run_search


def test_quickstart_search_is_recorded_as_parent_and_nested_trials(quickstart_search):
    # The search is conftest's: shrunk("quickstart", "train.epochs=2", "tracking.log_model=false").
    _, result, mlflow_client = quickstart_search

    exp = mlflow_client.get_experiment_by_name("quickstart")
    assert exp is not None
    runs = mlflow_client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("toolkit.role") == "search"]
    trials = [r for r in runs if r.data.tags.get("toolkit.role") == "trial"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_id == result.parent_run_id
    assert parent.info.status == "FINISHED"
    assert len(trials) == 2
    assert {t.data.tags["toolkit.trial_id"] for t in trials} == {"0", "1"}
    for trial in trials:
        assert trial.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert trial.info.status == "FINISHED"
        for name in ("depth", "units", "activation", "optimizer", "learning_rate", "l1", "l2"):
            assert name in trial.data.params, name
        assert trial.data.params["activation"] in ("sigmoid", "tanh", "relu")
        assert 1 <= int(trial.data.params["depth"]) <= 4
        history = mlflow_client.get_metric_history(trial.info.run_id, "val_loss")
        assert sorted(m.step for m in history) == [0, 1]
        assert {"loss", "accuracy", "val_accuracy"} <= set(trial.data.metrics)
        # MLflow's system metrics, on by default: a trial shorter than one sampling interval still has its sample.
        for name in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
            history = mlflow_client.get_metric_history(trial.info.run_id, f"system/{name}")
            assert history and all(m.value >= 0 for m in history), name
        assert 0 < trial.data.metrics["system/system_memory_usage_megabytes"] < 10_000_000
    from toolkit import analysis

    said = analysis.system_findings(analysis.load_search(result.parent_run_id))
    assert len(said) == 1 and f"the best trial, {result.best.trial_id}, trained" in said[0] and "% busy" in said[0], said

    artifact = mlflow_client.download_artifacts(parent.info.run_id, "experiment.yaml")
    card = yaml.safe_load(open(artifact))
    assert card["name"] == "quickstart"
    assert card["tuner"]["max_trials"] == 2
    assert card["train"]["epochs"] == 2
    assert parent.data.metrics["trials_completed"] == 2
    assert "best_val_accuracy" in parent.data.metrics


def test_system_metrics_can_be_turned_off(store, mlflow_client):
    off = ("tracking.log_model=false", "tracking.system_metrics=false", "tracking.report=false", "train.diagnostics=false")
    result = run_search(shrunk("quickstart", "tuner.max_trials=1", *off))
    run = mlflow_client.get_run(result.trials[0].run_id)
    assert "val_accuracy" in run.data.metrics and not [m for m in run.data.metrics if m.startswith("system/")]
