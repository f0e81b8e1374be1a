"""Model families for images: the CNN, KerasTuner's HyperResNet and HyperXception, a tunable batch.

Real KerasTuner and a real SQLite MLflow store in tmp_path; digits (8x8x1, from scikit-learn)
and the generated ``shapes`` images, so nothing is downloaded.
"""

from __future__ import annotations

import subprocess
import sys

import keras
import keras_tuner as kt
import numpy as np
import pytest
from conftest import ROOT, shrunk

from toolkit.config import ACTIVATIONS, ConfigError, DataConfig, validate
from toolkit.data import load_dataset
from toolkit.models import FAMILIES, CNNHyperModel, for_card
from toolkit.tuner import run_search

FAST = ["tracking.report=false", "tracking.log_model=false", "tracking.register_model=false"]


def _digits_cnn(*overrides: str):
    return shrunk("cnn_digits", "tuner.max_trials=1", "train.epochs=1", *FAST, *overrides)


def _child_runs(client, name: str):
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id])
    return [r for r in runs if r.data.tags.get("toolkit.role") == "trial"], [
        r for r in runs if r.data.tags.get("toolkit.role") == "search"
    ]


def test_the_registry_holds_every_family():
    assert set(FAMILIES) == {"mlp", "cnn", "resnet", "xception"}


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cnn_builds_and_trains_on_digits_with_every_activation(activation):
    cfg = validate({"data": {"source": "digits"}, "model": {"family": "cnn"}, "space": {"activation": activation, "depth": 1}})
    dataset = load_dataset(cfg.data, cfg.seed)
    hypermodel = for_card(cfg, dataset)
    assert isinstance(hypermodel, CNNHyperModel)
    model = hypermodel.build(kt.HyperParameters())
    assert model.input_shape == (None, 8, 8, 1)
    assert any(isinstance(layer, keras.layers.Conv2D) for layer in model.layers)
    history = model.fit(dataset.x_train[:128], dataset.y_train[:128], batch_size=32, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])


def test_cnn_filters_double_per_block_and_regularize_every_kernel():
    cfg = validate(
        {
            "data": {"source": "digits"},
            "model": {"family": "cnn"},
            "space": {"conv_blocks": 3, "filters": 8, "kernel_size": 5, "pooling": "avg", "batch_norm": True, "l2": 1e-4},
        }
    )
    model = for_card(cfg, load_dataset(cfg.data, cfg.seed)).build(kt.HyperParameters())
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [c.filters for c in convs] == [8, 16, 32] and {c.kernel_size for c in convs} == {(5, 5)}
    assert sum(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers) == 3
    assert sum(isinstance(layer, keras.layers.AveragePooling2D) for layer in model.layers) == 3
    kernels = [layer for layer in model.layers if getattr(layer, "kernel", None) is not None]
    assert kernels and all(layer.kernel_regularizer is not None for layer in kernels)


def test_cnn_search_on_digits_logs_its_knobs_the_batch_and_conv_diagnostics(store, mlflow_client):
    cfg = _digits_cnn("train.batch_size=[16, 32]", "train.diagnostics=true")
    result = run_search(cfg)
    assert [t.status for t in result.trials] == ["FINISHED"]
    trials, parents = _child_runs(mlflow_client, "cnn_digits")
    params = trials[0].data.params
    assert {"conv_blocks", "filters", "kernel_size", "pooling", "batch_norm", "depth", "units", "batch_size"} <= set(params)
    assert params["batch_size"] in {"16", "32"}
    assert trials[0].data.tags["toolkit.batch_size_per_replica"] == params["batch_size"]
    assert parents[0].data.params["train.batch_size"] == "[16, 32]"
    metrics = trials[0].data.metrics
    # Diagnostics per convolution: gradient and weight norms, and dead ReLU channels.
    assert {"grad_norm/conv_0", "grad_norm/conv_1", "weight_l2/conv_0", "weight_l2/output"} <= set(metrics), sorted(metrics)
    assert any(k.startswith("dead_relu/conv_0") for k in metrics), sorted(metrics)


def test_a_listed_batch_size_is_a_hyperparameter_and_a_single_one_is_not():
    from toolkit.models.execution import batch_size, rebatch

    listed = validate({"train": {"batch_size": [64, 16, 32]}}).train
    assert listed.batch_size == 16 and listed.batch_choices == [16, 32, 64]
    hp = kt.HyperParameters()
    assert batch_size(hp, listed) == 16 and hp.values == {"batch_size": 16}
    import tensorflow as tf

    hp.values["batch_size"] = 64
    ds = tf.data.Dataset.range(100).batch(16)
    assert [int(b.shape[0]) for b in rebatch(ds, hp, listed)] == [64, 36]
    single = validate({"train": {"batch_size": 32}}).train
    hp = kt.HyperParameters()
    assert batch_size(hp, single) == 32 and hp.values == {}
    with pytest.raises(ConfigError, match=r"train\.batch_size: each batch size must be in \[1, 1000000\]\. Received: 0"):
        validate({"train": {"batch_size": [0, 32]}})


