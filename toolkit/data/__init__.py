"""The dataset registry: shipped, synthetic, Keras and user-file sources → seeded splits and tf.data.

Every source resolves to a :class:`Dataset` of numpy splits (train, validation and an optional
held-out test split) with its task and input shape. :func:`make_pipeline` turns a split into a
cached, shuffled, batched and prefetched ``tf.data.Dataset``. This package knows nothing of
tracking; TensorFlow is imported only where a pipeline or a Keras download needs it, so
``toolkit datasets`` stays fast.

Sources:
    - shipped with scikit-learn: ``digits``, ``breast_cancer``, ``wine``, ``iris``;
    - generated: ``spirals``, ``moons``, ``circles``, ``xor`` (classification), ``friedman``
      (regression), taking ``n_samples``, ``noise``, and ``n_classes`` (spirals) or
      ``n_features`` (friedman);
    - Keras' downloadable sets ``mnist``, ``fashion_mnist``, ``cifar10`` (cached under
      ``$KERAS_HOME/datasets``);
    - user files: ``.csv`` and ``.parquet`` (``target`` names the label column, ``features``
      optionally selects columns) and ``.npz`` (arrays ``x`` and ``y``).

Modules:
    - ``dataset``: :class:`Dataset`, :class:`DataError`, :class:`DatasetUnavailable`, the task names;
    - ``sources``: the registry of built-in sources (``BUILTIN``) and :func:`describe_sources`;
    - ``keras_sets``: Keras' downloadable sets: :func:`keras_home`, :func:`keras_cache_dir`,
      :func:`keras_cached`, the download;
    - ``files``: reading ``.csv``/``.parquet``/``.npz`` files and encoding their targets;
      :func:`check_source`, the header-only checks behind ``toolkit validate``;
    - ``load``: :func:`load_dataset`, the seeded, stratified splits;
    - ``pipeline``: :func:`make_pipeline`.

Exports: ``Dataset``, ``DataError``, ``DatasetUnavailable``, ``CLASSIFICATION``, ``REGRESSION``,
``BUILTIN``, ``load_dataset``, ``check_source``, ``make_pipeline``, ``describe_sources``,
``keras_home``, ``keras_cache_dir``, ``keras_cached``, and ``_unreachable`` (the network probe,
for its test).
"""

from __future__ import annotations

from toolkit.data.dataset import CLASSIFICATION, REGRESSION, DataError, Dataset, DatasetUnavailable
from toolkit.data.files import check_source
from toolkit.data.keras_sets import _unreachable, keras_cache_dir, keras_cached, keras_home
from toolkit.data.load import load_dataset
from toolkit.data.pipeline import make_pipeline
from toolkit.data.sources import BUILTIN, describe_sources

__all__ = [
    "BUILTIN",
    "CLASSIFICATION",
    "REGRESSION",
    "DataError",
    "Dataset",
    "DatasetUnavailable",
    "_unreachable",
    "check_source",
    "describe_sources",
    "keras_cache_dir",
    "keras_cached",
    "keras_home",
    "load_dataset",
    "make_pipeline",
]
