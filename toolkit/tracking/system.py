"""System metrics per trial run: MLflow's own monitor, sized to the trial and never losing a short one."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

# Samples are taken this often at least and at most; in between, a tenth of the last trial's length.
# Each sample costs the monitor a get_run and a log_batch, and stopping it waits for the one in
# flight: at 1 s the quickstart's 2-second trials paid 2.8% of their time for system metrics
# (benchmarks/tracking_overhead.py); at 2 s a short trial gets one sample, plus its last interval's.
MIN_INTERVAL, MAX_INTERVAL = 2.0, 10.0


def sampling_interval(last_trial_seconds: float | None) -> float:
    """About ten samples per trial, judged by the one before it (:data:`MIN_INTERVAL` for the first)."""
    if not last_trial_seconds:
        return MIN_INTERVAL
    return max(MIN_INTERVAL, min(MAX_INTERVAL, last_trial_seconds / 10))


def start_monitor(run_id: str, uri: str, interval: float) -> Any | None:
    """Start MLflow's system-metrics monitor on a trial run; None when it cannot run (no psutil).

    It logs ``system/cpu_utilization_percentage``, ``system/system_memory_usage_megabytes`` and
    ``_percentage``, disk and network figures, and GPU ones where a GPU and pynvml are present.
    """
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError as exc:  # psutil missing
        log.warning("system metrics are off: %s", exc)
        return None

    class TrialMonitor(SystemMetricsMonitor):
        """MLflow's monitor, which drops the samples of its last, unfinished interval: a trial
        shorter than one interval would log nothing. Its finish() logs them."""

        def finish(self) -> None:
            super().finish()
            try:
                if any(m._metrics for m in self.monitors):
                    self.publish_metrics(self.aggregate_metrics())
                    self.mlflow_logger.flush()
            except Exception as exc:  # a closed or unreachable run: the trial's own record matters more
                log.debug("could not log the last system metrics sample: %s", exc)

    monitor = TrialMonitor(run_id, sampling_interval=interval, samples_before_logging=1, tracking_uri=uri)
    monitor.start()
    return monitor
