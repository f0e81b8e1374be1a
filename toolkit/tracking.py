"""MLflow tracking: one parent run per search, one nested run per trial, per-epoch metrics.

Every call goes through an explicit :class:`mlflow.MlflowClient` with run ids, never the fluent
"active run" state, so several tuner processes can log into one search. Keras callbacks carry
only strings (a run id and a URI) and so survive KerasTuner's ``copy.deepcopy``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import keras
import yaml

from toolkit.config import ExperimentConfig

log = logging.getLogger(__name__)

DEFAULT_STORE_DIR = Path("mlruns")
ROLE = "toolkit.role"
PARENT_TAG = "mlflow.parentRunId"


def tracking_uri(cfg: ExperimentConfig | None = None) -> str:
    """The tracking URI: the card's, else ``MLFLOW_TRACKING_URI``, else SQLite in ``mlruns/``.

    The file store is deprecated in MLflow 3, so the embedded default is SQLite.
    """
    if cfg is not None and cfg.tracking.uri:
        return cfg.tracking.uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    DEFAULT_STORE_DIR.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(DEFAULT_STORE_DIR / 'mlflow.db').resolve()}"


def store_dir(uri: str) -> Path:
    """The local folder that holds tuner state and artifacts for a tracking URI.

    For a SQLite store it is the database's folder; for a server it is ``./mlruns``.
    """
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :]).parent
    return DEFAULT_STORE_DIR


@lru_cache(maxsize=8)
def client(uri: str):
    """One cached client per URI (kept out of callbacks so they stay deep-copyable)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:6000]


