"""The experiment card: schema, loading by name or path, ``--set`` overrides.

This module is the lowest layer of the toolkit. It imports neither TensorFlow nor MLflow,
so ``toolkit validate`` answers in well under a second.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

# Registries of names. The objects behind them live in space.py, data.py and strategy.py;
# the names live here so that a card can be checked without importing TensorFlow.
ACTIVATIONS = (
    "sigmoid",
    "tanh",
    "relu",
    "elu",
    "selu",
    "gelu",
    "swish",
    "leaky_relu",
    "linear",
)
# "sgd" is plain SGD; "momentum" and "nesterov" are SGD with (Nesterov) momentum.
SGD_FAMILY = ("momentum", "nesterov")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "adagrad")
ALGORITHMS = ("random", "grid", "bayesian", "hyperband")
# What the toolkit measures of every trial's trained model, beside Keras' metrics (all lower is
# better): its parameter count, its saved weights' size and its inference latency for one batch.
MEASURES = ("model_params", "model_size_mb", "latency_ms")
STRATEGIES = ("auto", "cpu", "gpu", "mirrored", "tpu", "multi_worker")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
SHIPPED_DATASETS = ("digits", "breast_cancer", "wine", "iris")
SYNTHETIC_DATASETS = ("spirals", "moons", "circles", "xor", "friedman", "shapes")
KERAS_DATASETS = ("mnist", "fashion_mnist", "cifar10")
DATASETS = SHIPPED_DATASETS + SYNTHETIC_DATASETS + KERAS_DATASETS
FILE_SUFFIXES = (".csv", ".npz", ".parquet")
# Shipped model families (toolkit.models.FAMILIES holds their classes). A card may instead name
# the user's own builder (model.builder).
MODEL_FAMILIES = ("mlp", "cnn", "resnet", "xception")
# The space entries that compile a model: every family that takes the card's optimizer reads
# them, and so does a user's builder whose model comes back uncompiled.
COMPILE_SPACE = ("optimizer", "learning_rate", "momentum", "l1", "l2")
# The space entries only the MLP (and the CNN's dense head) reads; a custom builder would
# silently ignore them.
MLP_ONLY_SPACE = ("depth", "units", "activation", "dropout")
# The CNN's convolutional knobs. ``filters`` is the first block's width; each block doubles it.
CNN_ONLY_SPACE = ("conv_blocks", "filters", "kernel_size", "pooling", "batch_norm")
# The space entries each family reads. Any other entry set in a card is an error: a knob that is
# silently ignored looks as if it was searched. KerasTuner's HyperResNet and HyperXception declare
# their own hyperparameters (their names would collide with the card's), so they read none.
FAMILY_SPACE: dict[str, tuple[str, ...]] = {
    "mlp": MLP_ONLY_SPACE + COMPILE_SPACE,
    "cnn": MLP_ONLY_SPACE + COMPILE_SPACE + CNN_ONLY_SPACE,
    "resnet": (),
    "xception": (),
}
# The families that need image-shaped data (H, W, C), and the smallest side each accepts. KerasTuner's
# ResNet downsamples 32x (a 7x7/2 stem, a 3x3/2 pool and three strided stages), as Keras' ResNet
# does, which refuses images under 32x32; HyperXception's strided stem and up to eight halving
# residual blocks want as much.
IMAGE_FAMILIES = ("cnn", "resnet", "xception")
MIN_IMAGE_SIDE = {"cnn": 1, "resnet": 32, "xception": 32}
# The families whose models can start with KerasTuner's HyperImageAugment (model.augment).
AUGMENTABLE = IMAGE_FAMILIES
POOLINGS = ("max", "avg")
# The data options each source reads (data.py holds the loaders). Any other one set in a card
# is an error: a setting that is silently ignored looks as if it worked.
SOURCE_OPTIONS = {
    "spirals": ("n_samples", "noise", "n_classes"),
    "moons": ("n_samples", "noise"),
    "circles": ("n_samples", "noise"),
    "xor": ("n_samples", "noise"),
    "friedman": ("n_samples", "noise", "n_features"),
    "shapes": ("n_samples", "noise", "image_size"),
    ".csv": ("target", "features"),
    ".parquet": ("target", "features"),
}

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
DEFAULT_EXPERIMENTS_DIR = Path("experiments")


class ConfigError(Exception):
    """A bad card or bad usage: fatal, reported before any training (exit code 2).

    Args:
        message: What was wrong, the value received and what is accepted.
        field: The dotted path of the offending field, if there is one.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class _Section(BaseModel):
    # A typo in a card must never be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # Pydantic takes YAML's `true` as 1 where a number belongs: `epochs: true` would train
        # for one epoch. Every numeric field of every section refuses booleans, unless its type
        # admits a bool itself (the space's scalars, `jit_compile`).
        if not isinstance(value, bool) or info.field_name is None:
            return value
        field = cls.model_fields[info.field_name]
        types = _leaf_types(field.annotation)
        if bool in types or not types & {int, float}:
            return value
        kind = "an integer" if int in types and float not in types else "a number"
        words = "".join(f" or {t!r}" for t in sorted(t for t in types if isinstance(t, str)))  # Literal["auto"]
        raise ValueError(f"must be {kind}{_bounds(field.metadata)}{words}, not true/false. Received: {str(value).lower()}")


