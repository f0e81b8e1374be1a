"""The essay's question for images (slow): convolution beats an MLP of similar size, and deep
sigmoid conv stacks lose their gradient where relu stacks keep it.

Real KerasTuner and MLflow in tmp_path, on the generated ``shapes`` images (nothing downloaded).
"""

from __future__ import annotations

import pytest
from conftest import shrunk

from toolkit import analysis
from toolkit.tuner import run_search

QUICK = ["tracking.report=false", "tracking.log_model=false", "tracking.register_model=false"]


def _best(result) -> float:
    return max(t.metrics["best_val_accuracy"] for t in result.trials if t.status == "FINISHED")


@pytest.mark.slow
def test_a_cnn_beats_an_mlp_of_similar_size_on_shapes(store, tmp_path):
    # The cards' data and 10 epochs; about 33k parameters each: 2 conv blocks of 8 and 16 filters into 32 units; 1024 pixels into 32 units.
    cnn = run_search(
        shrunk("cnn_vs_mlp", "tuner.max_trials=1", "train.epochs=10", "space.conv_blocks=2", "space.activation=relu", *QUICK)
    )
    mlp = run_search(shrunk("mlp_vs_cnn", "tuner.max_trials=1", "train.epochs=10", "space.depth=1", "space.units=32", *QUICK))
    assert _best(cnn) > 0.85
    assert _best(cnn) - _best(mlp) > 0.15, (_best(cnn), _best(mlp))
    # The report says so, with the numbers: the card's compare_with sets the MLP search beside the CNN's.
    report = analysis.write_report(
        cnn.parent_run_id, out=tmp_path / "report", log_to_mlflow=False, compare_with=["mlp_vs_cnn"]
    ).read_text()
    similar = next(line for line in report.splitlines() if line.startswith("- At similar size"))
    assert "trial 0 of cnn_vs_mlp (cnn)" in similar and "trial 0 of mlp_vs_cnn (mlp)" in similar
    assert "cnn_vs_mlp led by" in similar and f"reached val_accuracy {_best(cnn):.3f}" in similar, similar


@pytest.mark.slow
def test_deep_sigmoid_conv_stacks_vanish_where_relu_stacks_do_not(store, mlflow_client):
    result = run_search(
        shrunk("cnn_vs_mlp", "tuner.max_trials=2", "train.epochs=3", "space.conv_blocks=4", "train.diagnostics=true", *QUICK)
    )
    ratio = {}
    for trial in result.trials:
        run = mlflow_client.get_run(trial.run_id)
        ratio[run.data.params["activation"]] = run.data.metrics["grad_ratio_first_last"]
    # The first conv layer's gradient, relative to the last layer's, is far smaller under sigmoid.
    assert ratio["sigmoid"] * 10 < ratio["relu"], ratio
