"""What ran a search: installed versions, the git commit, devices (``environment.json``)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

# MLflow's run-context tag for the source's commit (mlflow.utils.mlflow_tags.MLFLOW_GIT_COMMIT).
MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"
# What the logged model needs to be loaded and served. Listing them is the documented way to
# skip MLflow's requirement inference, which loads the model in a subprocess (~9 s here).
MODEL_REQUIREMENTS = ("mlflow", "keras", "tensorflow", "numpy", "pandas")


def _installed_version(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def pinned_requirements() -> list[str]:
    """Pinned pip requirements of a logged model, from what is installed here.

    TensorFlow is pinned under the name it was installed as (``tensorflow-cpu`` by default,
    ``tensorflow`` for the CUDA build), so the serving environment gets the same build.
    """
    reqs = []
    for name in MODEL_REQUIREMENTS:
        candidates = ("tensorflow", "tensorflow-cpu") if name == "tensorflow" else (name,)
        for dist in candidates:
            version = _installed_version(dist)
            if version:
                reqs.append(f"{dist}=={version}")
                break
    return reqs


def git_commit(path: Path | None = None) -> dict[str, Any] | None:
    """The git commit of the working tree at ``path`` (default: the current folder), if any.

    MLflow's ``mlflow.source.git.commit`` tag does not cover this (checked against MLflow 3.17):
    only the fluent ``mlflow.start_run`` sets it, and the toolkit creates its runs with
    ``MlflowClient.create_run``, which adds no context tags. Even there MLflow reads the
    repository of ``sys.argv[0]``, not of the folder the search runs in: for ``toolkit tune``
    that is the console script in ``.venv/bin``, which git ignores, so MLflow finds no commit.
    It also says nothing of uncommitted changes. So this reads the commit and the dirty flag
    for ``environment.json``, and the search's parent run gets MLflow's tag from it
    (:data:`MLFLOW_GIT_COMMIT`), where the MLflow UI shows it.

    Returns:
        ``{"commit": sha, "dirty": bool}``, or None outside a repository or without git.
    """
    cwd = str(path or Path.cwd())
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": sha, "dirty": bool(status.strip())} if sha else None


def environment(strategy_info: Any = None) -> dict[str, Any]:
    """What ran the search: versions, the git commit, devices and the strategy (``environment.json``).

    Args:
        strategy_info: The search's :class:`toolkit.strategy.StrategyInfo`. Defaults to None.

    Returns:
        A JSON-serializable description.
    """
    import tensorflow as tf

    versions = {"python": platform.python_version()}
    for dist in ("tensorflow", "tensorflow-cpu", "keras", "keras-tuner", "mlflow", "numpy", "scikit-learn"):
        version = _installed_version(dist)
        if version:
            versions[dist] = version
    devices = {kind: [d.name for d in tf.config.list_physical_devices(kind)] for kind in ("CPU", "GPU", "TPU")}
    env: dict[str, Any] = {
        "versions": versions,
        "keras_backend": _keras_backend(),
        "git": git_commit(),
        "platform": platform.platform(),
        "python_executable": sys.executable,
        "cpu_count": os.cpu_count(),
        "devices": devices,
    }
    if strategy_info is not None:
        env["strategy"] = {"name": strategy_info.name, "replicas": strategy_info.replicas, "devices": strategy_info.devices}
    return env


def _keras_backend() -> str:
    # Imported here so that reading a store (analysis, `toolkit report`) loads no TensorFlow.
    import keras

    return keras.backend.backend()
