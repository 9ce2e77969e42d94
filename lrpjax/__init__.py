"""lrpjax: Layer-wise Relevance Propagation for Flax NNX models, as pure JAX functions."""

from flax import nnx

from lrpjax import (
    baselines,
    compilation,
    composites,
    data,
    layers,
    linen,
    metrics,
    models,
    rules,
    viz,
)
from lrpjax.compilation import jit
from lrpjax.engine import INITS, Explanation, LayerError, explain, explainer, output_relevance

PRETRAINED = "minivgg_cifar10.npz"


def load_pretrained(name: str = "minivgg") -> nnx.Module:
    """A shipped model trained on CIFAR-10, in eval mode (offline; no TensorFlow).

    Args:
      name: a key of `lrpjax.models.SHIPPED`: ``"minivgg"`` (the default, `models.MiniVGG`)
        or ``"vit"`` (`models.CCT`, a compact convolutional transformer).

    The weights and their training metrics are in ``lrpjax/assets/``; see the README's
    model card.

    Raises:
      ValueError: an unknown name.
      lrpjax.models.ModelFileError: the model's weight file is not installed.
    """
    return models.load_shipped(name)[0]


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
    "linen",
    "load_pretrained",
    "metrics",
    "models",
    "output_relevance",
    "rules",
    "viz",
]
