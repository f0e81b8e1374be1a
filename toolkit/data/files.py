"""User files as sources: ``.csv`` and ``.parquet`` tables and ``.npz`` archives, and their targets.

A table's ``target`` names the label column and ``features`` optionally selects columns; an
archive holds arrays ``x`` and ``y``. A target's dtype decides the task unless ``task:`` says.
:func:`check_source` runs the checks that a file's header alone decides, without reading the
rows or importing TensorFlow, for ``toolkit validate``.
"""

from __future__ import annotations

import csv
import logging
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.config import DATASETS, DataConfig
from toolkit.data.dataset import CLASSIFICATION, REGRESSION, DataError, Loaded

log = logging.getLogger(__name__)


def source_path(cfg: DataConfig) -> Path:
    """The file a card's ``data.source`` names, once it is known to be a readable file.

    Raises:
        DataError: When there is no such file, or it is a directory.
    """
    path = Path(cfg.source).expanduser()
    if path.is_dir():
        raise DataError(
            f"data.source: {cfg.source!r} is a directory, not a file (looked at {path.resolve()}); "
            f"give the path of a {path.suffix.lower() or 'data'} file",
            field="data.source",
        )
    if not path.is_file():
        raise DataError(
            f"data.source: file not found: {cfg.source!r} (looked for {path.resolve()}; "
            "a relative path is read from the current directory)",
            field="data.source",
        )
    return path


def check_source(cfg: DataConfig) -> None:
    """Check what a user file's header alone decides, for ``toolkit validate``.

    The file exists and is not a directory; a table's header has unique names, the target
    column and the listed features; an archive is a zip holding ``x`` and ``y``. The rows are
    not read and neither pandas nor TensorFlow is imported, so this stays fast on large files.
    Built-in sources need no check.

    Args:
        cfg: The card's ``data`` section.

    Raises:
        DataError: With the same message that loading the data would give.
    """
    if cfg.source in DATASETS:
        return
    path = source_path(cfg)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        _npz_arrays(path)
        return
    if suffix == ".csv":
        header = _csv_header(path)
        if not header:
            raise DataError(f"{path}: cannot read the file (it is empty; a header line is needed)", field="data.source")
        # pandas names a blank header "Unnamed: <position>"; the loader sees those names.
        columns = [name or f"Unnamed: {i}" for i, name in enumerate(header)]
    else:
        columns = _parquet_columns(path)
        if columns is None:
            return
        _no_duplicates(path, columns)
    _check_columns(path, columns, cfg)


def _columns(columns: list[Any]) -> str:
    names = [str(c) for c in columns]
    shown = ", ".join(names[:20])
    return shown + (f", ... ({len(names)} in all)" if len(names) > 20 else "")


def _cannot_read(path: Path, exc: BaseException) -> DataError:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "no detail"
    return DataError(f"{path}: cannot read the file ({type(exc).__name__}: {detail})", field="data.source")


def _csv_header(path: Path) -> list[str]:
    """A CSV file's header line, read with the csv module, refusing duplicate names.

    pandas renames a second ``a`` to ``a.1`` without a word, so a duplicated column would
    quietly become two features (or hide which one is the target); the header is read here
    to catch that.

    Returns:
        The column names, or an empty list for an empty file.
    """
    try:
        # utf-8-sig: a byte-order mark (Excel writes one) is not part of the first name.
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise _cannot_read(path, exc) from None
    _no_duplicates(path, header)
    return header


def _no_duplicates(path: Path, columns: list[Any]) -> None:
    seen: dict[str, int] = {}
    for i, name in enumerate(columns):
        name = str(name)
        if not name:  # blank headers are a saved index; pandas names each by its position
            continue
        if name in seen:
            raise DataError(
                f"{path}: column {name!r} appears twice in the header (columns {seen[name] + 1} and {i + 1}); "
                "give each column a unique name",
                field="data.source",
            )
        seen[name] = i


def _parquet_columns(path: Path) -> list[str] | None:
    """A Parquet file's column names from its schema, or None when pyarrow is not installed."""
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pandas may read it with another engine; loading will tell
        return None
    try:
        return list(pq.read_schema(path).names)
    except Exception as exc:
        raise _cannot_read(path, exc) from None


