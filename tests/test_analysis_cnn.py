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
