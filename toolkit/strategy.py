"""Strategies: a card's ``strategy`` name → a ``tf.distribute.Strategy`` and a description of it.

Names (one registry, :data:`BUILDERS`):

- ``auto``: a TPU → ``TPUStrategy``; more than one GPU → ``MirroredStrategy``; one GPU →
  ``OneDeviceStrategy("/gpu:0")``; otherwise TensorFlow's default strategy (one CPU device).
- ``cpu`` / ``gpu``: ``OneDeviceStrategy`` on ``/cpu:0`` or ``/gpu:0``. ``gpu`` with no GPU is an error.
- ``mirrored``: ``MirroredStrategy`` over every GPU; with none, over ``replicas`` logical CPU
  devices split from the one physical CPU (this is how the path is tested on CPU-only machines).
- ``tpu``: ``TPUClusterResolver`` + ``initialize_tpu_system`` + ``TPUStrategy``. A TPU is looked
  for first, without any network call, so a machine with none fails at once instead of waiting on
  the GCE metadata server.
- ``multi_worker``: ``MultiWorkerMirroredStrategy`` from ``TF_CONFIG``. With two or more workers
  Keras 3 cannot train under it (keras-team/keras#20585, reproduced here), so it is refused with
  that explanation unless ``TOOLKIT_TRY_MULTI_WORKER=1``.

Every failure to find the hardware asked for is a :class:`StrategyError`, a
:class:`~toolkit.config.ConfigError`: the CLI exits 2 and no MLflow run is created, because
:func:`make_strategy` runs before the tracker.

Logical CPU devices can only be made before TensorFlow initializes its devices, which the first
TensorFlow op does. Importing TensorFlow or Keras does not, and neither does anything the CLI or
``run_search`` does before :func:`make_strategy`; in a notebook that already trained, ``mirrored``
on CPU is refused with a message that says how to get a fresh process.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from toolkit.config import STRATEGIES, ConfigError, StrategyConfig

log = logging.getLogger(__name__)

# Set to 1 to build MultiWorkerMirroredStrategy over several workers even though Keras 3 fails
# under it: for checking whether a newer Keras fixed keras-team/keras#20585.
ENV_TRY_MULTI_WORKER = "TOOLKIT_TRY_MULTI_WORKER"

# Where TPU VMs expose their chips: /dev/accel* (v2-v4) and VFIO groups /dev/vfio/<n> (v5e and later).
TPU_DEVICE_GLOBS = ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*")

# Class names as the public API spells them (tf.distribute.MultiWorkerMirroredStrategy is a
# CollectiveAllReduceStrategy inside, TPUStrategy a TPUStrategyV2); these are what runs are tagged with.
_PUBLIC_NAMES = {
    "_DefaultDistributionStrategy": "DefaultDistributionStrategy",
    "CollectiveAllReduceStrategy": "MultiWorkerMirroredStrategy",
    "TPUStrategyV2": "TPUStrategy",
}


class StrategyError(ConfigError):
    """The strategy cannot be had here (no GPU, no TPU, no cluster): fatal, before any run (exit 2)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, field="strategy")


