"""The concept cards test what the essay claims, each on a shrunk search.

Every card in ``experiments/`` validates (fast). The slow tests run a shrunk version of each
concept card end to end (real KerasTuner, real MLflow) and assert the direction of the effect.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ROOT, shrunk

from toolkit import analysis
from toolkit.config import available_cards, load_config

CARDS = available_cards(ROOT / "experiments")
CONCEPTS = ("activations", "nonlinearity", "regularization", "optimizers", "depth")


@pytest.mark.parametrize("card", CARDS)
def test_every_shipped_card_validates(card):
    cfg = load_config(card, experiments_dir=ROOT / "experiments")
    assert cfg.name == card


@pytest.mark.parametrize("card", CONCEPTS)
def test_concept_cards_exist_and_say_what_the_essay_claims(card):
    assert card in CARDS
    text = (ROOT / "experiments" / f"{card}.yaml").read_text()
    assert text.startswith("#") and "essay" in text.split("name:")[0]


def _search(*overrides: str) -> analysis.SearchData:
    """Run a shrunk card and read its trials back from MLflow alone."""
    from toolkit.tuner import run_search

    cfg = shrunk(*overrides, "tracking.log_model=false")
    result = run_search(cfg)
    assert all(t.status == "FINISHED" for t in result.trials), [t.failure for t in result.trials]
    return analysis.load_search(result.parent_run_id)


def _by(data: analysis.SearchData, column: str) -> dict:
    return {row[column]: row for _, row in data.finished.iterrows()}


@pytest.mark.slow
def test_activations_relu_beats_sigmoid_when_deep_and_sigmoid_gradients_vanish(store):
    data = _search("activations", "space.activation=[sigmoid, relu]", "space.depth=8", "train.epochs=3")
    trials = _by(data, "activation")
    relu, sigmoid = trials["relu"], trials["sigmoid"]
    assert relu["objective"] > sigmoid["objective"] + 0.2
    # Far below: the sigmoid's first layer gets orders of magnitude less gradient than its last.
    assert sigmoid["grad_ratio_first_last"] < 0.01
    assert sigmoid["grad_ratio_first_last"] < relu["grad_ratio_first_last"] / 100


@pytest.mark.slow
def test_nonlinearity_linear_stays_near_chance_while_tanh_and_relu_fit_xor(store):
    data = _search("nonlinearity", "space.depth=2", "tuner.max_trials=3", "train.epochs=20")
    trials = _by(data, "activation")
    assert trials["linear"]["objective"] < 0.7  # chance is 0.5 on balanced XOR
    assert trials["tanh"]["objective"] > 0.9
    assert trials["relu"]["objective"] > 0.9


@pytest.mark.slow
def test_regularization_l2_shrinks_the_gap_and_the_weights(store):
    data = _search("regularization", "space.l1=0.0", "space.l2=[0.0, 0.01]", "train.epochs=40")
    trials = _by(data, "l2")
    plain, strong = trials[0.0], trials[0.01]
    assert strong["gap_loss"] < plain["gap_loss"]
    assert plain["gap_loss"] > 0.1  # the unregularized network did overfit

    def weight_norm(row):
        return np.sqrt(sum(row[c] ** 2 for c in row.index if c.startswith("weight_l2/")))

    assert weight_norm(strong) < weight_norm(plain) / 2


@pytest.mark.slow
def test_optimizers_curves_are_logged_and_the_report_ranks_them(store, mlflow_client):
    epochs = 4
    data = _search("optimizers", "space.optimizer=[sgd, adam]", "space.learning_rate=0.01", f"train.epochs={epochs}")
    for run_id in data.finished["run_id"]:
        for metric in ("val_accuracy", "loss", "gap_loss"):
            steps = sorted(m.step for m in mlflow_client.get_metric_history(run_id, metric))
            assert steps == list(range(epochs)), metric
        # The probe runs within its time budget: always the first and the last epoch.
        steps = {m.step for m in mlflow_client.get_metric_history(run_id, "grad_norm/dense_0")}
        assert {0, epochs - 1} <= steps <= set(range(epochs))
    ranking = analysis.optimizer_ranking(data)
    assert set(ranking["optimizer"]) == {"sgd", "adam"}
    assert ranking.iloc[0]["optimizer"] == "adam"  # adaptive steps get there first at this rate
    report = mlflow_client.download_artifacts(data.parent_run_id, "report.md")
    text = open(report).read()
    assert "Optimizers, ranked by the epochs their fastest trial took" in text
    assert "## Optimizers: epochs to target" in text