def _leaf_types(annotation: Any) -> set[Any]:
    """Every type a (possibly nested, union or Literal) annotation is made of."""
    args = get_args(annotation)
    if not args:
        return {annotation}
    return set().union(*(_leaf_types(a) for a in args))


def _bounds(metadata: list[Any]) -> str:
    """A field's ``Field(ge=..., le=...)`` limits in words: `` in [1, 100000]``."""

    def limit(name: str) -> str | None:
        value = next((getattr(m, name) for m in metadata if getattr(m, name, None) is not None), None)
        return None if value is None else str(value) if isinstance(value, int) else f"{value:g}"

    low = f"[{limit('ge')}" if limit("ge") else f"({limit('gt')}" if limit("gt") else None
    high = f"{limit('le')}]" if limit("le") else f"{limit('lt')})" if limit("lt") else None
    return f" in {low}, {high}" if low and high else ""


class Range(_Section):
    """A range of values: ``{min, max, step}`` or ``{min, max, sampling: log}``."""

    min: float
    max: float
    step: float | None = None
    sampling: Literal["linear", "log"] = "linear"

    @model_validator(mode="after")
    def _check_bounds(self) -> Range:
        for key in ("min", "max"):
            if not math.isfinite(getattr(self, key)):
                raise ValueError(f"{key} must be a finite number. Received: {getattr(self, key)}")
        if self.min > self.max:
            raise ValueError(f"min {self.min:g} is greater than max {self.max:g}")
        if self.sampling == "log" and self.min <= 0:
            raise ValueError(f"log sampling needs min > 0. Received: min={self.min:g}")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"step must be > 0. Received: step={self.step:g}")
        return self

    @property
    def is_int(self) -> bool:
        """Whether every bound is a whole number, so the range can be an ``hp.Int``."""
        return all(float(v).is_integer() for v in (self.min, self.max, self.step or 1))


Scalar = bool | int | float | str
# A list is a choice, a scalar is fixed, a mapping is a range.
Param = Range | list[Scalar] | Scalar


def _choices(value: Param) -> list[Any]:
    """The discrete values a parameter can take (ranges have none)."""
    if isinstance(value, list):
        return value
    if isinstance(value, Range):
        return []
    return [value]


class SpaceConfig(_Section):
    """The search space. Each entry becomes one KerasTuner hyperparameter of the same name."""

    depth: Param = Field(default_factory=lambda: Range(min=1, max=3))
    units: Param = Field(default_factory=lambda: [32, 64, 128])
    activation: Param = "relu"
    optimizer: Param = "adam"
    learning_rate: Param = 1e-3
    # Only SGD with momentum has a momentum value (a KerasTuner conditional).
    momentum: Param = 0.9
    l1: Param = 0.0
    l2: Param = 0.0
    dropout: Param = 0.0
    # The CNN's knobs (model.family: cnn). Each block is one convolution, then pooling by 2.
    conv_blocks: Param = Field(default_factory=lambda: Range(min=1, max=2))
    # The first block's filters; each later block doubles them (the VGG convention), so one
    # hyperparameter sets the whole stack's width.
    filters: Param = Field(default_factory=lambda: [16, 32])
    kernel_size: Param = 3
    pooling: Param = "max"
    batch_norm: Param = False

    @field_validator("*", mode="before")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("an empty list offers no choice; give at least one value")
        if value is None:
            raise ValueError("a value is required; give a scalar, a list or {min, max}")
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _check_values(cls, value: Any, info: ValidationInfo) -> Any:
        name = info.field_name
        if name in _NAMED:
            allowed = _NAMED[name]
            if isinstance(value, Range):
                raise ValueError("a range is not accepted here; give a name or a list of names")
            for item in _choices(value):
                if item not in allowed:
                    raise ValueError(f"unknown {name} {item!r}. Accepted: {', '.join(allowed)}")
            return value
        if name == "batch_norm":
            if isinstance(value, Range):
                raise ValueError("a range is not accepted here; give true, false or [true, false]")
            for item in _choices(value):
                if not isinstance(item, bool):
                    raise ValueError(f"must be true or false. Received: {item!r}")
            return value
        low, high = _BOUNDS[name]
        points = [value.min, value.max] if isinstance(value, Range) else _choices(value)
        for item in points:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                raise ValueError(f"must be a number. Received: {item!r}")
            if not (low <= item <= high):
                raise ValueError(f"must be in the range [{low:g}, {high:g}]. Received: {item!r}")
            if name in INTEGER_SPACE and not float(item).is_integer():
                raise ValueError(f"must be a whole number. Received: {item!r}")
        return value


# The space entries that are whole numbers (hp.Int for a range).
INTEGER_SPACE = ("depth", "units", "conv_blocks", "filters", "kernel_size")
_NAMED = {"activation": ACTIVATIONS, "optimizer": OPTIMIZERS, "pooling": POOLINGS}
_BOUNDS = {
    "depth": (1, 64),
    "units": (1, 65536),
    "conv_blocks": (1, 16),
    "filters": (1, 4096),
    "kernel_size": (1, 15),
    "learning_rate": (1e-12, 1e3),
    "momentum": (0.0, 1.0),
    "l1": (0.0, 10.0),
    "l2": (0.0, 10.0),
    "dropout": (0.0, 0.99),
}


