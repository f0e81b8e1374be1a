"""Hyperparameter importance from a random-forest surrogate with permutation importance."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from toolkit.analysis.findings import NOT_ENOUGH
from toolkit.analysis.load import SearchData

# The random-forest surrogate needs a few trials per hyperparameter to mean anything.
MIN_IMPORTANCE_TRIALS = 8


@dataclass
class Importance:
    """Hyperparameter importance from a random-forest surrogate with permutation importance."""

    table: pd.DataFrame | None
    reason: str | None = None
    oob_r2: float | None = None
    n_trials: int = 0


def hyperparameter_importance(data: SearchData, seed: int = 0) -> Importance:
    """How much each hyperparameter explains of the objective.

    A random forest (sklearn, 100 trees) is fitted to map the varied hyperparameters to the
    objective. Each hyperparameter's importance is the mean drop in the forest's R² when that
    column is shuffled (permutation importance, 10 repeats). Both are computed on the trials
    themselves: there are too few for a held-out split, so the forest's out-of-bag R² is reported
    alongside as the measure of how much to trust the ranking.

    Args:
        data: The search.
        seed: Seeds the forest and the permutations. Defaults to 0.

    Returns:
        The importances, or the reason there are none.
    """
    done = data.finished
    features = data.varying
    if len(done) < MIN_IMPORTANCE_TRIALS or not features:
        enough = len(done) >= MIN_IMPORTANCE_TRIALS
        why = (
            "no hyperparameter was varied"
            if enough
            else f"{len(done)} finished trial(s); the surrogate needs {MIN_IMPORTANCE_TRIALS}"
        )
        return Importance(None, f"{NOT_ENOUGH} ({why}).", n_trials=len(done))
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.inspection import permutation_importance

    x = pd.DataFrame(index=done.index)
    for name in features:
        column = done[name]
        if pd.api.types.is_numeric_dtype(column):
            # Conditional hyperparameters (momentum) are absent for some trials: a value below
            # the range keeps "absent" distinct without claiming an order.
            x[name] = column.fillna(column.min() - 1 if column.notna().any() else -1)
        else:
            x[name] = pd.Categorical(column.fillna("absent")).codes
    y = done["objective"].astype(float).to_numpy()
    forest = RandomForestRegressor(n_estimators=100, random_state=seed, oob_score=True, min_samples_leaf=1, n_jobs=1)
    forest.fit(x.to_numpy(), y)
    result = permutation_importance(forest, x.to_numpy(), y, n_repeats=10, random_state=seed, n_jobs=1)
    table = pd.DataFrame({"hyperparameter": features, "importance": result.importances_mean, "std": result.importances_std})
    table = table.sort_values("importance", ascending=False).reset_index(drop=True)
    return Importance(table, oob_r2=float(forest.oob_score_), n_trials=len(done))


def importance_findings(importance: Importance) -> list[str]:
    if importance.table is None:
        return [f"Hyperparameter importance: {importance.reason}"]
    listing = ", ".join(f"{r['hyperparameter']} {r['importance']:.3f}" for _, r in importance.table.iterrows())
    trust = "a weak hint" if (importance.oob_r2 or 0) < 0.2 else "usable"
    return [
        f"Hyperparameter importance (random-forest surrogate, permutation importance = drop in R² when shuffled, "
        f"{importance.n_trials} trials): {listing}. The surrogate's out-of-bag R² is {importance.oob_r2:.2f}, so the ranking is {trust}."
    ]
