"""Metrics that score explanations, one module per family, one protocol and registry.

`registry` defines the protocol (``metric(model, x, maps, target, *, explain=None,
key=None) -> (N,) scores``) and `REGISTRY`, which `lrpjax evaluate` loops over. Families:
`perturbation` (faithfulness by region perturbation, AOPC), `randomization` (model
randomisation), `complexity` (sparseness, entropy, effective complexity).
"""

from lrpjax.analysis.metrics import complexity, perturbation, randomization, registry
from lrpjax.analysis.metrics.complexity import effective_complexity, entropy, sparseness
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
    randomize_layers,
    spearman,
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
    "complexity",
    "effective_complexity",
    "entropy",
    "get",
    "layer_order",
    "model_randomization",
    "names",
    "perturbation",
    "randomization",
    "randomize_layers",
    "region_perturbation",
    "region_perturbation_lerf",
    "region_perturbation_morf",
    "region_relevance",
    "register",
    "registry",
    "sparseness",
    "spearman",
    "summary",
]
