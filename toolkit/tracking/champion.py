"""The champion: the search's best model logged once with the Keras flavor, and registered."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolkit.tracking.environment import pinned_requirements
from toolkit.tracking.store import _global_tracking_uri, client

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)


def _save_keras_model(path: str, **kwargs: Any) -> None:
    # mlflow.keras.save_model writes the input example before it creates the model folder, so
    # log_model with an input example fails (mlflow/mlflow#16183, open in MLflow 3.17).
    import mlflow.keras

    os.makedirs(path, exist_ok=True)
    mlflow.keras.save_model(path=path, **kwargs)
    _serve_through_toolkit_loader(path, kwargs.get("mlflow_model"))


def _serve_through_toolkit_loader(path: str, mlflow_model: Any = None) -> None:
    """Make ``toolkit/tracking/serving.py`` the saved model's ``python_function`` loader.

    The file is copied into the model's ``code/`` folder, so the model serves (``mlflow models
    serve``, ``mlflow.pyfunc.load_model``) where the toolkit is not installed. The Keras flavor
    itself is unchanged: ``mlflow.keras.load_model`` gives the plain Keras model.
    """
    from mlflow.models import Model

    from toolkit.tracking import serving

    code = Path(path) / "code"
    code.mkdir(exist_ok=True)
    shutil.copyfile(serving.__file__, code / f"{serving.MODULE_NAME}.py")
    mlmodel = Path(path) / "MLmodel"
    model = mlflow_model if mlflow_model is not None else Model.load(str(mlmodel))
    pyfunc = model.flavors["python_function"]
    pyfunc["loader_module"] = serving.MODULE_NAME
    pyfunc["code"] = "code"
    model.save(str(mlmodel))


@contextlib.contextmanager
def _requirements_read_from_here() -> Iterator[None]:
    """Skip MLflow's check that this environment satisfies the model's requirements.

    :func:`~toolkit.tracking.environment.pinned_requirements` reads the requirements from this
    very environment, so the check cannot find a mismatch, and it costs 0.2-0.6 s: it maps every
    installed distribution to its modules (``importlib.metadata.packages_distributions``) the
    first time a process saves or loads a model. ``Model.log`` makes it twice, when it writes the
    requirements and when it loads the saved model to check the input example.
    """
    import importlib

    # The modules themselves: ``mlflow.pyfunc`` as an attribute of ``mlflow`` is a lazy proxy.
    modules = tuple(importlib.import_module(name) for name in ("mlflow.utils.environment", "mlflow.pyfunc"))
    checks = [module.warn_dependency_requirement_mismatches for module in modules]
    for module in modules:
        module.warn_dependency_requirement_mismatches = _no_check
    try:
        yield
    finally:
        for module, check in zip(modules, checks, strict=True):
            module.warn_dependency_requirement_mismatches = check


def _no_check(requirements: list[str]) -> None:
    return None


class _KerasFlavor:
    """``mlflow.keras`` with the missing-folder bug above worked around, for ``Model.log``."""

    __name__ = "mlflow.keras"
    save_model = staticmethod(_save_keras_model)


@dataclass
class LoggedModel:
    """The best model as logged on the parent run."""

    model_uri: str
    registered_name: str | None
    version: str | None
    seconds: float

    @property
    def champion_uri(self) -> str | None:
        return f"models:/{self.registered_name}@champion" if self.registered_name else None


def log_champion(
    uri: str,
    run_id: str,
    model: keras.Model,
    input_example: Any,
    register_as: str | None = None,
    tags: dict[str, str] | None = None,
    experiment_id: str | None = None,
) -> LoggedModel:
    """Log the search's best model once, on its parent run, and make it ``<name>@champion``.

    Uses the Keras 3 flavor (``mlflow.keras``; ``mlflow.tensorflow`` targets tf.keras 2) with
    a signature inferred from ``input_example`` and pinned pip requirements, so MLflow does
    not infer them by loading the model in a subprocess.

    Args:
        uri: The tracking URI.
        run_id: The search's parent run.
        model: The trained model. It standardizes its own inputs, so it serves raw features.
        input_example: A few raw training rows.
        register_as: The registered model name; the new version gets the alias ``champion``.
            Defaults to None: log only.
        tags: Tags for the registered version (trial id, objective value, ...). Defaults to None.
        experiment_id: The experiment the logged model belongs to, whose artifact location
            holds its files. Defaults to the parent run's experiment.

    Returns:
        Where the model went and how long logging took.
    """
    from mlflow.models import Model, infer_signature

    started = time.perf_counter()
    example = input_example.astype("float32") if getattr(input_example, "dtype", None) == "float64" else input_example
    signature = infer_signature(example, model.predict(example, verbose=0))
    # The same layers and weights without the optimizer: a served model never trains, and a
    # saved optimizer whose slots were never built warns on every load.
    import keras

    inference = keras.Model(model.inputs, model.outputs, name=model.name)
    # MLflow checks the input example by predicting on it; keep Keras' progress bar quiet.
    interactive = keras.utils.is_interactive_logging_enabled()
    keras.utils.disable_interactive_logging()
    try:
        # Model.log resolves the store from the global URI; point it at this search's store.
        with _global_tracking_uri(uri), _requirements_read_from_here():
            import mlflow

            # Model.log would file the LoggedModel under MLflow's "active" experiment (Default,
            # id 0, with artifacts in ./mlruns of the current folder), not the run's. So it is
            # created here in the search's experiment, with the run's params as Model.log copies them.
            run = client(uri).get_run(run_id)
            logged_model = mlflow.initialize_logged_model(
                name="model",
                source_run_id=run_id,
                params=dict(run.data.params),
                experiment_id=experiment_id or run.info.experiment_id,
            )
            info = Model.log(
                artifact_path=None,
                name="model",
                flavor=_KerasFlavor(),
                run_id=run_id,
                model_id=logged_model.model_id,
                model=inference,
                signature=signature,
                input_example=example,
                pip_requirements=pinned_requirements(),
                registered_model_name=register_as,
                await_registration_for=0,
            )
    finally:
        if interactive:
            keras.utils.enable_interactive_logging()
    version = None
    if register_as:
        version = str(info.registered_model_version)
        # Aliases, not the deprecated stages: the champion is whatever the alias points at.
        client(uri).set_registered_model_alias(register_as, "champion", version)
        for key, value in (tags or {}).items():
            client(uri).set_model_version_tag(register_as, version, key, value)
    logged = LoggedModel(info.model_uri, register_as, version, time.perf_counter() - started)
    log.info("logged the best model in %.1fs: %s", logged.seconds, logged.champion_uri or logged.model_uri)
    return logged
