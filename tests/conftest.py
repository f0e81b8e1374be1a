"""Shared fixtures: a real MLflow store in tmp_path, fixed seeds, quiet TensorFlow."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seeds() -> None:
    random.seed(0)
    np.random.seed(0)


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite MLflow store under tmp_path, set as MLFLOW_TRACKING_URI.

    KerasTuner state and artifacts land beside the database, so nothing touches ./mlruns.
    """
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def mlflow_client(store: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=store)


def shrunk(name: str = "quickstart", *overrides: str):
    """A shipped card shrunk for tests: 2 trials x 1 epoch unless overridden."""
    from toolkit.config import load_config

    base = ["tuner.max_trials=2", "train.epochs=1"]
    return load_config(name, [*base, *overrides], experiments_dir=ROOT / "experiments")
