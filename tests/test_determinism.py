"""Speed settings must not change what is learnt: same seed and card → same trials and weights."""

from __future__ import annotations

import keras
import keras_tuner as kt
import numpy as np
from conftest import shrunk

from toolkit.config import validate
from toolkit.data import load_dataset, make_pipeline
from toolkit.models import MLPHyperModel
from toolkit.tuner import run_search


def train(steps_per_execution: int) -> list[np.ndarray]:
    cfg = validate(
        {
            "name": "d",
            "data": {"source": "digits"},
            "space": {"depth": 2, "units": 32, "optimizer": "momentum", "learning_rate": 0.05},
            "train": {"steps_per_execution": steps_per_execution, "jit_compile": False},
        }
    )
    data = load_dataset(cfg.data, seed=0)
    mean, var = data.feature_stats()
    keras.utils.set_random_seed(7)
    model = MLPHyperModel(cfg.space, data.input_shape, data.task, data.n_classes, mean, var, cfg.train, len(data.x_train)).build(
        kt.HyperParameters()
    )
    assert model.steps_per_execution == steps_per_execution
    model.fit(make_pipeline(data.x_train, data.y_train, 64, seed=3), epochs=2, verbose=0)
    weights = model.get_weights()
    keras.backend.clear_session()
    return weights


def test_steps_per_execution_changes_no_update():
    one, many = train(1), train(16)
    assert len(one) == len(many)
    for a, b in zip(one, many, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_same_seed_and_card_give_the_same_trials(tmp_path, monkeypatch):
    values = []
    for i in range(2):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/store{i}/mlflow.db")
        (tmp_path / f"store{i}").mkdir()
        result = run_search(
            shrunk("quickstart", "train.epochs=1", "tracking.log_model=false", "tracking.report=false", "train.diagnostics=false")
        )
        values.append([(t.hyperparameters, round(t.metrics["val_accuracy"], 6)) for t in result.trials])
    assert values[0] == values[1]


def test_an_edited_data_file_is_a_new_search(tmp_path):
    from toolkit.tuner import search_id

    csv = tmp_path / "d.csv"
    csv.write_text("a,label\n1,x\n2,y\n")
    cfg = validate({"name": "f", "data": {"source": str(csv), "target": "label"}})
    first = search_id(cfg)
    assert search_id(cfg) == first  # stable while the file is unchanged
    csv.write_text("a,label\n1,x\n3,y\n")
    assert search_id(cfg) != first


def test_the_search_runs_on_a_frozen_heap_and_leaves_it_unfrozen(monkeypatch):
    import gc

    from toolkit.tuner.tracked import frozen_heap

    assert gc.get_freeze_count() == 0
    with frozen_heap():
        frozen = gc.get_freeze_count()
        with frozen_heap():  # a search inside a search (a worker in-process) changes nothing
            assert gc.get_freeze_count() == frozen
        assert gc.get_freeze_count() == frozen
    assert frozen > 1000 and gc.get_freeze_count() == 0
    monkeypatch.setenv("TOOLKIT_GC_FREEZE", "0")
    with frozen_heap():
        assert gc.get_freeze_count() == 0
