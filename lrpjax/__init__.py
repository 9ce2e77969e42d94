"""lrpjax: Layer-wise Relevance Propagation for Flax NNX models, as pure JAX functions."""

from lrpjax import baselines, compilation, composites, data, layers, metrics, models, rules, viz
from lrpjax.compilation import jit
from lrpjax.engine import INITS, Explanation, LayerError, explain, explainer, output_relevance

PRETRAINED = "minivgg_cifar10.npz"


def load_pretrained() -> models.MiniVGG:
    """The shipped MiniVGG trained on CIFAR-10, in eval mode (offline; no TensorFlow).

    The weights and their training metrics are in ``lrpjax/assets/``; see the README's
    model card.
    """
    from importlib import resources

    with resources.as_file(resources.files("lrpjax") / "assets" / PRETRAINED) as path:
        return models.load(path)


__all__ = [
    "INITS",
    "Explanation",
    "LayerError",
    "baselines",
    "compilation",
    "composites",
    "data",
    "explain",
    "explainer",
    "jit",
    "layers",
    "load_pretrained",
    "metrics",
    "models",
    "output_relevance",
    "rules",
    "viz",
]
