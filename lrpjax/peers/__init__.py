"""Side by side with Zennit: the same model and the same LRP rules in PyTorch, to check that
lrpjax gives the same relevance and to time both on the same CPU (``lrpjax bench --peer
zennit``).

Zennit (Anders et al. 2021) is the reference LRP library for PyTorch. `pytorch` rebuilds
a sequential lrpjax model (the shipped miniVGG, `lrpjax.models.MiniVGG`) as a
``torch.nn.Sequential`` from the same weights, NHWC/HWIO converted to NCHW/OIHW and the
flatten done in NHWC order, and explains it with the Zennit composite of each of lrpjax's
presets, with the same parameters (epsilon, gamma, the bounds of z^B, the stabilisers).

How both sides are made to compute the same explanation (`zennit_composite`,
`zennit_model`, `compare`):

- **Rules.** Zennit's own composites (``EpsilonPlusFlat``, ``EpsilonGammaBox`` with
  ``low=0, high=1``, ``EpsilonAlpha2Beta1``; for plain epsilon, which Zennit has no class
  for, a ``LayerMapComposite`` of ``Epsilon`` on convolutions and dense layers) are built
  with the parameters of the rules lrpjax resolves for each layer
  (`lrpjax.core.composites.Composite.rule_for`), and each layer's Zennit hook is checked
  against lrpjax's rule (the report lists the pairs). The first layer is the same in both
  (the first convolution), and so are the stabilisers: ``z + eps * sign(z)``, sign(0) = +1.
- **Batch-norm.** lrpjax's presets explain batch-norm with LRP-epsilon (the shift absorbs
  its share of relevance) and carry the `lrpjax.core.canonizers.MergeBatchNorm` canonizer;
  Zennit's presets pass relevance through batch-norm unchanged (``Pass``) and merge it with
  ``SequentialMergeBatchNorm`` only where it directly follows a linear layer, which in the
  miniVGG's Conv-ReLU-BN blocks is nowhere. So Zennit gets batch-norm -> ``Epsilon`` (the
  ``layer_map`` argument of its composites, matched before its defaults) and the weights
  lrpjax's canonizer produces (in the miniVGG: ``bn5`` folded into ``dense2``, ``bn5`` reset
  to the identity). What Zennit gives as shipped is reported beside (``stock_float32``).
- **ReLU and dropout** pass relevance in both: Zennit's ``Pass`` on ReLU gives it all of
  the relevance at its output, lrpjax's gradient rule only where the input is positive,
  which is the same here, since the layer above (batch-norm) gives none to zero inputs.
- **Max-pooling** is winner-take-all in both (the gradient), but ties differ: PyTorch's
  gradient gives a tied window's relevance to its first maximum, lrpjax's shares it
  equally. Ties are common in real images (flat regions, saturated pixels), and move
  relevance between neighbouring pixels by up to a few percent of the image's largest
  relevance. The comparison therefore gives the torch model a max-pool with lrpjax's tie
  sharing (`torch_model` with ``share_ties``; same forward pass), and reports the
  difference with PyTorch's own max-pool beside (``torch_pool_float32``). The timing uses
  PyTorch's own.
- **Output relevance**: the logit of the class lrpjax predicts, one-hot (lrpjax's default
  ``init="logit"``).


The modules, each importing only those before it:

- `lrpjax.peers.install`: `require_zennit`, `PeerMissingError`, `INSTALL_HINT` (the
  ``peers`` extra, imported only when a comparison is asked for);
- `lrpjax.peers.pytorch`: `torch_model`, the model in PyTorch;
- `lrpjax.peers.zennit_rules`: `ZENNIT_RULES` (lrpjax rule class -> Zennit rule),
  `zennit_composite`, `zennit_model`;
- `lrpjax.peers.agreement`: `compare`, `zennit_relevance`, `max_rel_diff`;
- `lrpjax.peers.timing`: `benchmark_peer`, `run_peer` (the report of ``lrpjax bench --peer
  zennit``, whose command line is `lrpjax.commands.bench`), `table`.

References:
  Anders, Neumann, Samek, Müller, Lapuschkin (2021). Software for dataset-wide XAI: from
  local explanations to global insights with Zennit, CoRelAy, and ViRelAy. arXiv:2106.13200.
"""

from lrpjax.peers.agreement import DTYPES, compare, max_rel_diff, zennit_relevance
from lrpjax.peers.install import INSTALL_HINT, PeerMissingError, require_zennit
from lrpjax.peers.pytorch import nchw, torch_model
from lrpjax.peers.timing import METHODS, benchmark_peer, environment, run_peer, table
from lrpjax.peers.zennit_rules import (
    PRESETS,
    ZENNIT_COMPOSITES,
    ZENNIT_RULES,
    ZennitRule,
    canonized,
    lrpjax_rules,
    same_rule,
    zennit_composite,
    zennit_model,
    zennit_rule,
)

__all__ = [
    "DTYPES",
    "INSTALL_HINT",
    "METHODS",
    "PRESETS",
    "ZENNIT_COMPOSITES",
    "ZENNIT_RULES",
    "PeerMissingError",
    "ZennitRule",
    "benchmark_peer",
    "canonized",
    "compare",
    "environment",
    "lrpjax_rules",
    "max_rel_diff",
    "nchw",
    "require_zennit",
    "run_peer",
    "same_rule",
    "table",
    "torch_model",
    "zennit_composite",
    "zennit_model",
    "zennit_relevance",
    "zennit_rule",
]
