"""Metrics that score explanations, one module per family, one protocol and registry.

`registry` defines the protocol (``metric(model, x, maps, target, *, explain=None,
key=None) -> (N,) scores``) and `REGISTRY`, which `lrpjax evaluate` loops over. Families:
`perturbation` (faithfulness by region perturbation, AOPC), `randomization` (model
randomisation; random logit), `complexity` (sparseness, entropy, effective complexity),
`localisation` (pointing game, relevance mass and rank accuracy, top-k intersection,
attribution localisation, AUC; they take ground-truth ``masks=``; and the
`synthetic_localisation` benchmark), `axiomatic` (completeness, non-sensitivity, input
invariance). `explain_fn` makes the ``explain`` of the metrics that re-explain.
"""

from lrpjax.analysis.metrics import (
    axiomatic,
    complexity,
    localisation,
    perturbation,
    randomization,
    registry,
)
from lrpjax.analysis.metrics.axiomatic import (
    completeness,
    explain_fn,
    input_invariance,
    non_sensitivity,
    shift_first_layer,
)
from lrpjax.analysis.metrics.complexity import effective_complexity, entropy, sparseness
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
    "axiomatic",
    "completeness",
    "complexity",
    "effective_complexity",
    "entropy",
    "explain_fn",
    "get",
    "input_invariance",
    "layer_order",
    "localisation",
    "model_randomization",
    "names",
    "non_sensitivity",
    "perturbation",
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
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "shift_first_layer",
    "sparseness",
    "spearman",
    "ssim",
    "summary",
    "synthetic_localisation",
    "top_k_intersection",
]
