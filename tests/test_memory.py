"""A search's memory stays flat: no trial keeps the graphs of the trials before it alive."""

from __future__ import annotations

from conftest import shrunk

from toolkit.tuner import run_search
from toolkit.tuner.tracked import custom_gradient_names


def test_no_trial_leaves_its_graphs_in_tensorflows_gradient_registry(store):
    # Keras' train step registers tf.custom_gradient entries that pin the trial's whole graph
    # (tensorflow/tensorflow#97697): two more per trial, and 5 MB, unless the tuner drops them.
    counts = []
    run_search(
        shrunk(
            "quickstart", "tuner.max_trials=3", "tracking.log_model=false", "tracking.report=false", "train.diagnostics=false"
        ),
        on_trial=lambda result: counts.append(len(custom_gradient_names())),
    )
    assert len(counts) == 3
    assert counts[-1] == counts[0], counts
