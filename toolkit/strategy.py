"""Strategies: a card's ``strategy`` name → a ``tf.distribute.Strategy`` and a description of it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from toolkit.config import ConfigError, StrategyConfig

log = logging.getLogger(__name__)


class StrategyError(ConfigError):
    """The requested hardware is not there (no GPU, no TPU): a clear, early, fatal error."""


@dataclass
class StrategyInfo:
    """What a trial's run is tagged with."""

    strategy: Any  # tf.distribute.Strategy
    name: str  # the class name
    devices: list[str]

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)

    def tags(self) -> dict[str, str]:
        return {
            "toolkit.strategy": self.name,
            "toolkit.devices": ",".join(self.devices),
            "toolkit.replicas": str(self.replicas),
        }


def _gpus() -> list[Any]:
    import tensorflow as tf

    return tf.config.list_physical_devices("GPU")


def tpu_present() -> bool:
    """Whether a TPU is reachable, checked without a metadata-server lookup that could hang."""
    if os.environ.get("TPU_NAME") or os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_WORKER_ID"):
        return True
    # TPU VMs expose the chips as accel devices or vfio groups.
    return any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0"))


def split_cpu(replicas: int) -> None:
    """Split the CPU into logical devices; must happen before TensorFlow initializes devices."""
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)])
    except RuntimeError:
        # Already initialized: keep what is there (the same process ran a search before).
        pass


def _describe(strategy: Any) -> StrategyInfo:
    try:
        devices = list(strategy.extended.worker_devices)
    except (RuntimeError, AttributeError):
        devices = []  # the default strategy has no device list: it runs where TF places ops
    if not devices:
        import tensorflow as tf

        devices = ["/gpu:0" if tf.config.list_logical_devices("GPU") else "/cpu:0"]
    return StrategyInfo(strategy, type(strategy).__name__, [_short_device(d) for d in devices])


def _short_device(name: str) -> str:
    """'/job:localhost/replica:0/task:0/device:CPU:1' → '/cpu:1'."""
    tail = name.rsplit("device:", 1)[-1] if "device:" in name else name.lstrip("/")
    return "/" + tail.lower()


def make_strategy(cfg: StrategyConfig) -> StrategyInfo:
    """Build the strategy a card asks for.

    Args:
        cfg: The card's ``strategy`` section.

    Returns:
        The strategy and its description for tagging.

    Raises:
        StrategyError: When the hardware it needs is absent.
    """
    import tensorflow as tf

    name = cfg.name
    if name == "auto":
        if tpu_present():
            return make_strategy(StrategyConfig(name="tpu"))
        gpus = _gpus()
        if len(gpus) > 1:
            return _describe(tf.distribute.MirroredStrategy())
        if len(gpus) == 1:
            return _describe(tf.distribute.OneDeviceStrategy("/gpu:0"))
        return _describe(tf.distribute.get_strategy())
    if name == "cpu":
        return _describe(tf.distribute.OneDeviceStrategy("/cpu:0"))
    if name == "gpu":
        if not _gpus():
            raise StrategyError("strategy: 'gpu' was asked for but TensorFlow sees no GPU. Use 'auto' or 'cpu', or install the CUDA build with `make install GPU=1`.", field="strategy")
        return _describe(tf.distribute.OneDeviceStrategy("/gpu:0"))
    if name == "mirrored":
        gpus = _gpus()
        if gpus:
            return _describe(tf.distribute.MirroredStrategy())
        split_cpu(cfg.replicas)
        cpus = [d.name for d in tf.config.list_logical_devices("CPU")][: cfg.replicas]
        return _describe(tf.distribute.MirroredStrategy(devices=cpus))
    if name == "tpu":
        if not tpu_present():
            raise StrategyError("strategy: 'tpu' was asked for but no TPU was found (no TPU_NAME, no /dev/accel*). Use 'auto', 'cpu', 'gpu' or 'mirrored'.", field="strategy")
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return _describe(tf.distribute.TPUStrategy(resolver))
    if name == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise StrategyError("strategy: 'multi_worker' needs TF_CONFIG describing the cluster (see the README).", field="strategy")
        return _describe(tf.distribute.MultiWorkerMirroredStrategy())
    raise StrategyError(f"strategy: unknown name {name!r}", field="strategy")
