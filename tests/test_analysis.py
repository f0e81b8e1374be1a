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
        # Experiments made here keep MLflow's default artifact root (./mlruns): the tmp folder.
        patch.chdir(folder)
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


def test_quickstart_trials_carry_diagnostics_and_the_parent_the_report(quickstart_search, monkeypatch):
    from toolkit import cli

    # The search is conftest's: shrunk("quickstart", "train.epochs=2", "tracking.log_model=false").
    store, result, mlflow_client = quickstart_search
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


# ---------------------------------------------------------------------------- any model's search


def _custom_search(client, name: str, layers: dict[str, float] | None = None, ratio: bool = True) -> str:
    """A search of a user's own model: only custom hp names, per-epoch loss and val_accuracy.

    val_accuracy rises with ``filters`` and is higher with ``pooling=max``; ``kernel_size`` and
    ``branch_units`` do nothing. ``layers`` adds diagnostics metrics: a gradient norm per layer
    (and the diagnostics' own first/last ratio when ``ratio``).
    """
    exp_id = client.create_experiment(name)
    # No direction tag: the analysis infers it from the objective's name.
    parent = client.create_run(exp_id, tags={"toolkit.role": "search", "toolkit.objective": "val_accuracy"})
    cells = [(f, k, p) for f in (16, 32, 64) for k in (3, 5) for p in ("max", "avg")]
    for trial_id, (filters, kernel_size, pooling) in enumerate(cells):
        final = 0.5 + 0.004 * filters + (0.05 if pooling == "max" else 0.0)
        acc = final * (1 - np.exp(-2.0 * np.arange(1, EPOCHS + 1)))
        last = {}
        if layers:
            last = {f"grad_norm/{layer}": norm for layer, norm in layers.items()}
            last[f"dead_relu/{next(iter(layers))}"] = 0.0
            if ratio:
                norms = list(layers.values())
                last["grad_ratio_first_last"] = norms[0] / norms[-1]
        params = {
            "filters": filters,
            "kernel_size": kernel_size,
            "pooling": pooling,
            "branch_units": 8 if trial_id % 2 else 24,
            # KerasTuner's own bookkeeping and a knob named like a table column.
            "tuner/epochs": 2,
            "epochs": 3,
        }
        curves = {"val_accuracy": acc, "loss": 1.5 * np.exp(-0.5 * np.arange(EPOCHS))}
        _log_trial(client, exp_id, parent.info.run_id, trial_id, params, curves, last)
    return parent.info.run_id


ESSAY_WORDS = ("activation", "depth", "ptimizer", "L1", "L2", "l1", "l2", "Gradients", "Dead units", "Overfitting", "dense")


def test_a_custom_model_gets_marginal_effects_and_no_mlp_sections(shared_store, tmp_path):
    store, client = shared_store
    parent = _custom_search(client, "custom")
    data = analysis.load_search(parent, store)
    assert data.direction == "max"
    assert data.hyperparameters == ["filters", "kernel_size", "pooling", "branch_units", "epochs (hp)"]
    assert (data.table["epochs (hp)"] == 3).all() and (data.table["epochs"] == EPOCHS).all()

    choices = analysis.choice_findings(data)
    assert len(choices) == 1 and choices[0].startswith("pooling: max beat avg by 5.0 pp in mean val_accuracy")
    assert "n=6 and 6" in choices[0] and "best " in choices[0]
    numeric = {f.split(":", 1)[0]: f for f in analysis.numeric_findings(data)}
    assert set(numeric) == {"filters", "kernel_size", "branch_units"}
    assert "higher filters went with better val_accuracy (Spearman ρ = 0.96 over 12 trials)" in numeric["filters"]
    assert "64 mean 0.781, best 0.806 (n=4)" in numeric["filters"]
    assert "no clear trend" in numeric["kernel_size"] and "Spearman ρ = 0.00 over 12 trials" in numeric["kernel_size"]
    for finder in (
        analysis.activation_depth_findings,
        analysis.gradient_findings,
        analysis.overfitting_findings,
        analysis.regularization_findings,
    ):
        assert finder(data) == []
    assert analysis.optimizer_ranking(data) is None
    importance = analysis.hyperparameter_importance(data)
    assert importance.table["hyperparameter"].iloc[0] == "filters"

    md = analysis.write_report(parent, store, tmp_path / "out", log_to_mlflow=False)
    text = md.read_text()
    assert "- filters: the best trial used 64" in text and "- pooling: max beat avg" in text
    assert "## Optimizers" not in text and "tuner/epochs" not in text
    findings = text.split("## Findings", 1)[1].split("##", 1)[0]
    assert not [word for word in ESSAY_WORDS if word in findings]
    assert sorted(p.name for p in (tmp_path / "out" / "report").iterdir()) == [
        "learning_curves.png",
        "objective_vs_hyperparameters.png",
    ]


