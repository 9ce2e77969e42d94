r"""Complexity: how concentrated a map is, whatever the model.

Each metric sees a map as the vector :math:`a` of its absolute, channel-summed relevance
(:math:`a_i = |\sum_c R_{ic}|` over the H x W pixels of an (N, H, W, C) map; the pixels of
an (N, H, W) map; every entry of any other shape) and scores it per image:

- `sparseness`, the Gini index of :math:`a` sorted ascending (Chalasani et al. 2020):
  :math:`G = \sum_{i=1}^{n} (2i - n - 1)\, a_{(i)} / (n \sum_i a_i)`, 0 for a uniform
  map, :math:`1 - 1/n` for a single pixel (higher: sparser);
- `entropy` (registered as ``complexity``, Quantus's name), the Shannon entropy of the
  map as a distribution (Bhatt et al. 2020):
  :math:`H = -\sum_i p_i \log p_i` with :math:`p_i = a_i / \sum_j a_j`, from 0 for a single
  pixel to :math:`\log n` for a uniform map (lower: simpler);
- `effective_complexity`, the number of pixels with :math:`a_i > \epsilon` (Nguyen and
  Martínez 2020; lower: simpler).

As in Quantus, :math:`10^{-7}` is added to every :math:`a_i` of the Gini index so that an
all-zero map scores 0, not NaN; an all-zero map has entropy :math:`\log n` (uniform).
All three are jit-compiled and vmapped over the batch.

References:
  Chalasani, Chen, Chowdhury, Wu, Jha (2020). Concise explanations of neural networks using
  adversarial training. ICML. Bhatt, Weller, Moura (2020). Evaluating and aggregating
  feature-based model explanations. IJCAI. Nguyen, Martínez (2020). On quantitative aspects
  of model interpretability. arXiv:2007.07584. Hedström et al. (2023). Quantus. JMLR 24(34).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lrpjax.analysis.metrics.registry import register

__all__ = ["effective_complexity", "entropy", "pixel_magnitudes", "sparseness"]

#: Added to each magnitude in the Gini index, as Quantus does (an all-zero map scores 0).
GINI_SHIFT = 1e-7


def pixel_magnitudes(maps: np.ndarray | jax.Array) -> jax.Array:
    """(N, H, W, C) -> (N, H * W): absolute channel-summed relevance per pixel (float64
    where x64 is on, else float32); (N, ...) of another rank -> (N, prod) absolute values."""
    a = jnp.asarray(maps)
    if a.ndim == 4:
        a = a.sum(axis=-1)
    return jnp.abs(a.reshape(a.shape[0], -1))


@jax.jit
def _gini(a: jax.Array) -> jax.Array:
    a = jnp.sort(a + GINI_SHIFT, axis=-1)
    n = a.shape[-1]
    weights = 2 * jnp.arange(1, n + 1, dtype=a.dtype) - n - 1
    return (a * weights).sum(-1) / (n * a.sum(-1))


@jax.jit
def _entropy(a: jax.Array) -> jax.Array:
    total = a.sum(-1, keepdims=True)
    p = jnp.where(total > 0, a / jnp.where(total > 0, total, 1.0), 1.0 / a.shape[-1])
    return -jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0).sum(-1)


@register(
    "sparseness", family="complexity", higher_is_better=True, reference="Chalasani et al. 2020"
)
def sparseness(model, x, maps, target, *, explain=None, key=None) -> np.ndarray:
    """The Gini index of each map's pixel magnitudes; see the module docstring.

    Args:
      model, x, target, explain, key: unused (the protocol of `lrpjax.analysis.metrics`).
      maps: (N, H, W, C) or (N, ...) relevance.

    Returns:
      (N,) scores in [0, 1): higher is sparser.
    """
    return np.asarray(_gini(pixel_magnitudes(maps)), np.float64)


@register("complexity", family="complexity", higher_is_better=False, reference="Bhatt et al. 2020")
def entropy(model, x, maps, target, *, explain=None, key=None) -> np.ndarray:
    """The entropy of each map's pixel magnitudes as a distribution; see the module docstring.

    Returns:
      (N,) scores in [0, log n]: lower is simpler.
    """
    return np.asarray(_entropy(pixel_magnitudes(maps)), np.float64)


@register(
    "effective_complexity",
    family="complexity",
    higher_is_better=False,
    reference="Nguyen and Martínez 2020",
)
def effective_complexity(
    model, x, maps, target, *, explain=None, key=None, eps: float = 1e-5
) -> np.ndarray:
    """The number of pixels whose magnitude exceeds `eps`; see the module docstring.

    Returns:
      (N,) counts (as float64): lower is simpler.
    """
    return np.asarray((pixel_magnitudes(maps) > eps).sum(-1), np.float64)
