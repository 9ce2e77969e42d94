"""What the metrics that run the model share: its logits in batches, the explained class,
and an ``explain`` function built from an explainer spec for those that re-explain."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrpjax.analysis import baselines

__all__ = ["explain_fn", "logits", "resolve_target"]


@lru_cache(maxsize=16)
def _forward(graphdef: nnx.GraphDef) -> Callable:
    """jit(state, x) -> logits of the model in eval mode (a copy: the caller's model keeps
    its mode)."""

    def fn(state, x):
        model = nnx.merge(graphdef, state, copy=True)
        model.eval()
        return model(x)

    return jax.jit(fn)


def logits(model: nnx.Module, x: np.ndarray | jax.Array, batch_size: int = 256) -> np.ndarray:
    """(N, C) float64 logits of the model in eval mode, in batches of `batch_size`."""
    graphdef, state = nnx.split(model)
    fn = _forward(graphdef)
    x = jnp.asarray(x)
    out = [np.asarray(fn(state, x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
    return np.concatenate(out).astype(np.float64)


def resolve_target(target, scores: np.ndarray) -> np.ndarray:
    """(N,) int32 classes: ``target`` (an int or (N,); None or -1: the top class of the
    (N, C) scores)."""
    n = len(scores)
    t = np.broadcast_to(np.asarray(-1 if target is None else target), (n,)).astype(np.int32)
    return np.where(t < 0, scores.argmax(-1), t).astype(np.int32)


def explain_fn(model: nnx.Module, spec: str | baselines.Explainer) -> Callable:
    """An ``explain(x, target, *, model=None) -> maps`` for the metrics that re-explain.

    Args:
      model: a Flax NNX model returning logits.
      spec: an explainer spec for `lrpjax.analysis.baselines.make` (``"gradient"``,
        ``"lrp:epsilon"``, ...) or an explainer ``(fn, state)`` of the model.

    Returns:
      ``explain(x (N, ...), target (N,), *, model=None) -> (N, ...)`` maps (NumPy), of
      `model` or, given ``model=``, of another model of the same structure (its state is
      used with the explainer's graph: a shifted or randomised copy).
    """
    fn, state = baselines.make(model, spec) if isinstance(spec, str) else spec
    jitted = jax.jit(fn)

    def explain(x, target, *, model: nnx.Module | None = None) -> np.ndarray:
        use = state if model is None else nnx.state(model)
        t = jnp.asarray(np.asarray(target), jnp.int32)
        return np.asarray(jitted(use, jnp.asarray(x), t))

    return explain
