"""Read a search back from MLflow: the trials, their hyperparameters and their curves."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from toolkit import tracking
from toolkit.config import ConfigError, objective_direction

CURVE_METRICS = ("loss", "val_loss")
# MLflow's system metrics (tracking.system_metrics) the report reads for the best trial.
SYSTEM_METRICS = ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes")
# KerasTuner's own hyperparameters (Hyperband's ``tuner/epochs``, ``tuner/round``, ...) are
# bookkeeping, not knobs of the model.
TUNER_PREFIX = "tuner/"
# The table's own columns; a hyperparameter of the same name gets RESERVED_SUFFIX.
RESERVED = ("trial_id", "run_id", "status", "objective", "best_epoch", "epochs")
RESERVED_SUFFIX = " (hp)"
# Runs asked for per search_runs call: MLflow's own ceiling for one page (SQL stores and servers).
SEARCH_PAGE = 50_000


@dataclass
class SearchData:
    """One search as read back from MLflow.

    Attributes:
        name: The experiment's name.
        parent_run_id: The search's parent run.
        objective: The metric the tuner optimized.
        direction: ``"max"`` or ``"min"``.
        table: One row per trial run (see :func:`trials_table`).
        hyperparameters: The table's hyperparameter columns.
        curves: Per trial run id, per metric, the values by epoch.
        model: What the trials trained: the card's ``model.family``, or its ``model.builder``
            (empty when the parent run does not say).
        card: The parent run's params: the resolved card, flattened (``tuner.pruning.rule``, ...).
    """

    name: str
    parent_run_id: str
    objective: str
    direction: str
    table: pd.DataFrame
    hyperparameters: list[str]
    curves: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    model: str = ""
    card: dict[str, str] = field(default_factory=dict)

    @property
    def finished(self) -> pd.DataFrame:
        """The trials that finished with a finite objective."""
        table = self.table
        if table.empty:
            return table
        mask = (table["status"] == "FINISHED") & np.isfinite(table["objective"].astype(float))
        return table[mask]

    @property
    def varying(self) -> list[str]:
        """The hyperparameters that took more than one value among the finished trials."""
        done = self.finished
        # A conditional hyperparameter with one value where present (momentum: 0.9 for the SGD
        # family) only restates the choice it depends on.
        return [h for h in self.hyperparameters if h in done and done[h].nunique() > 1]

    def better(self, a: float, b: float) -> bool:
        """Whether objective value ``a`` is better than ``b``."""
        return a > b if self.direction == "max" else a < b


def metric_direction(metric: str, stored: str | None = None) -> str:
    """Whether a metric is better high (``"max"``) or low (``"min"``): the analysis' one rule.

    A direction stored with the search wins. Otherwise :func:`toolkit.config.objective_direction`
    decides (KerasTuner's rule without TensorFlow: ``val_mae`` and every loss are minimized,
    ``val_accuracy`` and ``auc`` maximized).

    Args:
        metric: The metric's name, e.g. ``val_accuracy``.
        stored: The search's stored direction (the parent's ``toolkit.direction`` tag). Defaults
            to None.

    Returns:
        ``"max"`` or ``"min"``.
    """
    if stored in ("max", "min"):
        return stored
    return objective_direction(metric)


def find_search(experiment: str, uri: str | None = None) -> str:
    """The id of the latest search (parent run tagged ``toolkit.role=search``) of an experiment.

    Args:
        experiment: The experiment's name.
        uri: The tracking URI. Defaults to :func:`toolkit.tracking.tracking_uri`.

    Returns:
        The parent run's id.

    Raises:
        ConfigError: When the experiment or its searches do not exist.
    """
    uri = uri or tracking.tracking_uri()
    client = tracking.client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ConfigError(
            f"no experiment {experiment!r} in the tracking store {uri}; run `toolkit tune {experiment}` first", field="EXP"
        )
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`{tracking.ROLE}` = 'search'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise ConfigError(f"experiment {experiment!r} has no search run yet; run `toolkit tune {experiment}` first", field="EXP")
    return runs[0].info.run_id


def load_search(
    parent_run_id: str, uri: str | None = None, objective: str | None = None, direction: str | None = None
) -> SearchData:
    """Read a search's trials and their curves from MLflow.

    Args:
        parent_run_id: The search's parent run.
        uri: The tracking URI. Defaults to :func:`toolkit.tracking.tracking_uri`.
        objective: The objective. Defaults to the parent's ``toolkit.objective`` tag.
        direction: ``"max"`` or ``"min"``. Defaults to :func:`metric_direction` of the objective
            and the parent's ``toolkit.direction`` tag.

    Returns:
        The search, with a per-epoch curve of the objective, loss and val_loss for every
        finished trial.
    """
    uri = uri or tracking.tracking_uri()
    client = tracking.client(uri)
    parent = client.get_run(parent_run_id)
    tags = parent.data.tags
    objective = objective or tags.get("toolkit.objective") or "val_loss"
    direction = metric_direction(objective, direction or tags.get("toolkit.direction"))
    experiment = client.get_experiment(parent.info.experiment_id).name
    runs = _child_runs(client, parent.info.experiment_id, parent_run_id)
    runs = [r for r in runs if r.data.tags.get(tracking.ROLE, "trial") == "trial"]

    # Not mlflow.search_runs(output_format="pandas"), checked against MLflow 3.17:
    # - it has no tracking-URI argument: it reads MLflow's process-wide URI, and pointing that at
    #   ``uri`` (mlflow.set_tracking_uri) also rewrites MLFLOW_TRACKING_URI in os.environ for every
    #   thread and child process while it runs;
    # - it builds its params.* columns from Python sets, so their order changes from one process
    #   to the next (PYTHONHASHSEED), while the table, plots and report list the hyperparameters
    #   in the order the trial logged them (the card's order);
    # - its raw frame is the small part: each row still needs the trial filter, the tuner/ and
    #   reserved names, typed params, the toolkit tags as columns and the objective's best epoch,
    #   which is read from the curve fetched here per run.
    rows = []
    hyperparameters: list[str] = []
    curves: dict[str, dict[str, np.ndarray]] = {}
    for run in runs:
        # The trial's params are its hypermodel's own hp names, whatever model built it.
        params = {_column(k): _parse_param(v) for k, v in run.data.params.items() if not k.startswith(TUNER_PREFIX)}
        for name in params:
            if name not in hyperparameters:
                hyperparameters.append(name)
        row: dict[str, Any] = {
            **run.data.metrics,
            # A metric named like a hyperparameter (a callback logging ``learning_rate``) must
            # not overwrite the knob's value.
            **params,
            "trial_id": run.data.tags.get("toolkit.trial_id", ""),
            "run_id": run.info.run_id,
            "status": run.info.status,
        }
        pruned = run.data.tags.get("toolkit.pruned_epoch")
        if pruned is not None and pruned.isdigit():
            row["pruned_epoch"] = int(pruned)
        # tuner.constraints and tuner.pareto: "true"/"false", and what an infeasible trial broke.
        for column in ("feasible", "infeasible", "pareto"):
            if f"toolkit.{column}" in run.data.tags:
                row[column] = run.data.tags[f"toolkit.{column}"]
        if run.info.status == "FINISHED":
            curves[run.info.run_id] = {
                m: _history(client, run.info.run_id, m) for m in dict.fromkeys((objective, *CURVE_METRICS))
            }
            curve = curves[run.info.run_id][objective]
            if curve.size:
                pick = np.nanargmax if direction == "max" else np.nanargmin
                best = int(pick(curve)) if np.isfinite(curve).any() else 0
                row["objective"] = float(curve[best])
                row["best_epoch"] = best
                row["epochs"] = int(curve.size)
        rows.append(row)
    table = pd.DataFrame(rows)
    for column in ("objective", "best_epoch", "epochs"):
        if column not in table:
            table[column] = np.nan
    if not table.empty:
        table = table.sort_values("trial_id", key=lambda s: s.map(_trial_sort_key)).reset_index(drop=True)
        for name in hyperparameters:
            table[name] = _coerce(table[name])
    lead = ["trial_id", "run_id", "status", *hyperparameters, "objective", "best_epoch", "epochs"]
    table = table[[c for c in lead if c in table] + sorted(c for c in table if c not in lead)]
    table.attrs.update(objective=objective, direction=direction, hyperparameters=list(hyperparameters))
    # The best trial's system metrics, whole histories: the report gives its peak memory and mean CPU.
    done = table[(table["status"] == "FINISHED") & np.isfinite(table["objective"].astype(float))] if not table.empty else table
    if not done.empty:
        best = done.sort_values("objective", ascending=direction == "min").iloc[0]["run_id"]
        for metric in SYSTEM_METRICS:
            if metric in done.columns:
                curves.setdefault(best, {})[metric] = _history(client, best, metric)
    card = parent.data.params
    model = card.get("model.builder") or card.get("model.family") or ""
    if model == "None":  # a card without a builder logs model.builder as None
        model = card.get("model.family", "")
    return SearchData(experiment, parent_run_id, objective, direction, table, hyperparameters, curves, model, dict(card))


def trials_table(search: str, uri: str | None = None) -> pd.DataFrame:
    """The trials of a search as a DataFrame, one row per trial run.

    Columns: ``trial_id``, ``run_id``, ``status``, one per hyperparameter (numbers as numbers),
    ``objective`` (the best value over the trial's epochs), ``best_epoch`` (0-based), ``epochs``,
    then every metric's last logged value (``loss``, ``val_loss``, ``gap_loss``,
    ``grad_norm/<layer>``, ...). ``table.attrs`` holds ``objective``, ``direction`` and
    ``hyperparameters``.

    Args:
        search: A parent run id, or an experiment name (its latest search is used).
        uri: The tracking URI. Defaults to :func:`toolkit.tracking.tracking_uri`.

    Returns:
        The table.
    """
    uri = uri or tracking.tracking_uri()
    parent = search
    if tracking.client(uri).get_experiment_by_name(search) is not None:
        parent = find_search(search, uri)
    return load_search(parent, uri).table


def _child_runs(client: Any, experiment_id: str, parent_run_id: str) -> list[Any]:
    """Every run nested under the parent, page by page (a store returns at most 50,000 a call)."""
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{tracking.PARENT_TAG}` = '{parent_run_id}'",
            max_results=SEARCH_PAGE,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _history(client: Any, run_id: str, metric: str) -> np.ndarray:
    """A metric's values by step; a step logged twice keeps its latest value."""
    by_step: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, metric):
        if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
            by_step[m.step] = (m.timestamp, m.value)
    return np.array([by_step[s][1] for s in sorted(by_step)], dtype="float64")


def _column(param: str) -> str:
    """A hyperparameter's column: its own name, unless the table already uses that name."""
    return param + RESERVED_SUFFIX if param in RESERVED else param


def _parse_param(value: str) -> Any:
    try:
        number = float(value)
    except ValueError:
        return value
    return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number


def _coerce(column: pd.Series) -> pd.Series:
    """A hyperparameter column as numbers when every value is one, else as text."""
    values = column.dropna()
    if len(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return pd.to_numeric(column)
    return column.map(lambda v: v if pd.isna(v) else str(v))


def _trial_sort_key(trial_id: Any) -> tuple[int, Any]:
    text = str(trial_id)
    return (0, int(text)) if text.isdigit() else (1, text)
