"""Loading: a card's data section → a :class:`Dataset` of seeded, stratified splits."""

from __future__ import annotations

import logging

import numpy as np

from toolkit.config import DataConfig
from toolkit.data.dataset import CLASSIFICATION, DataError, Dataset
from toolkit.data.files import _read_npz, _read_table, source_path
from toolkit.data.sources import BUILTIN

log = logging.getLogger(__name__)


def _split(
    x: np.ndarray, y: np.ndarray, task: str, cfg: DataConfig, seed: int, where: str, class_names: list[str] | None
) -> tuple:
    """Seeded train/validation(/test) split, stratified for classification."""
    from sklearn.model_selection import train_test_split

    n = len(x)
    n_test = int(round(n * cfg.test_split))
    n_val = int(round(n * cfg.validation_split))
    n_train = n - n_val - n_test
    empty = [
        name
        for name, size in (("training", n_train), ("validation", n_val), ("test", n_test if cfg.test_split else 1))
        if size < 1
    ]
    if empty:
        raise DataError(
            f"{where}: {n} sample(s) with validation_split={cfg.validation_split:g} and test_split={cfg.test_split:g} "
            f"leave the {empty[0]} split empty; use more data or {'smaller' if empty[0] == 'training' else 'larger'} splits",
            field="data.test_split" if empty[0] == "test" else "data.validation_split",
        )
    stratify = task == CLASSIFICATION
    if stratify:
        counts = np.bincount(y)
        present = np.flatnonzero(counts)
        smallest = int(present[np.argmin(counts[present])])
        needed = 3 if n_test else 2
        if counts[smallest] < needed:
            label = class_names[smallest] if class_names else str(smallest)
            raise DataError(
                f"{where}: class {label!r} has only {int(counts[smallest])} sample(s); a stratified split needs at least "
                f"{needed} per class (one in each split). Drop or merge that class, or add samples"
                + (" (if the target is a quantity, set data.task: regression)" if len(present) > 20 else ""),
                field="data.target",
            )
        k = len(present)
        for label, size in (("training", n_train), ("validation", n_val), ("test", n_test)):
            if (label != "test" or n_test) and size < k:
                raise DataError(
                    f"{where}: the {label} split would hold {size} sample(s), fewer than the {k} classes, so it cannot "
                    "be stratified; use more data or a larger split",
                    field="data.test_split" if label == "test" else "data.validation_split",
                )
    x_test = y_test = None
    try:
        if n_test:
            x, x_test, y, y_test = train_test_split(x, y, test_size=n_test, random_state=seed, stratify=y if stratify else None)
        x_train, x_val, y_train, y_val = train_test_split(
            x, y, test_size=n_val, random_state=seed, stratify=y if stratify else None
        )
    except ValueError as exc:  # anything sklearn still refuses, in its words
        raise DataError(f"{where}: cannot split the data: {exc}", field="data.validation_split") from None
    return x_train, y_train, x_val, y_val, x_test, y_test


def load_dataset(cfg: DataConfig, seed: int = 42) -> Dataset:
    """Resolve a card's data section into seeded, stratified numpy splits.

    Args:
        cfg: The card's ``data`` section.
        seed: The split and generation seed. Defaults to 42.

    Returns:
        The splits with task, class names and feature names.

    Raises:
        DataError: For bad user data (exit 2).
        DatasetUnavailable: When a Keras dataset cannot be downloaded (exit 1).
    """
    if cfg.source in BUILTIN:
        name, source = cfg.source, cfg.source
        x, y, task, class_names, feature_names = BUILTIN[cfg.source](cfg, seed)
        if cfg.task and cfg.task != task:
            raise DataError(f"data.task: {cfg.source!r} is a {task} dataset. Received: {cfg.task!r}", field="data.task")
    else:
        path = source_path(cfg)
        name, source = path.stem, str(path.resolve())
        if path.suffix.lower() == ".npz":
            x, y, task, class_names, feature_names = _read_npz(path, cfg)
        else:
            x, y, task, class_names, feature_names = _read_table(path, cfg)
    if len(x) == 0:
        raise DataError(f"{source}: the data has no rows", field="data.source")
    if task == CLASSIFICATION and class_names is None:
        class_names = [str(i) for i in range(int(y.max()) + 1)]
    splits = _split(x, y, task, cfg, seed, where=source, class_names=class_names)
    dataset = Dataset(name, source, task, *splits, class_names=class_names, feature_names=feature_names)
    log.info("data %s: %s, input shape %s, %s", name, task, dataset.input_shape, dataset.sizes)
    return dataset
