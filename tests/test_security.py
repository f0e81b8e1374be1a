"""Secrets: URIs stripped of credentials, the oracle's token, and trial values checked against the space."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT

from toolkit.config import ConfigError
from toolkit.security import has_credentials, make_token, read_token, redact_uri, write_token


@pytest.mark.parametrize(
    ("uri", "safe"),
    [
        ("http://user:secret@127.0.0.1:5000", "http://***@127.0.0.1:5000"),
        ("https://user:p@ss@host/api", "https://***@host/api"),  # an @ inside the password
        ("https://token@host", "https://***@host"),
        ("postgresql://u:secret@db:5432/mlflow?sslmode=require", "postgresql://***@db:5432/mlflow?sslmode=require"),
        ("https://host/x?token=secret&a=1", "https://host/x?token=***&a=1"),
        ("https://host/x?a=1&Password=secret#frag", "https://host/x?a=1&Password=***#frag"),
        ("https://host/x?client_secret=s3;api_key=k", "https://host/x?client_secret=***;api_key=***"),
        ("sqlite:////tmp/mlruns/mlflow.db", "sqlite:////tmp/mlruns/mlflow.db"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("databricks", "databricks"),
        ("", ""),
    ],
)
def test_redact_uri_strips_credentials_and_keeps_the_rest(uri, safe):
    assert redact_uri(uri) == safe
    assert "s3" not in redact_uri(uri) and ":secret@" not in redact_uri(uri) and "=secret" not in redact_uri(uri)
    assert has_credentials(uri) == (uri != safe)


def test_redact_uri_works_inside_a_message():
    text = "error: could not reach http://user:secret@h:1/api?x=1&token=secret (retry), then https://a:secret@b"
    assert redact_uri(text) == "error: could not reach http://***@h:1/api?x=1&token=*** (retry), then https://***@b"
    assert redact_uri(None) == ""


def test_tokens_are_fresh_and_fit_grpc_metadata():
    a, b = make_token(), make_token()
    assert a != b and len(a) >= 40 and a.isascii() and " " not in a


def test_read_token_from_the_environment_or_a_private_file(tmp_path, monkeypatch):
    monkeypatch.delenv("TOOLKIT_ORACLE_TOKEN", raising=False)
    assert read_token() is None
    monkeypatch.setenv("TOOLKIT_ORACLE_TOKEN", " tok ")
    assert read_token() == "tok"
    path = write_token(tmp_path / "oracle.token", "from-file")
    assert (path.stat().st_mode & 0o777) == 0o600
    assert read_token(path) == "from-file"  # the file wins over the environment


def test_read_token_refuses_a_file_others_can_read_an_empty_one_or_none(tmp_path):
    path = write_token(tmp_path / "t", "tok")
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match=r"readable by others \(mode 0644\): run `chmod 600"):
        read_token(path)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    os.chmod(empty, 0o600)
    with pytest.raises(ConfigError, match="is empty"):
        read_token(empty)
    with pytest.raises(ConfigError, match="cannot be read"):
        read_token(tmp_path / "missing")


def test_security_imports_no_tensorflow_mlflow_or_grpc():
    code = "import sys, toolkit.security; print(sorted(m for m in ('tensorflow', 'mlflow', 'grpc') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------------- trial values


@pytest.fixture
def space():
    import keras_tuner as kt

    hp = kt.HyperParameters()
    hp.Int("depth", 1, 4)
    hp.Int("width", 8, 64, step=8)
    hp.Choice("units", [32, 64, 128])
    hp.Choice("activation", ["relu", "tanh"])
    hp.Choice("l1", [0.0, 1e-5, 1e-4])
    hp.Float("learning_rate", 1e-4, 1e-1, sampling="log")
    hp.Float("dropout", 0.0, 0.5, step=0.1)
    hp.Boolean("batchnorm")
    hp.Fixed("epochs", 3)
    return hp


def test_values_the_space_can_give_pass(space):
    from toolkit.distributed import check_values

    good = {
        "depth": 4,
        "width": 24,
        "units": 64,
        "activation": "tanh",
        "l1": 1e-5,
        "learning_rate": 1e-4,
        "dropout": 0.30000000000000004,
        "batchnorm": False,
        "epochs": 3,
    }
    assert check_values(space, good) is None
    assert check_values(space, {}) is None  # inactive conditional parameters may be absent


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"units": 7}, "units=7 is outside the card's space: units must be one of [32, 64, 128]"),
        ({"units": 10**9}, "units=1000000000 is outside"),
        ({"units": "64"}, "units='64' is outside"),  # wrong type
        ({"depth": 0}, "depth must be in [1, 4]"),
        ({"depth": 2.5}, "depth must be an integer in [1, 4]"),
        ({"depth": True}, "depth must be an integer"),
        ({"width": 12}, "width must be 8 plus a multiple of 8"),
        ({"learning_rate": 10.0}, "learning_rate must be in [0.0001, 0.1]"),
        ({"learning_rate": float("nan")}, "learning_rate must be a number"),
        ({"dropout": 0.25}, "dropout must be 0.0 plus a multiple of 0.1"),
        ({"batchnorm": 1}, "batchnorm must be true or false"),
        ({"activation": "evil"}, "activation must be one of ['relu', 'tanh']"),
        ({"epochs": 3000}, "epochs is fixed at 3"),
        ({"hidden": 1}, "hidden=1 is not in the card's space (its names: activation, batchnorm, depth"),
    ],
)
def test_values_outside_the_space_are_named_with_what_is_allowed(space, values, message):
    from toolkit.distributed import check_values

    assert message in check_values(space, values)
