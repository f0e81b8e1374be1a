"""The user's own model: a builder reference resolved like KerasTuner's ``get_hypermodel``.

A card's ``model.builder`` (or ``run_search(cfg, hypermodel=...)``) names one of:

- a function ``build(hp) -> keras.Model``;
- a ``kt.HyperModel`` subclass (instantiated with no arguments);
- a ``kt.HyperModel`` instance.

A reference is ``"path/to/file.py:build"`` (a relative path is looked up in the card's folder
first, then in the current directory) or ``"package.module:build"``. Every way it can be wrong
(no file, no module, no such name, not callable, an import that raises) is a
:class:`~toolkit.config.ConfigError` on ``model.builder``, raised before any MLflow run exists.

:class:`CardCompiled` wraps the user's HyperModel: it builds under the card's precision policy,
and a model that comes back **uncompiled** is compiled with the card's optimizer, learning rate,
momentum and L1/L2 space (as hyperparameters of the same names) and the task's loss and metrics.
A compiled model is used as it is.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import traceback
from pathlib import Path
from typing import Any

import keras
import keras_tuner as kt

from toolkit import space as blocks
from toolkit.config import ConfigError, SpaceConfig, TrainConfig, locate_builder, split_builder_reference
from toolkit.models.execution import batch_size, build_precision, compile_settings, rebatch, task_loss

FIELD = "model.builder"


def resolve(reference: str, card_dir: Path | None = None) -> Any:
    """Import the object a builder reference names.

    Args:
        reference: ``"file.py:name"`` or ``"package.module:name"``.
        card_dir: The card's folder, searched first for a relative file. Defaults to None.

    Returns:
        The named object (a function, a HyperModel subclass or an instance).

    Raises:
        ConfigError: For a missing file or module, a missing name, or an import that fails.
    """
    where, name = split_builder_reference(locate_builder(reference, card_dir))
    if where.endswith(".py") or "/" in where or "\\" in where:
        module = _import_file(Path(where), reference)
    else:
        module = _import_module(where, reference)
    if not hasattr(module, name):
        public = sorted(n for n, v in vars(module).items() if not n.startswith("_") and callable(v))
        raise ConfigError(
            f"{FIELD}: {where!r} has no {name!r}. Received: {reference!r}. Callables it defines: {', '.join(public) or 'none'}",
            field=FIELD,
        )
    return getattr(module, name)


def _import_file(path: Path, reference: str) -> Any:
    # A stable module name per file, so that a worker (or a second resolve) gets the same module.
    module_name = f"toolkit_builder_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{FIELD}: {str(path)!r} cannot be imported as Python. Received: {reference!r}", field=FIELD)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    # Sibling modules of the builder file import as they would when run from its folder.
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise ConfigError(f"{FIELD}: importing {str(path)!r} failed: {_last_frame(exc)}", field=FIELD) from exc
    finally:
        sys.path.remove(str(path.parent))
    return module


def _import_module(name: str, reference: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):
            raise ConfigError(
                f"{FIELD}: no module named {exc.name!r}. Received: {reference!r}. "
                "Give 'path/to/file.py:build' or 'package.module:build' with the package importable",
                field=FIELD,
            ) from exc
        raise ConfigError(f"{FIELD}: importing {name!r} failed: {_last_frame(exc)}", field=FIELD) from exc
    except Exception as exc:
        raise ConfigError(f"{FIELD}: importing {name!r} failed: {_last_frame(exc)}", field=FIELD) from exc


def _last_frame(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def as_hypermodel(obj: Any, what: str = FIELD) -> kt.HyperModel:
    """A HyperModel from a build function, a HyperModel subclass or an instance.

    Raises:
        ConfigError: For anything else (the message says what was received).
    """
    if isinstance(obj, kt.HyperModel):
        return obj
    if isinstance(obj, type):
        if issubclass(obj, kt.HyperModel):
            try:
                return obj()
            except TypeError as exc:
                raise ConfigError(
                    f"{what}: the HyperModel subclass {obj.__name__} cannot be made with no arguments ({exc}); "
                    "pass an instance from Python instead",
                    field=FIELD,
                ) from exc
        raise ConfigError(
            f"{what}: {obj.__name__} is a class but not a keras_tuner.HyperModel. "
            "Accepted: a function build(hp) -> keras.Model, a kt.HyperModel subclass or an instance",
            field=FIELD,
        )
    if callable(obj):
        return _FunctionHyperModel(obj)
    raise ConfigError(
        f"{what}: {type(obj).__name__} {_short(obj)} is not callable. "
        "Accepted: a function build(hp) -> keras.Model, a kt.HyperModel subclass or an instance",
        field=FIELD,
    )


class _FunctionHyperModel(kt.HyperModel):
    """A ``build(hp)`` function as a HyperModel (KerasTuner's DefaultHyperModel, named for the function)."""

    def __init__(self, build: Any) -> None:
        super().__init__(name=getattr(build, "__name__", None))
        self._build = build

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        return self._build(hp)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe(obj: Any) -> str:
    """A short name for the user's builder, logged as the search's ``toolkit.model`` tag."""
    inner = getattr(obj, "inner", obj)
    build = getattr(inner, "_build", None)
    target = build if build is not None else inner
    module = getattr(target, "__module__", "") or ""
    name = getattr(target, "__qualname__", None) or type(target).__name__
    return f"{module}:{name}" if module else name


class CardCompiled(kt.HyperModel):
    """The user's HyperModel, built under the card's precision and compiled with its space when it is not.

    Args:
        inner: The user's HyperModel.
        space: The card's space: ``optimizer``, ``learning_rate``, ``momentum``, ``l1`` and ``l2``
            are read when the model comes back uncompiled.
        task: ``"classification"`` or ``"regression"``.
        train: The card's training section. Defaults to ``TrainConfig()``.
        n_train: Training samples, used to choose ``steps_per_execution``. Defaults to 1000.
    """

    def __init__(
        self, inner: kt.HyperModel, space: SpaceConfig, task: str, train: TrainConfig | None = None, n_train: int = 1000
    ) -> None:
        super().__init__(name=inner.name, tunable=inner.tunable)
        self.inner = inner
        self.space = space
        self.task = task
        self.train = train or TrainConfig()
        self.n_train = n_train

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        with build_precision(self.train.precision):
            model = self.inner.build(hp)
            batch_size(hp, self.train)  # declared with the model's own, so it is searched from the first trial
            if not isinstance(model, keras.Model):
                raise TypeError(f"the builder returned {type(model).__name__}, not a keras.Model")
            if not getattr(model, "compiled", False):
                self._compile(hp, model)
            return model

    def _compile(self, hp: kt.HyperParameters, model: keras.Model) -> None:
        regularizer = blocks.regularizer(hp, self.space)
        if regularizer is not None:
            # L1/L2 on every kernel, wherever it is: Keras adds a variable's regularizer to the loss.
            for layer in model._flatten_layers(include_self=False):
                kernel = getattr(layer, "kernel", None)
                if kernel is not None and getattr(kernel, "trainable", False):
                    kernel.regularizer = regularizer
        optimizer = blocks.optimizer(hp, self.space)
        loss, metrics = task_loss(self.task)
        settings = compile_settings(model, self.train, self.n_train, batch_size(hp, self.train))
        model.compile(optimizer=optimizer, loss=loss, metrics=metrics, **settings)

    def fit(self, hp: kt.HyperParameters, model: keras.Model, x: Any = None, *args: Any, **kwargs: Any) -> Any:
        # A listed train.batch_size is the trial's batch_size hyperparameter, whoever built the model.
        return self.inner.fit(hp, model, rebatch(x, hp, self.train), *args, **kwargs)
