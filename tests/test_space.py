"""Search-space blocks: sampled values stay in the card's bounds; momentum only with the SGD family."""

from __future__ import annotations

import keras_tuner as kt
import pytest

from toolkit import space
from toolkit.config import SGD_FAMILY, validate


def make_space(**entries):
    return validate({"name": "t", "data": {"source": "iris"}, "space": entries}).space


def sample(space_cfg, n: int = 60, seed: int = 0):
    """Draw n random trials from the space the blocks declare."""
    hp = kt.HyperParameters()
    declare_all(hp, space_cfg)
    oracle = kt.oracles.RandomSearchOracle(objective="val_loss", max_trials=n, seed=seed, hyperparameters=hp)
    out = []
    for _ in range(n):
        values = oracle.populate_space(str(len(out)))["values"]
        if values is None:
            break
        # Re-run the blocks on the sampled values, as a real build does.
        trial_hp = hp.copy()
        trial_hp.values = values
        declare_all(trial_hp, space_cfg)
        out.append(trial_hp.values)
    return out


def declare_all(hp, space_cfg):
    space.depth(hp, space_cfg)
    space.units(hp, space_cfg)
    space.activation(hp, space_cfg)
    space.optimizer(hp, space_cfg)
    space.regularizer(hp, space_cfg)
    space.dropout(hp, space_cfg)


def test_sampled_values_stay_within_the_card_bounds():
    cfg = make_space(
        depth={"min": 2, "max": 5},
        units=[16, 48],
        activation=["sigmoid", "relu"],
        optimizer=["sgd", "momentum", "nesterov", "adam"],
        learning_rate={"min": 1e-4, "max": 1e-1, "sampling": "log"},
        momentum={"min": 0.5, "max": 0.95},
        l1=[0.0, 1e-5],
        l2={"min": 1e-6, "max": 1e-2, "sampling": "log"},
        dropout={"min": 0.0, "max": 0.5, "step": 0.1},
    )
    trials = sample(cfg)
    assert len(trials) >= 30
    for values in trials:
        assert 2 <= values["depth"] <= 5 and isinstance(values["depth"], int)
        assert values["units"] in (16, 48)
        assert values["activation"] in ("sigmoid", "relu")
        assert 1e-4 <= values["learning_rate"] <= 1e-1
        assert values["l1"] in (0.0, 1e-5)
        assert 1e-6 <= values["l2"] <= 1e-2
        assert 0.0 <= values["dropout"] <= 0.5
    # Log sampling spreads over decades rather than bunching near the top.
    assert min(v["learning_rate"] for v in trials) < 1e-3


def test_momentum_exists_only_for_the_sgd_family():
    cfg = make_space(optimizer=["sgd", "momentum", "nesterov", "adam", "rmsprop"], momentum=[0.5, 0.9])
    trials = sample(cfg)
    seen = {v["optimizer"] for v in trials}
    assert {"momentum", "adam"} <= seen
    for values in trials:
        if values["optimizer"] in SGD_FAMILY:
            assert values["momentum"] in (0.5, 0.9)
        else:
            assert "momentum" not in values


def test_fixed_scalars_are_fixed():
    hp = kt.HyperParameters()
    cfg = make_space(depth=3, units=64, activation="tanh")
    assert space.depth(hp, cfg) == 3
    assert space.units(hp, cfg) == 64
    assert space.activation(hp, cfg) == "tanh"
    assert isinstance(hp.space[0], kt.engine.hyperparameters.Fixed)


@pytest.mark.parametrize(
    "name, cls, extra",
    [
        ("sgd", "SGD", {}),
        ("momentum", "SGD", {"momentum": 0.9}),
        ("nesterov", "SGD", {"nesterov": True}),
        ("adam", "Adam", {}),
        ("adamw", "AdamW", {}),
        ("rmsprop", "RMSprop", {}),
        ("adagrad", "Adagrad", {}),
    ],
)
def test_optimizer_registry(name, cls, extra):
    opt = space.make_optimizer(name, 0.01, momentum=0.9)
    assert type(opt).__name__ == cls
    assert float(opt.learning_rate) == pytest.approx(0.01)
    for key, value in extra.items():
        assert getattr(opt, key) == value


def test_unknown_optimizer_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"Unknown optimizer 'lion'\. Accepted: sgd, momentum, nesterov, adam"):
        space.make_optimizer("lion", 0.1)
