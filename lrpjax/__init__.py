"""lrpjax: Layer-wise Relevance Propagation for Flax NNX models, as pure JAX functions."""

from lrpjax import composites, layers, models, rules
from lrpjax.engine import INITS, Explanation, LayerError, explain, explainer, output_relevance

__all__ = [
    "INITS",
    "Explanation",
    "LayerError",
    "composites",
    "explain",
    "explainer",
    "layers",
    "models",
    "output_relevance",
    "rules",
]
