r"""Localisation: does the map put its relevance where the evidence is?

These metrics compare a map with a ground-truth mask of the evidence (an object's
segmentation or bounding box) and need it: every one takes ``masks``, (N, H, W) bool, as
a keyword argument (a missing mask, or one of the wrong shape, is a ValueError). As in
Quantus, whose explanations are reduced over channels before they are scored, a map is
scored by its channel-summed relevance per pixel, :math:`a_i = \sum_c R_{ic}` over the
n = H x W pixels of an (N, H, W, C) map (an (N, H, W) map is taken as it is), signed
unless ``absolute=True`` (:math:`|a_i|`, Quantus's ``abs``). With :math:`s_i \in \{0, 1\}`
the mask and :math:`|s| = \sum_i s_i` its size, per image:

- `pointing_game` (Zhang et al. 2018): 1 if a pixel of maximal relevance lies in the
  mask, else 0 (ties: a hit if any maximal pixel is in the mask, as in Quantus); with
  ``weighted=True`` a hit scores :math:`1 - |s| / n`, so that hitting a large mask counts
  less (Quantus 0.6.0's weighted variant fails: it writes the (k, 1) array of the weights
  of its k hits into its 1-D boolean array of hits, which NumPy refuses with a TypeError;
  e.g. k = 3 hits of 8 x 8 masks in 32 x 32 maps, weights 0.9375. It also writes the NaN
  of an empty mask into that boolean array, so that an empty mask scores a hit, 1);
- `relevance_mass_accuracy` (Arras et al. 2022): :math:`\sum_i s_i a_i / \sum_i a_i`, the
  share of the map's relevance that falls in the mask (of a signed map it can leave
  [0, 1]; NaN where :math:`\sum_i a_i = 0`, as Quantus's 0/0);
- `relevance_rank_accuracy` (Arras et al. 2022): with :math:`P_K` the K = |s| pixels of
  highest relevance, :math:`|P_K \cap s| / K`;
- `top_k_intersection` (Theiner et al. 2021): :math:`|P_k \cap s| / k` for a fixed k;
  with ``concept_influence=True`` multiplied by :math:`n / |s|`;
- `attribution_localisation` (Kohlbrenner et al. 2020): the inside-total ratio of
  positive relevance :math:`\mu = \sum_i s_i a_i^+ / \sum_i a_i^+` (0 where the map has no
  positive relevance, as Quantus's 1e-9 in the denominator gives); with ``weighted=True``
  :math:`\mu \cdot n / |s|`, so that a uniform map scores 1 whatever the mask's size
  (Quantus multiplies by :math:`|s| / n` instead);
- `auc` (Fawcett 2006): the area under the ROC curve of the pixel scores :math:`a_i` as a
  classifier of the mask, computed as the Mann-Whitney U statistic
  :math:`\frac{1}{|s|(n - |s|)} \sum_{i: s_i} \sum_{j: \neg s_j} ([a_i > a_j] +
  \tfrac12 [a_i = a_j])`, which is what Quantus's ``sklearn.metrics.roc_curve`` and
  trapezoidal ``auc`` give: 1 for the mask itself, 0 for its complement, 0.5 for a
  constant map. NaN where the mask is empty or full.

Every score is NaN for an empty mask (as in Quantus, but for its pointing game). Quantus
also normalises the maps before scoring (``normalise_by_max``: the whole batch by its
largest absolute value, e.g. maps whose largest entries are 1 and 4 both divided by 4); a
positive scale changes none of these scores, so it is not done here. Ranks
(:math:`P_K`, :math:`P_k`) break ties by pixel index, row-major (Quantus's ``np.argsort``
breaks them arbitrarily). All metrics are jit-compiled and vmapped over the batch.

`synthetic_localisation` makes a benchmark with known evidence: a coloured square on grey
noise, whose colour alone decides the class, so that the square is the mask a correct
explanation must point into.

References:
  Zhang, Bargal, Lin, Brandt, Shen, Sclaroff (2018). Top-down neural attention by
  excitation backprop. IJCV 126, 1084-1102. Arras, Osman, Samek (2022). CLEVR-XAI: a
  benchmark dataset for the ground truth evaluation of neural network explanations.
  Information Fusion 81, 14-40. Theiner, Müller-Budack, Ewerth (2021). Interpretable
  semantic photo geolocation. arXiv:2104.14995 (WACV 2022). Kohlbrenner, Bauer, Nakajima,
  Binder, Samek, Lapuschkin (2020). Towards best practice in explaining neural network
  decisions with LRP. IJCNN. Fawcett (2006). An introduction to ROC analysis. Pattern
  Recognition Letters 27(8), 861-874. Hedström et al. (2023). Quantus. JMLR 24(34).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lrpjax.analysis.metrics.registry import register

__all__ = [
    "COLOURS",
    "TOP_K_FRACTION",
    "attribution_localisation",
    "auc",
    "ground_truth",
    "pixel_scores",
    "pointing_game",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "synthetic_localisation",
    "top_k_intersection",
]

#: Default k of `top_k_intersection` as a fraction of the pixels: Quantus's k = 1000 of a
#: 224 x 224 image (2 %), scaled to the image (20 of 32 x 32).
TOP_K_FRACTION = 1000 / 224**2

#: The square's colour of each class of `synthetic_localisation` (RGB in [0, 1]).
COLOURS = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def pixel_scores(maps: np.ndarray | jax.Array, *, absolute: bool = False) -> jax.Array:
    """(N, H, W, C) -> (N, H * W) channel-summed relevance per pixel; (N, H, W) -> (N, H * W).

    Args:
      maps: (N, H, W, C) or (N, H, W) relevance.
      absolute: take the absolute value of each pixel's sum.

    Raises:
      ValueError: maps of another rank.
    """
    a = jnp.asarray(maps)
    if a.ndim == 4:
        a = a.sum(axis=-1)
    if a.ndim != 3:
        raise ValueError(
            f"localisation metrics take (N, H, W, C) or (N, H, W) maps, not shape {a.shape}"
        )
    a = a.reshape(a.shape[0], -1)
    return jnp.abs(a) if absolute else a


def ground_truth(masks: np.ndarray | jax.Array | None, maps, metric: str) -> jax.Array:
    """The masks as (N, H * W) bool, checked against the maps' (N, H, W).

    Args:
      masks: (N, H, W) bool (or 0/1) masks of the evidence.
      maps: (N, H, W, C) or (N, H, W) maps they belong to.
      metric: the metric's name, for the error message.

    Raises:
      ValueError: maps of another rank; masks missing, or of another shape than the maps'
        (N, H, W).
    """
    if np.ndim(maps) not in (3, 4):
        raise ValueError(
            f"{metric} takes (N, H, W, C) or (N, H, W) maps, not shape {np.shape(maps)}"
        )
    want = tuple(np.shape(maps)[:3])
    if masks is None:
        raise ValueError(
            f"{metric} needs ground-truth masks: pass masks=(N, H, W) bool, here {want}"
        )
    if tuple(np.shape(masks)) != want:
        raise ValueError(
            f"{metric}: masks must be (N, H, W) = {want} like the maps, not {np.shape(masks)}"
        )
    s = jnp.asarray(masks)
    return (s if s.dtype == jnp.bool_ else s != 0).reshape(want[0], -1)


def _ranks(a: jax.Array) -> jax.Array:
    """0-based position of each pixel in the order of decreasing relevance (ties: index)."""
    order = jnp.argsort(-a, stable=True)
    return jnp.zeros_like(order).at[order].set(jnp.arange(a.shape[-1]))


def _nan_where_empty(score: jax.Array, size: jax.Array) -> jax.Array:
    return jnp.where(size > 0, score, jnp.nan)


@functools.partial(jax.jit, static_argnames="weighted")
@functools.partial(jax.vmap, in_axes=(0, 0, None))
def _pointing(a: jax.Array, s: jax.Array, weighted: bool) -> jax.Array:
    hit = jnp.any(s & (a == a.max())).astype(a.dtype)
    size = s.sum()
    if weighted:
        hit = hit * (1 - size / s.size)
    return _nan_where_empty(hit, size)


@jax.jit
@jax.vmap
def _mass(a: jax.Array, s: jax.Array) -> jax.Array:
    total = a.sum()
    ratio = jnp.where(
        total != 0, jnp.where(s, a, 0).sum() / jnp.where(total != 0, total, 1), jnp.nan
    )
    return _nan_where_empty(ratio, s.sum())


@jax.jit
@jax.vmap
def _rank(a: jax.Array, s: jax.Array) -> jax.Array:
    size = s.sum()
    hits = (s & (_ranks(a) < size)).sum()
    return _nan_where_empty(hits / jnp.maximum(size, 1), size)


@functools.partial(jax.jit, static_argnames=("k", "concept_influence"))
@functools.partial(jax.vmap, in_axes=(0, 0, None, None))
def _top_k(a: jax.Array, s: jax.Array, k: int, concept_influence: bool) -> jax.Array:
    size = s.sum()
    score = (s & (_ranks(a) < k)).sum() / k
    if concept_influence:
        score = score * s.size / jnp.maximum(size, 1)
    return _nan_where_empty(score, size)


@functools.partial(jax.jit, static_argnames="weighted")
@functools.partial(jax.vmap, in_axes=(0, 0, None))
def _inside_ratio(a: jax.Array, s: jax.Array, weighted: bool) -> jax.Array:
    total = a.sum()
    ratio = jnp.where(total > 0, jnp.where(s, a, 0).sum() / jnp.where(total > 0, total, 1), 0)
    size = s.sum()
    if weighted:
        ratio = ratio * s.size / jnp.maximum(size, 1)
    return _nan_where_empty(ratio, size)


@jax.jit
@jax.vmap
def _auc(a: jax.Array, s: jax.Array) -> jax.Array:
    positives = s.sum()
    negatives = s.size - positives
    below = jnp.sort(jnp.where(s, jnp.inf, a))  # the negatives' scores, then +inf
    lower = jnp.searchsorted(below, a, side="left")  # negatives scoring < a_i
    upper = jnp.searchsorted(below, a, side="right")  # ... scoring <= a_i
    wins = (lower + upper).astype(a.dtype) / (2 * jnp.maximum(negatives, 1))
    score = jnp.where(s, wins, 0).sum() / jnp.maximum(positives, 1)
    return jnp.where((positives > 0) & (negatives > 0), score, jnp.nan)


def _scores(fn, *args) -> np.ndarray:
    return np.asarray(fn(*args), np.float64)


@register(
    "pointing_game", family="localisation", higher_is_better=True, reference="Zhang et al. 2018"
)
def pointing_game(
    model,
    x,
    maps,
    target,
    *,
    explain=None,
    key=None,
    masks: np.ndarray | jax.Array | None = None,
    weighted: bool = False,
    absolute: bool = False,
) -> np.ndarray:
    """Whether a pixel of maximal relevance lies in the mask; see the module docstring.

    Args:
      model, x, target, explain, key: unused (the protocol of `lrpjax.analysis.metrics`).
      maps: (N, H, W, C) or (N, H, W) relevance.
      masks: (N, H, W) bool ground truth (required).
      weighted: a hit scores :math:`1 - |s| / n` instead of 1.
      absolute: score the absolute channel sums.

    Returns:
      (N,) scores in {0, 1} (weighted: [0, 1)); NaN for an empty mask. Higher is better.
    """
    s = ground_truth(masks, maps, "pointing_game")
    return _scores(_pointing, pixel_scores(maps, absolute=absolute), s, weighted)


@register(
    "relevance_mass_accuracy",
    family="localisation",
    higher_is_better=True,
    reference="Arras et al. 2022",
)
def relevance_mass_accuracy(
    model,
    x,
    maps,
    target,
    *,
    explain=None,
    key=None,
    masks: np.ndarray | jax.Array | None = None,
    absolute: bool = False,
) -> np.ndarray:
    """The share of the relevance inside the mask; see the module docstring.

    Args:
      maps: (N, H, W, C) or (N, H, W) relevance.
      masks: (N, H, W) bool ground truth (required).
      absolute: score the absolute channel sums.

    Returns:
      (N,) ratios (in [0, 1] for a non-negative map); NaN for an empty mask or a map
      summing to 0. Higher is better.
    """
    s = ground_truth(masks, maps, "relevance_mass_accuracy")
    return _scores(_mass, pixel_scores(maps, absolute=absolute), s)


@register(
    "relevance_rank_accuracy",
    family="localisation",
    higher_is_better=True,
    reference="Arras et al. 2022",
)
def relevance_rank_accuracy(
    model,
    x,
    maps,
    target,
    *,
    explain=None,
    key=None,
    masks: np.ndarray | jax.Array | None = None,
    absolute: bool = False,
) -> np.ndarray:
    """The share of the |s| most relevant pixels that lie in the mask; see the module docstring.

    Args:
      maps: (N, H, W, C) or (N, H, W) relevance.
      masks: (N, H, W) bool ground truth (required).
      absolute: rank the absolute channel sums.

    Returns:
      (N,) ratios in [0, 1]; NaN for an empty mask. Higher is better.
    """
    s = ground_truth(masks, maps, "relevance_rank_accuracy")
    return _scores(_rank, pixel_scores(maps, absolute=absolute), s)


@register(
    "top_k_intersection",
    family="localisation",
    higher_is_better=True,
    reference="Theiner et al. 2021",
)
def top_k_intersection(
    model,
    x,
    maps,
    target,
    *,
    explain=None,
    key=None,
    masks: np.ndarray | jax.Array | None = None,
    k: int | None = None,
    concept_influence: bool = False,
    absolute: bool = False,
) -> np.ndarray:
    """The share of the k most relevant pixels that lie in the mask; see the module docstring.

    Args:
      maps: (N, H, W, C) or (N, H, W) relevance.
      masks: (N, H, W) bool ground truth (required).
      k: the number of pixels; default `TOP_K_FRACTION` of them, rounded (at least 1).
        Quantus's default is k = 1000 whatever the image size.
      concept_influence: multiply by :math:`n / |s|` (Quantus's ``concept_influence``).
      absolute: rank the absolute channel sums.

    Returns:
      (N,) ratios in [0, 1] (concept influence: [0, n / |s|]); NaN for an empty mask.
      Higher is better.

    Raises:
      ValueError: k outside 1..H * W.
    """
    s = ground_truth(masks, maps, "top_k_intersection")
    n = s.shape[1]
    k = max(1, round(TOP_K_FRACTION * n)) if k is None else int(k)
    if not 1 <= k <= n:
        raise ValueError(f"top_k_intersection: k must be in 1..{n} (the pixels), not {k}")
    return _scores(_top_k, pixel_scores(maps, absolute=absolute), s, k, concept_influence)


@register(
    "attribution_localisation",
    family="localisation",
    higher_is_better=True,
    reference="Kohlbrenner et al. 2020",
)
def attribution_localisation(
    model,
    x,
    maps,
    target,
    *,
    explain=None,
    key=None,
    masks: np.ndarray | jax.Array | None = None,
    weighted: bool = False,
    absolute: bool = False,
) -> np.ndarray:
    r"""The share of the positive relevance inside the mask; see the module docstring.

    Kohlbrenner et al. score the positive relevance, :math:`a_i^+ = \max(a_i, 0)`, and so
    does this by default; Quantus's default (``abs=True``) scores :math:`|a_i|`, which is
    ``absolute=True`` here. Quantus's weighted variant multiplies by :math:`|s| / n`, with
    its n the size of ``x_batch[2:]`` (the batch less two images, so that the weight
    depends on the batch size: for a batch of 8 RGB 32 x 32 images and a 64-pixel mask,
    64 / (6 * 3 * 1024) = 0.0035, where 64 / 1024 = 0.0625 was meant); this multiplies by
    :math:`n / |s|`, the chance level's inverse, so that 1 is a uniform map's score for
    every mask size.

    Args:
      maps: (N, H, W, C) or (N, H, W) relevance.
      masks: (N, H, W) bool ground truth (required).
      weighted: multiply by :math:`n / |s|` (1 for a uniform map).
      absolute: score :math:`|a_i|` instead of :math:`a_i^+`.

    Returns:
      (N,) ratios in [0, 1] (weighted: [0, n / |s|]); NaN for an empty mask. Higher is
      better.
    """
    s = ground_truth(masks, maps, "attribution_localisation")
    a = pixel_scores(maps, absolute=absolute)
    return _scores(_inside_ratio, jnp.maximum(a, 0), s, weighted)


@register("auc", family="localisation", higher_is_better=True, reference="Fawcett 2006")
def auc(
    model,
    x,
    maps,
    target,
    *,
    explain=None,
    key=None,
    masks: np.ndarray | jax.Array | None = None,
    absolute: bool = False,
) -> np.ndarray:
    """ROC AUC of the pixel scores against the mask (Mann-Whitney U); see the module docstring.

    Args:
      maps: (N, H, W, C) or (N, H, W) relevance.
      masks: (N, H, W) bool ground truth (required).
      absolute: score the absolute channel sums.

    Returns:
      (N,) areas in [0, 1] (0.5: chance); NaN for an empty or a full mask. Higher is better.
    """
    s = ground_truth(masks, maps, "auc")
    return _scores(_auc, pixel_scores(maps, absolute=absolute), s)


def synthetic_localisation(
    n: int, size: int = 32, seed: int = 0, *, square: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A benchmark whose evidence is known: one coloured square per image on grey noise.

    The background is grey-level noise, uniform in [0.2, 0.8] per pixel, with a
    per-channel jitter uniform in [-0.05, 0.05], so that no background pixel is strongly
    coloured; a square of ``square`` x ``square`` pixels, at a uniformly random position
    inside the image, is painted in one of the pure colours `COLOURS` (red, green, blue).
    The colour is the label: a model that classifies these images correctly has to find
    the square, which is the mask. Images, masks and labels depend on ``seed`` only.

    Args:
      n: number of images.
      size: image height and width.
      seed: NumPy random seed.
      square: the square's side; default ``size // 4`` (8 of 32: 6.25 % of the pixels).

    Returns:
      ``(images, masks, labels)``: (n, size, size, 3) float32 in [0, 1], (n, size, size)
      bool (the square), (n,) int32 in {0, 1, 2}.

    Raises:
      ValueError: a square that does not fit the image.
    """
    side = size // 4 if square is None else int(square)
    if not 1 <= side <= size:
        raise ValueError(f"the square's side must be in 1..{size}, not {side}")
    rng = np.random.default_rng(seed)
    grey = rng.uniform(0.2, 0.8, (n, size, size, 1))
    images = grey + rng.uniform(-0.05, 0.05, (n, size, size, 3))
    labels = rng.integers(0, len(COLOURS), n).astype(np.int32)
    corners = rng.integers(0, size - side + 1, (n, 2))
    masks = np.zeros((n, size, size), bool)
    for i, (r, c) in enumerate(corners):
        masks[i, r : r + side, c : c + side] = True
    images[masks] = np.asarray(COLOURS)[np.repeat(labels, side * side)]
    return images.astype(np.float32), masks, labels