def _check_columns(path: Path, columns: list[Any], cfg: DataConfig) -> None:
    """The checks a table's column names alone decide: shared by loading and ``validate``."""
    if cfg.target is None:
        raise DataError(f"{path}: data.target must name the label column. Columns: {_columns(columns)}", field="data.target")
    if cfg.target not in columns:
        raise DataError(f"{path}: data.target column {cfg.target!r} not found. Columns: {_columns(columns)}", field="data.target")
    if cfg.features is None:
        return
    if not cfg.features:
        raise DataError(
            f"{path}: data.features is an empty list; name at least one column, or leave it out to use all",
            field="data.features",
        )
    missing = [c for c in cfg.features if c not in columns]
    if missing:
        raise DataError(
            f"{path}: data.features column {missing[0]!r} not found. Columns: {_columns(columns)}", field="data.features"
        )
    if cfg.target in cfg.features:
        # The label as an input would be a perfect, useless model.
        raise DataError(
            f"{path}: data.features includes the target column {cfg.target!r}; the label cannot also be an input",
            field="data.features",
        )
    if len(set(cfg.features)) != len(cfg.features):
        dup = next(c for c in cfg.features if cfg.features.count(c) > 1)
        raise DataError(f"{path}: data.features names column {dup!r} twice", field="data.features")


def _row_namer(path: Path) -> Callable[[int], str]:
    """How to point at the i-th data row (0-based) of a table in a message."""
    if path.suffix.lower() == ".csv":
        # +2: one for the header line and one because people count lines from 1.
        return lambda i: f"line {i + 2}"
    return lambda i: f"row {i + 1}"


def _read_table(path: Path, cfg: DataConfig) -> Loaded:
    """A CSV or Parquet table: ``target`` names the label column, ``features`` selects columns."""
    import pandas as pd

    is_csv = path.suffix.lower() == ".csv"
    # Duplicate names, before pandas renames them (CSV) or fails on them (Parquet).
    if is_csv:
        _csv_header(path)
    else:
        _no_duplicates(path, _parquet_columns(path) or [])
    try:
        frame = pd.read_csv(path) if is_csv else pd.read_parquet(path)
    except Exception as exc:
        raise _cannot_read(path, exc) from None
    _check_columns(path, list(frame.columns), cfg)
    if cfg.features is not None:
        features = list(cfg.features)
    else:
        # A column with no header is almost always a DataFrame index saved by `to_csv()` without
        # index=False: row numbers, which track the label whenever the file is sorted by it.
        unnamed = [c for c in frame.columns if str(c).startswith("Unnamed: ") and c != cfg.target]
        if unnamed:
            log.warning(
                "%s: column(s) without a header (%s) left out of the features; they look like a saved index. "
                "List them in data.features to use them.",
                path,
                ", ".join(map(str, unnamed)),
            )
        features = [c for c in frame.columns if c != cfg.target and c not in unnamed]
    if not features:
        raise DataError(f"{path}: no feature columns besides the target {cfg.target!r}", field="data.features")
    if frame.empty:
        raise DataError(f"{path}: the file has a header but no rows", field="data.source")
    row = _row_namer(path)
    x_frame = frame[features]
    non_numeric = [c for c in features if not pd.api.types.is_numeric_dtype(x_frame[c])]
    if non_numeric:
        column = non_numeric[0]
        more = f" (and {len(non_numeric) - 1} more: {', '.join(map(str, non_numeric[1:4]))})" if len(non_numeric) > 1 else ""
        raise DataError(
            f"{path}: feature column {str(column)!r} is not numeric: {_first_text(x_frame[column].to_numpy(), row)}{more}. "
            "Encode it as numbers, or leave it out with data.features",
            field="data.features",
        )
    for column in [*features, cfg.target]:
        missing_rows = frame[column].isna()
        if missing_rows.any():
            first = row(int(np.flatnonzero(missing_rows.to_numpy())[0]))
            raise DataError(
                f"{path}: column {str(column)!r} has {int(missing_rows.sum())} missing (NaN) value(s), the first on {first}; "
                "fill or drop them first",
                field="data.source",
            )
    x = x_frame.to_numpy(dtype="float32")
    if not np.isfinite(x).all():
        i, col = np.argwhere(~np.isfinite(x))[0]
        raise DataError(
            f"{path}: column {str(features[col])!r} has an infinite or too large value on {row(int(i))}", field="data.source"
        )
    y, task, class_names = _target(frame[cfg.target].to_numpy(), cfg, f"{path}: target column {cfg.target!r}", row)
    return x, y, task, class_names, [str(c) for c in features]


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _is_missing(value: Any) -> bool:
    try:
        return value is None or bool(value != value)  # NaN is the one value unequal to itself
    except TypeError:  # pandas.NA refuses to be a bool
        return True


def _first_text(values: np.ndarray, row: Callable[[int], str]) -> str:
    """Where the first cell that is not a number is, and what it holds: ``line 7 holds 'n/a'``.

    A column with one stray word among numbers is read as text throughout, so its first cell
    is usually a valid number; the message must show the cell that is not.
    """
    i = next((i for i, v in enumerate(values) if not _is_missing(v) and not _is_number(v)), None)
    if i is None:  # e.g. a Parquet string column whose every cell spells a number
        return f"it holds text such as {str(next(iter(values), ''))!r}"
    return f"{row(i)} holds {str(values[i])!r}"


