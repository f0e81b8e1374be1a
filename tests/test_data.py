"""The data registry: every source resolves, every bad-data case states its message, no leakage.

Everything here runs offline. Keras' downloadable sets are tested with an empty ``KERAS_HOME``
(a clean, fast failure) and with tiny fake files in the cache (the readers).
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import ROOT

from toolkit.config import ConfigError, DataConfig, validate
from toolkit.data import (
    DataError,
    DatasetUnavailable,
    check_source,
    describe_sources,
    keras_cache_dir,
    load_dataset,
    make_pipeline,
)

# name → (samples, input shape, task, classes)
BUILTIN = {
    "digits": (1797, (8, 8, 1), "classification", 10),
    "breast_cancer": (569, (30,), "classification", 2),
    "wine": (178, (13,), "classification", 3),
    "iris": (150, (4,), "classification", 3),
    "spirals": (1000, (2,), "classification", 2),
    "moons": (1000, (2,), "classification", 2),
    "circles": (1000, (2,), "classification", 2),
    "xor": (1000, (2,), "classification", 2),
    "friedman": (1000, (10,), "regression", 0),
    "shapes": (1500, (32, 32, 1), "classification", 3),
}


def data(source: str, **options) -> DataConfig:
    return DataConfig(source=str(source), **options)


def write_csv(path: Path, frame: pd.DataFrame) -> Path:
    frame.to_csv(path, index=False)
    return path


def labelled_frame(n: int = 60, seed: int = 0) -> pd.DataFrame:
    """A small tabular set as a user would have it: numeric features, string labels."""
    rng = np.random.default_rng(seed)
    label = np.array(["cat", "dog", "bird"])[np.arange(n) % 3]
    return pd.DataFrame({"a": rng.normal(size=n), "b": rng.integers(0, 5, n), "c": rng.normal(size=n), "label": label})


# ---------------------------------------------------------------------------- built-in sources


@pytest.mark.parametrize("name", list(BUILTIN))
def test_builtin_source_resolves_to_seeded_stratified_splits(name):
    samples, shape, task, classes = BUILTIN[name]
    ds = load_dataset(data(name), seed=1)
    assert (ds.task, ds.input_shape, ds.n_classes) == (task, shape, classes)
    assert ds.sizes == {"train": samples - round(samples * 0.2), "validation": round(samples * 0.2), "test": 0}
    assert ds.x_train.dtype == np.float32
    if task == "classification":
        assert ds.y_train.dtype == np.int64 and len(ds.class_names) == classes
        # Stratified: each class's share of the validation split is its share of the whole, ±1 sample.
        y_all = np.concatenate([ds.y_train, ds.y_val])
        expected = np.bincount(y_all, minlength=classes) * len(ds.y_val) / len(y_all)
        assert np.all(np.abs(np.bincount(ds.y_val, minlength=classes) - expected) <= 1)
    else:
        assert ds.y_train.dtype == np.float32 and ds.class_names is None
    again = load_dataset(data(name), seed=1)
    np.testing.assert_array_equal(ds.x_val, again.x_val)
    assert ds.digest == again.digest


def test_a_different_seed_gives_a_different_split_and_a_test_split_is_held_out():
    a = load_dataset(data("iris", test_split=0.2), seed=1)
    b = load_dataset(data("iris", test_split=0.2), seed=2)
    assert a.sizes == {"train": 90, "validation": 30, "test": 30}
    assert a.digest != b.digest
    assert np.bincount(a.y_test).tolist() == [10, 10, 10]  # stratified
    rows = {tuple(r) for r in a.x_train} & {tuple(r) for r in a.x_test}
    assert len(rows) <= 1  # iris has one duplicated row; otherwise the splits are disjoint


def test_synthetic_sources_take_their_generator_options():
    spirals = load_dataset(data("spirals", n_samples=301, n_classes=3, noise=0.0))
    assert spirals.n_classes == 3 and sum(spirals.sizes.values()) == 301
    friedman = load_dataset(data("friedman", n_samples=200, n_features=7, noise=0.5))
    assert friedman.input_shape == (7,) and sum(friedman.sizes.values()) == 200
    xor = load_dataset(data("xor", n_samples=400))
    # Labels are the quadrant parity of the clean points; a little noise flips few of them.
    x, y = np.concatenate([xor.x_train, xor.x_val]), np.concatenate([xor.y_train, xor.y_val])
    assert np.mean(((x[:, 0] > 0) ^ (x[:, 1] > 0)) == y) > 0.85


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"source": "moons", "n_classes": 3},
            r"data\.n_classes: not used by 'moons', so it would be ignored\. Options it takes: n_samples, noise\. Received: 3",
        ),
        (
            {"source": "digits", "n_samples": 100},
            r"data\.n_samples: not used by 'digits'.*none besides validation_split, test_split and task",
        ),
        ({"source": "iris", "target": "species"}, r"data\.target: not used by 'iris'"),
        (
            {"source": "my.csv", "target": "y", "n_samples": 10},
            r"data\.n_samples: not used by a \.csv file.*Options it takes: target, features",
        ),
        ({"source": "my.npz", "target": "y"}, r"data\.target: not used by a \.npz file"),
    ],
)
def test_options_a_source_would_ignore_are_card_errors_before_any_data_loads(options, message):
    with pytest.raises(ConfigError, match=message):
        validate({"name": "t", "data": options})


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"source": "friedman", "task": "classification"},
            r"data\.task: 'friedman' is a regression dataset\. Received: 'classification'",
        ),
        ({"source": "friedman", "n_features": 3}, r"friedman needs at least 5 features\. Received: 3"),
    ],
)
def test_builtin_sources_reject_what_they_cannot_be(options, message):
    with pytest.raises(DataError, match=message):
        load_dataset(DataConfig(**options))


# ---------------------------------------------------------------------------- user files


def test_csv_string_labels_are_encoded_in_sorted_order(tmp_path):
    frame = labelled_frame()
    ds = load_dataset(data(write_csv(tmp_path / "pets.csv", frame), target="label"))
    assert ds.task == "classification" and ds.class_names == ["bird", "cat", "dog"]
    assert ds.feature_names == ["a", "b", "c"] and ds.input_shape == (3,)
    assert ds.name == "pets" and ds.source == str((tmp_path / "pets.csv").resolve())
    # The encoding round-trips: each row's code names its original label.
    by_row = {tuple(np.round(r, 4)): lbl for r, lbl in zip(frame[["a", "b", "c"]].to_numpy(), frame["label"], strict=True)}
    for row, code in zip(ds.x_train, ds.y_train, strict=True):
        assert ds.class_names[code] == by_row[tuple(np.round(row.astype("float64"), 4))]


def test_csv_float_target_means_regression_unless_the_task_says_otherwise(tmp_path):
    frame = labelled_frame().drop(columns="label").assign(y=lambda f: 2 * f.a + 0.5)
    path = write_csv(tmp_path / "reg.csv", frame)
    ds = load_dataset(data(path, target="y"))
    assert ds.task == "regression" and ds.y_train.dtype == np.float32 and ds.n_classes == 0
    # Integer target: class labels. A float column of whole numbers with task: classification too.
    assert load_dataset(data(path, target="b")).task == "classification"
    frame["z"] = (frame.b % 2).astype(float)
    ds = load_dataset(data(write_csv(tmp_path / "z.csv", frame), target="z", task="classification", features=["a", "c"]))
    assert ds.task == "classification" and ds.class_names == ["0", "1"]


def test_csv_features_select_columns(tmp_path):
    frame = labelled_frame().assign(name="x")  # a text column, left out by features
    ds = load_dataset(data(write_csv(tmp_path / "f.csv", frame), target="label", features=["c", "a"]))
    assert ds.feature_names == ["c", "a"] and ds.input_shape == (2,)


def test_a_saved_dataframe_index_is_not_a_feature(tmp_path, caplog):
    labelled_frame().sort_values("label").to_csv(tmp_path / "indexed.csv")  # index=True: row numbers
    ds = load_dataset(data(tmp_path / "indexed.csv", target="label"))
    assert ds.feature_names == ["a", "b", "c"]
    assert "without a header (Unnamed: 0) left out of the features" in caplog.text
    ds = load_dataset(data(tmp_path / "indexed.csv", target="label", features=["Unnamed: 0", "a"]))
    assert ds.feature_names == ["Unnamed: 0", "a"]


def test_parquet_and_npz_files_resolve(tmp_path):
    frame = labelled_frame()
    frame.to_parquet(tmp_path / "pets.parquet")
    ds = load_dataset(data(tmp_path / "pets.parquet", target="label"))
    assert ds.class_names == ["bird", "cat", "dog"] and ds.input_shape == (3,)

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "img.npz", x=rng.random((40, 4, 4)), y=np.arange(40) % 2)
    ds = load_dataset(data(tmp_path / "img.npz"))
    assert (ds.task, ds.input_shape, ds.n_classes, sum(ds.sizes.values())) == ("classification", (4, 4), 2, 40)
    np.savez(tmp_path / "reg.npz", x=rng.random(40), y=rng.random((40, 1)))
    ds = load_dataset(data(tmp_path / "reg.npz"))
    assert (ds.task, ds.input_shape, ds.y_train.shape) == ("regression", (1,), (32,))


def error_cases(tmp: Path) -> dict[str, tuple[dict, str]]:
    """Each bad-data case of the issue: card data section → the message it must give."""
    ok = labelled_frame()
    write_csv(tmp / "ok.csv", ok)
    write_csv(tmp / "text.csv", ok.assign(colour=["red", "green", "blue"] * 20))
    with_nan = ok.copy()
    with_nan.loc[4, "c"] = np.nan
    write_csv(tmp / "nan.csv", with_nan)
    write_csv(tmp / "tiny.csv", ok.head(4))
    rare = ok.copy()
    rare.loc[7, "label"] = "fish"
    write_csv(tmp / "rare.csv", rare)
    write_csv(tmp / "one_class.csv", ok.assign(label="cat"))
    write_csv(tmp / "constant.csv", ok.assign(label=2.5))
    # One stray word in a column of numbers: pandas reads the whole column as text.
    stray = ok.astype({"b": object})
    stray.loc[6, "b"] = "1,5"
    write_csv(tmp / "stray.csv", stray)
    (tmp / "dup.csv").write_text("a,b,a,label\n" + "".join(f"{i},{i % 5},{i % 7},{'xy'[i % 2]}\n" for i in range(40)))
    (tmp / "text.npz").write_text("x,y\n1,2\n")
    (tmp / "folder.csv").mkdir()
    return {
        "missing file": ({"source": str(tmp / "nope.csv"), "target": "label"}, r"data\.source: file not found: '.*nope\.csv'"),
        "missing target column": (
            {"source": str(tmp / "ok.csv"), "target": "species"},
            r"ok\.csv: data\.target column 'species' not found\. Columns: a, b, c, label",
        ),
        "no target given": (
            {"source": str(tmp / "ok.csv")},
            r"ok\.csv: data\.target must name the label column\. Columns: a, b, c, label",
        ),
        "non-numeric feature": (
            {"source": str(tmp / "text.csv"), "target": "label"},
            r"text\.csv: feature column 'colour' is not numeric: line 2 holds 'red'\. Encode it as numbers, or leave it out with data\.features",
        ),
        "NaNs": (
            {"source": str(tmp / "nan.csv"), "target": "label"},
            r"nan\.csv: column 'c' has 1 missing \(NaN\) value\(s\), the first on line 6; fill or drop them first",
        ),
        "empty split": (
            {"source": str(tmp / "tiny.csv"), "target": "label", "validation_split": 0.1},
            r"tiny\.csv: 4 sample\(s\) with validation_split=0\.1 and test_split=0 leave the validation split empty",
        ),
        "class too small": (
            {"source": str(tmp / "rare.csv"), "target": "label"},
            r"rare\.csv: class 'fish' has only 1 sample\(s\); a stratified split needs at least 2 per class",
        ),
        "single class": (
            {"source": str(tmp / "one_class.csv"), "target": "label"},
            r"one_class\.csv: target column 'label' has a single class \('cat' in all 60 rows\); "
            r"classification needs at least 2 classes",
        ),
        "constant target": (
            {"source": str(tmp / "constant.csv"), "target": "label"},
            r"constant\.csv: target column 'label' is constant \(2\.5 in all 60 rows\), so there is nothing to learn; "
            r"a regression target must take at least two values",
        ),
        "bad cell": (
            {"source": str(tmp / "stray.csv"), "target": "label"},
            r"stray\.csv: feature column 'b' is not numeric: line 8 holds '1,5'\. Encode it as numbers",
        ),
        "duplicate columns": (
            {"source": str(tmp / "dup.csv"), "target": "label"},
            r"dup\.csv: column 'a' appears twice in the header \(columns 1 and 3\); give each column a unique name",
        ),
        "not a zip": (
            {"source": str(tmp / "text.npz")},
            r"text\.npz: not a valid \.npz \(zip\) file; write one with numpy\.savez\(path, x=features, y=targets\)",
        ),
        "directory": (
            {"source": str(tmp / "folder.csv"), "target": "label"},
            r"data\.source: '.*folder\.csv' is a directory, not a file \(looked at .*folder\.csv\); give the path of a \.csv file",
        ),
    }


ALL_ERROR_CASES = [
    "missing file",
    "missing target column",
    "no target given",
    "non-numeric feature",
    "NaNs",
    "empty split",
    "class too small",
    "single class",
    "constant target",
    "bad cell",
    "duplicate columns",
    "not a zip",
    "directory",
]


@pytest.mark.parametrize("case", ALL_ERROR_CASES)
def test_bad_data_states_the_problem(tmp_path, case):
    options, message = error_cases(tmp_path)[case]
    with pytest.raises(DataError, match=message):
        load_dataset(DataConfig(**options))


@pytest.mark.parametrize(
    "make, options, message",
    [
        (
            lambda p: labelled_frame().to_csv(p, index=False),
            {"target": "label", "features": ["a", "label"]},
            r"data\.features includes the target column 'label'",
        ),
        (
            lambda p: labelled_frame().to_csv(p, index=False),
            {"target": "label", "features": ["a", "zz"]},
            r"data\.features column 'zz' not found",
        ),
        (
            lambda p: labelled_frame().to_csv(p, index=False),
            {"target": "label", "task": "regression"},
            r"target column 'label' is not numeric: line 2 holds 'cat', so it cannot be a regression target",
        ),
        (lambda p: p.write_text("a,label\n"), {"target": "label"}, r"the file has a header but no rows"),
        (lambda p: p.write_bytes(b""), {"target": "label"}, r"cannot read the file \(EmptyDataError"),
        (
            lambda p: labelled_frame().assign(a=np.inf).to_csv(p, index=False),
            {"target": "label"},
            r"column 'a' has an infinite or too large value on line 2",
        ),
        (
            lambda p: labelled_frame(n=9).to_csv(p, index=False),
            {"target": "label", "validation_split": 0.2},
            r"the validation split would hold 2 sample\(s\), fewer than the 3 classes",
        ),
    ],
)
def test_more_bad_tables_state_the_problem(tmp_path, make, options, message):
    path = tmp_path / "t.csv"
    make(path)
    with pytest.raises(DataError, match=message):
        load_dataset(data(path, **options))


@pytest.mark.parametrize(
    "arrays, options, message",
    [
        ({"features": np.zeros((4, 2)), "y": np.zeros(4)}, {}, r"an \.npz source needs arrays 'x' and 'y'\. Found: features, y"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(5)}, {}, r"x has 4 rows but y has 5"),
        ({"x": np.array([[1.0, np.nan]] * 10), "y": np.arange(10) % 2}, {}, r"array 'x' has 10 missing \(NaN\) value\(s\)"),
        ({"x": np.zeros((10, 2)), "y": np.zeros((10, 2))}, {}, r"'y' must hold one label or target per sample"),
        (
            {"x": np.arange(20.0).reshape(10, 2), "y": np.ones(10, dtype="int64")},
            {},
            r"d\.npz: array 'y' has a single class \('1' in all 10 rows\); classification needs at least 2 classes",
        ),
        (
            {"x": np.arange(20.0).reshape(10, 2), "y": np.full(10, -3.0)},
            {},
            r"d\.npz: array 'y' is constant \(-3 in all 10 rows\), so there is nothing to learn",
        ),
    ],
)
def test_bad_npz_states_the_problem(tmp_path, arrays, options, message):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_dataset(data(tmp_path / "d.npz", **options))


def test_a_npy_file_named_npz_is_not_a_zip_and_no_pickle_advice_is_given(tmp_path):
    np.save(tmp_path / "d.npy", np.zeros((4, 2)))
    (tmp_path / "d.npy").rename(tmp_path / "d.npz")
    with pytest.raises(DataError, match=r"d\.npz: not a valid \.npz \(zip\) file") as info:
        load_dataset(data(tmp_path / "d.npz"))
    assert "allow_pickle" not in str(info.value)


def test_duplicate_parquet_columns_are_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table([[1.0, 2.0], [3.0, 4.0], ["u", "v"]], names=["a", "a", "label"]), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t\.parquet: column 'a' appears twice in the header"):
        load_dataset(data(tmp_path / "t.parquet", target="label"))


# ---------------------------------------------------------------------------- validate: the header only

HEADER_CASES = ["missing file", "missing target column", "no target given", "duplicate columns", "not a zip", "directory"]


@pytest.mark.parametrize("case", HEADER_CASES)
def test_check_source_gives_the_loaders_message_from_the_header_alone(tmp_path, case):
    options, message = error_cases(tmp_path)[case]
    with pytest.raises(DataError, match=message):
        check_source(DataConfig(**options))


@pytest.mark.parametrize(
    "make, options, message",
    [
        (lambda p: np.savez(p, x=np.zeros((4, 2))), {}, r"an \.npz source needs arrays 'x' and 'y'\. Found: x"),
        (lambda p: p.write_bytes(b""), {}, r"not a valid \.npz \(zip\) file"),
    ],
)
def test_check_source_looks_inside_npz_archives(tmp_path, make, options, message):
    path = tmp_path / "d.npz"
    make(path)
    with pytest.raises(DataError, match=message):
        check_source(data(path, **options))


def test_check_source_passes_good_files_and_builtins_without_reading_rows(tmp_path):
    write_csv(tmp_path / "ok.csv", labelled_frame())
    check_source(data(tmp_path / "ok.csv", target="label", features=["a", "b"]))
    with pytest.raises(DataError, match=r"data\.features column 'zz' not found\. Columns: a, b, c, label"):
        check_source(data(tmp_path / "ok.csv", target="label", features=["a", "zz"]))
    # Rows are not read: a bad cell is found by loading, not by validate.
    write_csv(tmp_path / "cell.csv", labelled_frame().assign(a="text"))
    check_source(data(tmp_path / "cell.csv", target="label"))
    labelled_frame().to_parquet(tmp_path / "ok.parquet")
    check_source(data(tmp_path / "ok.parquet", target="label"))
    with pytest.raises(DataError, match=r"ok\.parquet: data\.target column 'y' not found"):
        check_source(data(tmp_path / "ok.parquet", target="y"))
    np.savez(tmp_path / "ok.npz", x=np.zeros((4, 2)), y=np.arange(4))
    check_source(data(tmp_path / "ok.npz"))
    check_source(data("digits"))


def test_validate_checks_the_data_file_without_tensorflow_or_mlflow(tmp_path):
    bad = write_card(tmp_path, {"source": str(tmp_path / "nope.csv"), "target": "label"})
    write_csv(tmp_path / "ok.csv", labelled_frame())
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"name": "good", "data": {"source": str(tmp_path / "ok.csv"), "target": "label"}}))
    code = (
        "import sys\n"
        "from toolkit.cli import main\n"
        f"codes = [main(['validate', {str(bad)!r}]), main(['validate', {str(good)!r}])]\n"
        "assert codes == [2, 0], codes\n"
        "assert 'tensorflow' not in sys.modules and 'mlflow' not in sys.modules and 'pandas' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^error: data\.source: file not found: '.*nope\.csv'", proc.stderr, re.M), proc.stderr


# ---------------------------------------------------------------------------- the CLI: exit codes, no runs


def write_card(tmp_path: Path, data_section: dict, **sections) -> Path:
    card = {
        "name": "datacase",
        "data": data_section,
        "space": {"depth": 1, "units": 8},
        "tuner": {"max_trials": 1},
        "train": {"epochs": 1, "diagnostics": False},
        "tracking": {"log_model": False},
        **sections,
    }
    path = tmp_path / "cards" / "datacase.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(card))
    return path


def runs_in(store: str) -> list:
    """Every run in the store; an untouched store (no database file yet) has none."""
    db = Path(store.removeprefix("sqlite:///"))
    if not db.exists():
        return []
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids) if ids else []


@pytest.mark.parametrize(
    "case",
    ["missing file", "missing target column", "non-numeric feature", "NaNs", "empty split", "class too small", "single class"],
)
def test_bad_data_via_the_cli_exits_2_with_one_line_and_creates_no_run(tmp_path, store, capsys, case):
    from toolkit.cli import main

    options, message = error_cases(tmp_path)[case]
    code = main(["tune", str(write_card(tmp_path, options))])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    assert __import__("re").search(message, err), err
    assert runs_in(store) == []


def test_keras_dataset_offline_fails_fast_with_exit_1_naming_the_dataset_and_cache(tmp_path, store, capsys, monkeypatch):
    from toolkit.cli import main

    home = tmp_path / "keras_home"
    monkeypatch.setenv("KERAS_HOME", str(home))
    started = time.perf_counter()
    code = main(["tune", str(write_card(tmp_path, {"source": "mnist"}))])
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err
    assert code == 1, err
    assert f"error: dataset 'mnist' is not cached in {home / 'datasets'} and c" in err
    assert "mnist.npz" in err and "KERAS_HOME" in err
    assert "Traceback" not in err and "Exception" not in err
    assert elapsed < 15, f"an offline download attempt must fail fast, took {elapsed:.1f} s"
    assert runs_in(store) == []


@pytest.mark.parametrize(
    "name, layout", [("mnist", ""), ("fashion_mnist", ""), ("cifar10", "tf.keras 2"), ("cifar10", "keras 3")]
)
def test_keras_datasets_read_from_the_cache_in_keras_home_without_network(tmp_path, monkeypatch, name, layout):
    """Tiny fake files in the layout Keras downloads: the readers work and KERAS_HOME is honoured."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    cache = keras_cache_dir(name)
    cache.mkdir(parents=True)
    rng = np.random.default_rng(0)
    n_train, n_test = 50, 20
    y_train, y_test = np.arange(n_train) % 10, np.arange(n_test) % 10
    if name == "mnist":
        images = rng.integers(0, 256, (n_train + n_test, 28, 28), dtype=np.uint8)
        np.savez(cache / "mnist.npz", x_train=images[:n_train], y_train=y_train, x_test=images[n_train:], y_test=y_test)
        shape = (28, 28, 1)
    elif name == "fashion_mnist":
        for split, labels in (("train", y_train), ("t10k", y_test)):
            images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
            with gzip.open(cache / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
                f.write(b"\0" * 8 + labels.astype(np.uint8).tobytes())
            with gzip.open(cache / f"{split}-images-idx3-ubyte.gz", "wb") as f:
                f.write(b"\0" * 16 + images.tobytes())
        shape = (28, 28, 1)
    else:
        batches = cache / ("cifar-10-batches-py-target" if layout == "keras 3" else "") / "cifar-10-batches-py"
        batches.mkdir(parents=True)
        for i, batch in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
            labels = (y_train[i * 10 : (i + 1) * 10] if i < 5 else y_test).tolist()
            with open(batches / batch, "wb") as f:
                pickle.dump({b"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8), b"labels": labels}, f)
        shape = (32, 32, 3)
    ds = load_dataset(data(name))
    assert ds.input_shape == shape and ds.n_classes == 10 and sum(ds.sizes.values()) == n_train + n_test
    # Raw pixels: the models scale them, so a champion serves what a user has.
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 255.0 and ds.is_image
    if name == "cifar10":
        assert ds.class_names[0] == "airplane"
    row = next(r for r in describe_sources() if r["name"] == name)
    assert row["kind"] == "keras (cached)"


def test_keras_dataset_error_is_not_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(DatasetUnavailable, match=r"dataset 'cifar10' is not cached in .*datasets and cannot be downloaded"):
        load_dataset(data("cifar10"))


def _proxy(monkeypatch: pytest.MonkeyPatch, address: str) -> None:
    """Send every download through ``address`` (both spellings: urllib prefers the lower-case one)."""
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, address)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)


def _no_global_socket_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(_timeout):
        raise AssertionError("the download changed the process-wide socket timeout")

    monkeypatch.setattr(socket, "setdefaulttimeout", refuse)


def test_keras_download_failure_behind_a_proxy_is_also_clean_and_fast(tmp_path, monkeypatch):
    """With a proxy set the reachability check is skipped; the download itself must fail cleanly."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    _proxy(monkeypatch, "http://127.0.0.1:9")  # the discard port: refused at once
    _no_global_socket_timeout(monkeypatch)
    started = time.perf_counter()
    with pytest.raises(
        DatasetUnavailable,
        match=r"dataset 'mnist' is not cached in .* and could not be downloaded \(https://\S+/mnist\.npz: .*refused",
    ):
        load_dataset(data("mnist"))
    assert time.perf_counter() - started < 15
    assert not list((tmp_path / "datasets").glob("mnist.npz*"))  # no partial file left behind


def test_a_stalled_keras_download_times_out_on_its_own_connection(tmp_path, monkeypatch):
    """A server that accepts and never answers: the download's own timeout ends it, with no
    change to the process-wide socket default."""
    from toolkit.data import keras_sets

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(keras_sets, "DOWNLOAD_SOCKET_TIMEOUT_S", 0.5)
    _no_global_socket_timeout(monkeypatch)
    before = socket.getdefaulttimeout()
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts; nobody reads
        _proxy(monkeypatch, f"http://127.0.0.1:{silent.getsockname()[1]}")
        started = time.perf_counter()
        with pytest.raises(DatasetUnavailable, match=r"could not be downloaded \(https://\S+/mnist\.npz: no data for 0\.5 s\)"):
            load_dataset(data("mnist"))
        assert time.perf_counter() - started < 5
    assert socket.getdefaulttimeout() == before
    assert not list((tmp_path / "datasets").glob("mnist.npz*"))


def test_a_hand_copied_archive_that_is_not_keras_file_is_refused_without_a_download(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    _proxy(monkeypatch, "http://127.0.0.1:9")  # were anything fetched, it would fail differently
    cache = keras_cache_dir("cifar10")
    cache.mkdir(parents=True)
    (cache / "cifar-10-python.tar.gz").write_bytes(b"not the archive")
    with pytest.raises(DatasetUnavailable, match=r"cifar-10-python\.tar\.gz is not the file Keras publishes .*Delete it"):
        load_dataset(data("cifar10"))


def test_reachability_check_gives_up_quickly():
    from toolkit.data import _unreachable

    started = time.perf_counter()
    assert "nonexistent.invalid" in _unreachable("https://nonexistent.invalid/", timeout=0.5)  # .invalid never resolves
    assert time.perf_counter() - started < 3


# ---------------------------------------------------------------------------- statistics and pipelines


def test_normalization_uses_training_statistics_only(tmp_path):
    """No leakage: shift the validation rows far away; the model's scaling must not move."""
    import keras_tuner as kt

    from toolkit.models import build_hypermodel

    cfg = validate({"name": "t", "data": {"source": "wine"}, "space": {"depth": 1, "units": 4}})
    ds = load_dataset(cfg.data, cfg.seed)
    sigma = ds.x_train.std(axis=0)
    ds.x_val = ds.x_val + 100 * sigma  # validation rows far away: any shared statistic would move
    model = build_hypermodel(cfg, ds).build(kt.HyperParameters())
    layer = model.get_layer("standardize")
    mean, variance = (np.asarray(v, dtype="float64").reshape(-1) for v in (layer.mean, layer.variance))

    np.testing.assert_allclose(mean, ds.x_train.astype("float64").mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(variance, ds.x_train.astype("float64").var(axis=0), rtol=1e-4)
    both = np.concatenate([ds.x_train, ds.x_val]).astype("float64")
    assert np.all(np.abs(mean - both.mean(axis=0)) > 10 * sigma), "validation rows leaked into the mean"
    assert np.all(variance < both.var(axis=0) / 10), "validation rows leaked into the variance"
    # And standardized training inputs come out centred with unit scale.
    out = np.asarray(layer(ds.x_train))
    np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=1e-3)
    np.testing.assert_allclose(out.std(axis=0), 1.0, atol=1e-2)


def test_feature_stats_are_exact_on_large_offsets():
    ds = load_dataset(data("iris"))
    ds.x_train = (ds.x_train.astype("float64") * 1e-3 + 1e4).astype("float32")
    mean, variance = ds.feature_stats()
    np.testing.assert_allclose(mean, ds.x_train.astype("float64").mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(variance, ds.x_train.astype("float64").var(axis=0), rtol=1e-6)


def test_target_stats_come_from_the_training_split():
    ds = load_dataset(data("friedman", n_samples=200))
    ds.y_val = ds.y_val + 1000.0
    mean, std = ds.target_stats()
    assert mean == pytest.approx(float(ds.y_train.astype("float64").mean())) and std == pytest.approx(
        float(ds.y_train.std()), rel=1e-5
    )
    with pytest.raises(ValueError, match="for regression"):
        load_dataset(data("iris")).target_stats()


def test_pipeline_batches_and_shuffles_reproducibly_from_the_seed():
    x = np.arange(100, dtype="float32").reshape(50, 2)
    y = np.arange(50, dtype="int64")

    def epochs(seed: int, shuffle: bool = True) -> list[list[int]]:
        ds = make_pipeline(x, y, batch_size=16, seed=seed, shuffle=shuffle)
        return [np.concatenate([b[1].numpy() for b in ds]).tolist() for _ in range(2)]

    first, second = epochs(7)
    assert sorted(first) == list(range(50)) and first != second  # every sample once, reshuffled per epoch
    assert epochs(7) == [first, second]  # the same seed gives the same order
    assert epochs(8)[0] != first
    assert epochs(7, shuffle=False)[0] == list(range(50))
    batch = next(iter(make_pipeline(x, y, batch_size=16, seed=0)))
    assert batch[0].shape == (16, 2) and batch[0].dtype.name == "float32"


# ---------------------------------------------------------------------------- `toolkit datasets`


def test_datasets_command_lists_sources_with_sizes_and_tasks_without_tensorflow(tmp_path):
    script = (
        "import sys, json\n"
        "from toolkit.cli import main\n"
        "code = main(['datasets'])\n"
        "print(json.dumps({'code': code, 'tf': 'tensorflow' in sys.modules}))\n"
    )
    env = {**os.environ, "KERAS_HOME": str(tmp_path), "COLUMNS": "80"}  # a pipe or CI log: words must not be cut
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - started
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "tf": False}
    lines = out.stdout.splitlines()
    for name, (samples, shape, task, _) in BUILTIN.items():
        row = next(line for line in lines if f" {name} " in line)
        assert str(samples) in row and task in row and str(int(np.prod(shape))) in row
    assert any("mnist" in line and "70000" in line and "keras (11 MB)" in line for line in lines)
    assert elapsed < 30, f"`toolkit datasets` took {elapsed:.1f} s"


# ---------------------------------------------------------------------------- end to end, as a new user


def new_user_card(tmp_path: Path, name: str, data_section: dict, **tuner) -> Path:
    card = {
        "name": name,
        "data": data_section,
        "space": {"depth": {"min": 1, "max": 2}, "units": [16, 32], "activation": ["relu", "tanh"]},
        "tuner": {"algorithm": "random", "max_trials": 2, **tuner},
        "train": {"epochs": 1, "batch_size": 32},
    }
    path = tmp_path / "mycards" / f"{name}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(card, sort_keys=False))
    return path


def check_search(client, name: str, n_trials: int) -> tuple:
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("toolkit.role") == "search"]
    trials = [r for r in runs if r.data.tags.get("toolkit.role") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(trials) == n_trials and all(t.info.status == "FINISHED" for t in trials)
    parent = parents[0]
    for trial in trials:
        inputs = {d.dataset.name: d for d in trial.inputs.dataset_inputs}
        assert set(inputs) == {f"{name}_data-training", f"{name}_data-validation"}
        digest = parent.data.tags["toolkit.data.digest"]
        assert inputs[f"{name}_data-training"].dataset.digest == f"{digest}-tra"
        assert f"{name}_data.csv" in inputs[f"{name}_data-training"].dataset.source
        assert {t.key: t.value for t in inputs[f"{name}_data-validation"].tags}["mlflow.data.context"] == "validation"
    return parent, trials


@pytest.mark.slow
def test_new_user_classification_csv_with_string_labels_trains_and_is_tracked(tmp_path, store, mlflow_client, capsys):
    from sklearn.datasets import load_iris

    from toolkit.cli import main

    iris = load_iris(as_frame=True)
    frame = iris.data.assign(label=iris.target_names[iris.target])  # "setosa", "versicolor", ...
    frame.to_csv(tmp_path / "flowers_data.csv", index=False)
    card = new_user_card(tmp_path, "flowers", {"source": str(tmp_path / "flowers_data.csv"), "target": "label"})

    code = main(["tune", str(card), "--set", "tracking.log_model=false"])
    assert code == 0, capsys.readouterr().err
    parent, trials = check_search(mlflow_client, "flowers", 2)
    assert parent.data.tags["toolkit.data.task"] == "classification"
    assert parent.data.tags["toolkit.data.n_train"] == "120"
    mapping = json.loads(Path(mlflow_client.download_artifacts(parent.info.run_id, "class_names.json")).read_text())
    assert mapping == {"0": "setosa", "1": "versicolor", "2": "virginica"}
    assert all("val_accuracy" in t.data.metrics for t in trials)


@pytest.mark.slow
def test_new_user_regression_csv_with_float_target_trains_on_val_loss(tmp_path, store, mlflow_client, capsys):
    from sklearn.datasets import load_diabetes

    from toolkit.cli import main

    diabetes = load_diabetes(as_frame=True)
    diabetes.frame.rename(columns={"target": "y"}).to_csv(tmp_path / "sugar_data.csv", index=False)
    card = new_user_card(tmp_path, "sugar", {"source": str(tmp_path / "sugar_data.csv"), "target": "y"}, objective="val_loss")

    code = main(["tune", str(card), "--set", "tracking.log_model=false"])
    assert code == 0, capsys.readouterr().err
    parent, trials = check_search(mlflow_client, "sugar", 2)
    assert parent.data.tags["toolkit.data.task"] == "regression"
    assert "best_val_loss" in parent.data.metrics
    assert all({"val_loss", "val_mae"} <= set(t.data.metrics) for t in trials)
    assert "class_names.json" not in [a.path for a in mlflow_client.list_artifacts(parent.info.run_id)]
    card_logged = yaml.safe_load(Path(mlflow_client.download_artifacts(parent.info.run_id, "experiment.yaml")).read_text())
    assert card_logged["data"]["task"] == "regression"