class DataConfig(_Section):
    """Where the data comes from and how it is split."""

    source: str = "digits"
    validation_split: float = Field(0.2, gt=0.0, lt=1.0)
    # The test split is held out and touched only to evaluate the best model.
    test_split: float = Field(0.0, ge=0.0, lt=1.0)
    target: str | None = None
    features: list[str] | None = None
    task: Literal["classification", "regression"] | None = None
    n_samples: int | None = Field(None, ge=4, le=10_000_000)
    noise: float | None = Field(None, ge=0.0, le=100.0)
    n_features: int | None = Field(None, ge=1, le=100_000)
    n_classes: int | None = Field(None, ge=2, le=1000)
    # shapes: the side of each square image, in pixels.
    image_size: int | None = Field(None, ge=8, le=512)

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value in DATASETS or value.lower().endswith(FILE_SUFFIXES):
            return value
        raise ValueError(
            f"unknown data source {value!r}. Accepted: {', '.join(DATASETS)}, or a path to a {'/'.join(FILE_SUFFIXES)} file"
        )

    @field_validator("target", "features", "n_samples", "noise", "n_features", "n_classes", "image_size")
    @classmethod
    def _used_by_source(cls, value: Any, info: ValidationInfo) -> Any:
        source = info.data.get("source")  # validated first, as it is declared first
        if value is None or source is None:
            return value
        kind = source if source in DATASETS else Path(source).suffix.lower()
        accepted = SOURCE_OPTIONS.get(kind, ())
        if info.field_name not in accepted:
            what = repr(source) if source in DATASETS else f"a {kind} file"
            takes = ", ".join(accepted) or "none besides validation_split, test_split and task"
            raise ValueError(f"not used by {what}, so it would be ignored. Options it takes: {takes}. Received: {_short(value)}")
        return value

    @model_validator(mode="after")
    def _check_splits(self) -> DataConfig:
        if self.validation_split + self.test_split >= 1.0:
            raise ValueError(
                "validation_split + test_split must be below 1 so training data remains. "
                f"Received: {self.validation_split:g} + {self.test_split:g}"
            )
        return self


class PruningConfig(_Section):
    """Stop hopeless trials early, under random, grid and bayesian search.

    At the end of each epoch from ``min_epochs`` on, a trial's best objective so far is set
    against the best-so-far, at the same epoch, of this search's finished trials (from every
    worker, read from MLflow). ``median`` stops it when it is worse than their median;
    ``percentile`` when it is outside their best ``percentile`` per cent (Optuna's
    PercentilePruner: 25 keeps the top quarter).
    """

    rule: Literal["median", "percentile"] = "median"
    min_epochs: int = Field(2, ge=1, le=100_000)
    # The finished trials that must have reached the epoch before any trial is judged at it.
    min_trials: int = Field(3, ge=1, le=100_000)
    percentile: float | None = Field(None, gt=0.0, lt=100.0)

    @model_validator(mode="after")
    def _percentile_for_its_rule(self) -> PruningConfig:
        if self.rule == "percentile" and self.percentile is None:
            self.percentile = 25.0
        if self.rule == "median" and self.percentile is not None:
            raise ValueError(
                f"percentile is read by rule: percentile only. Received: rule='median', percentile={self.percentile:g}"
            )
        return self