def _target(
    values: np.ndarray, cfg: DataConfig, where: str, row: Callable[[int], str] = lambda i: f"row {i + 1}"
) -> tuple[np.ndarray, str, list[str] | None]:
    """Infer the task from a target column and encode it.

    A float target means regression unless ``task:`` says otherwise; anything else (ints,
    strings, booleans) is a class label, encoded as 0..k-1 in sorted order of the labels.
    A target with nothing to learn (one class, or one constant value) is refused.

    Args:
        values: The target, one value per sample.
        cfg: The card's ``data`` section (its ``task``).
        where: The file and column or array, to start messages with.
        row: Names the i-th sample in messages. Defaults to ``row <i + 1>``.
    """
    is_float = np.issubdtype(values.dtype, np.floating)
    task = cfg.task or (REGRESSION if is_float else CLASSIFICATION)
    if task == REGRESSION:
        try:
            y = values.astype("float32")
        except (TypeError, ValueError):
            raise DataError(
                f"{where} is not numeric: {_first_text(values, row)}, so it cannot be a regression target",
                field="data.target",
            ) from None
        if not np.isfinite(y).all():
            raise DataError(f"{where} has missing (NaN) or infinite values; fill or drop them first", field="data.target")
        if len(y) and y.min() == y.max():
            # It would "train" to a loss of 1e-24 and report a perfect model.
            raise DataError(
                f"{where} is constant ({float(y[0]):g} in all {len(y)} rows), so there is nothing to learn; "
                "a regression target must take at least two values",
                field="data.target",
            )
        return y, task, None
    if is_float and np.isnan(values).any():
        raise DataError(f"{where} has missing (NaN) values; fill or drop them first", field="data.target")
    try:
        uniques, codes = np.unique(values, return_inverse=True)
    except TypeError:  # mixed types in an object column, e.g. 1 and "a": compare them as text
        uniques, codes = np.unique(values.astype(str), return_inverse=True)
    if len(uniques) == 1:
        raise DataError(
            f"{where} has a single class ({_label(uniques[0])!r} in all {len(values)} rows); "
            "classification needs at least 2 classes",
            field="data.target",
        )
    if len(uniques) > 100 and np.issubdtype(values.dtype, np.number):
        log.warning(
            "%s has %d distinct values and is treated as class labels; set data.task: regression if it is a quantity",
            where,
            len(uniques),
        )
    return codes.reshape(-1).astype("int64"), task, [_label(u) for u in uniques]


def _label(value: Any) -> str:
    # 1.0 → "1", so float-coded class labels read as the integers they are.
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _npz_arrays(path: Path) -> list[str]:
    """The array names in an ``.npz`` archive, which must be a zip holding ``x`` and ``y``.

    Checked from the zip's directory before ``np.load``: given a file that is not a zip, numpy
    falls back to unpickling and advises ``allow_pickle``, which would be the wrong fix.
    """
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as exc:
        raise _cannot_read(path, exc) from None
    if not is_zip:
        raise DataError(
            f"{path}: not a valid .npz (zip) file; write one with numpy.savez(path, x=features, y=targets)",
            field="data.source",
        )
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n.removesuffix(".npy") for n in archive.namelist()]
    except (OSError, zipfile.BadZipFile) as exc:
        raise _cannot_read(path, exc) from None
    if "x" not in names or "y" not in names:
        raise DataError(
            f"{path}: an .npz source needs arrays 'x' and 'y'. Found: {', '.join(names) or 'none'}", field="data.source"
        )
    return names


def _read_npz(path: Path, cfg: DataConfig) -> Loaded:
    """An ``.npz`` archive with arrays ``x`` (samples first) and ``y``."""
    _npz_arrays(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            x, y = archive["x"], archive["y"]
    except Exception as exc:
        raise _cannot_read(path, exc) from None
    if x.ndim == 0 or y.ndim == 0:
        raise DataError(f"{path}: 'x' and 'y' must be arrays with one row per sample", field="data.source")
    if len(x) != len(y):
        raise DataError(f"{path}: x has {len(x)} rows but y has {len(y)}", field="data.source")
    if y.ndim > 1:
        if int(np.prod(y.shape[1:])) != 1:
            raise DataError(
                f"{path}: 'y' must hold one label or target per sample. Received shape {y.shape}", field="data.source"
            )
        y = y.reshape(-1)
    if x.ndim == 1:
        x = x.reshape(-1, 1)  # one feature per sample
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise DataError(f"{path}: array 'x' is not numeric (dtype {x.dtype})", field="data.source")
    x = x.astype("float32")
    if np.isnan(x).any():
        raise DataError(f"{path}: array 'x' has {int(np.isnan(x).sum())} missing (NaN) value(s)", field="data.source")
    if not np.isfinite(x).all():
        raise DataError(f"{path}: array 'x' has infinite or too large values", field="data.source")
    y, task, class_names = _target(y, cfg, f"{path}: array 'y'")
    return x, y, task, class_names, None