def test_conv_layer_gradients_get_the_vanishing_finding(shared_store, tmp_path):
    store, client = shared_store
    layers = {"conv1d": 5e-4, "conv1d_1": 0.02, "dense": 0.5}
    data = analysis.load_search(_custom_search(client, "conv", layers), store)
    gradients = analysis.gradient_findings(data)
    assert gradients[0] == (
        "Gradients, the first layer's gradient norm was 1e+03× smaller than the last layer's at the last epoch "
        "(median ratio 0.001 over 12 trial(s)) — vanishing."
    )
    assert gradients[1].startswith("Dead units: none")
    assert analysis.plot_gradient_norms(data, tmp_path) == tmp_path / "gradient_norm_by_layer.png"


def test_without_the_diagnostics_ratio_layers_are_ordered_by_name(shared_store):
    store, client = shared_store
    # Logged out of order on purpose; the names say conv2d comes first and the output last.
    layers = {"dense_1": 0.5, "conv2d_1": 0.01, "dense": 0.1, "conv2d": 1e-4}
    data = analysis.load_search(_custom_search(client, "conv-no-ratio", layers, ratio=False), store)
    assert analysis.gradient_layers(data.table) == [f"grad_norm/{n}" for n in ("conv2d", "conv2d_1", "dense", "dense_1")]
    gradients = analysis.gradient_findings(data)
    assert "median ratio 0.0002 over 12 trial(s); first and last layer by name: conv2d and dense_1) — vanishing" in gradients[0]


def test_layer_order_reads_keras_names():
    names = ["output", "dense_10", "dense_2", "dense_0", "embedding", "separable_conv2d", "branch_a", "logits_1"]
    assert sorted(names, key=analysis.layer_order) == [
        "embedding",
        "separable_conv2d",
        "branch_a",
        "dense_0",
        "dense_2",
        "dense_10",
        "logits_1",
        "output",
    ]


def test_regularization_knobs_are_found_by_name(shared_store):
    import pandas as pd

    table = pd.DataFrame({"status": "FINISHED", "objective": [0.1, 0.2]})
    names = ["l2", "kernel_l2", "conv_l1", "l1_penalty", "l2_units", "gl2", "l2norm_type"]
    for n in names:
        table[n] = [0.0, 1.0] if n != "l2norm_type" else ["a", "b"]
    data = analysis.SearchData("t", "p", "val_loss", "min", table, names)
    assert analysis.regularization_knobs(data) == ["l2", "kernel_l2", "conv_l1", "l1_penalty"]


@pytest.mark.parametrize(
    ("metric", "stored", "expected"),
    [
        ("val_accuracy", None, "max"),
        ("val_mae", None, "min"),
        ("val_mean_squared_error", None, "min"),
        ("val_loss", None, "min"),
        ("val_auc", None, "max"),
        ("weighted_precision", None, "max"),
        ("val_my_error", None, "min"),
        ("val_my_score", None, "max"),
        ("val_mae", "max", "max"),  # a direction stored with the search wins
        ("val_accuracy", "min", "min"),
    ],
)
def test_metric_direction_is_one_rule(metric, stored, expected):
    assert analysis.metric_direction(metric, stored) == expected


def test_metric_direction_is_the_cards_rule_unless_the_search_stored_one():
    from toolkit.config import objective_direction

    for metric in ("val_mae", "val_loss", "val_accuracy", "val_auc", "val_my_score"):
        assert analysis.metric_direction(metric) == objective_direction(metric)
    assert analysis.metric_direction("val_mae", "max") == "max"


def test_a_search_with_a_min_objective_and_no_direction_tag_ranks_low_first(shared_store):
    store, client = shared_store
    exp_id = client.create_experiment("mae")
    parent = client.create_run(exp_id, tags={"toolkit.role": "search", "toolkit.objective": "val_mae"})
    for trial_id, width in enumerate((4, 8, 16)):
        curve = np.linspace(1.0, 1.0 / width, EPOCHS)
        _log_trial(client, exp_id, parent.info.run_id, trial_id, {"width": width}, {"val_mae": curve}, {})
    data = analysis.load_search(parent.info.run_id, store)
    assert data.direction == "min"
    assert analysis.best_trial_finding(data)[0].startswith("Best: trial 2 (width=16) reached val_mae 0.0625")