@dataclass(frozen=True)
class StrategyInfo:
    """A built strategy and what each trial's run is tagged with.

    Attributes:
        strategy: The ``tf.distribute.Strategy``.
        name: Its class name as the public API spells it, e.g. ``MirroredStrategy``.
        devices: The replica devices, shortened: ``/cpu:0``, ``/gpu:1``.
    """

    strategy: Any
    name: str
    devices: list[str]

    @property
    def replicas(self) -> int:
        """Replicas that train in sync (1 for one device)."""
        return int(self.strategy.num_replicas_in_sync)

    def per_replica_batch(self, global_batch: int) -> int:
        """The batch each replica gets from the card's global ``batch_size``.

        ``tf.distribute`` splits every global batch across the replicas; when it does not divide
        evenly the first replicas get one sample more, so the largest share is returned.

        Args:
            global_batch: The card's ``train.batch_size``.

        Returns:
            Samples per replica per step.

        Raises:
            ConfigError: When the global batch is smaller than the number of replicas.
        """
        if global_batch < self.replicas:
            raise ConfigError(
                f"train.batch_size: the global batch {global_batch} is smaller than the {self.replicas} replicas of "
                f"{self.name}, so some replicas would get no data. Accepted: a batch_size of at least {self.replicas}.",
                field="train.batch_size",
            )
        if global_batch % self.replicas:
            log.warning(
                "train.batch_size %d does not divide over %d replicas; they get uneven batches", global_batch, self.replicas
            )
        return math.ceil(global_batch / self.replicas)

    def tags(self) -> dict[str, str]:
        """``toolkit.strategy``, ``toolkit.devices`` and ``toolkit.replicas`` for a trial's run."""
        return {
            "toolkit.strategy": self.name,
            "toolkit.devices": ",".join(self.devices),
            "toolkit.replicas": str(self.replicas),
        }

    def __str__(self) -> str:
        return f"{self.name} on {','.join(self.devices)} ({self.replicas} replica{'s' if self.replicas != 1 else ''})"


# ---------------------------------------------------------------------------- hardware


def gpus() -> list[Any]:
    """The physical GPUs TensorFlow sees (listing them does not initialize the devices)."""
    import tensorflow as tf

    return tf.config.list_physical_devices("GPU")


def find_tpu() -> str | None:
    """Where a TPU can be reached, found from the environment and ``/dev`` only.

    ``TPUClusterResolver()`` with no name asks the GCE metadata server, which on a cloud VM
    without a TPU can take long to answer; nothing here touches the network.

    Returns:
        The resolver's ``tpu`` argument (``"local"`` on a TPU VM, else a name or ``grpc://`` address),
        or None when there is no sign of a TPU.
    """
    if os.environ.get("TPU_NAME"):
        return os.environ["TPU_NAME"]
    if os.environ.get("COLAB_TPU_ADDR"):
        return f"grpc://{os.environ['COLAB_TPU_ADDR']}"
    if any(glob.glob(pattern) for pattern in TPU_DEVICE_GLOBS):
        return "local"
    return None


def split_cpu(replicas: int) -> list[str]:
    """Split the physical CPU into ``replicas`` logical devices and return their names.

    Args:
        replicas: How many logical CPU devices to make.

    Returns:
        The names of the first ``replicas`` logical CPU devices.

    Raises:
        StrategyError: When TensorFlow already initialized its devices with fewer logical CPUs.
    """
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)])
    except RuntimeError:
        # TensorFlow already ran an op in this process. An earlier split (an earlier search in
        # the same process) is fine when it made enough devices.
        pass
    names = [d.name for d in tf.config.list_logical_devices("CPU")]
    if len(names) < replicas:
        raise StrategyError(
            f"strategy: 'mirrored' without a GPU needs {replicas} logical CPU devices, but TensorFlow already "
            f"initialized its devices in this process with {len(names)}, and they cannot be split afterwards. "
            f"Run the search in a fresh process (the toolkit CLI does), or call "
            f"toolkit.strategy.split_cpu({replicas}) before any other TensorFlow op."
        )
    return names[:replicas]


def steps_per_execution_for(requested: int, strategy: Any = None) -> int:
    """The ``steps_per_execution`` a strategy can run.

    Keras 3's multi-step loop (``multi_step_on_iterator``) runs the replicated train step inside a
    ``tf.cond`` in a ``tf.while_loop``. Under a MirroredStrategy with two or more replicas every such
    fit fails with "You must feed a value for placeholder tensor" (seen with Keras 3.15 and
    TensorFlow 2.21, on any optimizer, dataset size or steps value > 1; the error of
    keras-team/keras#19246). One step per call works, so that is what those strategies get.

    Args:
        requested: What the card asks for (or what ``auto`` chose).
        strategy: The strategy the model is built under. Defaults to the one in scope, which is
            the tuner's while KerasTuner builds a model.

    Returns:
        ``requested``, or 1 under a multi-replica mirrored strategy.
    """
    if requested <= 1:
        return requested
    import tensorflow as tf

    strategy = strategy or tf.distribute.get_strategy()
    mirrored = isinstance(strategy, (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy))
    if mirrored and strategy.num_replicas_in_sync > 1:
        log.info(
            "steps_per_execution %d → 1 under %s with %d replicas (Keras 3 cannot run more there)",
            requested,
            type(strategy).__name__,
            strategy.num_replicas_in_sync,
        )
        return 1
    return requested


