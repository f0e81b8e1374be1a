"""Shared fixtures: a real MLflow store in tmp_path, fixed seeds, quiet TensorFlow."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings as hypothesis_settings
from hypothesis.configuration import set_hypothesis_home_dir

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

ROOT = Path(__file__).resolve().parents[1]

# Hypothesis keeps its example database and caches outside the checkout: a test run writes
# nothing there.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "toolkit-hypothesis")
hypothesis_settings.register_profile("toolkit", database=None)
hypothesis_settings.load_profile("toolkit")


@pytest.fixture(autouse=True)
def _seeds() -> None:
    random.seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def _empty_store_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty SQLite store with MLflow's schema, made once: creating the schema (its
    migrations) takes seconds, copying the file takes milliseconds."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _empty_store_db: Path) -> str:
    """A fresh SQLite MLflow store under tmp_path, set as MLFLOW_TRACKING_URI.

    KerasTuner state and artifacts land beside the database, so nothing touches ./mlruns.
    """
    import shutil

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    shutil.copyfile(_empty_store_db, tmp_path / "store" / "mlflow.db")
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