def test_steps_per_execution_follows_the_trials_batch():
    # 30 epochs: trials long enough for several steps per call (12 × 30 = 360 steps; see test_models).
    cfg = validate({"data": {"source": "digits"}, "model": {"family": "cnn"}, "train": {"batch_size": [16, 128], "epochs": 30}})
    hypermodel = for_card(cfg, load_dataset(cfg.data, cfg.seed))
    steps = {}
    for batch in (16, 128):
        hp = kt.HyperParameters()
        hp.Choice("batch_size", [16, 128])
        hp.values["batch_size"] = batch
        steps[batch] = hypermodel.build(hp).steps_per_execution
        keras.backend.clear_session()
    assert steps == {16: 32, 128: 12}  # ceil(1437/128) steps an epoch, capped at 32


def test_cnn_champion_predicts_from_raw_pixels(store, mlflow_client, monkeypatch):
    import mlflow.pyfunc

    cfg = shrunk("cnn_digits", "tuner.max_trials=1", "train.epochs=2", "tracking.report=false", "data.test_split=0.1")
    result = run_search(cfg)
    model = mlflow.pyfunc.load_model(result.model_uri)
    assert [s.shape for s in model.metadata.get_input_schema().inputs] == [(-1, 8, 8, 1)]
    dataset = load_dataset(cfg.data, cfg.seed)
    assert dataset.x_test.max() == 16.0  # raw intensities: the model scales them itself
    probabilities = np.asarray(model.predict(dataset.x_test))
    assert probabilities.shape == (len(dataset.x_test), 10)
    assert float((probabilities.argmax(axis=1) == dataset.y_test).mean()) > 0.5


def test_augment_adds_kerastuners_image_augmentation_as_trial_params(store, mlflow_client):
    result = run_search(_digits_cnn("model.augment=true", "train.diagnostics=false"))
    assert [t.status for t in result.trials] == ["FINISHED"]
    params = _child_runs(mlflow_client, "cnn_digits")[0][0].data.params
    assert {"factor_rotate", "factor_translate_x", "factor_translate_y", "factor_contrast"} <= set(params)


def _shapes(side: int = 32, n: int = 60, **model):
    return validate(
        {
            "name": "tiny_shapes",
            "data": {"source": "shapes", "image_size": side, "n_samples": n},
            "model": model,
            "tuner": {"max_trials": 1},
            # XLA would compile the million-parameter models for longer than the trial trains.
            "train": {"epochs": 1, "batch_size": 16, "diagnostics": False, "jit_compile": False},
            "tracking": {"report": False, "log_model": False, "register_model": False},
        }
    )


@pytest.mark.slow
def test_hyper_xception_runs_one_tiny_trial_with_its_own_hyperparameters(store, mlflow_client):
    result = run_search(_shapes(family="xception", n=48))
    assert [t.status for t in result.trials] == ["FINISHED"], result.trials
    params = _child_runs(mlflow_client, "tiny_shapes")[0][0].data.params
    assert {"num_residual_blocks", "sep_num_filters", "dropout_rate", "learning_rate"} <= set(params)


@pytest.mark.slow
def test_hyper_resnet_runs_one_tiny_trial_with_its_own_hyperparameters(store, mlflow_client):
    result = run_search(_shapes(family="resnet", n=48))
    assert [t.status for t in result.trials] == ["FINISHED"], result.trials
    params = _child_runs(mlflow_client, "tiny_shapes")[0][0].data.params
    assert {"version", "conv3_depth", "conv4_depth", "pooling", "optimizer", "learning_rate"} <= set(params)


