"""How a champion answers when it is served: finite numbers in, predictions out, and a quiet log.

This file travels with every champion model (its ``code/`` folder, as
``toolkit_champion_serving.py``) and is the model's ``python_function`` loader, so
``mlflow models serve`` and ``mlflow.pyfunc.load_model`` use it without the toolkit
installed. It therefore imports nothing from the toolkit: NumPy and MLflow only.

MLflow's Keras flavor predicts whatever it is given: NaN, +/-Infinity, ``null`` and
``1e400`` (which JSON parses as Infinity) all answer 200 with a meaningless prediction, and
each prediction prints a Keras progress bar into the server's log. This loader wraps the
flavor's model so that:

- a non-finite or non-numeric input is refused with ``INVALID_PARAMETER_VALUE``, which the
  scoring server answers with HTTP 400 and the message below (which cell, what was there);
- predictions run with ``verbose=0``.
"""

from __future__ import annotations

from typing import Any

MODULE_NAME = "toolkit_champion_serving"


def check_finite(data: Any) -> Any:
    """``data`` as a float array, or an ``MlflowException`` (HTTP 400) naming the first bad cell.

    Args:
        data: What the scoring server parsed: a NumPy array, a pandas DataFrame, a list.

    Returns:
        The inputs as a float32 NumPy array of the same shape.
    """
    import numpy as np
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    values = data.to_numpy() if hasattr(data, "to_numpy") else data
    try:
        array = np.asarray(values, dtype="float64")
    except (TypeError, ValueError) as exc:
        raise MlflowException(
            f"every input must be a number; received a value that is not ({exc}). Send a nested list of finite numbers",
            INVALID_PARAMETER_VALUE,
        ) from None
    with np.errstate(over="ignore"):
        array = array.astype("float32")  # the model's dtype: 1e39 is finite in float64, not here
    bad = ~np.isfinite(array)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raw = np.asarray(values, dtype=object)[where] if np.ndim(values) else values
        shown = "null" if raw is None else repr(raw)
        raise MlflowException(
            f"input {list(where)} is {shown}: every input must be a finite number (NaN, Infinity, "
            f"null and numbers beyond float32 range are refused); {int(bad.sum())} such value(s) in this request",
            INVALID_PARAMETER_VALUE,
        )
    return array


class ChampionModel:
    """The Keras flavor's pyfunc model with finite inputs checked and no progress bar.

    Args:
        inner: What ``mlflow.keras``' own loader returns.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.signature = getattr(inner, "signature", None)

    def get_raw_model(self) -> Any:
        return self._inner.get_raw_model()

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        import keras

        array = check_finite(data)
        model = self._inner.get_raw_model()
        if getattr(self._inner, "save_exported_model", False):
            predictions = model.serve(array)
        else:
            predictions = model.predict(array, verbose=0)
        out = keras.ops.convert_to_numpy(predictions)
        if hasattr(data, "index"):  # a DataFrame in, a DataFrame out (as the Keras flavor does)
            import pandas as pd

            return pd.DataFrame(out, index=data.index)
        return out


def _load_pyfunc(path: str) -> ChampionModel:
    """The ``python_function`` loader MLflow calls with the model's data folder."""
    from mlflow.keras.load import _load_pyfunc as load_keras

    return ChampionModel(load_keras(path))