def _finite_metrics(logs: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in (logs or {}).items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        # MLflow stores NaN, but a NaN loss is reported through the FAILED status instead.
        out[key] = number if math.isfinite(number) else float("nan")
    return out


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log several metrics in one batched call."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(key, value, now, step) for key, value in metrics.items()]
    for i in range(0, len(batch), 1000):
        client(uri).log_batch(run_id, metrics=batch[i : i + 1000])


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    """Log params in batches of 100 (MLflow's per-call limit)."""
    from mlflow.entities import Param

    items = [Param(key, _param_value(value)) for key, value in params.items()]
    for i in range(0, len(items), 100):
        client(uri).log_batch(run_id, params=items[i : i + 100])


class EpochLogger(keras.callbacks.Callback):
    """Logs Keras' own metric names every epoch, with ``step=epoch``, in one batched call.

    Args:
        uri: The tracking URI.
        run_id: The trial's run.
    """

    def __init__(self, uri: str, run_id: str) -> None:
        super().__init__()
        self.uri = uri
        self.run_id = run_id

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        metrics = _finite_metrics(logs or {})
        if metrics:
            log_metrics(self.uri, self.run_id, metrics, step=epoch)


class SearchTracker:
    """The MLflow side of one search: the parent run and its nested trial runs.

    Keeps settings in ``__init__``; the work happens in small per-event methods.

    Args:
        cfg: The validated card.
        uri: The tracking URI. Defaults to :func:`tracking_uri`.
    """

    def __init__(self, cfg: ExperimentConfig, uri: str | None = None) -> None:
        self.cfg = cfg
        self.uri = uri or tracking_uri(cfg)
        self.experiment_name = cfg.tracking.experiment or cfg.name
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None
        self.open_runs: set[str] = set()

    @property
    def client(self):
        return client(self.uri)

    # ------------------------------------------------------------------ experiment and parent

    def ensure_experiment(self) -> str:
        """Create the experiment if needed; artifacts of a SQLite store live beside the database."""
        if self.experiment_id:
            return self.experiment_id
        found = self.client.get_experiment_by_name(self.experiment_name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
            self.experiment_id = found.experiment_id
            return self.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):
            location = (store_dir(self.uri).resolve() / "artifacts" / self.experiment_name).as_uri()
        try:
            self.experiment_id = self.client.create_experiment(self.experiment_name, artifact_location=location)
        except Exception:
            # Another worker created it first.
            found = self.client.get_experiment_by_name(self.experiment_name)
            if found is None:
                raise
            self.experiment_id = found.experiment_id
        return self.experiment_id

    def start_search(self, search_id: str, parent_run_id: str | None = None, extra_tags: dict[str, str] | None = None) -> str:
        """Create the parent run, or reattach to ``parent_run_id`` when resuming.

        Args:
            search_id: A stable id for this search, stored as the tag ``toolkit.search_id``.
            parent_run_id: The parent to reattach to. Defaults to creating a new one.
            extra_tags: More tags for a new parent run.

        Returns:
            The parent run's id.
        """
        experiment_id = self.ensure_experiment()
        if parent_run_id:
            run = self._get_run(parent_run_id)
            if run is not None and run.data.tags.get("toolkit.search_id") == search_id:
                self.parent_run_id = parent_run_id
                self.client.update_run(parent_run_id, status="RUNNING")
                self.client.set_tag(parent_run_id, "toolkit.resumed", "true")
                self.open_runs.add(parent_run_id)
                return parent_run_id
        tags = {
            ROLE: "search",
            "toolkit.card": self.cfg.name,
            "toolkit.search_id": search_id,
            "toolkit.objective": self.cfg.objective,
            "toolkit.direction": self.cfg.direction,
            **(extra_tags or {}),
        }
        run = self.client.create_run(experiment_id, tags=tags, run_name=f"search-{self.cfg.name}")
        self.parent_run_id = run.info.run_id
        self.open_runs.add(self.parent_run_id)
        card = self.cfg.to_dict()
        log_params(self.uri, self.parent_run_id, flatten(card))
        self.client.log_text(self.parent_run_id, yaml.safe_dump(card, sort_keys=False), "experiment.yaml")
        return self.parent_run_id

    def _get_run(self, run_id: str):
        try:
            return self.client.get_run(run_id)
        except Exception:
            return None

    def end_search(self, status: str = "FINISHED", metrics: dict[str, float] | None = None) -> None:
        """Log the search's summary metrics and close the parent run."""
        if not self.parent_run_id:
            return
        if metrics:
            log_metrics(self.uri, self.parent_run_id, {k: v for k, v in metrics.items() if v is not None})
        self.client.set_terminated(self.parent_run_id, status=status)
        self.open_runs.discard(self.parent_run_id)

    # ------------------------------------------------------------------ trials

    def trial_runs(self, status: str | None = None) -> list[Any]:
        """The trial runs nested under this search's parent, optionally by status."""
        query = f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'"
        if status:
            query += f" and attributes.status = '{status}'"
        return self.client.search_runs([self.ensure_experiment()], filter_string=query, max_results=50_000)

    def close_stale_trials(self, completed: set[str] | None = None) -> int:
        """On resume, close the trial runs a crash left RUNNING. Returns how many.

        Args:
            completed: Trial ids the tuner's oracle recorded as completed: their runs are closed
                FINISHED; the others KILLED, since the oracle will rerun them.
        """
        stale = self.trial_runs(status="RUNNING")
        for run in stale:
            if run.data.tags.get("toolkit.trial_id") in (completed or set()):
                self.client.set_terminated(run.info.run_id, status="FINISHED")
                continue
            self.client.set_tag(run.info.run_id, "toolkit.failure", "the process running this trial stopped (killed or crashed); the trial is rerun")
            self.client.set_terminated(run.info.run_id, status="KILLED")
        return len(stale)

    def start_trial(self, trial_id: str, hyperparameters: dict[str, Any], tags: dict[str, str] | None = None) -> str:
        """Create a nested run for one trial, with its hyperparameters as params."""
        all_tags = {
            PARENT_TAG: self.parent_run_id,
            ROLE: "trial",
            "toolkit.trial_id": str(trial_id),
            "toolkit.card": self.cfg.name,
            **(tags or {}),
        }
        run = self.client.create_run(self.ensure_experiment(), tags=all_tags, run_name=f"trial-{trial_id}")
        run_id = run.info.run_id
        self.open_runs.add(run_id)
        log_params(self.uri, run_id, hyperparameters)
        return run_id

    def end_trial(self, run_id: str, status: str, failure: str | None = None, metrics: dict[str, float] | None = None) -> None:
        """Close a trial's run as FINISHED, FAILED (with the reason as a tag) or KILLED."""
        if failure:
            self.client.set_tag(run_id, "toolkit.failure", failure[-4000:])
        if metrics:
            log_metrics(self.uri, run_id, metrics)
        self.client.set_terminated(run_id, status=status)
        self.open_runs.discard(run_id)

    def log_data_summary(self, dataset: Any) -> None:
        """On the parent run: the data's task, sizes and digest as tags, and for classification
        the label encoding as ``class_names.json`` (class index → original label).

        Tags and an artifact rather than params, because a resumed search may log them again
        and MLflow refuses to change a param's value.
        """
        tags = {
            "toolkit.data.source": dataset.source,
            "toolkit.data.task": dataset.task,
            "toolkit.data.digest": dataset.digest,
            "toolkit.data.input_shape": json.dumps(list(dataset.input_shape)),
            **{f"toolkit.data.n_{split}": str(n) for split, n in dataset.sizes.items()},
        }
        from mlflow.entities import RunTag

        self.client.log_batch(self.parent_run_id, tags=[RunTag(key, value[:5000]) for key, value in tags.items()])
        if dataset.class_names:
            self.client.log_dict(self.parent_run_id, dict(enumerate(dataset.class_names)), "class_names.json")

    def log_dataset(self, run_id: str, dataset: Any, context: str = "training") -> None:
        """Record a split with MLflow's dataset tracking: name, source and digest."""
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        from mlflow.data.code_dataset_source import CodeDatasetSource

        x, y = (dataset.x_train, dataset.y_train) if context == "training" else (dataset.x_val, dataset.y_val)
        # A user file is a local path; a built-in source is code (scikit-learn or a generator).
        source = dataset.source if "/" in dataset.source else CodeDatasetSource(tags={"toolkit.source": dataset.source})
        ds = mlflow.data.from_numpy(x, targets=y, source=source, name=f"{dataset.name}-{context}", digest=f"{dataset.digest}-{context[:3]}")
        entity = DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])
        self.client.log_inputs(run_id, datasets=[entity])

    def kill_open_runs(self, reason: str = "interrupted") -> None:
        """Mark every run this process opened as KILLED (on SIGINT/SIGTERM)."""
        for run_id in list(self.open_runs):
            try:
                self.client.set_tag(run_id, "toolkit.failure", reason)
                self.client.set_terminated(run_id, status="KILLED")
            except Exception as exc:  # keep closing the others
                log.warning("could not mark run %s KILLED: %s", run_id, exc)
            self.open_runs.discard(run_id)
