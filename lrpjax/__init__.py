"""lrpjax: Layer-wise Relevance Propagation for Flax NNX models, as pure JAX functions.

The package is layered; each layer imports only from the ones before it
(docs/architecture.md):

- `lrpjax.core`: the LRP engine and what it is made of: layers, layer types, rules,
  composites, canonizers, glue, tracing, compilation, Linen conversion;
- `lrpjax.models`, `lrpjax.zoo`, `lrpjax.data`, `lrpjax.viz`: models, datasets, pictures;
- `lrpjax.analysis`: baselines, metrics, concepts (CRP), evaluation;
- `lrpjax.runs`: dataset runs that stream to disk, resume, and span processes;
- `lrpjax.bench`, `lrpjax.peers`: benchmarks, and the Zennit bridge;
- `lrpjax.commands`: the ``lrpjax`` command line, one module per subcommand.

The public names below (``lrpjax.rules``, ``lrpjax.composites``, ...) are the sub-modules
of those layers, importable by these short names too (``from lrpjax.composites import
FIRST``).
"""

import sys

from flax import nnx

from lrpjax import data, models, viz, zoo
from lrpjax.analysis import baselines, concepts, metrics
from lrpjax.core import (
    canonizers,
    compilation,
    composites,
    engine,
    layer_types,
    layers,
    linen,
    rules,
)
from lrpjax.core.compilation import jit
from lrpjax.core.engine import (
    INITS,
    Explanation,
    LayerError,
    explain,
    explainer,
    output_relevance,
    resolve_rules,
)

#: Short names of public sub-modules: ``import lrpjax.rules`` is ``lrpjax.core.rules``.
for _module in (
    baselines, canonizers, compilation, composites, concepts, layer_types, layers, linen,
    metrics, rules,
):  # fmt: skip
    sys.modules[f"{__name__}.{_module.__name__.rpartition('.')[2]}"] = _module
del _module

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
    "canonizers",
    "compilation",
    "composites",
    "concepts",
    "data",
    "engine",
    "explain",
    "explainer",
    "jit",
    "layer_types",
    "layers",
    "linen",
    "load_pretrained",
    "metrics",
    "models",
    "output_relevance",
    "resolve_rules",
    "rules",
    "viz",
    "zoo",
]
