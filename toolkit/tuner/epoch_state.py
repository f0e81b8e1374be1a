"""Resume inside a trial: each fit's weights, optimizer and history, saved at epoch ends on a time budget.

KerasTuner reruns an interrupted trial from epoch 0 (keras-team/keras-tuner#439): its oracle
puts the trial back in its retry queue with the same id and hyperparameters. Under
``train.epoch_state`` the tracked tuner saves, in ``<trial folder>/epoch_state/``, what a fit
needs to go on: the model's variables and the optimizer's (one ``.npz``), and ``state.json``
with the epochs done, their metrics, and the histories of the trial's fits that ended (folds,
executions). The retried trial then skips the fits that ended, restores the one that was cut,
and fits it from ``initial_epoch``. With :func:`toolkit.data.pipeline.epoch_pipeline` its data
order is the one the uninterrupted trial would have seen.

Saving happens at an epoch's end only when the time spent saving in this fit, plus the cost of
one more save (the last one measured, or an estimate from the variables' size before the
first), stays within ``budget`` of the time the fit has trained: short epochs are saved every
few epochs, long ones every epoch. Files are written under a temporary name and renamed, and
``state.json`` names the ``.npz`` it goes with, so a kill at any point leaves a consistent state.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

log = logging.getLogger(__name__)

STATE_DIR = "epoch_state"
RESUMED_TAG = "toolkit.resumed_from_epoch"
RESUMED_FOLD_TAG = "toolkit.resumed_from_fold"
# The first save's cost before it is measured: a fixed cost plus writing the variables' bytes.
_FIXED_SECONDS = 0.002
_BYTES_PER_SECOND = 300e6


@dataclass
class FitProgress:
    """A fit cut short: epochs ``0 … next_epoch-1`` are saved, with their metrics."""

    fit: int
    next_epoch: int
    history: dict[str, list[float]]
    weights: Path


class TrialState:
    """The saved state of one trial attempt, kept in ``<trial folder>/epoch_state/``.

    A state written for another search (parent run) or other hyperparameters is discarded.

    Args:
        directory: The trial's folder (KerasTuner's ``trial_<id>``).
        key: What the state must match: trial id, parent run and hyperparameters.
    """

    def __init__(self, directory: str | Path, key: dict[str, Any]) -> None:
        self.directory = Path(directory) / STATE_DIR
        self.key = json.loads(json.dumps(key, sort_keys=True, default=str))
        self.fits_done: list[dict[str, list[float]]] = []
        self.measures: dict[str, float] | None = None
        self.progress: FitProgress | None = None
        self.saving_seconds = 0.0
        self.saves = 0
        # The fits this attempt has started (the next one's index is len of it).
        self.next_fit = 0
        self._load()

    @property
    def resumable(self) -> bool:
        """Whether a previous attempt left anything to continue from."""
        return bool(self.fits_done) or self.progress is not None

    def _load(self) -> None:
        path = self.directory / "state.json"
        if not path.is_file():
            return
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("ignoring an unreadable trial state %s: %s", path, exc)
            self.clear()
            return
        if state.get("key") != self.key:
            log.info("ignoring the state in %s: it was saved for another search or other hyperparameters", path)
            self.clear()
            return
        self.fits_done = state.get("fits_done", [])
        self.measures = state.get("measures")
        self.saving_seconds = float(state.get("saving_seconds", 0.0))
        self.saves = int(state.get("saves", 0))
        current = state.get("current")
        if current and (self.directory / current["weights"]).is_file():
            self.progress = FitProgress(
                int(current["fit"]), int(current["next_epoch"]), current["history"], self.directory / current["weights"]
            )

    def _write(self, current: dict[str, Any] | None) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        state = {
            "key": self.key,
            "fits_done": self.fits_done,
            "measures": self.measures,
            "current": current,
            "saving_seconds": self.saving_seconds,
            "saves": self.saves,
        }
        tmp = self.directory / "state.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.directory / "state.json")

    def save_epoch(self, fit: int, epoch: int, history: dict[str, list[float]], model: keras.Model) -> float:
        """Save a fit's state after ``epoch``; returns the seconds it took."""
        started = time.perf_counter()
        self.directory.mkdir(parents=True, exist_ok=True)
        arrays = {f"m{i}": keras.ops.convert_to_numpy(v.value) for i, v in enumerate(model.variables)}
        optimizer = getattr(model, "optimizer", None)
        if optimizer is not None:
            arrays.update({f"o{i}": keras.ops.convert_to_numpy(v.value) for i, v in enumerate(optimizer.variables)})
        name = f"fit{fit}-epoch{epoch}.npz"
        tmp = self.directory / (name + ".tmp")
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, self.directory / name)
        self.saves += 1
        self._write({"fit": fit, "next_epoch": epoch + 1, "history": history, "weights": name})
        # The state now names the new file: the older ones can go.
        for old in self.directory.glob("fit*-epoch*.npz"):
            if old.name != name:
                old.unlink(missing_ok=True)
        # The whole save counts, state.json included (the file holds the total up to the save before).
        seconds = time.perf_counter() - started
        self.saving_seconds += seconds
        return seconds

    def end_fit(self, history: dict[str, list[float]], measures: dict[str, float] | None) -> None:
        """Record a fit that ended: its history, and the trial's measures once they exist."""
        self.fits_done.append(history)
        if measures is not None:
            self.measures = measures
        self.progress = None
        self._write(None)
        for old in self.directory.glob("fit*-epoch*.npz"):
            old.unlink(missing_ok=True)

    def clear(self) -> None:
        """Delete the state: the trial ended, or the state belongs to something else."""
        shutil.rmtree(self.directory, ignore_errors=True)
        self.fits_done, self.measures, self.progress = [], None, None


