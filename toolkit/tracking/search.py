"""The MLflow side of one search: its experiment, the parent run and the nested trial runs."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import yaml

from toolkit.config import ExperimentConfig
from toolkit.tracking.champion import LoggedModel, log_champion
from toolkit.tracking.environment import MLFLOW_GIT_COMMIT, git_commit
from toolkit.tracking.store import client, ensure_store, store_dir, tracking_uri
from toolkit.tracking.values import _synchronous, flatten, log_metrics, log_params

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

ROLE = "toolkit.role"
PARENT_TAG = "mlflow.parentRunId"


# The experiment tag MLflow's UI reads to open an experiment as model training, not GenAI.
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"


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
        self._dataset_inputs: dict[tuple[str, str], Any] = {}
        self._store_ready = False
        # Another process may close this tracker's runs once it joined a chief's search (attach):
        # the chief, writing a worker off. A search of one process is the only one (the card's lock).
        self._shared = False

    @property
    def client(self):
        # A search writes, so its first call creates a new store (once, under a lock).
        if not self._store_ready:
            ensure_store(self.uri)
            self._store_ready = True
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

    def trials_view(self, hyperparameters: list[str] | None = None) -> str:
        """Save a view of this search's trials in the MLflow UI; return its address within the UI.

        MLflow's UI opens a view saved as the experiment tag ``mlflow.sharedViewState.<key>``
        from the address ``#/experiments/<id>/runs?viewStateShareKey=<key>`` (its "Share"
        button does the same). This one lists the trial runs of the search, best first, with
        the objective, its best value and the hyperparameters as columns, and no clicks. The
        experiment is also marked a model-training one (``mlflow.experimentKind``), so the UI
        does not offer its GenAI pages for it.

        Args:
            hyperparameters: The params to show as columns. Defaults to none.

        Returns:
            ``#/experiments/<id>/runs?viewStateShareKey=<key>``.
        """
        experiment_id = self.ensure_experiment()
        objective = self.cfg.objective
        state = {
            "searchFilter": f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'",
            "orderByKey": f"metrics.`best_{objective}`",
            "orderByAsc": self.cfg.direction == "min",
            "selectedColumns": [
                f"metrics.`best_{objective}`",
                f"metrics.`{objective}`",
                "metrics.`trial_seconds`",
                *(f"params.`{h}`" for h in hyperparameters or []),
                "tags.`toolkit.trial_id`",
            ],
        }
        key = f"trials-{self.parent_run_id}"
        found = self.client.get_experiment(experiment_id)
        if found.tags.get(EXPERIMENT_KIND) is None:
            self.client.set_experiment_tag(experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        self.client.set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{key}", json.dumps(state))
        return f"#/experiments/{experiment_id}/runs?viewStateShareKey={key}"

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
            **_git_tags(),
            **(extra_tags or {}),
        }
        run = self.client.create_run(experiment_id, tags=tags, run_name=f"search-{self.cfg.name}")
        self.parent_run_id = run.info.run_id
        self.open_runs.add(self.parent_run_id)
        card = self.cfg.to_dict()
        if (card.get("tracking") or {}).get("uri"):  # the params and experiment.yaml never hold a password
            from toolkit.security import redact_uri

            card["tracking"]["uri"] = redact_uri(card["tracking"]["uri"])
        log_params(self.uri, self.parent_run_id, flatten(card))
        self.client.log_text(self.parent_run_id, yaml.safe_dump(card, sort_keys=False), "experiment.yaml")
        return self.parent_run_id

    def abandon_search(self, parent_run_id: str, reason: str) -> None:
        """Close a search that is being started over: its RUNNING trials and parent become KILLED."""
        run = self._get_run(parent_run_id)
        if run is None or run.info.status != "RUNNING":
            return
        query = f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'"
        stale = self.client.search_runs([run.info.experiment_id], filter_string=query, max_results=50_000)
        for trial in [*stale, run]:
            self.client.set_tag(trial.info.run_id, "toolkit.failure", reason)
            self.client.set_terminated(trial.info.run_id, status="KILLED")

    def attach(self, parent_run_id: str, search_id: str | None = None) -> str:
        """Join a search another process owns (a distributed worker joins its chief's).

        Trial runs then nest under ``parent_run_id``; the parent is not this process's to close,
        so it is not among :attr:`open_runs`.

        Args:
            parent_run_id: The search's parent run.
            search_id: This process's search id, checked against the parent's. Defaults to no check.

        Raises:
            RuntimeError: When the run is not a search's parent run in this tracking store.
            ConfigError: When the parent belongs to another search (another card).
        """
        from toolkit.config import ConfigError

        run = self._get_run(parent_run_id)
        if run is None or run.data.tags.get(ROLE) != "search":
            raise RuntimeError(
                f"the search's parent run {parent_run_id} is not in the MLflow store at {self.uri}: "
                "every process of a distributed search must log to the same tracking server (MLFLOW_TRACKING_URI)"
            )
        theirs = run.data.tags.get("toolkit.search_id")
        if search_id and theirs != search_id:
            raise ConfigError(
                f"this card's search is {search_id!r} but the parent run {parent_run_id} is search {theirs!r}: "
                "start every worker with the chief's card and --set overrides (only tuner.max_trials and tracking may differ)",
                field="EXP",
            )
        self.parent_run_id = parent_run_id
        self.experiment_id = run.info.experiment_id
        self._shared = True
        return parent_run_id

    def set_tags(self, tags: dict[str, str], run_id: str | None = None) -> None:
        """Set several tags in one call (the parent run by default)."""
        from mlflow.entities import RunTag

        self.client.log_batch(run_id or self.parent_run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def parent_tag(self, key: str) -> str | None:
        """A tag of the parent run as stored (e.g. one a resumed search's earlier process set)."""
        run = self._get_run(self.parent_run_id) if self.parent_run_id else None
        return run.data.tags.get(key) if run else None

    def parent_metric(self, key: str, default: float = 0.0) -> float:
        """The latest value of a parent metric as stored, or ``default``."""
        run = self._get_run(self.parent_run_id) if self.parent_run_id else None
        return float(run.data.metrics.get(key, default)) if run else default

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

    def close_stale_trials(
        self, completed: Mapping[str, dict[str, float]] | set[str] | None = None, failed: dict[str, str] | None = None
    ) -> int:
        """On resume, reconcile trial runs with what the tuner's oracle recorded. Returns how many changed.

        A process killed (``kill -9``, a crash) leaves its trial's run RUNNING. Such a run is
        closed by the oracle's word:

        - the oracle recorded the trial as completed: the run is closed FINISHED, with the
          summaries trial end would have logged, from the run's history, with the objective's
          best value and epoch from the oracle's record when ``completed`` maps ids to it (the
          history of a run whose process died may miss its last epochs: a dead tracking server
          loses what was queued). The same holds for a run an interrupt closed KILLED in
          the instant after the oracle recorded the trial, so the trial, which is not rerun,
          still has its FINISHED run;
        - the oracle recorded it as failed: FAILED, with the oracle's reason;
        - otherwise: KILLED, since the oracle runs the trial again.

        Args:
            completed: Trial ids the oracle recorded as completed, or id → what the oracle
                recorded of the objective (``best_<objective>``, ``best_epoch``). Defaults to none.
            failed: Trial id → reason, for trials the oracle recorded as failed. Defaults to none.
        """
        completed = completed if isinstance(completed, Mapping) else dict.fromkeys(completed or (), None)
        failed = failed or {}
        by_trial: dict[str, list[Any]] = {}
        for run in self.trial_runs():
            by_trial.setdefault(run.data.tags.get("toolkit.trial_id", ""), []).append(run)
        changed = 0
        for tid, runs in by_trial.items():
            open_runs = [r for r in runs if r.info.status == "RUNNING"]
            if tid in completed and not any(r.info.status == "FINISHED" for r in runs):
                candidates = [r for r in runs if r.info.status in ("RUNNING", "KILLED")]
                if candidates:
                    latest = max(candidates, key=lambda r: r.info.start_time or 0)
                    if "toolkit.failure" in latest.data.tags:
                        self.client.delete_tag(latest.info.run_id, "toolkit.failure")
                    summary = self._closing_summary(latest, completed[tid])
                    self.end_trial(latest.info.run_id, "FINISHED", metrics=summary, force=True)
                    open_runs = [r for r in open_runs if r is not latest]
                    changed += 1
            if tid in failed and not open_runs and not any(r.info.status in ("FINISHED", "FAILED") for r in runs):
                # Interrupted between the oracle's verdict and the run's close: the run says KILLED,
                # the oracle FAILED. The oracle's word stands, so the trial counts as failed.
                killed = [r for r in runs if r.info.status == "KILLED"]
                if killed:
                    latest = max(killed, key=lambda r: r.info.start_time or 0)
                    self.end_trial(latest.info.run_id, "FAILED", failure=failed[tid], force=True)
                    changed += 1
            for run in open_runs:
                if tid in completed:
                    reason = "a second run of a trial that had already completed"
                    status = "KILLED"
                elif tid in failed:
                    reason, status = failed[tid], "FAILED"
                else:
                    reason = "the process running this trial stopped (killed or crashed); the trial is rerun"
                    status = "KILLED"
                self.end_trial(run.info.run_id, status, failure=reason, force=True)
                changed += 1
        return changed

    def _closing_summary(self, run: Any, oracle: dict[str, float] | None) -> dict[str, float]:
        """The summaries of a completed trial whose run was left open.

        From the run's history, with the objective's best value and epoch taken from the oracle
        when known. A history that does not reach the oracle's best epoch lost its last epochs
        (a dead process or tracking server): the run gets the tag ``toolkit.history_incomplete``,
        so its curves are not mistaken for the whole trial.
        """
        summary = self._summaries_from_history(run)
        if not oracle:
            return summary
        summary.update(oracle)
        best_epoch = oracle.get("best_epoch")
        steps = [m.step for m in self.client.get_metric_history(run.info.run_id, self.cfg.objective)]
        if best_epoch is not None and int(best_epoch) not in steps:
            last = f"stops at epoch {max(steps)}" if steps else "is empty"
            self.client.set_tag(
                run.info.run_id,
                "toolkit.history_incomplete",
                f"MLflow's history of {self.cfg.objective} {last}, before the oracle's best epoch {int(best_epoch)}; "
                "the objective's summary is the oracle's",
            )
        return summary

    def _summaries_from_history(self, run: Any) -> dict[str, float]:
        from toolkit.config import objective_direction

        summary: dict[str, float] = {}
        for key in list(run.data.metrics):
            if key.startswith("best_") or key == "trial_seconds":
                continue
            history = sorted(self.client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
            values = [(m.step, m.value) for m in history if math.isfinite(m.value)]
            if not values:
                continue
            lower = (self.cfg.direction if key == self.cfg.objective else objective_direction(key)) == "min"
            step, value = (min if lower else max)(values, key=lambda sv: sv[1])
            summary[f"best_{key}"] = value
            if key == self.cfg.objective:
                summary["best_epoch"] = step
        return summary

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
        log_params(self.uri, run_id, hyperparameters, synchronous=False)
        return run_id

    def end_trial(
        self,
        run_id: str,
        status: str,
        failure: str | None = None,
        metrics: dict[str, float] | None = None,
        details: str | None = None,
        force: bool = False,
    ) -> bool:
        """Close a trial's run as FINISHED, FAILED (with the reason as a tag) or KILLED.

        Summary metrics and the failure tag go in one batched call: per-trial calls are the
        tracking overhead that counts. A run that is no longer RUNNING is left as it is, unless
        ``force``: the chief or a resume closed it already (its worker was written off, say), and
        a late process must not rewrite their verdict.

        Args:
            run_id: The trial's run.
            status: ``FINISHED``, ``FAILED`` or ``KILLED``.
            failure: The one-line reason, as the tag ``toolkit.failure``. Defaults to None.
            metrics: Summary metrics (best values, best epoch, seconds). Defaults to None.
            details: The full traceback of a failure, logged as ``failure.txt``. Defaults to None.
            force: Close the run whatever its state (the oracle's word on resume). Defaults to False.

        Returns:
            Whether the run was closed here.
        """
        if not force and not self._still_open(run_id):
            self.open_runs.discard(run_id)
            return False
        if details:
            self.client.log_text(run_id, details, "failure.txt")
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        tags = [RunTag("toolkit.failure", failure[-4000:])] if failure else []
        batch = [Metric(key, float(value), now, 0) for key, value in (metrics or {}).items() if value is not None]
        if tags or batch:
            self.client.log_batch(run_id, metrics=batch, tags=tags, synchronous=_synchronous())
        # Drains MLflow's async queue first, so the run is complete once it is closed.
        self.client.set_terminated(run_id, status=status)
        self.open_runs.discard(run_id)
        return True

    def _still_open(self, run_id: str) -> bool:
        if not self._shared:
            return True  # one process owns this search (the card's lock): no other closes its runs
        run = self._get_run(run_id)
        if run is None or run.info.status == "RUNNING":
            return True  # a store that cannot answer: closing is still the right attempt
        log.info("run %s was already closed %s by another process; left as it is", run_id, run.info.status)
        return False

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

    def _dataset_input(self, dataset: Any, context: str) -> Any:
        # Built once per split and search: every trial trains on the same data, and building the
        # entity (schema and profile) is per-trial overhead otherwise.
        key = (dataset.digest, context)
        if key not in self._dataset_inputs:
            import mlflow.data
            from mlflow.data.code_dataset_source import CodeDatasetSource
            from mlflow.entities import DatasetInput, InputTag

            x, y = (dataset.x_train, dataset.y_train) if context == "training" else (dataset.x_val, dataset.y_val)
            # A user file is a local path; a built-in source is code (scikit-learn or a generator).
            source = dataset.source if "/" in dataset.source else CodeDatasetSource(tags={"toolkit.source": dataset.source})
            ds = mlflow.data.from_numpy(
                x, targets=y, source=source, name=f"{dataset.name}-{context}", digest=f"{dataset.digest}-{context[:3]}"
            )
            self._dataset_inputs[key] = DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])
        return self._dataset_inputs[key]

    def log_dataset(self, run_id: str, dataset: Any, context: str = "training") -> None:
        """Record a split with MLflow's dataset tracking: name, source and digest."""
        self.client.log_inputs(run_id, datasets=[self._dataset_input(dataset, context)])

    def log_datasets(self, run_id: str, dataset: Any, contexts: tuple[str, ...] = ("training", "validation")) -> None:
        """Record several splits in one call (what each trial does)."""
        self.client.log_inputs(run_id, datasets=[self._dataset_input(dataset, c) for c in contexts])

    # ------------------------------------------------------------------ parent artifacts

    def log_json(self, data: Any, artifact_file: str, run_id: str | None = None) -> None:
        """Write ``data`` as an indented JSON artifact (the parent run by default)."""
        self.client.log_text(
            run_id or self.parent_run_id, json.dumps(data, indent=2, sort_keys=False, default=str), artifact_file
        )

    def log_csv(self, rows: list[dict[str, Any]], artifact_file: str, run_id: str | None = None) -> None:
        """Write dict rows as a CSV artifact; the columns are the union of keys, in first-seen order."""
        columns: dict[str, None] = {}
        for row in rows:
            columns.update(dict.fromkeys(row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        self.client.log_text(run_id or self.parent_run_id, buffer.getvalue(), artifact_file)

    def log_best_model(
        self,
        model: keras.Model,
        input_example: Any,
        register_as: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> LoggedModel:
        """Log the search's best model once, on the parent run, and make it ``<name>@champion``.

        Uses the Keras 3 flavor (``mlflow.keras``; ``mlflow.tensorflow`` targets tf.keras 2) with
        a signature inferred from ``input_example`` and pinned pip requirements, so MLflow does
        not infer them by loading the model in a subprocess.

        Args:
            model: The trained model. It standardizes its own inputs, so it serves raw features.
            input_example: A few raw training rows.
            register_as: The registered model name; the new version gets the alias ``champion``.
                Defaults to None: log only.
            tags: Tags for the registered version (trial id, objective value, ...).

        Returns:
            Where the model went and how long logging took.
        """
        # The parent's own experiment, so the model and its artifacts stay with the search's runs.
        experiment_id = self.experiment_id or self.client.get_run(self.parent_run_id).info.experiment_id
        return log_champion(self.uri, self.parent_run_id, model, input_example, register_as, tags, experiment_id=experiment_id)

    # ------------------------------------------------------------------ closing

    def close_open_runs(self, status: str = "KILLED", reason: str = "interrupted") -> None:
        """Close every run this process opened with ``status`` and the reason as a tag.

        Used in ``finally``: KILLED when interrupted (SIGINT/SIGTERM), FAILED when the search
        crashed. A second interrupt while closing does not stop the others from being closed.
        """
        from mlflow.entities import RunTag

        interrupted: BaseException | None = None
        for run_id in list(self.open_runs):
            for _ in range(2):  # once more if a second signal cut the first attempt short
                try:
                    if not self._still_open(run_id):  # the chief or a resume closed it: their word stands
                        break
                    self.client.log_batch(run_id, tags=[RunTag("toolkit.failure", reason[-4000:])])
                    self.client.set_terminated(run_id, status=status)
                    break
                except KeyboardInterrupt as exc:
                    interrupted = exc
                except Exception as exc:  # keep closing the others
                    log.warning("could not mark run %s %s: %s", run_id, status, exc)
                    break
            self.open_runs.discard(run_id)
        if interrupted is not None:
            raise interrupted

    def kill_open_runs(self, reason: str = "interrupted") -> None:
        """Mark every run this process opened as KILLED (on SIGINT/SIGTERM)."""
        self.close_open_runs("KILLED", reason)


def _git_tags() -> dict[str, str]:
    """MLflow's commit tag for the parent run, which ``create_run`` does not add itself (see
    :func:`toolkit.tracking.environment.git_commit`); empty outside a git repository."""
    git = git_commit()
    return {MLFLOW_GIT_COMMIT: git["commit"]} if git else {}
