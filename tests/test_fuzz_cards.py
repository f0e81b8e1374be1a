"""Property tests: whatever card a user writes, the toolkit accepts it or exits 2 naming the field.

It never prints a traceback, never creates an MLflow run and never writes outside its store.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolkit.cli import main
from toolkit.config import ACTIVATIONS, ALGORITHMS, DATASETS, OPTIMIZERS, STRATEGIES, ExperimentConfig

FIELDS = {
    name: list(model.annotation.model_fields)
    for name, model in ExperimentConfig.model_fields.items()
    if hasattr(model.annotation, "model_fields")
}
KEYS = st.from_regex(r"[a-z][a-z_]{0,9}", fullmatch=True)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**9), 10**9),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from([*ACTIVATIONS, *OPTIMIZERS, *ALGORITHMS, *STRATEGIES, *DATASETS, "relux", "adamm", "../x", "val_acuracy"]),
)
ANY = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3), max_leaves=6)
RANGES = st.fixed_dictionaries(
    {},
    optional={
        "min": st.one_of(st.integers(-5, 100), st.floats(-1, 10)),
        "max": st.one_of(st.integers(-5, 100), st.floats(-1, 10)),
        "step": st.one_of(st.integers(-1, 5), st.floats(0, 1)),
        "sampling": st.sampled_from(["linear", "log", "cubic"]),
        "stp": st.integers(),
    },
)


def section(name: str):
    """A section whose values are plausible, random or out of range, with a stray key at times."""
    known = FIELDS[name]
    value = st.one_of(ANY, RANGES, st.lists(SCALARS, min_size=0, max_size=4))
    return st.one_of(
        st.dictionaries(st.sampled_from(known), value, max_size=len(known)),
        st.dictionaries(st.one_of(st.sampled_from(known), KEYS), value, max_size=4),
        ANY,
    )


CARDS = st.fixed_dictionaries(
    {},
    optional={
        "name": st.one_of(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True), SCALARS),
        "seed": st.one_of(st.integers(-10, 2**32), SCALARS),
        "data": section("data"),
        "space": section("space"),
        "tuner": section("tuner"),
        "train": section("train"),
        "strategy": st.one_of(st.sampled_from(STRATEGIES), section("strategy"), SCALARS),
        "tracking": st.dictionaries(
            st.sampled_from(["log_model", "register_model", "report", "experiment", "lgo_model"]),
            st.one_of(st.booleans(), SCALARS),
            max_size=3,
        ),
        "extra_key": ANY,
    },
)

TEXTS = st.one_of(
    CARDS.map(lambda card: yaml.safe_dump(card, allow_unicode=True).encode()),
    st.binary(max_size=64),
    st.just(b""),
    st.sampled_from(
        [
            b"data: {source: iris\n",
            b"space:\n  depth: [1, 2\n",
            b"\t- not: yaml: here\n",
            b"!!python/object/apply:os.system ['touch pwned']\n",
            b"name: x\nspace: !!python/name:os.system\n",
            b"- just\n- a list\n",
            b"42\n",
            b"a: &x [*x]\n",
            b"\xff\xfe\x00d\x00a\x00t\x00a\x00",
        ]
    ),
)


def _first_field(message: str) -> str:
    match = re.match(r"error: (\S+?): ", message)
    return match.group(1) if match else ""


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(content=TEXTS)
def test_any_card_is_accepted_or_rejected_cleanly(content: bytes, tmp_path_factory, capsys, monkeypatch):
    work = tmp_path_factory.mktemp("fuzz")
    store = work / "store"
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    card = work / "card.yaml"
    card.write_bytes(content)
    before = sorted(p.name for p in work.iterdir())

    code = main(["validate", str(card)])
    out, err = capsys.readouterr()
    assert code in (0, 2), err
    assert "Traceback" not in out + err
    if code == 2:
        assert err.startswith("error: ") and err.count("\n") == 1, err
        field = _first_field(err)
        assert field, f"the message must start with the field it is about: {err}"
        parsed = _safe_parse(content)
        top = field.split(".")[0]
        # The field is either a key of the card (possibly nested), or the card file itself.
        assert (
            field == str(card) or top in (parsed if isinstance(parsed, dict) else {}) or top in ExperimentConfig.model_fields
        ), err
        # A rejected card is rejected by `tune` too, before anything is created.
        assert main(["tune", str(card)]) == 2
        capsys.readouterr()
    assert sorted(p.name for p in work.iterdir()) == before, "nothing may be written outside the store"
    assert not store.exists(), "validation must never create an MLflow store or run"
    assert not Path("pwned").exists() and not os.path.exists(work / "pwned")


def _safe_parse(content: bytes):
    try:
        return yaml.safe_load(content.decode("utf-8"))
    except Exception:
        return None


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".hidden", "x" * 101, "semi;colon", "tab\tname"])
def test_unsafe_names_are_rejected(tmp_path, capsys, name):
    card = tmp_path / "card.yaml"
    card.write_text(yaml.safe_dump({"name": name, "data": {"source": "iris"}}))
    assert main(["validate", str(card)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: name: name must be 1-100 characters")
