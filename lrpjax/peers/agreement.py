"""Agreement of lrpjax with Zennit: logits and relevance on the same images, in float32 and
float64 (see `lrpjax.peers` for how both sides are made to compute the same explanation)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrpjax import data, models
from lrpjax.analysis import baselines
from lrpjax.core import compilation
from lrpjax.peers.install import require_zennit
from lrpjax.peers.pytorch import nchw, torch_model
from lrpjax.peers.zennit_rules import PRESETS, zennit_composite, zennit_model

__all__ = ["DTYPES", "compare", "max_rel_diff", "zennit_relevance"]

DTYPES: tuple[str, ...] = ("float32", "float64")


def _seed(target: Any) -> Callable[[Any], Any]:
    """Zennit's output relevance: the logit of `target` (one-hot times the output)."""
    torch, _ = require_zennit()

    def attr_output(out):
        onehot = torch.nn.functional.one_hot(target, out.shape[-1]).to(out)
        return onehot * out.detach()

    return attr_output


def zennit_relevance(net: Any, composite: Any, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Zennit's LRP relevance of `target`'s logit for NHWC images, returned NHWC.

    Args:
      net: a torch model (`torch_model` / `zennit_model`), float32 or float64.
      composite: a Zennit composite.
      x: (N, H, W, C) images.
      target: (N,) class indices.

    Returns:
      (N, H, W, C) relevance, as a NumPy array of the net's dtype.
    """
    torch, zennit = require_zennit()
    dtype = "float64" if next(net.parameters()).dtype == torch.float64 else "float32"
    xt = nchw(x, dtype)
    seed = _seed(torch.as_tensor(np.asarray(target), dtype=torch.long))
    with zennit.attribution.Gradient(net, composite) as attributor:
        _, relevance = attributor(xt, seed)
    return relevance.detach().permute(0, 2, 3, 1).numpy()


def max_rel_diff(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Worst image's ``max |ours - theirs| / max |theirs|`` (0 where both are all zero).

    Args:
      ours, theirs: (N, ...) arrays of one shape.

    Returns:
      The largest per-image relative difference.
    """
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    n = ours.shape[0]
    diff = np.abs(ours - theirs).reshape(n, -1).max(axis=1)
    scale = np.abs(theirs).reshape(n, -1).max(axis=1)
    rel = np.where(scale > 0, diff / np.where(scale > 0, scale, 1.0), np.where(diff > 0, np.inf, 0))
    return float(rel.max())


def compare(
    model: nnx.Module | None = None,
    images: np.ndarray | None = None,
    presets: Sequence[str] = PRESETS,
    dtypes: Sequence[str] = DTYPES,
    variants: bool = True,
) -> dict:
    """Logits and relevance of lrpjax against Zennit on the same images.

    The main comparison gives the torch model lrpjax's max-pool tie sharing (see
    `torch_model`), so that both compute one definition and any difference is the
    implementation's. With `variants`, two more float32 columns: PyTorch's own max-pool
    (the first maximum takes a tied window's relevance), and Zennit's composite as shipped
    (batch-norm passes relevance, its own canonizer, PyTorch's max-pool).

    Args:
      model: a sequential NNX model (default: the shipped miniVGG).
      images: (N, H, W, C) images in [0, 1] (default: the 100 shipped CIFAR-10 images).
      presets: names of `PRESETS`.
      dtypes: ``"float32"`` and/or ``"float64"`` (JAX with x64 enabled, torch in double);
        the model's weights are cast to it.
      variants: also compute the two float32 variants above.

    Returns:
      ``{"images", "dtypes", "rows": [...]}``: a row for the logits and one per preset,
      with ``"method"``, and per dtype the worst image's ``max |lrpjax - Zennit| / max
      |Zennit|``; ``"torch_pool_float32"`` and ``"stock_float32"`` for the variants; for
      presets ``"zennit"`` (the composite), ``"rules"`` and ``"merged"`` (as `zennit_model`
      gives them), and with both dtypes each library's float32 rounding error, its float32
      relevance against its own float64 one (``"lrpjax_float32_error"``,
      ``"zennit_float32_error"``): the scale the float32 difference is to be read against
      (LRP-epsilon divides by outputs near zero, which magnifies rounding).
    """
    torch, _ = require_zennit()
    if model is None:
        model = models.load_shipped("minivgg")[0]
    if images is None:
        images = data.sample()[0]
    images = np.asarray(images)
    models.check_images(images, images.shape[1:])
    rows: dict[str, dict] = {"logits": {"method": "logits"}}
    results: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    rows.update({f"lrp:{p}": {"method": f"lrp:{p}"} for p in presets})
    for dtype in dtypes:
        with jax.enable_x64(dtype == "float64"):
            m = models.cast(model, dtype)
            x = jnp.asarray(images, dtype)
            logits = np.asarray(m(x))
            target = logits.argmax(-1)  # both explain the class lrpjax predicts
            with torch.no_grad():
                theirs = torch_model(m, dtype)(nchw(images, dtype)).numpy()
            rows["logits"][dtype] = max_rel_diff(logits, theirs)
            for preset in presets:
                row = rows[f"lrp:{preset}"]
                fn, state = baselines.make(m, f"lrp:{preset}")
                ours = np.asarray(compilation.jit(fn)(state, x, jnp.asarray(target)))
                net, comp, info = zennit_model(m, x, preset, dtype, share_ties=True)
                theirs = zennit_relevance(net, comp, images, target)
                row[dtype] = max_rel_diff(ours, theirs)
                row.update(info)
                results[preset, dtype] = ours, theirs
                if variants and dtype == "float32":
                    net, comp, _ = zennit_model(m, x, preset, dtype)
                    row["torch_pool_float32"] = max_rel_diff(
                        ours, zennit_relevance(net, comp, images, target)
                    )
                    comp, _ = zennit_composite(m, preset, stock=True)
                    row["stock_float32"] = max_rel_diff(
                        ours, zennit_relevance(torch_model(m, dtype), comp, images, target)
                    )
    if {"float32", "float64"} <= set(dtypes):  # each library's own float32 rounding error
        for preset in presets:
            (ours32, theirs32), (ours64, theirs64) = (results[preset, d] for d in DTYPES)
            rows[f"lrp:{preset}"]["lrpjax_float32_error"] = max_rel_diff(ours32, ours64)
            rows[f"lrp:{preset}"]["zennit_float32_error"] = max_rel_diff(theirs32, theirs64)
    return {"images": len(images), "dtypes": list(dtypes), "rows": list(rows.values())}
