"""The trials table, findings, plots and report, read back from a real MLflow store.

Most tests log a synthetic search straight into MLflow (known effects, no training), so every
number the report states can be checked. One test runs a real shrunk quickstart search.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import ROOT, shrunk
from mlflow.entities import Metric, Param

from toolkit import analysis, trials_table
from toolkit.config import ConfigError

EPOCHS = 5


def _log_trial(client, exp_id: str, parent: str, trial_id: int, params: dict, curves: dict, last: dict) -> str:
    run = client.create_run(
        exp_id, tags={"mlflow.parentRunId": parent, "toolkit.role": "trial", "toolkit.trial_id": str(trial_id)}
    )
    metrics = [Metric(k, float(v), 0, step) for k, values in curves.items() for step, v in enumerate(values)]
    metrics += [Metric(k, float(v), 0, EPOCHS - 1) for k, v in last.items()]
    client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _search(client, name: str = "fake", full: bool = True) -> str:
    """A search with known effects: relu beats sigmoid when deep, sigmoid's gradient vanishes
    when deep, L2 shrinks the gap and the weights, adam reaches the target first."""
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name)
    parent = client.create_run(
        exp_id,
        tags={"toolkit.role": "search", "toolkit.card": name, "toolkit.objective": "val_accuracy", "toolkit.direction": "max"},
    )
    parent_id = parent.info.run_id
    cells = [(a, d, l2, o) for a in ("sigmoid", "relu") for d in (1, 8) for l2 in (0.0, 0.01) for o in ("sgd", "adam")]
    if not full:
        cells = cells[:3]
    for trial_id, (activation, depth, l2, optimizer) in enumerate(cells):
        final = 0.9 if (activation == "relu" or depth == 1) else 0.3
        final -= 0.02 if l2 == 0 else 0.0
        speed = 3.0 if optimizer == "adam" else 0.8
        acc = final * (1 - np.exp(-speed * np.arange(1, EPOCHS + 1)))
        loss = 1.5 * np.exp(-0.5 * np.arange(EPOCHS))
        gap = 0.4 if l2 == 0 else 0.05
        ratio = 1e-3 if (activation == "sigmoid" and depth == 8) else 0.9
        layers = [f"dense_{i}" for i in range(depth)] + ["output"]
        last = {"gap_loss": gap, "gap_accuracy": gap / 10, "grad_ratio_first_last": ratio}
        for i, layer in enumerate(layers):
            last[f"grad_norm/{layer}"] = 0.5 * ratio ** (1 - i / depth)
            last[f"weight_l2/{layer}"] = 10.0 if l2 == 0 else 3.0
            if layer != "output" and activation == "relu":
                last[f"dead_relu/{layer}"] = 0.25 if layer == "dense_0" and l2 else 0.0
        params = {
            "depth": depth,
            "units": 64,
            "activation": activation,
            "optimizer": optimizer,
            "learning_rate": 0.01,
            "l1": 0.0,
            "l2": l2,
        }
        _log_trial(client, exp_id, parent_id, trial_id, params, {"val_accuracy": acc, "loss": loss, "val_loss": loss + gap}, last)
    return parent_id


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory):
    """One store for the synthetic searches: creating an MLflow database costs seconds."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("analysis") / "store"
    folder.mkdir()
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri, MlflowClient(tracking_uri=uri)


@pytest.fixture(scope="module")
def fake(shared_store) -> analysis.SearchData:
    uri, client = shared_store
    return analysis.load_search(_search(client, "fake"), uri)


def test_trials_table_has_a_row_per_trial_with_typed_hyperparameters(shared_store):
    store, client = shared_store
    parent = _search(client, "table")
    table = trials_table(parent, store)
    assert len(table) == 16
    assert list(table["trial_id"]) == [str(i) for i in range(16)]
    assert table["depth"].dtype.kind == "i" and table["l2"].dtype.kind == "f"
    assert set(table["activation"]) == {"sigmoid", "relu"}
    assert (table["epochs"] == EPOCHS).all()
    relu_deep = table[(table["activation"] == "relu") & (table["depth"] == 8)]
    assert relu_deep["objective"].max() == pytest.approx(0.9 * (1 - np.exp(-3.0 * EPOCHS)))
    assert table.attrs["objective"] == "val_accuracy" and table.attrs["direction"] == "max"
    assert {"gap_loss", "grad_norm/dense_0", "weight_l2/output"} <= set(table.columns)
    # An experiment name means its latest search.
    assert len(trials_table("table", store)) == 16


def test_findings_state_the_effects_with_numbers(fake):
    table = fake.finished
    deep_means = table[table["depth"] == 8].groupby("activation")["objective"].mean()
    margin = (deep_means["relu"] - deep_means["sigmoid"]) * 100
    deep = " ".join(analysis.activation_depth_findings(fake))
    assert f"At depth ≥ 8, relu beat sigmoid by {margin:.1f} pp in mean val_accuracy" in deep
    assert "At depth < 8, relu and sigmoid tied" in deep

    gradients = analysis.gradient_findings(fake)
    sigmoid = next(f for f in gradients if "sigmoid" in f)
    assert "1e+03× smaller" in sigmoid and "vanishing" in sigmoid
    assert "vanishing" not in next(f for f in gradients if "relu:" in f)

    regularization = " ".join(analysis.regularization_findings(fake))
    assert "L2: stronger l2 went with a smaller gap_loss" in regularization
    assert "median gap_loss 0.05" in regularization and "vs 0.4" in regularization
    assert "median total weight L2 norm 6.62 vs 22.1" in regularization