# ---------------------------------------------------------------------------- builders


def _describe(strategy: Any) -> StrategyInfo:
    try:
        devices = list(strategy.extended.worker_devices)
    except (RuntimeError, AttributeError):
        devices = []  # the default strategy has no device list: it runs where TensorFlow places ops
    if not devices:
        import tensorflow as tf

        devices = ["/gpu:0" if tf.config.list_logical_devices("GPU") else "/cpu:0"]
    cls = type(strategy).__name__
    return StrategyInfo(strategy, _PUBLIC_NAMES.get(cls, cls), [_short_device(d) for d in devices])


def _short_device(name: str) -> str:
    """``/job:localhost/replica:0/task:0/device:CPU:1`` → ``/cpu:1``; other jobs keep job and task."""
    if "device:" not in name:
        return name.lower() if name.startswith("/") else "/" + name.lower()
    head, tail = name.rsplit("device:", 1)
    short = "/" + tail.lower()
    if "/job:" in head and "/job:localhost" not in head:
        parts = [p for p in head.split("/") if p.startswith(("job:", "task:"))]
        short = "/" + "/".join(parts) + short
    return short


def _auto(cfg: StrategyConfig) -> StrategyInfo:
    if find_tpu():
        try:
            return _tpu(cfg)
        except StrategyError as exc:
            # auto means "whatever is here": a TPU that cannot be initialized is not here.
            log.warning("auto: %s; using the GPUs or CPU instead", exc)
    import tensorflow as tf

    found = gpus()
    if len(found) > 1:
        return _describe(tf.distribute.MirroredStrategy())
    if len(found) == 1:
        return _describe(tf.distribute.OneDeviceStrategy("/gpu:0"))
    return _describe(tf.distribute.get_strategy())


def _cpu(cfg: StrategyConfig) -> StrategyInfo:
    import tensorflow as tf

    return _describe(tf.distribute.OneDeviceStrategy("/cpu:0"))


def _gpu(cfg: StrategyConfig) -> StrategyInfo:
    import tensorflow as tf

    if not gpus():
        if tf.test.is_built_with_cuda():
            why = "This is the CUDA build of TensorFlow: check nvidia-smi, the driver and CUDA_VISIBLE_DEVICES."
        else:
            why = "This is the CPU-only build of TensorFlow: install the CUDA build with `make install GPU=1`."
        raise StrategyError(f"strategy: 'gpu' was asked for but TensorFlow sees no GPU. {why} Or use 'auto' or 'cpu'.")
    return _describe(tf.distribute.OneDeviceStrategy("/gpu:0"))


def _mirrored(cfg: StrategyConfig) -> StrategyInfo:
    import tensorflow as tf

    if gpus():
        # All the GPUs; `replicas` only sizes the CPU split.
        return _describe(tf.distribute.MirroredStrategy())
    return _describe(tf.distribute.MirroredStrategy(devices=split_cpu(cfg.replicas)))


def _require_tpu() -> str:
    where = find_tpu()
    if where is None:
        raise StrategyError(
            "strategy: 'tpu' was asked for but no TPU was found (TPU_NAME and COLAB_TPU_ADDR are unset and there is "
            "no /dev/accel* or /dev/vfio/<n> device). Accepted here: auto, cpu, gpu, mirrored."
        )
    return where


def _tpu(cfg: StrategyConfig) -> StrategyInfo:
    where = _require_tpu()
    import tensorflow as tf

    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=where)
        if where != "local":  # a TPU VM's chips are local; a TPU node is a remote cluster
            tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return _describe(tf.distribute.TPUStrategy(resolver))
    except (ValueError, RuntimeError, tf.errors.OpError) as exc:
        raise StrategyError(f"strategy: a TPU looked present ({where!r}) but could not be initialized: {exc}") from exc


