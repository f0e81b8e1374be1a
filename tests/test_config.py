"""The experiment card: every validation rule states its message. No TensorFlow here."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from toolkit.config import (
    ConfigError,
    Range,
    apply_overrides,
    load_config,
    objective_direction,
    parse_overrides,
    validate,
)

EXPERIMENTS = ROOT / "experiments"


def card(**sections):
    raw = {"name": "t", "data": {"source": "iris"}}
    raw.update(sections)
    return raw


@pytest.mark.parametrize(
    "raw, message",
    [
        (card(spce={}), r"spce: unknown field \(is it a typo\?\)\. Accepted fields: name, seed, data"),
        (
            card(space={"activaton": "relu"}),
            r"space\.activaton: unknown field.*Accepted fields in space: depth, units, activation",
        ),
        (card(space={"activation": "relux"}), r"space\.activation: unknown activation 'relux'\. Accepted: sigmoid, tanh, relu"),
        (card(space={"activation": ["relu", "swishh"]}), r"unknown activation 'swishh'"),
        (
            card(space={"optimizer": "adamm"}),
            r"space\.optimizer: unknown optimizer 'adamm'\. Accepted: sgd, momentum, nesterov, adam",
        ),
        (card(space={"activation": {"min": 1, "max": 2}}), r"space\.activation: a range is not accepted"),
        (card(space={"depth": {"min": 4, "max": 1}}), r"space\.depth.*min 4 is greater than max 1"),
        (card(space={"depth": 0}), r"space\.depth: must be in the range \[1, 64\]\. Received: 0"),
        (card(space={"depth": 2.5}), r"space\.depth: must be a whole number\. Received: 2\.5"),
        (card(space={"units": []}), r"space\.units.*empty list offers no choice"),
        (card(space={"units": "wide"}), r"space\.units: must be a number\. Received: 'wide'"),
        (card(space={"learning_rate": {"min": 0, "max": 1, "sampling": "log"}}), r"log sampling needs min > 0"),
        (
            card(space={"learning_rate": {"min": 1e-3, "max": 1, "sampling": "cubic"}}),
            r"space\.learning_rate.*sampling.*'linear' or 'log'",
        ),
        (card(space={"dropout": 1.5}), r"space\.dropout: must be in the range \[0, 0\.99\]\. Received: 1\.5"),
        (card(space={"l2": -1}), r"space\.l2: must be in the range \[0, 10\]\. Received: -1"),
        (card(space={"depth": {"min": 1}}), r"space\.depth\.max: this field is required"),
        (
            card(tuner={"algorithm": "annealing"}),
            r"tuner\.algorithm: Input should be 'random', 'grid', 'bayesian' or 'hyperband'\. Received: 'annealing'",
        ),
        (card(tuner={"max_trials": 0}), r"tuner\.max_trials: Input should be greater than or equal to 1\. Received: 0"),
        (card(tuner={"objective": "val loss"}), r"tuner\.objective: objective must be a metric name"),
        (card(train={"epochs": "many"}), r"train\.epochs: Input should be a valid integer.*Received: 'many'"),
        (card(train={"precision": "fp8"}), r"train\.precision: Input should be 'float32', 'mixed_float16' or 'mixed_bfloat16'"),
        (
            card(strategy="quantum"),
            r"strategy\.name: Input should be 'auto', 'cpu', 'gpu', 'mirrored', 'tpu' or 'multi_worker'\. Received: 'quantum'",
        ),
        (card(strategy={"name": "mirrored", "replicas": 0}), r"strategy\.replicas: Input should be greater than or equal to 1"),
        (card(data={"source": "imagenet"}), r"data\.source: unknown data source 'imagenet'\. Accepted: digits, breast_cancer"),
        (card(data={"source": "iris", "validation_split": 1.2}), r"data\.validation_split: Input should be less than 1"),
        (
            card(data={"source": "iris", "validation_split": 0.6, "test_split": 0.5}),
            r"validation_split \+ test_split must be below 1",
        ),
        (card(name="../escape"), r"name: name must be 1-100 characters of letters, digits.*Received: '\.\./escape'"),
        (card(name="a b"), r"name must be 1-100 characters"),
        (card(seed=-1), r"seed: Input should be greater than or equal to 0"),
        (card(tracking={"log_model": "perhaps"}), r"tracking\.log_model: Input should be a valid boolean"),
    ],
)
def test_bad_cards_name_the_field_the_value_and_what_is_accepted(raw, message):
    with pytest.raises(ConfigError, match=message):
        validate(raw)


def test_a_list_is_a_choice_a_scalar_is_fixed_a_mapping_is_a_range():
    cfg = validate(
        card(space={"units": [32, 64], "activation": "tanh", "learning_rate": {"min": 1e-4, "max": 1e-1, "sampling": "log"}})
    )
    assert cfg.space.units == [32, 64]
    assert cfg.space.activation == "tanh"
    assert isinstance(cfg.space.learning_rate, Range)
    assert cfg.space.learning_rate.sampling == "log"


def test_strategy_shorthand_and_defaults():
    cfg = validate(card(strategy="mirrored"))
    assert cfg.strategy.name == "mirrored" and cfg.strategy.replicas == 2
    assert validate(card()).strategy.name == "auto"


@pytest.mark.parametrize(
    "objective, direction",
    [("val_loss", "min"), ("loss", "min"), ("val_mean_squared_error", "min"), ("val_accuracy", "max"), ("val_auc", "max")],
)
def test_objective_direction_is_inferred(objective, direction):
    assert objective_direction(objective) == direction


def test_default_objective_follows_the_task():
    assert validate(card()).objective == "val_accuracy"
    assert validate(card(data={"source": "friedman", "task": "regression"})).objective == "val_loss"


def test_overrides_are_yaml_scalars_and_create_sections():
    pairs = parse_overrides(
        ["tuner.max_trials=7", "space.activation=[relu, tanh]", "train.jit_compile=false", "strategy.replicas=3", "name=x1"]
    )
    assert pairs[0] == ("tuner.max_trials", 7)
    assert pairs[1] == ("space.activation", ["relu", "tanh"])
    assert pairs[2] == ("train.jit_compile", False)
    raw = apply_overrides({"name": "t", "strategy": "mirrored"}, pairs)
    assert raw["tuner"]["max_trials"] == 7
    assert raw["strategy"] == {"name": "mirrored", "replicas": 3}  # shorthand expanded
    assert raw["name"] == "x1"


@pytest.mark.parametrize(
    "pair, message",
    [
        ("epochs", r"--set expects dotted\.key=value.*Received: 'epochs'"),
        ("=3", r"--set expects"),
        ("a..b=1", r"--set expects"),
        ("tuner.max_trials=[1", r"--set tuner\.max_trials: the value '\[1' is not valid YAML"),
    ],
)
def test_malformed_overrides_are_errors(pair, message):
    with pytest.raises(ConfigError, match=message):
        parse_overrides([pair])


def test_override_through_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match=r"--set seed\.x: 'seed' holds 42, not a section"):
        apply_overrides({"seed": 42}, parse_overrides(["seed.x=1"]))


def test_load_by_name_and_by_path_with_overrides(tmp_path):
    by_name = load_config("quickstart", ["tuner.max_trials=2"], experiments_dir=EXPERIMENTS)
    assert by_name.name == "quickstart" and by_name.tuner.max_trials == 2
    path = tmp_path / "mine.yaml"
    path.write_text("data: {source: wine}\n")
    by_path = load_config(str(path))
    assert by_path.name == "mine"  # defaults to the file's stem
    assert by_path.data.source == "wine"


def test_unknown_experiment_lists_the_cards_that_exist():
    with pytest.raises(ConfigError, match=r"unknown experiment 'nope'\. Cards that exist: .*quickstart"):
        load_config("nope", experiments_dir=EXPERIMENTS)


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"experiment card not found: .*missing\.yaml"):
        load_config(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", r"the card is empty"),
        (b"- a\n- b\n", r"a card must be a mapping of sections.*Received: a list"),
        (b"data: {source: iris\n", r"malformed YAML at line 2"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", r"not UTF-8 text|not text"),
        (b"!!python/object/apply:os.system ['echo hacked']\n", r"malformed YAML.*could not determine a constructor"),
        (b"name: x\ndata: !!python/object/new:dict {}\n", r"malformed YAML"),
    ],
)
def test_unreadable_cards_are_errors(tmp_path, content, message):
    path = tmp_path / "card.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))


def test_config_imports_no_tensorflow():
    code = "import sys, toolkit.config, toolkit.cli; assert 'tensorflow' not in sys.modules and 'mlflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_card_validates(path: Path):
    cfg = load_config(str(path))
    assert cfg.name == path.stem


# YAML reads `true` as a boolean, and pydantic would take it as 1: `epochs: true` trained one epoch.
BOOLEANS_FOR_NUMBERS = [
    ("train.epochs", r"train\.epochs: must be an integer in \[1, 100000\], not true/false\. Received: true"),
    ("seed", r"seed: must be an integer in \[0, 2147483647\], not true/false\. Received: true"),
    ("tuner.max_trials", r"tuner\.max_trials: must be an integer in \[1, 100000\], not true/false\. Received: true"),
    ("tuner.executions_per_trial", r"tuner\.executions_per_trial: must be an integer in \[1, 100\], not true/false"),
    ("tuner.factor", r"tuner\.factor: must be an integer in \[2, 100\], not true/false"),
    ("tuner.max_consecutive_failed_trials", r"tuner\.max_consecutive_failed_trials: must be an integer"),
    ("tuner.max_retries_per_trial", r"tuner\.max_retries_per_trial: must be an integer in \[0, 100\], not true/false"),
    ("train.batch_size", r"train\.batch_size: must be an integer in \[1, 1000000\], not true/false"),
    ("train.steps_per_execution", r"train\.steps_per_execution: must be an integer or 'auto', not true/false"),
    ("train.early_stopping", r"train\.early_stopping: must be an integer in \[0, 100000\], not true/false"),
    ("strategy.replicas", r"strategy\.replicas: must be an integer in \[1, 64\], not true/false"),
    ("data.validation_split", r"data\.validation_split: must be a number in \(0, 1\), not true/false\. Received: true"),
    ("data.test_split", r"data\.test_split: must be a number in \[0, 1\), not true/false"),
]


def nested(dotted: str, value) -> dict:
    """``"a.b", 1`` → ``{"a": {"b": 1}}``."""
    *parents, leaf = dotted.split(".")
    section = {leaf: value}
    for part in reversed(parents):
        section = {part: section}
    return section


@pytest.mark.parametrize("dotted, message", BOOLEANS_FOR_NUMBERS, ids=[d for d, _ in BOOLEANS_FOR_NUMBERS])
def test_a_boolean_where_a_number_belongs_is_refused_in_the_card(dotted, message):
    with pytest.raises(ConfigError, match=message):
        validate({**card(), **nested(dotted, True)})


@pytest.mark.parametrize("dotted", ["train.epochs", "seed", "tuner.max_trials"])
def test_a_boolean_where_a_number_belongs_is_refused_from_set(tmp_path, dotted):
    path = tmp_path / "c.yaml"
    path.write_text("data: {source: iris}\n")
    with pytest.raises(ConfigError, match=re.escape(dotted) + r": must be an integer .*not true/false\. Received: false"):
        load_config(str(path), [f"{dotted}=false"])


@pytest.mark.parametrize(
    "data, message",
    [
        ({"source": "spirals", "n_classes": True}, r"data\.n_classes: must be an integer in \[2, 1000\], not true/false"),
        ({"source": "spirals", "n_samples": True}, r"data\.n_samples: must be an integer in \[4, 10000000\], not true/false"),
        ({"source": "friedman", "n_features": True}, r"data\.n_features: must be an integer in \[1, 100000\], not true/false"),
        ({"source": "spirals", "noise": True}, r"data\.noise: must be a number in \[0, 100\], not true/false"),
    ],
)
def test_a_boolean_for_a_generator_option_is_refused(data, message):
    with pytest.raises(ConfigError, match=message):
        validate(card(data=data))


def test_a_boolean_range_bound_is_refused_and_real_booleans_still_work():
    with pytest.raises(ConfigError, match=r"space\.depth\.min: must be a number, not true/false\. Received: true"):
        validate(card(space={"depth": {"min": True, "max": 3}}))
    cfg = validate(card(train={"jit_compile": True, "diagnostics": False}, tracking={"log_model": False}))
    assert cfg.train.jit_compile is True and cfg.train.diagnostics is False and cfg.tracking.log_model is False
    assert validate(card(train={"epochs": 3.0})).train.epochs == 3  # a whole float is still an integer
