"""Strategies: the right tf.distribute strategy per card, clear failures for absent hardware, tags per trial.

Logical CPU devices can be made only before TensorFlow initializes its devices, and this test
process has long done so; so ``mirrored`` on two logical CPUs is run in a fresh process through the
CLI, as a user runs it, and read back from MLflow.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
from conftest import ROOT, shrunk

from toolkit.config import STRATEGIES, ConfigError, StrategyConfig, load_config
from toolkit.strategy import BUILDERS, ENV_TRY_MULTI_WORKER, TPU_DEVICE_GLOBS, StrategyError, check_available, make_strategy

QUICKSTART = str(ROOT / "experiments" / "quickstart.yaml")


def toolkit(*args: str, store: str | None = None, timeout: int = 300, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run the CLI in a fresh process; returns the result and its wall time in seconds."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env}
    if store:
        full_env["MLFLOW_TRACKING_URI"] = store
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "toolkit.cli", *args], capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=timeout
    )
    return proc, time.perf_counter() - started


def no_runs(store: str) -> bool:
    """Nothing was recorded: the store was never even created (cheap), or it holds no run."""
    if not Path(store[len("sqlite:///") :]).exists():
        return True
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    return not client.search_runs([e.experiment_id for e in client.search_experiments()])


def has_tpu() -> bool:
    return any(glob.glob(p) for p in TPU_DEVICE_GLOBS) or bool(os.environ.get("TPU_NAME") or os.environ.get("COLAB_TPU_ADDR"))


def has_gpu() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


@pytest.fixture
def no_tpu_env(monkeypatch: pytest.MonkeyPatch) -> None:
    if any(glob.glob(p) for p in TPU_DEVICE_GLOBS):
        pytest.skip("this machine has TPU devices")
    monkeypatch.delenv("TPU_NAME", raising=False)
    monkeypatch.delenv("COLAB_TPU_ADDR", raising=False)


# ---------------------------------------------------------------------------- names


def test_the_registry_names_are_the_card_schemas_names():
    literal = typing.get_args(StrategyConfig.model_fields["name"].annotation)
    assert tuple(BUILDERS) == STRATEGIES == literal


def test_a_bad_strategy_name_is_a_card_error_that_lists_the_valid_names(store):
    with pytest.raises(
        ConfigError,
        match=r"strategy\.name: Input should be 'auto', 'cpu', 'gpu', 'mirrored', 'tpu' or 'multi_worker'. Received: 'warp'",
    ):
        load_config(QUICKSTART, ["strategy=warp"])
    with pytest.raises(StrategyError, match="unknown name 'warp'. Accepted: auto, cpu, gpu, mirrored, tpu, multi_worker"):
        make_strategy("warp")

    from toolkit.cli import main

    assert main(["tune", QUICKSTART, "--set", "strategy.name=warp"]) == 2
    assert no_runs(store)


# ---------------------------------------------------------------------------- CPU


def test_auto_picks_the_default_cpu_strategy_on_this_machine(no_tpu_env):
    if has_gpu():
        pytest.skip("this machine has a GPU")
    info = make_strategy("auto")
    assert info.name == "DefaultDistributionStrategy"
    assert info.devices == ["/cpu:0"]
    assert info.replicas == 1
    assert info.tags() == {
        "toolkit.strategy": "DefaultDistributionStrategy",
        "toolkit.devices": "/cpu:0",
        "toolkit.replicas": "1",
    }
    assert info.per_replica_batch(64) == 64


def test_cpu_is_one_device_on_cpu0():
    info = make_strategy(StrategyConfig(name="cpu"))
    assert (info.name, info.devices, info.replicas) == ("OneDeviceStrategy", ["/cpu:0"], 1)


def test_mirrored_on_cpu_after_tensorflow_initialized_is_a_clear_error():
    import tensorflow as tf

    from toolkit.strategy import split_cpu

    tf.constant(1.0)  # TensorFlow has initialized its devices in this process
    have = len(tf.config.list_logical_devices("CPU"))
    with pytest.raises(StrategyError, match=rf"needs {have + 1} logical CPU devices.*already initialized.*fresh process"):
        split_cpu(have + 1)


# ---------------------------------------------------------------------------- absent hardware


def test_tpu_without_a_tpu_fails_fast_and_says_so(no_tpu_env):
    started = time.perf_counter()
    with pytest.raises(StrategyError, match="no TPU was found") as raised:
        make_strategy("tpu")
    assert time.perf_counter() - started < 1.0  # no metadata-server lookup
    assert isinstance(raised.value, ConfigError)


def test_tpu_cli_exits_nonzero_within_seconds_and_creates_no_run(no_tpu_env, store):
    proc, seconds = toolkit("tune", QUICKSTART, "--set", "strategy=tpu", store=store)
    assert proc.returncode == 2, proc.stderr
    assert "no TPU was found" in proc.stderr
    assert "Traceback" not in proc.stderr
    # Checked before TensorFlow loads: about a second even on a busy machine.
    assert seconds < 8, f"took {seconds:.1f}s"
    assert no_runs(store)


def test_gpu_without_a_gpu_is_exit_2_with_a_clear_message_and_no_run(store, capsys):
    if has_gpu():
        pytest.skip("this machine has a GPU")
    from toolkit.cli import main

    code = main(["tune", QUICKSTART, "--set", "strategy=gpu", "--set", "tuner.max_trials=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "'gpu' was asked for but TensorFlow sees no GPU" in err
    assert "make install GPU=1" in err
    assert no_runs(store)


def test_multi_worker_needs_a_valid_tf_config(monkeypatch):
    cfg = StrategyConfig(name="multi_worker")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(StrategyError, match="TF_CONFIG, which is not set"):
        check_available(cfg)
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(StrategyError, match="TF_CONFIG must be JSON with a cluster and a task. Received: '{not json'"):
        make_strategy(cfg)


def test_multi_worker_over_two_workers_is_refused_naming_the_keras_issue(monkeypatch):
    monkeypatch.delenv(ENV_TRY_MULTI_WORKER, raising=False)
    cluster = {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 0}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(cluster))
    with pytest.raises(StrategyError, match=r"over 2 workers cannot train with Keras 3.*keras-team/keras#20585.*--workers N"):
        check_available(StrategyConfig(name="multi_worker"))


# ---------------------------------------------------------------------------- precision


@pytest.mark.parametrize("source", ["digits", "friedman"])
@pytest.mark.parametrize("policy, compute", [("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")])
def test_mixed_precision_builds_float32_outputs_and_does_not_leak(policy, compute, source):
    import keras
    import keras_tuner as kt

    from toolkit.data import load_dataset
    from toolkit.models import build_hypermodel

    sized = ["data.n_samples=200"] if source == "friedman" else []
    cfg = shrunk("quickstart", f"train.precision={policy}", f"data.source={source}", *sized)
    dataset = load_dataset(cfg.data, cfg.seed)
    hypermodel = build_hypermodel(cfg, dataset)
    # KerasTuner clears the session (and with it Keras' global policy) before every build.
    keras.backend.clear_session()
    model = hypermodel.build(kt.HyperParameters())

    hidden = [layer for layer in model.layers if layer.name.startswith("dense_")]
    assert hidden and all(layer.compute_dtype == compute for layer in hidden)
    assert model.layers[-1].compute_dtype == "float32"
    assert model.outputs[0].dtype == "float32"
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) == (policy == "mixed_float16")
    assert keras.mixed_precision.global_policy().name == "float32"

    if policy == "mixed_bfloat16" and source == "digits":  # and it trains
        history = model.fit(dataset.x_train[:128], dataset.y_train[:128], batch_size=32, epochs=1, verbose=0)
        assert history.history["loss"][0] > 0


# ---------------------------------------------------------------------------- end to end (fresh processes)


@pytest.mark.slow
def test_mirrored_search_on_two_logical_cpus_tags_every_trial(store, mlflow_client):
    if has_gpu():
        pytest.skip("mirrored uses the GPUs on this machine")
    proc, _ = toolkit(
        "tune",
        QUICKSTART,
        "--set",
        "strategy=mirrored",
        "--set",
        "tuner.max_trials=2",
        "--set",
        "train.epochs=1",
        "--set",
        "tracking.log_model=false",
        "--set",
        "tracking.report=false",
        store=store,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    exp = mlflow_client.get_experiment_by_name("quickstart")
    runs = mlflow_client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("toolkit.role") == "search"]
    trials = [r for r in runs if r.data.tags.get("toolkit.role") == "trial"]
    assert len(parent) == 1 and parent[0].data.tags["toolkit.strategy"] == "MirroredStrategy"
    assert len(trials) == 2
    for trial in trials:
        assert trial.info.status == "FINISHED"
        tags = trial.data.tags
        assert tags["toolkit.strategy"] == "MirroredStrategy"
        assert tags["toolkit.devices"] == "/cpu:0,/cpu:1"
        assert tags["toolkit.replicas"] == "2"
        assert tags["toolkit.batch_size_per_replica"] == "32"  # the card's 64 is the global batch
        assert "val_accuracy" in trial.data.metrics


@pytest.mark.slow
def test_a_global_batch_smaller_than_the_replicas_is_a_card_error(store):
    if has_gpu():
        pytest.skip("mirrored uses the GPUs on this machine")
    proc, _ = toolkit(
        "tune",
        QUICKSTART,
        "--set",
        "strategy=mirrored",
        "--set",
        "strategy.replicas=4",
        "--set",
        "train.batch_size=2",
        store=store,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "train.batch_size: the global batch 2 is smaller than the 4 replicas" in proc.stderr
    assert no_runs(store)


MULTI_WORKER_FIT = """
import json, os, sys
os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": sys.argv[2].split(",")}, "task": {"type": "worker", "index": int(sys.argv[1])}})
import keras, numpy as np, tensorflow as tf
strategy = tf.distribute.MultiWorkerMirroredStrategy()
x = np.random.default_rng(0).random((256, 8)).astype("float32")
y = (x.sum(axis=1) > 4).astype("int64")
with strategy.scope():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2, activation="softmax")])
    model.compile("sgd", "sparse_categorical_crossentropy")
try:
    model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(64), epochs=1, verbose=0)
    print("FIT OK")
except Exception as exc:
    print("FIT FAILED", type(exc).__name__, str(exc)[-200:].replace(chr(10), " "))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_keras3_still_cannot_fit_under_multi_worker_mirrored_on_two_local_processes(tmp_path: Path):
    """A canary for keras-team/keras#20585: when this fails, Keras fixed it and the refusal can go."""
    script = tmp_path / "fit.py"
    script.write_text(MULTI_WORKER_FIT)
    workers = ",".join(f"127.0.0.1:{_free_port()}" for _ in range(2))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), workers], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for out in outputs:
        assert "FIT FAILED ValueError" in out and "PerReplica" in out, out
