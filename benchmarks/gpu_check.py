"""P7: training samples/s of a toolkit trial ÷ a bare ``model.fit`` of the same model and data, same device.

Goal ≥ 0.95. It prints the devices TensorFlow finds, then runs a one-trial search with
``strategy: auto`` (tracked in MLflow, diagnostics on, as a user runs it) and a bare ``fit`` of the
model the same HyperModel builds, on the same ``tf.data`` pipeline under the same strategy,
alternated A B A B. Throughput is steady state: the median epoch after the first (which traces
the step functions), timed from epoch end to epoch end, so each side pays its own per-epoch
callbacks and validation. On the toolkit side the epoch ends are the timestamps of the per-epoch
metrics MLflow recorded.

With two or more GPUs ``auto`` is MirroredStrategy; the script then also runs ``strategy: gpu``
(one GPU) so the mirrored speed-up is visible. On a machine with no GPU it says so, runs the same
comparison on the CPU for reference (not P7), and exits 0.

    python benchmarks/gpu_check.py [--samples N] [--epochs E] [--depth D] [--units U] [--batch-size B] [--pairs P] [--no-cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
# Keras warns that fit's shuffle does not apply to a tf.data pipeline (which shuffles itself).
warnings.filterwarnings("ignore", category=UserWarning)

from harness import ROOT, machine, verdict  # noqa: E402

sys.path.insert(0, str(ROOT))

GOAL = 0.95
# Sized so a GPU is busy rather than waiting on per-step overhead; the CPU reference is smaller.
GPU_DEFAULTS = {"samples": 200_000, "epochs": 5, "depth": 4, "units": 1024, "batch_size": 1024}
# Epochs of a few seconds, so the per-epoch costs are weighed against real work, not timer noise.
CPU_DEFAULTS = {"samples": 100_000, "epochs": 4, "depth": 3, "units": 256, "batch_size": 256}


def card(strategy: str, samples: int, epochs: int, depth: int, units: int, batch_size: int) -> Any:
    """One fixed model (every value a scalar), so the search's single trial is the bare fit's model."""
    from toolkit.config import ExperimentConfig

    return ExperimentConfig.model_validate(
        {
            "name": "gpu_check",
            "seed": 0,
            "data": {"source": "spirals", "n_samples": samples, "n_classes": 3},
            "space": {"depth": depth, "units": units, "activation": "relu", "optimizer": "adam", "learning_rate": 1e-3},
            "tuner": {"algorithm": "random", "max_trials": 1, "objective": "val_accuracy"},
            "train": {"epochs": epochs, "batch_size": batch_size},
            "strategy": strategy,
            # The best model and the report are once-per-search costs, not training throughput.
            "tracking": {"log_model": False, "register_model": False, "report": False},
        }
    )


def steady_rate(epoch_ends: list[float], n_train: int) -> float:
    """Samples/s from epoch-end times (seconds): the median epoch after the first."""
    durations = [b - a for a, b in zip(epoch_ends[:-1], epoch_ends[1:], strict=True)]
    if not durations:
        raise ValueError("need at least 2 epochs to time a steady-state epoch")
    return n_train / statistics.median(durations)


def toolkit_rate(cfg: Any) -> tuple[float, Any]:
    """Run the one-trial search in a fresh MLflow store; samples/s from its per-epoch metric times."""
    from mlflow import MlflowClient

    from toolkit.data import load_dataset
    from toolkit.tuner import run_search

    folder = tempfile.mkdtemp(prefix="gpu-check-")
    uri = f"sqlite:///{folder}/mlflow.db"
    result = run_search(cfg, fresh=True, uri=uri)
    trial = result.trials[0]
    if trial.status != "FINISHED":
        raise RuntimeError(f"the toolkit trial did not finish: {trial.status} {trial.failure}")
    history = MlflowClient(tracking_uri=uri).get_metric_history(trial.run_id, "loss")
    ends = [m.timestamp / 1000 for m in sorted(history, key=lambda m: m.step)]
    tags = MlflowClient(tracking_uri=uri).get_run(trial.run_id).data.tags
    n_train = len(load_dataset(cfg.data, cfg.seed).x_train)
    return steady_rate(ends, n_train), tags


def bare_rate(cfg: Any) -> float:
    """The same HyperModel's model, the same pipelines, a plain ``fit`` under the same strategy."""
    import keras
    import keras_tuner as kt

    from toolkit.data import load_dataset
    from toolkit.models import build_hypermodel
    from toolkit.strategy import make_strategy
    from toolkit.tuner import search_inputs

    class EpochEnds(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.ends: list[float] = []

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            self.ends.append(time.time())

    dataset = load_dataset(cfg.data, cfg.seed)
    info = make_strategy(cfg.strategy)
    keras.backend.clear_session()
    keras.utils.set_random_seed(cfg.seed)
    with info.strategy.scope():
        model = build_hypermodel(cfg, dataset).build(kt.HyperParameters())
    (train_ds,), kwargs = search_inputs(cfg, dataset)
    ends = EpochEnds()
    kwargs["callbacks"] = [*kwargs["callbacks"], ends]
    model.fit(train_ds, **kwargs)
    return steady_rate(ends.ends, len(dataset.x_train))


def compare(cfg: Any, pairs: int) -> float:
    """Alternate toolkit and bare runs; print each and return the ratio of the medians."""
    toolkit_rates, bare_rates = [], []
    tags: dict[str, str] = {}
    for round_ in range(pairs):
        rate, tags = toolkit_rate(cfg)
        toolkit_rates.append(rate)
        bare_rates.append(bare_rate(cfg))
        print(
            f"    round {round_ + 1}: toolkit {toolkit_rates[-1]:,.0f} samples/s, bare fit {bare_rates[-1]:,.0f} samples/s",
            flush=True,
        )
    print(
        f"    trial tags: strategy={tags.get('toolkit.strategy')} devices={tags.get('toolkit.devices')} "
        f"replicas={tags.get('toolkit.replicas')} per-replica batch={tags.get('toolkit.batch_size_per_replica')}"
    )
    toolkit_median, bare_median = statistics.median(toolkit_rates), statistics.median(bare_rates)
    ratio = toolkit_median / bare_median
    print(f"    median: toolkit {toolkit_median:,.0f} samples/s ÷ bare {bare_median:,.0f} samples/s = {ratio:.3f}")
    return ratio


def describe_devices() -> list[Any]:
    """Print the machine and the devices TensorFlow finds; return the GPUs."""
    import tensorflow as tf

    from toolkit.strategy import find_tpu

    print(f"machine: {machine()}")
    print(
        f"tensorflow {tf.__version__} (built with CUDA: {tf.test.is_built_with_cuda()}), keras {__import__('keras').__version__}"
    )
    gpus = tf.config.list_physical_devices("GPU")
    for kind in ("CPU", "GPU"):
        for device in tf.config.list_physical_devices(kind):
            details = tf.config.experimental.get_device_details(device) if kind == "GPU" else {}
            extra = (
                f" ({details.get('device_name', '?')}, compute capability {details.get('compute_capability', '?')})"
                if details
                else ""
            )
            print(f"device: {device.name}{extra}")
    tpu = find_tpu()
    print(f"TPU: {tpu}" if tpu else "TPU: none found")
    return gpus


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for key in GPU_DEFAULTS:
        parser.add_argument(
            f"--{key.replace('_', '-')}", type=int, default=None, help=f"GPU default {GPU_DEFAULTS[key]}, CPU {CPU_DEFAULTS[key]}"
        )
    parser.add_argument("--pairs", type=int, default=3, help="toolkit/bare rounds, alternated. Defaults to 3.")
    parser.add_argument("--no-cpu", action="store_true", help="without a GPU, skip the CPU reference run")
    args = parser.parse_args(argv)

    gpus = describe_devices()
    sizes = {key: getattr(args, key) or default for key, default in (GPU_DEFAULTS if gpus else CPU_DEFAULTS).items()}
    print(
        f"model and data: spirals, {sizes['samples']:,} samples (80% train), {sizes['depth']} x {sizes['units']} relu units, batch {sizes['batch_size']}, {sizes['epochs']} epochs"
    )

    if not gpus:
        print(
            "no GPU: TensorFlow sees no GPU on this machine, so P7 is not measured here. Run this script on a GPU machine after `make install GPU=1`."
        )
        if args.no_cpu:
            return 0
        print("CPU reference (not P7): toolkit trial (strategy auto) vs bare fit, same device", flush=True)
        ratio = compare(card("auto", **sizes), args.pairs)
        print(
            f"CPU reference = {ratio:.3f} (the P7 goal, {GOAL}, applies on a GPU: {verdict(ratio, GOAL, smaller_is_better=False)} here)"
        )
        return 0

    print(f"P7 on {len(gpus)} GPU(s): toolkit trial (strategy auto) vs bare fit, same device(s)", flush=True)
    ratio = compare(card("auto", **sizes), args.pairs)
    print(f"P7 = {ratio:.3f} (goal >= {GOAL}: {verdict(ratio, GOAL, smaller_is_better=False)})")
    if len(gpus) >= 2:
        # auto is already MirroredStrategy over every GPU; one GPU shows what mirroring buys.
        print("mirrored vs one GPU (toolkit trials):", flush=True)
        mirrored, _ = toolkit_rate(card("mirrored", **sizes))
        single, _ = toolkit_rate(card("gpu", **sizes))
        print(
            f"    mirrored {mirrored:,.0f} samples/s ÷ one GPU {single:,.0f} samples/s = {mirrored / single:.2f} on {len(gpus)} GPUs"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