@pytest.mark.parametrize(
    "raw, field, message",
    [
        (
            {"model": {"family": "resnet"}},
            "data.source",
            r"'resnet' needs images \(H, W, C\) of at least 32x32; .*'digits' gives 8x8x1",
        ),
        ({"model": {"family": "xception"}, "data": {"source": "shapes", "image_size": 16}}, "data.source", r"gives 16x16x1"),
        (
            {"model": {"family": "cnn"}, "data": {"source": "iris"}},
            "data.source",
            r"'cnn' needs images .*'iris' gives tabular rows",
        ),
        ({"model": {"family": "resnet"}, "data": {"source": "shapes"}, "space": {"units": 8}}, "space.units", "reads no space"),
        ({"space": {"filters": [8, 16]}}, "space.filters", r"not read by model.family 'mlp'.*Received: filters=\[8, 16\]"),
        ({"model": {"augment": True}}, "model.augment", r"for the image families \(cnn, resnet, xception\)"),
        ({"space": {"pooling": "median"}}, "space.pooling", r"unknown pooling 'median'\. Accepted: max, avg"),
        ({"space": {"batch_norm": 1}}, "space.batch_norm", "must be true or false"),
        ({"data": {"source": "digits", "image_size": 16}}, "data.image_size", "not used by 'digits'"),
    ],
)
def test_a_card_the_family_cannot_take_is_refused_naming_the_field(raw, field, message):
    with pytest.raises(ConfigError, match=message) as info:
        validate(raw)
    assert info.value.field == field


def _tune(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "toolkit.cli", "tune", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )


def test_data_the_family_cannot_take_exits_2_before_any_run(tmp_path, cli_in_process):
    # A tabular .npz is known only once loaded: refused at run time, still before any MLflow run.
    # (Built-in sources are refused by validate: test_a_card_the_family_cannot_take_...)
    np.savez(tmp_path / "rows.npz", x=np.random.rand(60, 5).astype("float32"), y=np.arange(60) % 3)
    card = tmp_path / "card.yaml"
    card.write_text(f"name: rows\ndata: {{source: {tmp_path / 'rows.npz'}}}\nmodel: {{family: cnn}}\n")
    code, _, err = cli_in_process("tune", str(card), env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"})
    assert code == 2, err
    assert "data.source: model.family 'cnn' needs images (H, W, C)" in err and "Traceback" not in err
    assert not (tmp_path / "store" / "mlflow.db").exists()


def test_image_npz_of_h_w_is_given_a_channel_for_the_cnn():
    from toolkit.models.cnn import CNNHyperModel

    hypermodel = CNNHyperModel(validate({}).space, (6, 6, 1), 2, input_shape=(6, 6))
    model = hypermodel.build(kt.HyperParameters())
    assert model.input_shape == (None, 6, 6) and model.predict(np.zeros((2, 6, 6)), verbose=0).shape == (2, 2)


def test_shapes_is_a_seeded_image_source_with_three_balanced_classes():
    first = load_dataset(DataConfig(source="shapes", n_samples=90, image_size=16), seed=3)
    again = load_dataset(DataConfig(source="shapes", n_samples=90, image_size=16), seed=3)
    assert first.input_shape == (16, 16, 1) and first.class_names == ["circle", "square", "triangle"]
    assert np.array_equal(first.x_train, again.x_train)
    assert 0.0 <= first.x_train.min() and first.x_train.max() <= 255.0
    labels = np.concatenate([first.y_train, first.y_val])
    assert np.bincount(labels).tolist() == [30, 30, 30]


@pytest.mark.slow
def test_cnn_search_with_two_workers(tmp_path):
    import os

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"}
    proc = _tune(
        "cnn_digits",
        "--workers",
        "2",
        "--set",
        "tuner.max_trials=2",
        "--set",
        "train.epochs=1",
        "--set",
        "tracking.report=false",
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from mlflow import MlflowClient

    trials, _ = _child_runs(MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]), "cnn_digits")
    assert sorted(r.info.status for r in trials) == ["FINISHED", "FINISHED"]
    assert {r.data.tags["toolkit.worker"] for r in trials} <= {"tuner0", "tuner1"}


def test_an_mlp_cards_record_holds_only_what_the_mlp_reads():
    # The resolved card is the search's id for resume: an MLP card resolves as before the image families.
    card = validate({"data": {"source": "digits"}}).to_dict()
    assert set(card["space"]) == {"depth", "units", "activation", "dropout", "optimizer", "learning_rate", "momentum", "l1", "l2"}
    assert "augment" not in card["model"] and "image_size" not in card["data"]
    assert card["train"]["batch_size"] == 64
    cnn = validate({"data": {"source": "shapes", "image_size": 16}, "model": {"family": "cnn", "augment": True}}).to_dict()
    assert {"conv_blocks", "filters", "kernel_size", "pooling", "batch_norm"} <= set(cnn["space"])
    assert cnn["model"]["augment"] is True and cnn["data"]["image_size"] == 16
    assert validate({"model": {"family": "xception"}, "data": {"source": "shapes"}}).to_dict()["space"] == {}
