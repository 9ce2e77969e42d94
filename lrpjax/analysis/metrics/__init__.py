"""Metrics that score explanations, one module per family, one protocol and registry.

`registry` defines the protocol (``metric(model, x, maps, target, *, explain=None,
key=None) -> (N,) scores``) and `REGISTRY`, which `lrpjax evaluate` loops over. Families:
`perturbation` (faithfulness by region perturbation, AOPC), `faithfulness` (pixel
flipping, selectivity, faithfulness correlation and estimate, sensitivity-n, monotonicity
and monotonicity correlation, ROAD, infidelity, IROF), `robustness` (max- and
avg-sensitivity, local Lipschitz estimate, relative input and output stability; they take
``explain``), `randomization` (model randomisation; random logit), `complexity`
(sparseness, entropy, effective complexity), `localisation` (pointing game, relevance
mass and rank accuracy, top-k intersection, attribution localisation, AUC; they take
ground-truth ``masks=``; and the `synthetic_localisation` benchmark), `axiomatic`
(completeness, non-sensitivity, input invariance). `explain_fn` makes the ``explain`` of
the metrics that re-explain.
"""

from lrpjax.analysis.metrics import (
    axiomatic,
    complexity,
    faithfulness,
    localisation,
    perturbation,
    randomization,
    registry,
    robustness,
    scoring,
)
from lrpjax.analysis.metrics.axiomatic import (
    completeness,
    input_invariance,
    non_sensitivity,
    shift_first_layer,
)
from lrpjax.analysis.metrics.complexity import effective_complexity, entropy, sparseness
from lrpjax.analysis.metrics.faithfulness import (
    faithfulness_correlation,
    faithfulness_estimate,
    infidelity,
    irof,
    monotonicity,
    monotonicity_correlation,
    noisy_linear_imputation,
    pixel_flipping,
    pixel_flipping_curves,
    road_curves,
    road_lerf,
    road_morf,
    selectivity,
    selectivity_curves,
    sensitivity_n,
    sensitivity_n_curves,
)
from lrpjax.analysis.metrics.localisation import (
    attribution_localisation,
    auc,
    pointing_game,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    synthetic_localisation,
    top_k_intersection,
)
from lrpjax.analysis.metrics.perturbation import (
    ORDERS,
    REPLACEMENTS,
    SCORES,
    aopc,
    region_perturbation,
    region_perturbation_lerf,
    region_perturbation_morf,
    region_relevance,
    summary,
)
from lrpjax.analysis.metrics.randomization import (
    layer_order,
    model_randomization,
    random_logit,
    randomize_layers,
    spearman,
    ssim,
)
from lrpjax.analysis.metrics.registry import FAMILIES, REGISTRY, Metric, get, names, register
from lrpjax.analysis.metrics.robustness import (
    avg_sensitivity,
    local_lipschitz_estimate,
    max_sensitivity,
    perturbed_inputs,
    relative_input_stability,
    relative_output_stability,
)
from lrpjax.analysis.metrics.scoring import explain_fn

__all__ = [
    "FAMILIES",
    "ORDERS",
    "REGISTRY",
    "REPLACEMENTS",
    "SCORES",
    "Metric",
    "aopc",
    "attribution_localisation",
    "auc",
    "avg_sensitivity",
    "axiomatic",
    "completeness",
    "complexity",
    "effective_complexity",
    "entropy",
    "explain_fn",
    "faithfulness",
    "faithfulness_correlation",
    "faithfulness_estimate",
    "get",
    "infidelity",
    "input_invariance",
    "irof",
    "layer_order",
    "local_lipschitz_estimate",
    "localisation",
    "max_sensitivity",
    "model_randomization",
    "monotonicity",
    "monotonicity_correlation",
    "names",
    "noisy_linear_imputation",
    "non_sensitivity",
    "perturbation",
    "perturbed_inputs",
    "pixel_flipping",
    "pixel_flipping_curves",
    "pointing_game",
    "random_logit",
    "randomization",
    "randomize_layers",
    "region_perturbation",
    "region_perturbation_lerf",
    "region_perturbation_morf",
    "region_relevance",
    "register",
    "registry",
    "relative_input_stability",
    "relative_output_stability",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "road_curves",
    "road_lerf",
    "road_morf",
    "robustness",
    "scoring",
    "selectivity",
    "selectivity_curves",
    "sensitivity_n",
    "sensitivity_n_curves",
    "shift_first_layer",
    "sparseness",
    "spearman",
    "ssim",
    "summary",
    "synthetic_localisation",
    "top_k_intersection",
]