def restore(model: keras.Model, weights: Path) -> None:
    """Put a saved fit's model and optimizer variables back (see :meth:`TrialState.save_epoch`)."""
    with np.load(weights) as saved:
        model_arrays = [saved[f"m{i}"] for i in range(sum(k.startswith("m") for k in saved.files))]
        optimizer_arrays = [saved[f"o{i}"] for i in range(sum(k.startswith("o") for k in saved.files))]
    variables = model.variables
    if len(variables) != len(model_arrays):
        raise ValueError(f"the saved state has {len(model_arrays)} model variables, the model {len(variables)}")
    optimizer = getattr(model, "optimizer", None)
    if optimizer_arrays:
        if optimizer is None:
            raise ValueError("the saved state has optimizer variables, and the model no optimizer")
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        if len(optimizer.variables) != len(optimizer_arrays):
            raise ValueError(
                f"the saved state has {len(optimizer_arrays)} optimizer variables, the optimizer {len(optimizer.variables)}"
            )
        for variable, value in zip(optimizer.variables, optimizer_arrays, strict=True):
            variable.assign(value)
    for variable, value in zip(variables, model_arrays, strict=True):
        variable.assign(value)


class StateSaver(keras.callbacks.Callback):
    """Saves a fit's state at epoch ends within the time budget; restores a cut fit first.

    It comes after KerasTuner's own callbacks, so an epoch's best-epoch checkpoint is written
    before the state that counts that epoch.

    Args:
        state: The trial's state.
        fit: This fit's index within the trial (fold or execution).
        budget: The largest share of the fit's training time that saving may take.
        progress: The cut fit to continue, or None to start at epoch 0.
        measures: The tuner's trial measures, stored with the state when the fit ends.
        trial_id: The trial (the key into ``measures``).
    """

    def __init__(
        self,
        state: TrialState,
        fit: int,
        budget: float,
        progress: FitProgress | None,
        measures: dict[str, dict[str, float]],
        trial_id: str,
    ) -> None:
        super().__init__()
        self.state = state
        self.fit = fit
        self.budget = budget
        self.progress = progress
        self.measures = measures
        self.trial_id = trial_id
        self.history: dict[str, list[float]] = {}
        self._started = 0.0
        self._spent = 0.0
        self._cost: float | None = None

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.history = {k: list(v) for k, v in (self.progress.history if self.progress else {}).items()}
        if self.progress is not None:
            restore(self.model, self.progress.weights)
        self._started = time.perf_counter()
        self._spent = 0.0

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        for name, value in (logs or {}).items():
            self.history.setdefault(name, []).append(float(value))
        trained = time.perf_counter() - self._started - self._spent
        cost = self._cost if self._cost is not None else self._estimate()
        if self._spent + cost > self.budget * trained:
            return
        try:
            seconds = self.state.save_epoch(self.fit, epoch, self.history, self.model)
        except Exception as exc:  # saving is a convenience: a full disk must not fail the trial
            log.warning(
                "trial %s: could not save its state after epoch %d: %s: %s", self.trial_id, epoch, type(exc).__name__, exc
            )
            self._cost = float("inf")
            return
        self._spent += seconds
        self._cost = seconds

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        try:
            self.state.end_fit(self.history, self.measures.get(self.trial_id))
        except Exception as exc:
            log.warning("trial %s: could not record its finished fit: %s: %s", self.trial_id, type(exc).__name__, exc)

    def _estimate(self) -> float:
        variables = list(self.model.variables)
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None:
            variables += list(optimizer.variables)
        size = sum(int(np.prod(v.shape)) * _itemsize(v.dtype) for v in variables)
        return _FIXED_SECONDS + size / _BYTES_PER_SECOND


def _itemsize(dtype: Any) -> int:
    try:
        return np.dtype(str(dtype)).itemsize
    except TypeError:  # bfloat16 and other dtypes numpy does not name
        return 4


def done_history(history: dict[str, list[float]]) -> keras.callbacks.History:
    """A ``History`` for a fit that ended in an earlier attempt, as ``fit`` would have returned it."""
    out = keras.callbacks.History()
    out.history = {k: list(v) for k, v in history.items()}
    out.epoch = list(range(max((len(v) for v in history.values()), default=0)))
    return out