class Bound(_Section):
    """A constraint on one measure of a trial: ``{max: 20000}``, ``{min: 0.9}`` or both."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _a_bound(self) -> Bound:
        if self.min is None and self.max is None:
            raise ValueError("a constraint needs min, max or both, e.g. {max: 20000}. Received: neither")
        for name, value in (("min", self.min), ("max", self.max)):
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number. Received: {value}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min must not exceed max. Received: min={self.min:g}, max={self.max:g}")
        return self


def _measure_name(value: str, what: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        raise ValueError(f"{what} names a measure ({', '.join(MEASURES)}) or a metric such as val_accuracy. Received: {value!r}")
    return value


class TunerConfig(_Section):
    """Which KerasTuner algorithm runs the trials, and what it optimizes."""

    algorithm: Literal[ALGORITHMS] = "random"
    # None: val_accuracy for classification, val_loss for regression.
    objective: str | None = None
    direction: Literal["min", "max"] | None = None
    max_trials: int = Field(4, ge=1, le=100_000)
    executions_per_trial: int = Field(1, ge=1, le=100)
    # Hyperband: reduction factor between brackets.
    factor: int = Field(3, ge=2, le=100)
    # KerasTuner's own failure controls.
    max_consecutive_failed_trials: int = Field(3, ge=1, le=100_000)
    max_retries_per_trial: int = Field(0, ge=0, le=100)
    # None: every trial trains all its epochs.
    pruning: PruningConfig | None = None
    # Measure (MEASURES) or metric name → bounds. A trial outside them is infeasible: the oracle
    # hears the worst score so far for it, and the champion is the best feasible trial.
    constraints: dict[str, Bound] | None = None
    # Two or three measures or metrics: the report's non-dominated trials, tagged toolkit.pareto.
    pareto: list[str] | None = None

    @model_validator(mode="after")
    def _pruning_for_its_algorithms(self) -> TunerConfig:
        if self.pruning is not None and self.algorithm == "hyperband":
            raise ValueError(
                "pruning is for random, grid and bayesian search; hyperband stops trials by its own rounds. "
                "Received: algorithm='hyperband' with pruning. Remove tuner.pruning or pick another algorithm"
            )
        return self

    @field_validator("constraints")
    @classmethod
    def _constraint_names(cls, value: dict[str, Bound] | None) -> dict[str, Bound] | None:
        if value is not None:
            if not value:
                raise ValueError("constraints needs at least one measure, e.g. {model_params: {max: 20000}}. Received: {}")
            for name in value:
                _measure_name(name, "each constraint")
        return value

    @field_validator("pareto")
    @classmethod
    def _pareto_names(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not 2 <= len(value) <= 3 or len(set(value)) != len(value):
                raise ValueError(
                    f"pareto takes two or three different measures, e.g. [val_accuracy, model_params]. Received: {value}"
                )
            for name in value:
                _measure_name(name, "each pareto entry")
        return value

    @field_validator("objective")
    @classmethod
    def _objective_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError(f"objective must be a metric name such as val_loss. Received: {value!r}")
        return value


class EpochStateConfig(_Section):
    """Resume inside a trial: each trial's state saved at epoch ends, on a time budget.

    At an epoch's end the weights, the optimizer's variables and the history so far are saved
    in the trial's folder when the time spent saving stays within ``budget`` of the time the
    trial has trained. A search killed mid-trial continues that trial, on resume, from the last
    saved epoch instead of epoch 0 (see :mod:`toolkit.tuner.epoch_state`).
    """

    # The largest share of a trial's training time that saving its state may take.
    budget: float = Field(0.05, gt=0.0, le=1.0)


class TrainConfig(_Section):
    """How each trial trains."""

    epochs: int = Field(3, ge=1, le=100_000)
    # The global batch: each replica gets batch_size / replicas. A list is a choice: each trial's
    # batch is then a hyperparameter named batch_size (the card's key, in YAML and --set). The
    # field is `batch_sizes` in Python so that `batch_size` can stay the one int the input
    # pipelines are cut in (see the property).
    batch_sizes: int | list[int] = Field(64, alias="batch_size")
    precision: Literal[PRECISIONS] = "float32"
    # "auto" picks from model and data size; small models are bound by per-step overhead.
    steps_per_execution: int | Literal["auto"] = "auto"
    jit_compile: bool | Literal["auto"] = "auto"
    # Stop a trial when the objective has not improved for this many epochs (0: never).
    early_stopping: int = Field(0, ge=0, le=100_000)
    # Per-epoch diagnostics: gradient norms, dead ReLUs, weight norms, train/val gap.
    diagnostics: bool = True
    # k-fold cross-validation: the train and validation splits joined, k stratified folds, each
    # trial trained k times and scored by the mean over folds (None: the one validation split).
    folds: int | None = Field(None, ge=2, le=20)
    # Save each trial's state at epoch ends so that a killed search resumes inside the trial
    # (true for the default budget; None or false: a resumed trial starts at epoch 0).
    epoch_state: EpochStateConfig | None = None

    @field_validator("epoch_state", mode="before")
    @classmethod
    def _epoch_state_switch(cls, value: Any) -> Any:
        if value is True:
            return {}
        if value is False:
            return None
        return value

    @field_validator("batch_sizes", mode="before")
    @classmethod
    def _no_bool_batches(cls, value: Any) -> Any:
        if isinstance(value, bool) or (isinstance(value, list) and any(isinstance(v, bool) for v in value)):
            raise ValueError(
                "must be an integer in [1, 1000000], not true/false (a list of them is a choice). "
                f"Received: {str(value).lower() if isinstance(value, bool) else _short(value)}"
            )
        return value

    @field_validator("batch_sizes")
    @classmethod
    def _batch_values(cls, value: int | list[int]) -> int | list[int]:
        for item in value if isinstance(value, list) else [value]:
            if not 1 <= item <= 1_000_000:
                raise ValueError(f"each batch size must be in [1, 1000000]. Received: {item}")
        if isinstance(value, list) and not value:
            raise ValueError("an empty list offers no choice; give at least one batch size")
        return value

    @property
    def batch_choices(self) -> list[int]:
        """The global batch sizes a trial may train with (one unless the card gives a list)."""
        values = self.batch_sizes if isinstance(self.batch_sizes, list) else [self.batch_sizes]
        return sorted(set(values))

    @property
    def batch_size(self) -> int:
        """The global batch the input pipelines are cut in: the smallest choice.

        A trial whose ``batch_size`` hyperparameter is larger rebatches that pipeline in its
        HyperModel's ``fit``; the smallest is also the one the replica rule (a global batch of at
        least one sample per replica) must hold for.
        """
        return self.batch_choices[0]

    @field_validator("steps_per_execution")
    @classmethod
    def _positive_spe(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 100_000:
            raise ValueError(f"steps_per_execution must be 'auto' or in [1, 100000]. Received: {value}")
        return value


class StrategyConfig(_Section):
    """The ``tf.distribute`` strategy each trial trains under."""

    name: Literal[STRATEGIES] = "auto"
    # mirrored without GPUs: the CPU is split into this many logical devices.
    replicas: int = Field(2, ge=1, le=64)


class TrackingConfig(_Section):
    """Where and what MLflow records."""

    # None: MLFLOW_TRACKING_URI, else SQLite at mlruns/mlflow.db.
    uri: str | None = None
    # None: the card's name.
    experiment: str | None = None
    # Log the best model once on the parent run and register it as <name>@champion.
    log_model: bool = True
    register_model: bool = True
    report: bool = True
    # CPU, memory, disk and network (GPU where present) on every trial run, by MLflow's monitor.
    system_metrics: bool = True
    # Experiments whose latest searches the report sets beside this one (best trial, trials of
    # similar parameter count), e.g. a CNN card against its MLP partner card.
    compare_with: list[str] = Field(default_factory=list, max_length=10)

    @field_validator("compare_with")
    @classmethod
    def _safe_compare_with(cls, value: list[str]) -> list[str]:
        for name in value:
            if not NAME_PATTERN.fullmatch(name):
                raise ValueError(
                    "compare_with lists experiment names: 1-100 characters of letters, digits, '_', '-' or '.', "
                    f"starting with a letter or digit. Received: {name!r}"
                )
        return list(dict.fromkeys(value))

    @field_validator("experiment")
    @classmethod
    def _safe_experiment(cls, value: str | None) -> str | None:
        # It names a folder under the store (the tuner's state, reports): no '/', '..' or absolute path.
        if value is not None and not NAME_PATTERN.fullmatch(value):
            raise ValueError(
                "experiment must be 1-100 characters of letters, digits, '_', '-' or '.', "
                f"starting with a letter or digit. Received: {value!r}"
            )
        return value


class ModelConfig(_Section):
    """Which model the trials train: a shipped family, or the user's own builder."""

    family: str = "mlp"
    # "path/to/file.py:build" or "package.module:build": a build(hp) function, a kt.HyperModel
    # subclass or an instance. A relative file is looked up in the card's folder, then the cwd.
    builder: str | None = None
    # Start the image families' models with KerasTuner's HyperImageAugment: random rotation,
    # translation and contrast, active in training only, each strength a trial hyperparameter.
    augment: bool = False

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str) -> str:
        if value not in MODEL_FAMILIES:
            raise ValueError(f"unknown model family {value!r}. Accepted: {', '.join(MODEL_FAMILIES)}")
        return value

    @field_validator("builder")
    @classmethod
    def _reference(cls, value: str | None) -> str | None:
        if value is not None:
            split_builder_reference(value)
        return value