def test_optimizers_are_ranked_by_epochs_to_target(fake):
    ranking = analysis.optimizer_ranking(fake)
    assert list(ranking["optimizer"]) == ["adam", "sgd"]
    assert ranking.loc[0, "epochs_to_target"] == 1
    assert ranking.loc[1, "epochs_to_target"] > 1
    text = analysis.optimizer_findings(fake, ranking)[0]
    assert "adam 1 epoch(s)" in text


def test_importance_names_its_method_and_finds_what_matters(fake):
    importance = analysis.hyperparameter_importance(fake)
    assert importance.table is not None
    top_two = set(importance.table["hyperparameter"].head(2))
    assert top_two == {"activation", "depth"}
    assert importance.oob_r2 is not None
    assert "random-forest surrogate, permutation importance" in analysis.importance_findings(importance)[0]


def test_few_trials_say_not_enough(shared_store):
    store, client = shared_store
    data = analysis.load_search(_search(client, "few", full=False), store)
    text = " ".join(
        analysis.importance_findings(analysis.hyperparameter_importance(data)) + analysis.regularization_findings(data)
    )
    assert text.count(analysis.NOT_ENOUGH) == 2


def test_report_is_written_and_logged_to_the_parent(shared_store, tmp_path):
    store, mlflow_client = shared_store
    parent = _search(mlflow_client, "written")
    md = analysis.write_report(parent, store, tmp_path / "out")
    text = md.read_text()
    assert "relu beat sigmoid" in text and "![Activation × depth](report/activation_depth_heatmap.png)" in text
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5

    root = {a.path for a in mlflow_client.list_artifacts(parent)}
    assert {"report.md", "report.html", "report"} <= root
    plots = {a.path for a in mlflow_client.list_artifacts(parent, "report")}
    assert plots == {
        f"report/{n}.png"
        for n in (
            "learning_curves",
            "objective_vs_hyperparameters",
            "activation_depth_heatmap",
            "gradient_norm_by_layer",
            "gap_vs_regularization",
        )
    }


def test_regenerate_uses_the_latest_search(shared_store):
    store, mlflow_client = shared_store
    _search(mlflow_client, "regen", full=False)
    latest = _search(mlflow_client, "regen")
    cfg = analysis.ExperimentConfig(name="regen")
    path = analysis.regenerate(cfg, store)
    assert path.is_file() and f"`{latest}`" in path.read_text()
    assert "report.md" in {a.path for a in mlflow_client.list_artifacts(latest)}


def test_report_without_a_search_is_a_usage_error(shared_store, monkeypatch, capsys):
    store, _ = shared_store
    from toolkit import cli

    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match="no experiment 'nothing-here'"):
        analysis.find_search("nothing-here", store)
    assert cli.main(["report", "quickstart"]) == 2
    assert "toolkit tune quickstart" in capsys.readouterr().err


def test_quickstart_trials_carry_diagnostics_and_the_parent_the_report(store, mlflow_client, monkeypatch):
    from toolkit import cli
    from toolkit.tuner import run_search

    result = run_search(shrunk("quickstart", "train.epochs=2", "tracking.log_model=false"))
    for trial in result.trials:
        run = mlflow_client.get_run(trial.run_id)
        assert {"grad_norm/dense_0", "grad_norm/output", "grad_ratio_first_last", "gap_loss", "gap_accuracy"} <= set(
            run.data.metrics
        )
        assert "weight_l2/dense_0" in run.data.metrics and "weight_l1/output" in run.data.metrics
        if trial.hyperparameters["activation"] == "relu":
            assert "dead_relu/dense_0" in run.data.metrics
        steps = sorted(m.step for m in mlflow_client.get_metric_history(trial.run_id, "grad_norm/dense_0"))
        assert steps == [0, 1]
    artifacts = {a.path for a in mlflow_client.list_artifacts(result.parent_run_id)}
    assert {"report.md", "report.html", "report"} <= artifacts
    assert "report/learning_curves.png" in {a.path for a in mlflow_client.list_artifacts(result.parent_run_id, "report")}

    monkeypatch.chdir(ROOT)
    assert cli.main(["report", "quickstart"]) == 0
    regenerated = analysis.find_search("quickstart", store)
    assert regenerated == result.parent_run_id
    assert os.path.isfile(os.path.join(os.path.dirname(store[len("sqlite:///") :]), "reports", "quickstart", "report.md"))


def test_switches_turn_diagnostics_and_report_off(store, mlflow_client):
    from toolkit.tuner import run_search

    cfg = shrunk(
        "quickstart", "tuner.max_trials=1", "train.diagnostics=false", "tracking.report=false", "tracking.log_model=false"
    )
    result = run_search(cfg)
    metrics = mlflow_client.get_run(result.trials[0].run_id).data.metrics
    assert "val_accuracy" in metrics and not any(k.startswith(("grad_norm/", "gap_")) for k in metrics)
    assert "report.md" not in {a.path for a in mlflow_client.list_artifacts(result.parent_run_id)}


def test_reading_a_store_loads_no_tensorflow():
    """`toolkit report` works from MLflow alone, so its modules must not pay TensorFlow's import."""
    import subprocess
    import sys

    code = "import sys, toolkit.analysis, toolkit.tracking; assert 'tensorflow' not in sys.modules, 'tensorflow was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
