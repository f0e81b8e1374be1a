"""A trial's values checked against the card's space, on the worker before it builds and on the chief when it comes back.

KerasTuner hands a worker whatever values the chief's oracle stored, with no range check: a
value outside the card (``units=7`` where the card allows 32, 64 or 128, or ``units=10**9``)
would be built and trained. Here each value must be one the card's hp object could have given.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

# Float ranges and steps are compared with a tolerance: values travel as doubles over gRPC.
_REL_TOL = 1e-9


def _space(space_hps: Any) -> dict[str, list[Any]]:
    """Name → the hp objects of that name (one per set of conditions)."""
    hps: Iterable[Any] = getattr(space_hps, "space", space_hps)
    out: dict[str, list[Any]] = {}
    for hp in hps:
        out.setdefault(hp.name, []).append(hp)
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_REL_TOL, abs_tol=1e-12)


def _on_step(value: float, low: float, step: float) -> bool:
    k = (value - low) / step
    return _close(k, round(k))


def _check_one(hp: Any, value: Any) -> str | None:
    """Why ``value`` is not one ``hp`` can take, or None."""
    kind = type(hp).__name__
    if kind == "Choice":
        allowed = list(hp.values)
        # True == 1 in Python: a bool must match a bool choice and a number a number choice.
        if any(type(value) is type(v) and value == v for v in allowed):
            return None
        if _is_number(value) and any(_is_number(v) and not _is_int(v) and _close(float(value), v) for v in allowed):
            return None
        return f"must be one of {allowed}"
    if kind == "Boolean":
        return None if isinstance(value, bool) else "must be true or false"
    if kind == "Fixed":
        return None if type(value) is type(hp.value) and value == hp.value else f"is fixed at {hp.value!r}"
    if kind == "Int":
        if not _is_int(value):
            return f"must be an integer in [{hp.min_value}, {hp.max_value}]"
        if not hp.min_value <= value <= hp.max_value:
            return f"must be in [{hp.min_value}, {hp.max_value}]"
        if hp.step and hp.sampling == "linear" and (value - hp.min_value) % hp.step:
            return f"must be {hp.min_value} plus a multiple of {hp.step}"
        return None
    if kind == "Float":
        if not _is_number(value) or not math.isfinite(value):
            return f"must be a number in [{hp.min_value}, {hp.max_value}]"
        low, high = hp.min_value, hp.max_value
        if not (low <= value <= high or _close(value, low) or _close(value, high)):
            return f"must be in [{low}, {high}]"
        if hp.step and hp.sampling == "linear" and not _on_step(value, low, hp.step):
            return f"must be {low} plus a multiple of {hp.step}"
        return None
    return None  # a kind of hp this check does not know: KerasTuner's own build decides


def check_values(space_hps: Any, values: Mapping[str, Any]) -> str | None:
    """Why a trial's values are not ones the card's space can give, or None when they all are.

    Args:
        space_hps: The card's space: a KerasTuner ``HyperParameters`` (its ``space``) or a list
            of hp objects.
        values: The trial's values, by hp name.

    Returns:
        A message naming the first bad value, what was received and what the card allows, or
        None.
    """
    space = _space(space_hps)
    for name, value in values.items():
        hps = space.get(name)
        if not hps:
            known = ", ".join(sorted(space)) or "none"
            return f"the trial's value {name}={value!r} is not in the card's space (its names: {known})"
        reasons = [_check_one(hp, value) for hp in hps]
        if all(reasons):
            return f"the trial's value {name}={value!r} is outside the card's space: {name} {reasons[0]}"
    return None
