"""The report on a CNN search: its conv_blocks is the depth the essay's findings read."""

from __future__ import annotations

import pandas as pd

from toolkit import analysis


def _cnn_search() -> analysis.SearchData:
    # A dense head of fixed depth; what varies is the number of conv blocks.
    rows = []
    for blocks in (1, 2, 3, 4):
        for activation, accuracy, ratio in (("relu", 0.99, 0.5), ("sigmoid", 0.4, 0.01)):
            rows.append(
                {
                    "trial_id": f"{blocks}{activation}",
                    "status": "FINISHED",
                    "objective": accuracy - (0.2 if blocks >= 3 and activation == "sigmoid" else 0.0),
                    "conv_blocks": blocks,
                    "depth": 1,
                    "activation": activation,
                    "grad_ratio_first_last": ratio,
                }
            )
    table = pd.DataFrame(rows)
    return analysis.SearchData("cnn", "p", "val_accuracy", "max", table, ["conv_blocks", "depth", "activation"])


def test_conv_blocks_is_the_depth_of_a_cnn_search(tmp_path):
    data = _cnn_search()
    deep = analysis.activation_depth_findings(data)
    assert deep[0].startswith("At conv blocks ≥ 3, relu beat sigmoid by 79.0 pp"), deep
    assert deep[1].startswith("At conv blocks < 3, relu beat sigmoid by 59.0 pp"), deep
    gradients = " ".join(analysis.gradient_findings(data))
    assert "sigmoid: the first layer's gradient norm was 100× smaller" in gradients and "at conv blocks ≥ 3" in gradients
    assert analysis.plot_activation_depth(data, tmp_path) == tmp_path / "activation_depth_heatmap.png"


def _sized(name: str, model: str, trials: list[tuple[float, float]]) -> analysis.SearchData:
    rows = [
        {
            "trial_id": str(i),
            "run_id": f"{name}-{i}",
            "status": "FINISHED",
            "objective": accuracy,
            "best_epoch": 0,
            "epochs": 1,
            "model_params": params,
            "units": 8 * (i + 1),
        }
        for i, (accuracy, params) in enumerate(trials)
    ]
    return analysis.SearchData(name, f"p-{name}", "val_accuracy", "max", pd.DataFrame(rows), ["units"], model=model)


def test_the_report_sets_a_cnn_beside_an_mlp_best_against_best_and_at_similar_size(tmp_path):
    # The best CNN (0.99) is 20k parameters; the best MLP overall (0.75) is 70k, too big to pair with it.
    cnn = _sized("cnn_vs_mlp", "cnn", [(0.99, 20_000), (0.95, 33_000), (0.40, 65_000)])
    mlp = _sized("mlp_vs_cnn", "mlp", [(0.63, 33_100), (0.75, 70_000), (0.60, 28_000)])
    found = analysis.comparison_findings(cnn, {"mlp_vs_cnn": mlp})
    assert found[0] == (
        "Best against best: trial 0 of cnn_vs_mlp (cnn), 20k parameters, reached val_accuracy 0.990; "
        "trial 1 of mlp_vs_cnn (mlp), 70k parameters, reached 0.750: cnn_vs_mlp led by 24.0 pp."
    )
    # 20k has a partner within 1.5x (28k, 0.60), so it is the pair: the best CNN that has one.
    assert found[1].startswith("At similar size (within 1.5× the parameters): trial 0 of cnn_vs_mlp (cnn), 20k")
    assert found[1].endswith("trial 2 of mlp_vs_cnn (mlp), 28k parameters, reached 0.600: cnn_vs_mlp led by 39.0 pp.")
    table = analysis.comparison_table(cnn, {"mlp_vs_cnn": mlp})
    assert list(table["search"]) == ["cnn_vs_mlp", "mlp_vs_cnn"] and list(table["its params"]) == ["20k", "70k"]

    far = _sized("mlp_vs_cnn", "mlp", [(0.63, 500_000)])
    assert analysis.comparison_findings(cnn, {"mlp_vs_cnn": far})[1] == (
        "No trials of similar size (within 1.5×): cnn_vs_mlp spans 20k parameters–65k parameters, "
        "mlp_vs_cnn 500k parameters–500k parameters."
    )
    missing = analysis.comparison_findings(cnn, {"mlp_vs_cnn": None})
    assert missing == [
        "mlp_vs_cnn: no search in this store yet; run `make tune EXP=mlp_vs_cnn`, then `toolkit report cnn_vs_mlp` "
        "to set the two side by side."
    ]
    report = analysis.build_report(cnn, tmp_path, {"mlp_vs_cnn": mlp}).markdown()
    assert "## Against mlp_vs_cnn" in report and "| cnn_vs_mlp | cnn | 3 | 0.99 | 0 | 20k | 20k | 65k |" in report
