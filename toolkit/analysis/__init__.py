"""What a search found, from MLflow alone: the trials table, importance, plots and the report.

Everything here reads the tracking store, never the tuner, so ``toolkit report EXP`` rebuilds a
report for any search that was logged, and a notebook can do the same with :func:`trials_table`.

The report is for any search, whatever model built its trials: the hyperparameters are the
trial runs' own params (the hypermodel's hp names), and every varied one gets its marginal effect
(per value for a categorical knob, the rank correlation for a numeric one) and a place in the
importance ranking and the plots. The essay's questions are answered where the search has what
they need: which activation and depth won together (an ``activation`` and a ``depth`` knob),
whether gradients vanished (``grad_norm/<layer>`` diagnostics, any layer names), whether
regularization helped (L1/L2 strength knobs) and which optimizer got there first (an
``optimizer`` knob); otherwise those findings are left out. Each finding states its numbers and
how many trials they rest on, and says "not enough trials to say" where the trials cannot support
a claim. Whether higher is better comes from one rule, :func:`metric_direction`.

Modules, one concept each:

- :mod:`~toolkit.analysis.load`: :class:`SearchData`, :func:`find_search`, :func:`load_search`,
  :func:`trials_table`, :func:`metric_direction`.
- :mod:`~toolkit.analysis.findings`: the ``*_findings`` functions, :func:`optimizer_ranking`,
  :func:`epochs_to_target`, :func:`regularization_knobs`, :func:`gradient_layers`,
  :func:`gradient_ratios`, :func:`layer_order`, :data:`NOT_ENOUGH`.
- :mod:`~toolkit.analysis.importance`: :class:`Importance`, :func:`hyperparameter_importance`,
  :func:`importance_findings`.
- :mod:`~toolkit.analysis.compare`: :func:`comparison_findings`, :func:`comparison_table`,
  :func:`similar_size_pair`: one search beside others (``tracking.compare_with``).
- :mod:`~toolkit.analysis.pareto`: ``tuner.constraints`` and ``tuner.pareto``:
  :func:`violations`, :func:`non_dominated`, :func:`pareto_flags`, :func:`pareto_table`,
  :func:`constraint_findings`, :func:`pareto_findings`, :func:`plot_pareto`.
- :mod:`~toolkit.analysis.plots`: the ``plot_*`` functions and :data:`PLOTS`.
- :mod:`~toolkit.analysis.report`: :class:`Report`, :func:`build_report`, :func:`write_report`,
  :func:`log_search_report`, :func:`regenerate`.
"""

from __future__ import annotations

from toolkit.analysis.compare import comparison_findings, comparison_table, similar_size_pair
from toolkit.analysis.findings import (
    NOT_ENOUGH,
    activation_depth_findings,
    best_trial_finding,
    choice_findings,
    epochs_to_target,
    gradient_findings,
    gradient_layers,
    gradient_ratios,
    layer_order,
    numeric_findings,
    optimizer_findings,
    optimizer_ranking,
    overfitting_findings,
    pruning_findings,
    regularization_findings,
    regularization_knobs,
    system_findings,
)
from toolkit.analysis.importance import Importance, hyperparameter_importance, importance_findings
from toolkit.analysis.load import SearchData, find_search, load_search, metric_direction, trials_table
from toolkit.analysis.pareto import (
    constraint_findings,
    non_dominated,
    pareto_findings,
    pareto_flags,
    pareto_table,
    plot_pareto,
    violations,
)
from toolkit.analysis.plots import (
    PLOTS,
    plot_activation_depth,
    plot_gap_vs_regularization,
    plot_gradient_norms,
    plot_learning_curves,
    plot_objective_vs_hyperparameters,
)
from toolkit.analysis.report import Report, build_report, log_search_report, regenerate, write_report

# The card type, for callers that build one to pass to :func:`regenerate`.
from toolkit.config import ExperimentConfig

__all__ = [
    "NOT_ENOUGH",
    "PLOTS",
    "ExperimentConfig",
    "Importance",
    "Report",
    "SearchData",
    "activation_depth_findings",
    "best_trial_finding",
    "build_report",
    "choice_findings",
    "comparison_findings",
    "comparison_table",
    "constraint_findings",
    "epochs_to_target",
    "find_search",
    "gradient_findings",
    "gradient_layers",
    "gradient_ratios",
    "hyperparameter_importance",
    "importance_findings",
    "layer_order",
    "load_search",
    "log_search_report",
    "metric_direction",
    "non_dominated",
    "numeric_findings",
    "optimizer_findings",
    "optimizer_ranking",
    "overfitting_findings",
    "pareto_findings",
    "pareto_flags",
    "pareto_table",
    "plot_pareto",
    "plot_activation_depth",
    "plot_gap_vs_regularization",
    "plot_gradient_norms",
    "plot_learning_curves",
    "plot_objective_vs_hyperparameters",
    "pruning_findings",
    "regenerate",
    "regularization_findings",
    "regularization_knobs",
    "similar_size_pair",
    "system_findings",
    "trials_table",
    "violations",
    "write_report",
]