def split_builder_reference(reference: str) -> tuple[str, str]:
    """``"file.py:build"`` or ``"pkg.mod:build"`` → (where, name).

    Raises:
        ValueError: When the reference lacks ``:name`` or the name is not an identifier.
    """
    where, sep, name = reference.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise ValueError(
            f"must be 'path/to/file.py:build' or 'package.module:build' (a file or module, then ':' and a name). "
            f"Received: {reference!r}"
        )
    return where, name


_KT_NAMES = {"resnet": "ResNet", "xception": "Xception"}
# The image shape (H, W, C) of each built-in image source; the others are tabular.
IMAGE_SOURCES = {"digits": (8, 8, 1), "mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3)}
SHAPES_SIDE = 32  # the shapes source's default image side


def source_image_shape(data: DataConfig) -> tuple[int, ...] | None | Literal["unknown"]:
    """A source's image shape, known without loading it: ``None`` for tabular, ``"unknown"`` for a file."""
    if data.source == "shapes":
        side = data.image_size or SHAPES_SIDE
        return (side, side, 1)
    if data.source in IMAGE_SOURCES:
        return IMAGE_SOURCES[data.source]
    if data.source in DATASETS or not data.source.lower().endswith(".npz"):
        return None
    return "unknown"


def check_image_family(family: str, source: str, shape: tuple[int, ...] | None | str) -> None:
    """Refuse data an image family cannot take: not an image, or smaller than the family needs.

    Args:
        family: An image family (one of ``IMAGE_FAMILIES``).
        source: The data source, for the message.
        shape: One sample's shape; ``None`` for tabular data; ``"unknown"`` skips the check
            (a file, checked again once loaded).

    Raises:
        ValueError: Naming the family, the shape received and what it accepts.
    """
    if shape == "unknown":
        return
    side = MIN_IMAGE_SIDE[family]
    needs = f"images (H, W, C){f' of at least {side}x{side}' if side > 1 else ''}"
    image_sources = ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in IMAGE_SOURCES.items())
    offer = f"Image sources: {image_sources}, shapes (image_size, default {SHAPES_SIDE}), or an .npz of (N, H, W[, C])"
    if shape is None or len(shape) not in (2, 3):
        got = "tabular rows" if shape is None else "samples that are not (H, W, C) images"
        raise ValueError(f"model.family {family!r} needs {needs}; data.source {source!r} gives {got}. {offer}")
    if min(shape[:2]) < side:
        smaller = "; use model.family: cnn for small images" if family != "cnn" else ""
        raise ValueError(
            f"model.family {family!r} needs {needs}; data.source {source!r} gives {'x'.join(map(str, shape))}{smaller}. {offer}"
        )