def _require_cluster() -> int:
    """Check TF_CONFIG without TensorFlow; return how many workers it names."""
    raw = os.environ.get("TF_CONFIG")
    example = '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}'
    if not raw:
        raise StrategyError(
            f"strategy: 'multi_worker' reads its cluster from TF_CONFIG, which is not set. Example: TF_CONFIG='{example}'"
        )
    try:
        spec = json.loads(raw)
        cluster = spec["cluster"]
        n_workers = sum(len(cluster.get(job, [])) for job in ("chief", "worker"))
        task = spec["task"]
        if not isinstance(task["type"], str) or isinstance(task["index"], bool):
            raise TypeError(task)
        int(task["index"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise StrategyError(
            f"strategy: TF_CONFIG must be JSON with a cluster and a task. Received: {raw!r}. Example: {example}"
        ) from None
    if n_workers > 1 and os.environ.get(ENV_TRY_MULTI_WORKER) != "1":
        from importlib.metadata import version

        raise StrategyError(
            f"strategy: 'multi_worker' over {n_workers} workers cannot train with Keras {version('keras')}: "
            "every fit fails before its first step ('Attempt to convert a value (PerReplica ...) to a Tensor', raised where "
            "Keras reduces a distributed batch to build the model); Keras 3 does not support MultiWorkerMirroredStrategy "
            "(keras-team/keras#20585). Use tuner workers instead (--workers N, or --role chief/worker across hosts), "
            f"or 'mirrored' within one machine. Set {ENV_TRY_MULTI_WORKER}=1 to try it anyway."
        )
    return n_workers


def _multi_worker(cfg: StrategyConfig) -> StrategyInfo:
    _require_cluster()
    import tensorflow as tf

    return _describe(tf.distribute.MultiWorkerMirroredStrategy())


BUILDERS: dict[str, Callable[[StrategyConfig], StrategyInfo]] = {
    "auto": _auto,
    "cpu": _cpu,
    "gpu": _gpu,
    "mirrored": _mirrored,
    "tpu": _tpu,
    "multi_worker": _multi_worker,
}
# The card's names (toolkit.config.STRATEGIES, free of TensorFlow) and these builders are one set.
assert tuple(BUILDERS) == STRATEGIES, (tuple(BUILDERS), STRATEGIES)


def check_available(cfg: StrategyConfig) -> None:
    """Fail at once, without importing TensorFlow, when a ``tpu`` or ``multi_worker`` card cannot run here.

    The CLI calls it before TensorFlow loads, so ``--set strategy=tpu`` on a machine without a
    TPU answers in about a second. :func:`make_strategy` makes the same checks (and the GPU one).

    Args:
        cfg: The card's ``strategy`` section.

    Raises:
        StrategyError: No TPU was found, or TF_CONFIG is missing, malformed or names a cluster
            Keras 3 cannot train on.
    """
    if cfg.name == "tpu":
        _require_tpu()
    elif cfg.name == "multi_worker":
        _require_cluster()


def make_strategy(cfg: StrategyConfig | str) -> StrategyInfo:
    """Build the strategy a card asks for.

    Call it before any other TensorFlow op in the process: ``mirrored`` on a CPU-only machine
    splits the CPU into logical devices, which TensorFlow allows only before it initializes them.

    Args:
        cfg: The card's ``strategy`` section, or just a name such as ``"mirrored"``.

    Returns:
        The strategy and its description for tagging.

    Raises:
        StrategyError: When the name is unknown or the hardware it needs is absent.
    """
    if isinstance(cfg, str):
        if cfg not in BUILDERS:
            raise StrategyError(f"strategy: unknown name {cfg!r}. Accepted: {', '.join(BUILDERS)}")
        cfg = StrategyConfig(name=cfg)
    info = BUILDERS[cfg.name](cfg)
    log.info("strategy %s: %s", cfg.name, info)
    return info
