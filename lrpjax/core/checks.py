"""Input checks for `lrpjax.explain`: clear errors and warnings for inputs the model or
its first rule cannot take (uint8 pixels, NaN, a wrong rank, 0..255 floats, values outside
a z^B rule's bounds, token ids reaching a layer that is not an embedding), found once per
model structure and input shape.
"""

from __future__ import annotations

import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrpjax.core import glue, layer_types, tracing
from lrpjax.core import rules as rules_lib
from lrpjax.core.layer_types import LayerError

__all__ = ["FAR_OUTSIDE", "check_input"]


def _logits(graphdef, state, x):
    model = nnx.merge(graphdef, state, copy=True)
    model.eval()
    return model(x)


def check_input(graphdef, state, composite, x) -> tuple[int, tracing.Plan]:
    """Clear errors for inputs the model or the first rule cannot take.

    Args:
      graphdef, state: the model, split.
      composite: an `lrpjax.core.composites.Composite` (its ``resolve`` gives the rules).
      x: the batch to explain.

    Returns:
      The number of classes and the model's plan (`tracing.Plan`).

    Raises:
      ValueError: for uint8, empty, NaN/Inf or wrongly shaped inputs.
    """
    if x.dtype == jnp.uint8:
        raise ValueError(
            "x is uint8 (raw pixels); convert it to float first, e.g. x / 255 for a model "
            "trained on [0, 1], as lrpjax.data loads images"
        )
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch (N, ...), got shape {x.shape}")
    if jnp.issubdtype(x.dtype, jnp.floating) and not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError("input contains NaN or Inf values")
    key = (graphdef, composite, x.shape, str(x.dtype))
    if key not in _STRUCTURES:  # traced once per model structure and input shape
        _STRUCTURES[key] = _structure(graphdef, state, composite, x)
        while len(_STRUCTURES) > 64:
            _STRUCTURES.pop(next(iter(_STRUCTURES)))
    num_classes, plan, rules, normaliser = _STRUCTURES[key]
    if normaliser is not None:
        warnings.warn(
            f"the model ends in a {normaliser}: lrpjax explains the logits below it (relevance "
            "through a softmax does not sum to a score); init='probability' puts the "
            "probability on them",
            stacklevel=3,
        )
    if x.ndim == 4 and jnp.issubdtype(x.dtype, jnp.floating):
        lo, hi = float(jnp.min(x)), float(jnp.max(x))
        if max(-lo, hi) > FAR_OUTSIDE:
            warnings.warn(
                f"x has values in [{lo:.3g}, {hi:.3g}], far outside [0, 1]: raw pixels as "
                "floats? Scale them as the model was trained (lrpjax's models and "
                "lrpjax.data use x / 255); rules with input bounds (z^B) assume [0, 1]",
                stacklevel=3,
            )
    for path in plan.takes_input:
        rule = rules[path]
        if isinstance(rule, rules_lib.ZBox):
            low, high = np.min(rule.low), np.max(rule.high)
            lo, hi = float(jnp.min(x)), float(jnp.max(x))
            if lo < low - 1e-3 or hi > high + 1e-3:
                warnings.warn(
                    f"x has values in [{lo:.3g}, {hi:.3g}], outside the bounds "
                    f"[{low:.3g}, {high:.3g}] of the z^B rule of layer {path!r}; "
                    "give the composite the input's bounds (e.g. epsilon_gamma_box(low=..., "
                    "high=...)) or rescale x",
                    stacklevel=3,
                )
    return num_classes, plan


#: Image batches with values beyond +-FAR_OUTSIDE get a warning (0..255 pixels as floats).
FAR_OUTSIDE = 10.0

#: (graphdef, composite, input shape, dtype) -> (classes, plan, rules, output softmax):
#: value-independent.
_STRUCTURES: dict[tuple, tuple[int, tracing.Plan, dict[str, rules_lib.Rule], str | None]] = {}


def _input_hint(graphdef, state, x) -> str:
    """What the model's first convolution takes, where x's rank does not fit it."""
    model = nnx.merge(graphdef, state, copy=True)
    convs = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Conv)]
    if not convs:
        return ""
    conv = convs[0]
    spatial, channels = len(conv.kernel_size), conv.in_features
    if x.ndim >= spatial + 1:  # the right rank, or one example without its batch axis
        return ""
    wanted = f"(N, {', '.join('HWD'[:spatial])}, {channels})"
    hint = f"; its first convolution takes {wanted} inputs"
    features = int(np.prod(x.shape[1:]))
    side = round((features / channels) ** (1 / spatial)) if features % channels == 0 else 0
    if side > 0 and side**spatial * channels == features:
        shape = ", ".join([str(x.shape[0]), *[str(side)] * spatial, str(channels)])
        hint += f": x.reshape({shape}) if x holds channels-last images"
    return hint


def _structure(
    graphdef, state, composite, x
) -> tuple[int, tracing.Plan, dict[str, rules_lib.Rule], str | None]:
    """The model's output classes, plan, rules and trailing softmax (None, ``"softmax"``
    or ``"log_softmax"``) on inputs like x, or a clear error."""
    try:
        out = jax.eval_shape(partial(_logits, graphdef), state, x)
    except LayerError:
        raise
    except Exception as error:
        hint = _input_hint(graphdef, state, x)
        if hint:
            raise ValueError(f"the model cannot take x of shape {x.shape}{hint}") from error
        try:
            jax.eval_shape(partial(_logits, graphdef), state, x[None])
        except Exception:
            raise ValueError(f"the model cannot take x of shape {x.shape}: {error}") from error
        raise ValueError(
            f"x of shape {x.shape} looks like one example without the batch axis; pass x[None]"
        ) from error
    if not isinstance(out, jax.ShapeDtypeStruct) or out.ndim != 2:
        raise ValueError(
            f"the model must return (N, classes) logits, got {getattr(out, 'shape', out)}"
        )
    plan = tracing.record(graphdef, state, composite, x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        for path in plan.takes_input:
            if not isinstance(plan.units[path], layer_types.EMBEDDINGS):
                raise ValueError(
                    f"x is {x.dtype} and reaches layer {path!r} "
                    f"({type(plan.units[path]).__name__}), not a token embedding; "
                    "convert it to float"
                )
    _, normaliser = glue.strip_output_softmax(jax.make_jaxpr(partial(_logits, graphdef))(state, x))
    return out.shape[-1], plan, composite.resolve(plan), normaliser