class ExperimentConfig(_Section):
    """A whole experiment card."""

    name: str
    seed: int = Field(42, ge=0, le=2**31 - 1)
    data: DataConfig = Field(default_factory=DataConfig)
    space: SpaceConfig = Field(default_factory=SpaceConfig)
    tuner: TunerConfig = Field(default_factory=TunerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not NAME_PATTERN.fullmatch(value):
            raise ValueError(
                f"name must be 1-100 characters of letters, digits, '_', '-' or '.', "
                f"starting with a letter or digit. Received: {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _folds_with_what_they_can_share(self) -> ExperimentConfig:
        if self.train.folds is None:
            return self
        if self.tuner.algorithm == "hyperband":
            raise ValueError(
                "train.folds does not go with hyperband: its later rounds continue an earlier trial's weights, "
                "which were trained on the other folds' validation data. Received: "
                f"algorithm='hyperband', folds={self.train.folds}. Use random, grid or bayesian"
            )
        if self.tuner.pruning is not None:
            raise ValueError(
                "train.folds does not go with tuner.pruning: a trial's score is known only after its last fold. "
                f"Received: folds={self.train.folds} with pruning. Remove one of them"
            )
        return self

    @model_validator(mode="after")
    def _space_for_the_model(self) -> ExperimentConfig:
        set_keys = [k for k in SpaceConfig.model_fields if k in self.space.model_fields_set]
        if self.model.builder is not None:
            if "family" in self.model.model_fields_set:
                raise ValueError(
                    f"model: give either family or builder, not both. Received: family={self.model.family!r}, "
                    f"builder={self.model.builder!r}"
                )
            if self.model.augment:
                raise ValueError(
                    f"model.augment is for the shipped image families ({', '.join(AUGMENTABLE)}); model.builder "
                    f"{self.model.builder!r} would ignore it. Received: augment=true. Add augmentation layers in the builder"
                )
            ignored = [k for k in set_keys if k not in COMPILE_SPACE]
            if ignored:
                readers = [f for f, keys in FAMILY_SPACE.items() if ignored[0] in keys]
                raise ValueError(
                    f"space.{ignored[0]} is read only by the built-in {readers[0]} family; model.builder "
                    f"{self.model.builder!r} would silently ignore it. With a builder, space accepts: {', '.join(COMPILE_SPACE)} "
                    "(they compile a model the builder returns uncompiled); declare other knobs with hp.* in the builder"
                )
        return self

    def check_family(self) -> None:
        """Refuse what the card's family would ignore or cannot take (a family card only).

        Run by :func:`validate` after the schema, so each error names its own field.

        Raises:
            ConfigError: For a space entry the family does not read (``space.<key>``), ``model.augment``
                on a family without images, or a built-in source the family cannot take (``data.source``).
        """
        if self.model.builder is not None:
            return
        family = self.model.family
        reads = FAMILY_SPACE[family]
        ignored = [k for k in SpaceConfig.model_fields if k in self.space.model_fields_set and k not in reads]
        if ignored:
            key = ignored[0]
            if reads:
                accepted = f"Entries {family} reads: {', '.join(reads)}"
            else:
                accepted = (
                    f"{family} reads no space entries: KerasTuner's Hyper{_KT_NAMES[family]} declares its own hyperparameters"
                )
            raise ConfigError(
                f"space.{key}: not read by model.family {family!r}, so it would be silently ignored. "
                f"Received: {key}={_short(_plain(getattr(self.space, key)))}. {accepted}",
                field=f"space.{key}",
            )
        if self.model.augment and family not in AUGMENTABLE:
            raise ConfigError(
                f"model.augment: for the image families ({', '.join(AUGMENTABLE)}). Received: augment=true with family {family!r}",
                field="model.augment",
            )
        if family in IMAGE_FAMILIES:
            try:
                check_image_family(family, self.data.source, source_image_shape(self.data))
            except ValueError as exc:
                raise ConfigError(f"data.source: {exc}", field="data.source") from None

    @field_validator("strategy", mode="before")
    @classmethod
    def _strategy_shorthand(cls, value: Any) -> Any:
        # `strategy: mirrored` is shorthand for `strategy: {name: mirrored}`.
        return {"name": value} if isinstance(value, str) else value

    @property
    def objective(self) -> str:
        """The metric the tuner optimizes."""
        if self.tuner.objective:
            return self.tuner.objective
        return "val_loss" if self.data.task == "regression" else "val_accuracy"

    @property
    def direction(self) -> str:
        """``min`` or ``max``: given in the card, else inferred from the objective's name."""
        return self.tuner.direction or objective_direction(self.objective)

    def to_dict(self) -> dict[str, Any]:
        """The resolved card as plain data (what ``experiment.yaml`` holds).

        Space entries the model does not read are left out (with a builder, also the family), and
        ``model.augment`` when it is off.
        """
        data = self.model_dump(mode="json", by_alias=True)
        if self.model.builder is not None:
            data["model"].pop("family")
            reads = COMPILE_SPACE
        else:
            reads = FAMILY_SPACE[self.model.family]
        # Only the entries the model reads: the others are not searched, and an MLP card's record
        # stays what it was before the image families arrived.
        for key in [k for k in data["space"] if k not in reads]:
            data["space"].pop(key)
        if not self.model.augment:
            data["model"].pop("augment")
        # Off by default: a card without them keeps the record (and the search id) it had before.
        for key in ("constraints", "pareto"):
            if data["tuner"].get(key) is None:
                data["tuner"].pop(key)
        for key in ("folds", "epoch_state"):
            if data["train"].get(key) is None:
                data["train"].pop(key)
        if data["data"].get("image_size") is None:
            data["data"].pop("image_size")
        return data


# KerasTuner's infer_metric_direction is the rule for Keras' metric names, but it needs Keras
# (and so TensorFlow); these mirror it without TensorFlow, and tests/test_config.py checks that
# they agree for every metric a task produces and for Keras' other metrics.
_MAXIMIZED = (
    "acc",
    "accuracy",
    "binary_accuracy",
    "categorical_accuracy",
    "sparse_categorical_accuracy",
    "top_k_categorical_accuracy",
    "sparse_top_k_categorical_accuracy",
    "true_positives",
    "true_negatives",
    "precision",
    "recall",
    "auc",
    "sensitivity_at_specificity",
    "specificity_at_sensitivity",
)
_MINIMIZED = (
    "loss",
    "crossentropy",
    "error",
    "mae",
    "mse",
    "mape",
    "msle",
    "hinge",
    "poisson",
    "kl_divergence",
    "kld",
    "log_cosh",
    "logcosh",
    "huber",
    "false_positives",
    "false_negatives",
)


def objective_direction(objective: str) -> str:
    """Whether a metric is maximized or minimized, from its name, as KerasTuner infers it.

    ``val_`` and ``weighted_`` prefixes are ignored. Accuracy, AUC, precision, recall and true
    counts are maximized; losses, errors (``mae``, ``mse``, ``rmse``, ...), crossentropies and
    false counts are minimized; any other name is taken as maximized (say ``tuner.direction``).

    Args:
        objective: A metric name such as ``val_mae``.

    Returns:
        ``"max"`` or ``"min"``.
    """
    name = objective.lower()
    name = name.removeprefix("val_").removeprefix("weighted_")
    if name in _MAXIMIZED:
        return "max"
    if name == "ce" or any(word in name for word in _MINIMIZED):
        return "min"
    return "max"


# ---------------------------------------------------------------------------- loading


def resolve_card_path(exp: str | Path, experiments_dir: Path | None = None) -> Path:
    """Find a card by name (``experiments/<name>.yaml``) or by path.

    Args:
        exp: A card name or a path to a YAML file.
        experiments_dir: Where named cards live. Defaults to ``./experiments``.

    Returns:
        The path of the card.

    Raises:
        ConfigError: When no such card exists; the message lists the cards that do.
    """
    experiments_dir = experiments_dir or DEFAULT_EXPERIMENTS_DIR
    text = str(exp)
    candidate = Path(text)
    looks_like_path = text.endswith((".yaml", ".yml")) or "/" in text or "\\" in text
    if looks_like_path:
        if candidate.is_file():
            return candidate
        raise ConfigError(f"experiment card not found: {text!r} is not a file.", field="EXP")
    for suffix in (".yaml", ".yml"):
        named = experiments_dir / f"{text}{suffix}"
        if named.is_file():
            return named
    known = available_cards(experiments_dir)
    listing = ", ".join(known) if known else f"none in {experiments_dir}/"
    raise ConfigError(
        f"unknown experiment {text!r}. Cards that exist: {listing}. Give a card name from experiments/ or a path to a YAML file.",
        field="EXP",
    )


def available_cards(experiments_dir: Path | None = None) -> list[str]:
    """Names of the cards in ``experiments/``."""
    experiments_dir = experiments_dir or DEFAULT_EXPERIMENTS_DIR
    if not experiments_dir.is_dir():
        return []
    return sorted(p.stem for p in experiments_dir.glob("*.y*ml") if p.suffix in (".yaml", ".yml"))


def parse_overrides(pairs: list[str] | None) -> list[tuple[str, Any]]:
    """Parse ``dotted.key=value`` strings; each value is read as a YAML scalar.

    Args:
        pairs: Strings such as ``tuner.max_trials=2``. Defaults to none.

    Returns:
        ``(dotted_key, value)`` pairs.

    Raises:
        ConfigError: When a pair has no ``=`` or its key or value is malformed.
    """
    result = []
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
            raise ConfigError(
                f"--set expects dotted.key=value, for example tuner.max_trials=2. Received: {pair!r}",
                field="--set",
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: the value {raw!r} is not valid YAML ({_first_line(exc)})", field=key) from None
        result.append((key, value))
    return result


def apply_overrides(raw: dict[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    """Set each dotted key in a copy of the raw card."""
    import copy

    card = copy.deepcopy(raw)
    for key, value in overrides:
        node = card
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if part == "strategy" and isinstance(child, str):
                child = {"name": child}  # strategy shorthand
            if child is None:
                child = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} holds {child!r}, not a section with fields", field=key)
            node[part] = child
            node = child
        node[parts[-1]] = value
    return card


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def read_card(path: Path) -> dict[str, Any]:
    """Read a card's YAML safely: tags such as ``!!python/object`` are errors."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the card ({exc.strerror})", field="EXP") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the card is not UTF-8 text (is it a binary file?)", field="EXP") from None
    if "\x00" in text:
        raise ConfigError(f"{path}: the card is not text (it contains NUL bytes)", field="EXP")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or _first_line(exc)
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}", field="EXP") from None
    except RecursionError:
        raise ConfigError(f"{path}: malformed YAML: nesting too deep", field="EXP") from None
    if raw is None:
        raise ConfigError(f"{path}: the card is empty; it needs at least a data: section", field="EXP")
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: a card must be a mapping of sections (name, seed, data, space, tuner, "
            f"train, strategy, tracking). Received: a {type(raw).__name__}",
            field="EXP",
        )
    return raw


def validate(raw: dict[str, Any], default_name: str = "experiment", card_dir: Path | None = None) -> ExperimentConfig:
    """Validate a raw card.

    Args:
        raw: The card as parsed YAML.
        default_name: The name used when the card has none. Defaults to ``"experiment"``.
        card_dir: The card's folder, where a relative ``model.builder`` file is looked up first.
            Defaults to None (the current directory only).

    Returns:
        The validated card.

    Raises:
        ConfigError: Naming the first bad field, the value received and what is accepted.
    """
    bad_keys = [k for k in raw if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError(f"card keys must be names. Received: {bad_keys[0]!r}", field=str(bad_keys[0]))
    raw = dict(raw)
    raw.setdefault("name", default_name)
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise _translate(exc) from None
    cfg.check_family()
    own = cfg.tracking.experiment or cfg.name
    if own in cfg.tracking.compare_with:
        raise ConfigError(
            f"tracking.compare_with: names other experiments to set beside this one; {own!r} is this card's own. "
            f"Received: {cfg.tracking.compare_with!r}",
            field="tracking.compare_with",
        )
    if cfg.model.builder is not None:
        cfg.model.builder = locate_builder(cfg.model.builder, card_dir)
    return cfg


def locate_builder(reference: str, card_dir: Path | None) -> str:
    """A file reference with its file found (card folder, then cwd) and made absolute.

    Workers and resumes then find the same file wherever they start. The file is checked for
    the named top-level function or class by parsing it, without running it (so ``toolkit
    validate`` stays free of TensorFlow); a module reference is checked when the search imports it.
    """
    import ast

    try:
        where, name = split_builder_reference(reference)
    except ValueError as exc:
        raise ConfigError(f"model.builder: {exc}", field="model.builder") from None
    if not (where.endswith(".py") or "/" in where or "\\" in where):
        return reference
    candidate = Path(where).expanduser()
    places = [candidate] if candidate.is_absolute() else [p / candidate for p in ([card_dir] if card_dir else []) + [Path.cwd()]]
    found = next((p for p in places if p.is_file()), None)
    if found is None:
        looked = ", ".join(str(p) for p in places)
        raise ConfigError(f"model.builder: builder file {where!r} not found (looked in: {looked})", field="model.builder")
    try:
        tree = ast.parse(found.read_text(encoding="utf-8"), filename=str(found))
    except (SyntaxError, UnicodeDecodeError) as exc:
        raise ConfigError(f"model.builder: {str(found)!r} is not valid Python: {exc}", field="model.builder") from None
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    if name not in names:
        defs = sorted(n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_"))
        raise ConfigError(
            f"model.builder: {str(found)!r} defines no {name!r}. Received: {reference!r}. It defines: {', '.join(defs) or 'nothing'}",
            field="model.builder",
        )
    return f"{found.resolve()}:{name}"


def load_config(
    exp: str | Path,
    overrides: list[str] | None = None,
    experiments_dir: Path | None = None,
) -> ExperimentConfig:
    """Load, override and validate a card.

    Args:
        exp: A card name from ``experiments/`` or a path to a YAML file.
        overrides: ``dotted.key=value`` strings, applied in order. Defaults to none.
        experiments_dir: Where named cards live. Defaults to ``./experiments``.

    Returns:
        The validated card.

    Raises:
        ConfigError: For any problem with the card or the overrides.
    """
    path = resolve_card_path(exp, experiments_dir)
    raw = read_card(path)
    raw = apply_overrides(raw, parse_overrides(overrides))
    default_name = path.stem if NAME_PATTERN.fullmatch(path.stem) else "experiment"
    return validate(raw, default_name=default_name, card_dir=path.parent)


def _translate(exc: ValidationError) -> ConfigError:
    """Turn pydantic's first error into one message: field, value received, what is accepted."""
    err = exc.errors(include_url=False)[0]
    loc = [str(p) for p in err["loc"]]
    # Drop pydantic's union-branch labels ("Range", "list[...]", "function-after[...]").
    loc = [p for p in loc if not ("[" in p or p in ("Range", "str", "int", "float", "bool"))]
    field = ".".join(loc) or "card"
    kind = err["type"]
    value = err.get("input")
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if kind == "extra_forbidden":
        parent = ".".join(loc[:-1])
        known = _known_fields(parent)
        accepted = f" Accepted fields{' in ' + parent if parent else ''}: {', '.join(known)}." if known else ""
        return ConfigError(f"{field}: unknown field (is it a typo?).{accepted}", field=field)
    if kind == "missing":
        return ConfigError(f"{field}: this field is required", field=field)
    shown = _short(value)
    if "Received" in msg:
        return ConfigError(f"{field}: {msg}", field=field)
    return ConfigError(f"{field}: {msg}. Received: {shown}", field=field)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _plain(value: Any) -> Any:
    """A space entry as the card wrote it: a range as its mapping."""
    return value.model_dump(exclude_none=True, exclude_defaults=True) if isinstance(value, BaseModel) else value


def _known_fields(dotted: str) -> list[str]:
    model: type[BaseModel] = ExperimentConfig
    for part in [p for p in dotted.split(".") if p]:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return [f.alias or name for name, f in model.model_fields.items()]
