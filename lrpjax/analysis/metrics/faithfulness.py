r"""Faithfulness: does the model's output change as the map says it should?

Each metric perturbs the input where the map points and watches the model's score
:math:`f_t` of the explained class t (its logit, or with ``score="probability"`` its
softmax probability; the default of each metric is Quantus's ``softmax``). Features are
pixels: of an (N, H, W, C) image the F = H x W pixels, all channels of a pixel removed
together, with the channel-summed relevance :math:`a_p = \sum_c R_{pc}` (an (N, H, W) map
is taken as it is). Quantus removes single entries of a channel-first array ranked by
the map broadcast to every channel; for a channel-summed map the two agree up to the
order of ties. "Removing" a pixel replaces it by the ``fill``: ``"black"`` (Quantus's
default: the image's minimum over all entries), ``"white"`` (its maximum), ``"mean"``
(its mean), a number, an array broadcastable to x, ``"blur"`` (a Gaussian blur of the
image, `lrpjax.analysis.metrics.perturbation`'s, sigma 1 or half the patch) or
``"uniform"`` (noise in [0, 1), one draw per image: image i's from
``fold_in(fold_in(key, FILL_STREAM), i)``). Quantus takes the
baseline of the array being perturbed at each step, and its ``"uniform"`` is one number
per image and step; here the fill is always the original image's (the same for
``"black"`` and ``"white"``, which removal does not move). Rankings
break ties by pixel index, row-major (a stable sort; Quantus's ``np.argsort`` breaks
them arbitrarily). With :math:`x_{\setminus S}` the image with the pixels S removed and
:math:`\mathrm{AUC}(c) = \sum_{k=1}^{L-1} (c_k + c_{k+1}) / 2` the trapezoidal area of a
curve :math:`c_1, \dots, c_L` (unit spacing, as Quantus's ``np.trapz``), per image:

- `pixel_flipping` (Bach et al. 2015): the pixels are removed cumulatively, most
  relevant first, ``features_in_step`` per step; the curve
  :math:`c_k = f_t(x_{\setminus S_k})` with :math:`S_k` the :math:`k s` most relevant
  pixels, k = 1..ceil(F / s) (`pixel_flipping_curves`; without the unperturbed score, as
  Quantus), scored by its AUC (Quantus's ``return_auc_per_sample``; lower is better).
- `selectivity` (Montavon et al. 2018): as pixel flipping over a grid of square
  ``patch_size`` patches (edge patches smaller), ranked by their summed relevance
  (`selectivity_curves`); its AUC, lower is better (Quantus's ``get_auc_score``).
- `faithfulness_correlation` (Bhatt et al. 2020): ``runs`` random subsets S of
  ``subset_size`` pixels (drawn with ``key``), scored by the Pearson correlation over the
  subsets of :math:`\sum_{p \in S} a_p` and :math:`f_t(x) - f_t(x_{\setminus S})`
  (higher is better).
- `sensitivity_n` (Ancona et al. 2018): the same correlation for each subset size n of
  ``sizes`` (`sensitivity_n_curves`, (N, len(sizes))), scored by its mean over n
  (higher is better). Quantus 0.6.0's ``SensitivityN`` instead removes the top-n pixels
  (one subset per image), correlates over the images of a batch, and pairs cumulative
  output changes with the relevance of the last step only, so that its score depends on
  the batch: it returns one number per step n, not per image (the Pearson correlation
  over the images of the first batch only, where ``batch_size`` splits them); this
  follows the paper: random subsets, one correlation per image and n.
- `faithfulness_estimate` (Alvarez-Melis and Jaakkola 2018): the pixels, most relevant
  first, in groups of ``features_in_step``; each group G is removed alone, and the score
  is the Pearson correlation over the groups of :math:`\sum_{p \in G} a_p` and
  :math:`f_t(x) - f_t(x_{\setminus G})` (higher is better).
- `monotonicity` (Arya et al. 2019): starting from the fill image, the pixels are put
  back, least relevant first (of :math:`|a_p|`, Quantus's ``abs=True``),
  ``features_in_step`` per step; 1 if the score never decreases,
  :math:`c_{k+1} \ge c_k` for all k, else 0 (higher is better). Quantus 0.6.0 fills the
  "restored" pixels with the baseline again (its ``perturb_func`` is baseline
  replacement), so that the image never changes and every map scores 1 (True); here the
  image's pixels are restored, as in Arya et al.
- `monotonicity_correlation` (Nguyen and Martínez 2020): each group G of
  ``features_in_step`` pixels, least relevant first (of :math:`|a_p|`), is replaced by
  ``samples`` draws of uniform noise in [0, 1) (Quantus's default fill; a deterministic
  fill makes the draws equal, so it is evaluated once); with
  :math:`v_G = \frac{1}{s^2} \operatorname{mean}_{draws} (f_t(x) - f_t(\tilde x_G))^2`,
  :math:`s = |f_t(x)|` (1 if below ``eps``; a per-image constant, which does not change
  the score), the score is the Spearman rank correlation over the groups of
  :math:`\sum_{p \in G} |a_p|` and :math:`v_G` (higher is better).
- `road_morf`, `road_lerf` (Rong et al. 2022; `road_curves`): for each percentage p of
  ``percentages`` (Quantus's 1, 3, ..., 99), the floor(p F / 100) most (MoRF) or least
  (LeRF) relevant pixels are imputed by noisy linear imputation
  (`noisy_linear_imputation`), and the curve records whether the model still predicts
  the explained class (Quantus's score; ``score="probability"`` or ``"logit"`` records
  the score instead); scored by the curve's mean over the percentages (MoRF: lower is
  better; LeRF: higher is better). Quantus averages the curve over the images instead
  of over the percentages, and scores MoRF only. Quantus 0.6.0's ``ROAD`` fails on
  multi-channel images: it ranks the C H W entries of the map broadcast to every channel
  and indexes the H W pixels of its imputation with those ranks (an IndexError: for a
  32 x 32 RGB image, ranks up to 3071 into 1024 pixels).
- `infidelity` (Yeh et al. 2019): ``samples`` Gaussian perturbations
  :math:`I \sim \mathcal N(0, \sigma^2)` of every input entry (drawn with ``key``),
  :math:`\mathrm{INFD} = \operatorname{mean}_I \big(I \cdot R - (f_t(x) - f_t(x - I))
  \big)^2` (lower is better); ``normalise=True`` first scales the map by the optimal
  :math:`\beta = \operatorname{mean}(I \cdot R\, \Delta f) / \operatorname{mean}((I \cdot
  R)^2)`, as Yeh et al.'s code does (an (N, H, W) map is broadcast over the channels).
  Quantus 0.6.0's ``Infidelity`` is not Yeh's: it replaces square patches by a
  deterministic baseline, cumulatively in reading order (with 8 x 8 patches of a 32 x 32
  image, its 16 perturbations remove patches 1, 1-2, ..., 1-16), scores the mean squared
  gap between :math:`f_t(x) - f_t(x')` and :math:`\sum R\,(x - x')`, and repeats this
  identical computation ``n_perturb_samples`` times.
- `irof` (Rieger and Hansen 2020): the image is cut into SLIC superpixels (scikit-image,
  ``slic(x, start_label=0)`` with its defaults, as Quantus; an optional dependency, or
  pass ``segments``), ranked by their mean relevance and removed cumulatively, most
  relevant first, filled with the image's mean (Quantus: the mean of the whole batch,
  recomputed at each step); with the curve :math:`c_k = f_t(x_{\setminus S_k}) / f_t(x)`,
  k = 1..L (L segments), the score is the area over it, :math:`L - \mathrm{AUC}(c)`
  (higher is better). Quantus pads the curves of a batch to its largest L with zeros,
  which adds :math:`c_L / 2` to the AUC of an image with fewer segments (its score is
  :math:`c_L / 2` lower); here each image uses its own L. Quantus 0.6.0's ``IROF`` fails on
  multi-channel images: its segment mask, (N, 1, H, W), fails the shape check of its own
  ``baseline_replacement_by_mask`` against the (N, C, H, W) images (an AssertionError).

Quantus normalises the maps first (``normalise=True``: the whole batch by its largest
absolute value, e.g. maps whose largest entries are 1 and 4 both divided by 4); every
score here but infidelity is invariant to a positive scale, and Quantus's infidelity
does not normalise (``normalise=False``), so no map is normalised.

Every model-running metric builds all of its perturbed inputs from a small description
of each (an image index and a step, a subset size or a random key) inside one
jit-compiled, vmapped function of a chunk of ``batch_size`` perturbed inputs (one
compiled program per metric, model and shape: the last chunk is padded), so the model
runs on full batches whatever the number of steps. Random draws are reproducible: the
perturbation number j of a metric (numbered image by image, ``j = i * per_image + k``)
uses ``jax.random.fold_in(key, j)``; the exact draws are given with each metric.

References:
  Bach, Binder, Montavon, Klauschen, Müller, Samek (2015). On pixel-wise explanations for
  non-linear classifier decisions by layer-wise relevance propagation. PLoS ONE 10(7).
  Montavon, Samek, Müller (2018). Methods for interpreting and understanding deep neural
  networks. Digital Signal Processing 73, 1-15. Bhatt, Weller, Moura (2020). Evaluating
  and aggregating feature-based model explanations. IJCAI. Ancona, Ceolini, Öztireli,
  Gross (2018). Towards better understanding of gradient-based attribution methods for
  deep neural networks. ICLR. Alvarez-Melis, Jaakkola (2018). Towards robust
  interpretability with self-explaining neural networks. NeurIPS. Arya et al. (2019). One
  explanation does not fit all: a toolkit and taxonomy of AI explainability techniques.
  arXiv:1909.03012. Nguyen, Martínez (2020). On quantitative aspects of model
  interpretability. arXiv:2007.07584. Rong, Leemann, Borisov, Kasneci, Kasneci (2022). A
  consistent and efficient evaluation strategy for attribution methods. ICML. Yeh, Hsieh,
  Suggala, Inouye, Ravikumar (2019). On the (in)fidelity and sensitivity of explanations.
  NeurIPS. Rieger, Hansen (2020). IROF: a low resource evaluation metric for explanation
  methods. arXiv:2003.08747. Hedström et al. (2023). Quantus. JMLR 24(34).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrpjax.analysis.metrics.axiomatic import baseline_input
from lrpjax.analysis.metrics.perturbation import _blur
from lrpjax.analysis.metrics.registry import register
from lrpjax.analysis.metrics.scoring import logits, resolve_target

__all__ = [
    "FILLS",
    "FILL_STREAM",
    "IMPUTATION_WEIGHTS",
    "ROAD_PERCENTAGES",
    "SCORES",
    "curve_auc",
    "faithfulness_correlation",
    "faithfulness_estimate",
    "infidelity",
    "irof",
    "monotonicity",
    "monotonicity_correlation",
    "noisy_linear_imputation",
    "pearson",
    "pixel_flipping",
    "pixel_flipping_curves",
    "road_curves",
    "road_lerf",
    "road_morf",
    "selectivity",
    "selectivity_curves",
    "sensitivity_n",
    "sensitivity_n_curves",
    "spearman_rank",
]

#: Named fills of removed pixels (besides a number or an array).
FILLS = ("black", "white", "mean", "blur", "uniform")
#: ``fold_in`` number of the key stream of ``"uniform"`` fills (kept apart from the
#: perturbations' streams ``fold_in(key, j)``, j < 2**31 - 1).
FILL_STREAM = 2**31 - 1
#: The model scores a curve can record.
SCORES = ("logit", "probability")
#: Quantus's ROAD percentages: 1, 3, ..., 99.
ROAD_PERCENTAGES = tuple(range(1, 100, 2))
#: Noisy linear imputation's neighbour weights (Rong et al. 2022): 1/6 for the four
#: direct neighbours, 1/12 for the four diagonal ones.
IMPUTATION_WEIGHTS = np.asarray([[1, 2, 1], [2, 0, 2], [1, 2, 1]], np.float64) / 12


# --- shared pieces ---------------------------------------------------------------------


def _images(x, maps, name: str) -> tuple[jax.Array, jax.Array]:
    """(N, H, W, C) images and their (N, H, W) channel-summed relevance."""
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"{name}: images must be (N, H, W, C), got {x.shape}")
    r = jnp.asarray(maps)
    if r.ndim == 4:
        r = r.sum(-1)
    if r.shape != x.shape[:3]:
        raise ValueError(f"{name}: maps of shape {np.shape(maps)} for images {x.shape}")
    return x, r.astype(jnp.promote_types(x.dtype, jnp.float32))


def _key(key) -> jax.Array:
    return jax.random.key(0) if key is None else key


def _fill(x: jax.Array, fill, key, sigma: float = 1.0) -> jax.Array:
    """(N, H, W, C) values that replace removed pixels (see `FILLS`)."""
    if isinstance(fill, str) and fill == "blur":
        return jnp.asarray(_blur(np.asarray(x), sigma=sigma), x.dtype)
    if isinstance(fill, str) and fill == "uniform":
        base = jax.random.fold_in(_key(key), FILL_STREAM)
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(len(x)))
        return jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:], x.dtype))(keys)
    if isinstance(fill, str) and fill not in FILLS:
        raise ValueError(f"unknown fill {fill!r}; choose from {', '.join(FILLS)} or a number")
    return baseline_input(x, fill).astype(x.dtype)


def _check_score(score: str, allowed: Sequence[str] = SCORES) -> None:
    if score not in allowed:
        raise ValueError(f"unknown score {score!r}; choose from {', '.join(allowed)}")


def _base(model, x, target, score: str, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The explained classes (N,) int32 and the unperturbed scores (N,) float64."""
    z = logits(model, x, batch_size)
    t = resolve_target(target, z)
    if score == "probability":
        z = np.exp(z - z.max(-1, keepdims=True))
        z /= z.sum(-1, keepdims=True)
    return t, z[np.arange(len(t)), t]


@functools.partial(jax.jit, static_argnames="descending")
def _ranks(a: jax.Array, descending: bool) -> jax.Array:
    """(N, ...) -> (N, ...) int32: each entry's place in its image's ranking (0: first),
    ties by index (row-major)."""
    flat = a.reshape(len(a), -1)
    order = jnp.argsort(-flat if descending else flat, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1).astype(jnp.int32).reshape(a.shape)


@lru_cache(maxsize=64)
def _runner(graphdef: nnx.GraphDef, perturb: Callable, score: str) -> Callable:
    """jit(state, shared, per_image, image, item, target) -> (score of the target, predicted
    class, auxiliary value) of each perturbed input ``perturb(shared, per_image[image],
    item)`` of a chunk, vmapped over the chunk."""

    def fn(state, shared, per_image, image, item, target):
        data = jax.tree.map(lambda v: v[image], per_image)
        xp, aux = jax.vmap(perturb, in_axes=(None, 0, 0))(shared, data, item)
        model = nnx.merge(graphdef, state, copy=True)
        model.eval()
        out = model(xp)
        predicted = out.argmax(-1)
        if score == "probability":
            out = jax.nn.softmax(out, axis=-1)
        return jnp.take_along_axis(out, target[image][:, None], axis=1)[:, 0], predicted, aux

    return jax.jit(fn)


def _run(model, perturb, shared, per_image, image, item, target, score, batch_size):
    """Run the model on every perturbed input, ``batch_size`` at a time.

    Returns:
      (M,) float64 scores of the targets, (M,) int predicted classes, (M,) float64 aux.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    m = len(image)
    if m == 0:
        return np.zeros(0), np.zeros(0, np.int64), np.zeros(0)
    chunk = min(batch_size, m)
    pad = -m % chunk
    image = jnp.asarray(np.pad(np.asarray(image, np.int32), (0, pad)))
    item = {k: jnp.asarray(np.pad(np.asarray(v), (0, pad))) for k, v in item.items()}
    graphdef, state = nnx.split(model)
    fn = _runner(graphdef, perturb, score)
    target = jnp.asarray(target, jnp.int32)
    outs = [
        fn(state, shared, per_image, image[i : i + chunk],
           {k: v[i : i + chunk] for k, v in item.items()}, target)
        for i in range(0, m + pad, chunk)
    ]  # fmt: skip
    scores, predicted, aux = (
        np.concatenate([np.asarray(o[j]) for o in outs])[:m] for j in range(3)
    )
    return scores.astype(np.float64), predicted, aux.astype(np.float64)


def _removed(d, lo, hi):
    return (d["rank"] >= lo) & (d["rank"] < hi)


def _ranked(shared, d, item):
    """Pixels ranked in [lo, hi) replaced by the fill; aux: their relevance."""
    m = _removed(d, item["lo"], item["hi"])
    return jnp.where(m[..., None], d["fill"], d["x"]), jnp.where(m, d["a"], 0).sum()


def _ranked_noise(shared, d, item):
    """Pixels ranked in [lo, hi) replaced by uniform noise from fold_in(key, id)."""
    m = _removed(d, item["lo"], item["hi"])
    k = jax.random.fold_in(shared["key"], item["id"])
    noise = jax.random.uniform(k, d["x"].shape, d["x"].dtype)
    return jnp.where(m[..., None], noise, d["x"]), jnp.where(m, d["a"], 0).sum()


def _subset_mask(key, ident, shape, size):
    """The pixels ``permutation(fold_in(key, ident), H * W)[:size]`` as an (H, W) mask."""
    f = math.prod(shape)
    perm = jax.random.permutation(jax.random.fold_in(key, ident), f)
    return jnp.zeros(f, bool).at[perm].set(jnp.arange(f) < size).reshape(shape)


def _subset(shared, d, item):
    """A random subset of ``size`` pixels replaced by the fill; aux: its relevance."""
    m = _subset_mask(shared["key"], item["id"], d["a"].shape, item["size"])
    return jnp.where(m[..., None], d["fill"], d["x"]), jnp.where(m, d["a"], 0).sum()


def pearson(a, b) -> np.ndarray:
    """Pearson correlation along the last axis (NaN where either side is constant)."""
    return np.asarray(_pearson(jnp.asarray(a), jnp.asarray(b)), np.float64)


@jax.jit
def _pearson(a, b):
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    den = jnp.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    return jnp.where(den > 0, (a * b).sum(-1) / jnp.where(den > 0, den, 1), jnp.nan)


def _rankdata(v):
    """Ranks 1..n along the last axis, ties given their average rank."""
    v = v.astype(jnp.result_type(v.dtype, jnp.float32))
    s = jnp.sort(v, axis=-1)
    below = jnp.vectorize(
        lambda s, v: jnp.searchsorted(s, v, side="left"), signature="(n),(n)->(n)"
    )
    upto = jnp.vectorize(
        lambda s, v: jnp.searchsorted(s, v, side="right"), signature="(n),(n)->(n)"
    )
    return ((below(s, v) + upto(s, v) + 1) / 2).astype(v.dtype)


def spearman_rank(a, b) -> np.ndarray:
    """Spearman rank correlation along the last axis (average ranks for ties; NaN where
    either side is constant), as ``scipy.stats.spearmanr``."""
    return np.asarray(_spearman(jnp.asarray(a), jnp.asarray(b)), np.float64)


@jax.jit
def _spearman(a, b):
    return _pearson(_rankdata(a), _rankdata(b))


def curve_auc(curves) -> np.ndarray:
    r"""Trapezoidal area under each curve with unit spacing, :math:`\sum_k (c_k +
    c_{k+1}) / 2` (Quantus's ``calculate_auc``; 0 for a single point)."""
    c = np.asarray(curves, np.float64)
    return ((c[..., :-1] + c[..., 1:]) / 2).sum(-1)


def _steps(count: int, features_in_step: int) -> int:
    if features_in_step < 1:
        raise ValueError(f"features_in_step must be positive, got {features_in_step}")
    return -(-count // features_in_step)


# --- pixel flipping, selectivity ---------------------------------------------------------


def _cumulative(model, x, fill, rank, a, t, hi, score, batch_size):
    """(N, len(hi)) scores with the pixels ranked below hi[k] removed, step k."""
    n, steps = len(x), len(hi)
    per_image = {"x": x, "fill": fill, "rank": rank, "a": a}
    item = {"lo": np.zeros(n * steps, np.int32), "hi": np.tile(np.asarray(hi, np.int32), n)}
    image = np.repeat(np.arange(n), steps)
    scores, _, _ = _run(model, _ranked, {}, per_image, image, item, t, score, batch_size)
    return scores.reshape(n, steps)


def pixel_flipping_curves(
    model: nnx.Module,
    x: np.ndarray | jax.Array,
    maps: np.ndarray | jax.Array,
    target=None,
    *,
    features_in_step: int = 1,
    fill: float | str | np.ndarray = "black",
    score: str = "probability",
    key: jax.Array | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """Pixel-flipping curves (Bach et al. 2015); see the module docstring.

    Args:
      model: a Flax NNX model returning logits (run in eval mode, on a copy).
      x: (N, H, W, C) images.
      maps: (N, H, W, C) or (N, H, W) relevance.
      target: (N,) or int explained classes (None or -1: the predicted class).
      features_in_step: pixels removed per step.
      fill: what replaces a removed pixel (`FILLS`, a number or an array).
      score: ``"probability"`` (Quantus's default softmax) or ``"logit"``.
      key: ``jax.random`` key of a ``"uniform"`` fill (default key 0).
      batch_size: perturbed images per model call.

    Returns:
      (N, ceil(H W / features_in_step)) float64: column k - 1 is the score after the k
      steps' pixels, most relevant first, were removed.
    """
    _check_score(score)
    x, a = _images(x, maps, "pixel_flipping")
    t, _ = _base(model, x, target, score, batch_size)
    steps = _steps(a[0].size, features_in_step)
    hi = np.arange(1, steps + 1) * features_in_step
    rank = _ranks(a, descending=True)
    return _cumulative(model, x, _fill(x, fill, key), rank, a, t, hi, score, batch_size)


@register(
    "pixel_flipping", family="faithfulness", higher_is_better=False, reference="Bach et al. 2015"
)
def pixel_flipping(model, x, maps, target, *, explain=None, key=None, **settings) -> np.ndarray:
    """The AUC of `pixel_flipping_curves` per image (keyword settings as there).

    Returns:
      (N,) areas under the curve of the score: lower is more faithful.
    """
    return curve_auc(pixel_flipping_curves(model, x, maps, target, key=key, **settings))


def selectivity_curves(
    model: nnx.Module,
    x: np.ndarray | jax.Array,
    maps: np.ndarray | jax.Array,
    target=None,
    *,
    patch_size: int = 8,
    fill: float | str | np.ndarray = "black",
    score: str = "probability",
    key: jax.Array | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """Selectivity curves (Montavon et al. 2018): patches removed, most relevant first.

    Args:
      model, x, maps, target, fill, score, key, batch_size: as `pixel_flipping_curves`
        (a ``"blur"`` fill has sigma ``patch_size / 2``).
      patch_size: side of the square patches of a grid (edge patches are smaller when H or
        W is not a multiple), ranked by their summed relevance.

    Returns:
      (N, ceil(H / patch_size) * ceil(W / patch_size)) float64: column k - 1 is the score
      after the k most relevant patches were removed.
    """
    _check_score(score)
    if patch_size < 1:
        raise ValueError(f"patch_size must be positive, got {patch_size}")
    x, a = _images(x, maps, "selectivity")
    n, h, w = a.shape
    gh, gw = -(-h // patch_size), -(-w // patch_size)
    padded = jnp.pad(a, ((0, 0), (0, gh * patch_size - h), (0, gw * patch_size - w)))
    patches = padded.reshape(n, gh, patch_size, gw, patch_size).sum((2, 4))
    patch_rank = _ranks(patches, descending=True)  # (N, gh, gw)
    rank = jnp.repeat(jnp.repeat(patch_rank, patch_size, 1), patch_size, 2)[:, :h, :w]
    t, _ = _base(model, x, target, score, batch_size)
    fills = _fill(x, fill, key, sigma=max(patch_size / 2, 1.0))
    return _cumulative(model, x, fills, rank, a, t, np.arange(1, gh * gw + 1), score, batch_size)


@register(
    "selectivity", family="faithfulness", higher_is_better=False, reference="Montavon et al. 2018"
)
def selectivity(model, x, maps, target, *, explain=None, key=None, **settings) -> np.ndarray:
    """The AUC of `selectivity_curves` per image (keyword settings as there).

    Returns:
      (N,) areas under the curve of the score: lower is more faithful.
    """
    return curve_auc(selectivity_curves(model, x, maps, target, key=key, **settings))


# --- faithfulness correlation, sensitivity-n ---------------------------------------------


def sensitivity_n_curves(
    model: nnx.Module,
    x: np.ndarray | jax.Array,
    maps: np.ndarray | jax.Array,
    target=None,
    *,
    key: jax.Array | None = None,
    sizes: Sequence[int] | None = None,
    runs: int = 100,
    fill: float | str | np.ndarray = "black",
    score: str = "probability",
    batch_size: int = 256,
) -> np.ndarray:
    r"""Sensitivity-n (Ancona et al. 2018): per subset size, the Pearson correlation of the
    subsets' relevance and the output drop; see the module docstring.

    Args:
      model, x, maps, target, fill, score, batch_size: as `pixel_flipping_curves`.
      key: ``jax.random`` key of the subsets (default key 0): run r of size j of image i
        removes the pixels (row-major) ``jax.random.permutation(fold_in(key, (i * J + j)
        * runs + r), H * W)[:sizes[j]]``, J = len(sizes).
      sizes: subset sizes n; default 8 sizes spaced geometrically from 1 to 80% of the
        pixels (Quantus's ``n_max_percentage``).
      runs: random subsets per size and image.

    Returns:
      (N, len(sizes)) float64 correlations (NaN where either side is constant).

    Raises:
      ValueError: a size outside 1..H W, runs < 2, or bad shapes.
    """
    _check_score(score)
    x, a = _images(x, maps, "sensitivity_n")
    f = a[0].size
    if sizes is None:
        sizes = np.unique(np.round(np.geomspace(1, max(1, 0.8 * f), 8)).astype(int))
    sizes = np.asarray(sizes, np.int32).reshape(-1)
    if len(sizes) == 0 or sizes.min() < 1 or sizes.max() > f:
        raise ValueError(f"subset sizes must lie in 1..{f} (the pixels), got {sizes.tolist()}")
    if runs < 2:
        raise ValueError(f"runs must be >= 2 (a correlation over the runs), got {runs}")
    n, j = len(x), len(sizes)
    t, f0 = _base(model, x, target, score, batch_size)
    per_image = {"x": x, "fill": _fill(x, fill, key), "a": a}
    ident = np.arange(n * j * runs, dtype=np.int32)
    item = {"id": ident, "size": np.tile(np.repeat(sizes, runs), n)}
    image = np.repeat(np.arange(n), j * runs)
    shared = {"key": _key(key)}
    scores, _, sums = _run(model, _subset, shared, per_image, image, item, t, score, batch_size)
    drops = (f0[:, None] - scores.reshape(n, j * runs)).reshape(n, j, runs)
    return pearson(sums.reshape(n, j, runs), drops)


@register(
    "sensitivity_n", family="faithfulness", higher_is_better=True, reference="Ancona et al. 2018"
)
def sensitivity_n(model, x, maps, target, *, explain=None, key=None, **settings) -> np.ndarray:
    """The mean over the subset sizes of `sensitivity_n_curves` (keyword settings as there).

    Returns:
      (N,) mean correlations: higher is more faithful.
    """
    return sensitivity_n_curves(model, x, maps, target, key=key, **settings).mean(-1)


@register(
    "faithfulness_correlation",
    family="faithfulness",
    higher_is_better=True,
    reference="Bhatt et al. 2020",
)
def faithfulness_correlation(
    model,
    x,
    maps,
    target,
    *,
    explain=None,
    key: jax.Array | None = None,
    runs: int = 100,
    subset_size: int = 224,
    fill: float | str | np.ndarray = "black",
    score: str = "logit",
    batch_size: int = 256,
) -> np.ndarray:
    r"""Pearson correlation of the relevance of random pixel subsets and the output drop
    when they are removed (Bhatt et al. 2020); see the module docstring.

    Args:
      model, x, maps, target, fill, batch_size: as `pixel_flipping_curves`.
      explain: unused.
      key: ``jax.random`` key of the subsets (default key 0): run r of image i removes the
        pixels ``jax.random.permutation(fold_in(key, i * runs + r), H * W)[:subset_size]``.
      runs: subsets per image (Quantus's ``nr_runs``).
      subset_size: pixels per subset (Quantus's 224, of entries there).
      score: ``"logit"`` (Quantus's default) or ``"probability"``.

    Returns:
      (N,) correlations in [-1, 1] (NaN where either side is constant): higher is better.
    """
    return sensitivity_n_curves(
        model, x, maps, target, key=key, sizes=[subset_size], runs=runs, fill=fill,
        score=score, batch_size=batch_size,
    )[:, 0]  # fmt: skip


# --- faithfulness estimate, monotonicity -------------------------------------------------


def _groups(model, x, fill, rank, a, t, steps, s, score, batch_size, perturb, shared, repeats):
    """Each group k (ranks [k s, (k + 1) s)) removed alone, `repeats` times.

    Returns (N, steps, repeats) scores and (N, steps, repeats) relevance of the groups.
    """
    n = len(x)
    lo = np.repeat(np.arange(steps) * s, repeats)
    item = {
        "id": np.arange(n * steps * repeats, dtype=np.int32),
        "lo": np.tile(lo, n).astype(np.int32),
        "hi": np.tile(lo + s, n).astype(np.int32),
    }
    per_image = {"x": x, "fill": fill, "rank": rank, "a": a}
    image = np.repeat(np.arange(n), steps * repeats)
    scores, _, sums = _run(model, perturb, shared, per_image, image, item, t, score, batch_size)
    return scores.reshape(n, steps, repeats), sums.reshape(n, steps, repeats)


@register(
    "faithfulness_estimate",
    family="faithfulness",
    higher_is_better=True,
    reference="Alvarez-Melis and Jaakkola 2018",
)
def faithfulness_estimate(
    model,
    x,
    maps,
    target,
    *,
    explain=None,
    key: jax.Array | None = None,
    features_in_step: int = 1,
    fill: float | str | np.ndarray = "black",
    score: str = "logit",
    batch_size: int = 256,
) -> np.ndarray:
    r"""Pearson correlation of each pixel group's relevance and the output drop when it
    alone is removed (Alvarez-Melis and Jaakkola 2018); see the module docstring.

    Args:
      model, x, maps, target, fill, key, batch_size: as `pixel_flipping_curves`.
      explain: unused.
      features_in_step: pixels per group (the groups follow the ranking, most relevant
        first).
      score: ``"logit"`` (Quantus's default) or ``"probability"``.

    Returns:
      (N,) correlations in [-1, 1] (NaN where either side is constant): higher is better.
    """
    _check_score(score)
    x, a = _images(x, maps, "faithfulness_estimate")
    t, f0 = _base(model, x, target, score, batch_size)
    steps = _steps(a[0].size, features_in_step)
    rank = _ranks(a, descending=True)
    scores, sums = _groups(
        model, x, _fill(x, fill, key), rank, a, t, steps, features_in_step, score,
        batch_size, _ranked, {}, 1,
    )  # fmt: skip
    return pearson(sums[..., 0], f0[:, None] - scores[..., 0])


@register(
    "monotonicity", family="faithfulness", higher_is_better=True, reference="Arya et al. 2019"
)
def monotonicity(
    model,
    x,
    maps,
    target,
    *,
    explain=None,
    key: jax.Array | None = None,
    features_in_step: int = 1,
    fill: float | str | np.ndarray = "black",
    absolute: bool = True,
    score: str = "probability",
    batch_size: int = 256,
) -> np.ndarray:
    r"""1 if the score never falls as the pixels are restored onto the fill image, least
    relevant first, else 0 (Arya et al. 2019); see the module docstring.

    Args:
      model, x, maps, target, fill, key, score, batch_size: as `pixel_flipping_curves`.
      explain: unused.
      features_in_step: pixels restored per step.
      absolute: rank by :math:`|a_p|` (Quantus's ``abs=True``) rather than :math:`a_p`.

    Returns:
      (N,) 1.0 (monotonic) or 0.0: higher is better.
    """
    _check_score(score)
    x, a = _images(x, maps, "monotonicity")
    t, _ = _base(model, x, target, score, batch_size)
    steps = _steps(a[0].size, features_in_step)
    hi = np.arange(1, steps + 1) * features_in_step
    rank = _ranks(jnp.abs(a) if absolute else a, descending=False)
    # restoring pixels onto the fill image is removing them from it, with the image as fill
    curves = _cumulative(model, _fill(x, fill, key), x, rank, a, t, hi, score, batch_size)
    return np.all(np.diff(curves, axis=1) >= 0, axis=1).astype(np.float64)


@register(
    "monotonicity_correlation",
    family="faithfulness",
    higher_is_better=True,
    reference="Nguyen and Martínez 2020",
)
def monotonicity_correlation(
    model,
    x,
    maps,
    target,
    *,
    explain=None,
    key: jax.Array | None = None,
    samples: int = 100,
    features_in_step: int = 1,
    fill: float | str | np.ndarray = "uniform",
    eps: float = 1e-5,
    absolute: bool = True,
    score: str = "probability",
    batch_size: int = 256,
) -> np.ndarray:
    r"""Spearman correlation of each pixel group's relevance and the mean squared output
    change when it alone is replaced by noise (Nguyen and Martínez 2020); see the module
    docstring.

    Args:
      model, x, maps, target, score, batch_size: as `pixel_flipping_curves`.
      explain: unused.
      key: ``jax.random`` key of the noise (default key 0): draw s of group k of image i
        is ``jax.random.uniform(fold_in(key, (i * K + k) * samples + s), (H, W, C))``
        (K groups), of which the group's pixels are used.
      samples: noise draws per group (Quantus's ``nr_samples``).
      features_in_step: pixels per group (least relevant first).
      fill: ``"uniform"`` (Quantus's default: fresh noise per draw) or any other fill
        (then evaluated once: all draws would be equal).
      eps: below this :math:`|f_t(x)|` the squared changes are not divided by it.
      absolute: rank and sum :math:`|a_p|` (Quantus's ``abs=True``).

    Returns:
      (N,) correlations in [-1, 1] (NaN where either side is constant): higher is better.
    """
    _check_score(score)
    x, a = _images(x, maps, "monotonicity_correlation")
    a = jnp.abs(a) if absolute else a
    t, f0 = _base(model, x, target, score, batch_size)
    steps = _steps(a[0].size, features_in_step)
    rank = _ranks(a, descending=False)
    noisy = isinstance(fill, str) and fill == "uniform"
    repeats = samples if noisy else 1
    if repeats < 1:
        raise ValueError(f"samples must be positive, got {samples}")
    fills = x if noisy else _fill(x, fill, key)
    perturb = _ranked_noise if noisy else _ranked
    scores, sums = _groups(
        model, x, fills, rank, a, t, steps, features_in_step, score, batch_size, perturb,
        {"key": _key(key)}, repeats,
    )  # fmt: skip
    scale = np.where(np.abs(f0) >= eps, 1 / np.where(np.abs(f0) >= eps, np.abs(f0), 1), 1) ** 2
    variance = ((scores - f0[:, None, None]) ** 2).mean(-1) * scale[:, None]
    return spearman_rank(sums[..., 0], variance)


# --- ROAD ------------------------------------------------------------------------------


def _stencil(v: jax.Array, weights: jax.Array) -> jax.Array:
    """Weighted sum over each pixel's 8 neighbours of (H, W, C) values (0 outside)."""
    h, w = v.shape[:2]
    p = jnp.pad(v, ((1, 1), (1, 1), (0, 0)))
    return sum(
        weights[i, j] * p[i : i + h, j : j + w]
        for i in range(3)
        for j in range(3)
        if (i, j) != (1, 1)
    )


def _impute(x, mask, noise, key, tol, maxiter):
    """Noisy linear imputation of one (H, W, C) image (see `noisy_linear_imputation`)."""
    weights = jnp.asarray(IMPUTATION_WEIGHTS, x.dtype)
    m = mask[..., None].astype(x.dtype)
    degree = _stencil(jnp.ones_like(x[..., :1]), weights)  # sum of the in-image weights

    def matvec(v):  # unknowns: D v - W (m v); known pixels: identity (decoupled)
        return m * (degree * v - _stencil(m * v, weights)) + (1 - m) * v

    rhs = m * _stencil((1 - m) * x, weights)
    precondition = 1 / jnp.where(m > 0, degree, 1)
    if maxiter is None:
        maxiter = 10 * (x.shape[0] + x.shape[1])
    solution, _ = jax.scipy.sparse.linalg.cg(
        matvec, rhs, x0=rhs * precondition, tol=tol, maxiter=maxiter,
        M=lambda r: precondition * r,
    )  # fmt: skip
    filled = solution + noise * jax.random.normal(key, x.shape, x.dtype)
    return jnp.where(m > 0, filled, x)


@functools.partial(jax.jit, static_argnames="maxiter")
def _impute_batch(x, mask, noise, keys, tol, maxiter):
    return jax.vmap(_impute, in_axes=(0, 0, None, 0, None, None))(
        x, mask, noise, keys, tol, maxiter
    )


def noisy_linear_imputation(
    x: np.ndarray | jax.Array,
    mask: np.ndarray | jax.Array,
    *,
    noise: float = 0.01,
    key: jax.Array | None = None,
    tol: float = 1e-5,
    maxiter: int | None = None,
) -> np.ndarray:
    r"""Replace the masked pixels by the solution of a neighbourhood-averaging system, plus
    noise (Rong et al. 2022).

    Every masked pixel i must equal the weighted mean of its in-image 8-neighbours j
    (weights :math:`w_{ij}` of `IMPUTATION_WEIGHTS`: 1/6 direct, 1/12 diagonal), known or
    imputed: :math:`D_i v_i - \sum_{j\ \mathrm{masked}} w_{ij} v_j = \sum_{j\ \mathrm{known}}
    w_{ij} x_j` with :math:`D_i = \sum_j w_{ij}`, per channel; this is the sparse system
    that Quantus (after Rong et al.'s code) builds and solves with ``scipy``'s
    ``spsolve``. Its matrix is a principal submatrix of a connected graph's Laplacian,
    symmetric positive definite whenever a pixel is known, so here it is solved
    matrix-free by Jacobi-preconditioned conjugate gradients (``jax.scipy.sparse.linalg
    .cg``, the stencil as the operator), to a residual of ``tol`` relative to the right
    side; then :math:`\text{noise} \cdot \mathcal N(0, 1)` is added to the imputed values.

    Args:
      x: (H, W, C) or (N, H, W, C) images.
      mask: (H, W) or (N, H, W) bool, the pixels to impute (all channels).
      noise: standard deviation of the added Gaussian noise (Quantus's 0.01).
      key: ``jax.random`` key of the noise, of shape x: image i of a batch uses
        ``fold_in(key, i)``; a single image uses ``key`` (default key 0).
      tol: relative residual at which CG stops.
      maxiter: most CG iterations (default 10 (H + W); CG needs of the order of the side
        of the largest hole times log(1 / tol)).

    Returns:
      The imputed images, x's shape (NumPy). With every pixel masked the system is
      singular; the result is then undefined.
    """
    x = jnp.asarray(x)
    single = x.ndim == 3
    xb, mb = (x[None], jnp.asarray(mask)[None]) if single else (x, jnp.asarray(mask))
    if xb.ndim != 4 or mb.shape != xb.shape[:3]:
        raise ValueError(f"noisy_linear_imputation: mask {np.shape(mask)} for images {x.shape}")
    key = _key(key)
    keys = (
        key[None] if single else jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(len(xb)))
    )
    out = _impute_batch(xb, mb.astype(bool), jnp.asarray(noise, x.dtype), keys, tol, maxiter)
    return np.asarray(out[0] if single else out)


def _imputed(shared, d, item):
    """The pixels ranked below hi imputed, noise from fold_in(key, id)."""
    m = d["rank"] < item["hi"]
    k = jax.random.fold_in(shared["key"], item["id"])
    out = _impute(d["x"], m, shared["noise"], k, shared["tol"], shared["maxiter"])
    return out, jnp.zeros((), d["x"].dtype)


def road_curves(
    model: nnx.Module,
    x: np.ndarray | jax.Array,
    maps: np.ndarray | jax.Array,
    target=None,
    *,
    order: str = "morf",
    percentages: Sequence[float] = ROAD_PERCENTAGES,
    noise: float = 0.01,
    key: jax.Array | None = None,
    score: str = "accuracy",
    tol: float = 1e-5,
    maxiter: int | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """ROAD curves (Rong et al. 2022): the most or least relevant pixels imputed.

    Args:
      model, x, maps, target, batch_size: as `pixel_flipping_curves`.
      order: ``"morf"`` (most relevant first) or ``"lerf"`` (least relevant first).
      percentages: percentages p of the pixels imputed, floor(p H W / 100) each.
      noise: standard deviation of the imputation noise (Quantus's 0.01).
      key: ``jax.random`` key of the noise (default key 0): percentage j of image i uses
        ``fold_in(key, i * len(percentages) + j)`` in `noisy_linear_imputation`.
      score: ``"accuracy"`` (Quantus: 1.0 if the model still predicts the target, else
        0.0), ``"probability"`` or ``"logit"``.
      tol, maxiter: CG tolerance and most iterations of the imputation
        (`noisy_linear_imputation`).

    Returns:
      (N, len(percentages)) float64.
    """
    _check_score(score, ("accuracy", *SCORES))
    if order not in ("morf", "lerf"):
        raise ValueError(f"unknown order {order!r}; choose from morf, lerf")
    x, a = _images(x, maps, "road")
    n, f = len(x), a[0].size
    counts = np.floor(f * np.asarray(percentages, np.float64) / 100).astype(np.int32)
    if counts.ndim != 1 or len(counts) == 0 or counts.min() < 0 or counts.max() >= f:
        raise ValueError(f"percentages must lie in [0, 100), got {list(percentages)}")
    t, _ = _base(model, x, target, "logit" if score == "accuracy" else score, batch_size)
    rank = _ranks(a, descending=order == "morf")
    p = len(counts)
    item = {"id": np.arange(n * p, dtype=np.int32), "hi": np.tile(counts, n)}
    shared = {
        "key": _key(key),
        "noise": jnp.asarray(noise, x.dtype),
        "tol": jnp.asarray(tol, x.dtype),
        "maxiter": jnp.asarray(10 * (x.shape[1] + x.shape[2]) if maxiter is None else maxiter),
    }
    per_image = {"x": x, "rank": rank}
    image = np.repeat(np.arange(n), p)
    run_score = "logit" if score == "accuracy" else score
    scores, predicted, _ = _run(
        model, _imputed, shared, per_image, image, item, t, run_score, batch_size
    )
    if score == "accuracy":
        return (predicted.reshape(n, p) == t[:, None]).astype(np.float64)
    return scores.reshape(n, p)


def _road_of(order: str):
    def metric(model, x, maps, target, *, explain=None, key=None, **settings) -> np.ndarray:
        return road_curves(model, x, maps, target, order=order, key=key, **settings).mean(-1)

    metric.__name__ = f"road_{order}"
    metric.__doc__ = f"""The mean over the percentages of `road_curves` with order
    ``{order!r}`` (the registered metric ``road_{order}``; keyword settings as there).

    Returns:
      (N,) mean accuracy (or score): {"lower" if order == "morf" else "higher"} is better.
    """
    return metric


road_morf = register(
    "road_morf", family="faithfulness", higher_is_better=False, reference="Rong et al. 2022"
)(_road_of("morf"))
road_lerf = register(
    "road_lerf", family="faithfulness", higher_is_better=True, reference="Rong et al. 2022"
)(_road_of("lerf"))


# --- infidelity --------------------------------------------------------------------------


def _gaussian(shared, d, item):
    """x - I with I ~ N(0, std^2) from fold_in(key, id); aux: I . R."""
    k = jax.random.fold_in(shared["key"], item["id"])
    i = shared["std"] * jax.random.normal(k, d["x"].shape, d["x"].dtype)
    return d["x"] - i, (i * d["r"]).sum()


@register("infidelity", family="faithfulness", higher_is_better=False, reference="Yeh et al. 2019")
def infidelity(
    model,
    x,
    maps,
    target,
    *,
    explain=None,
    key: jax.Array | None = None,
    samples: int = 100,
    noise: float = 0.2,
    normalise: bool = False,
    score: str = "logit",
    batch_size: int = 256,
) -> np.ndarray:
    r"""Mean squared gap between :math:`I \cdot R` and the output drop
    :math:`f_t(x) - f_t(x - I)` over Gaussian perturbations I (Yeh et al. 2019); see the
    module docstring.

    Args:
      model: a Flax NNX model returning logits.
      x: (N, ...) inputs.
      maps: (N, ...) relevance of x's shape, or (N, H, W) of (N, H, W, C) images
        (broadcast over the channels).
      target: (N,) or int explained classes (None or -1: the predicted class).
      explain: unused.
      key: ``jax.random`` key (default key 0): perturbation s of image i is
        ``noise * jax.random.normal(fold_in(key, i * samples + s), x.shape[1:])``.
      samples: perturbations per image.
      noise: their standard deviation :math:`\sigma` (Yeh et al.'s code: 0.2).
      normalise: scale the map by the optimal :math:`\beta` first (Yeh et al.'s code).
      score: ``"logit"`` (Quantus's default) or ``"probability"``.
      batch_size: perturbed inputs per model call.

    Returns:
      (N,) infidelities >= 0: lower is better.
    """
    _check_score(score)
    if samples < 1:
        raise ValueError(f"samples must be positive, got {samples}")
    x = jnp.asarray(x)
    r = jnp.asarray(maps)
    if x.ndim == 4 and r.shape == x.shape[:3]:
        r = r[..., None]
    if r.shape[0] != x.shape[0] or jnp.broadcast_shapes(r.shape, x.shape) != x.shape:
        raise ValueError(f"infidelity: maps of shape {np.shape(maps)} for inputs {x.shape}")
    n = len(x)
    t, f0 = _base(model, x, target, score, batch_size)
    per_image = {"x": x, "r": jnp.broadcast_to(r, x.shape).astype(x.dtype)}
    item = {"id": np.arange(n * samples, dtype=np.int32)}
    shared = {"key": _key(key), "std": jnp.asarray(noise, x.dtype)}
    image = np.repeat(np.arange(n), samples)
    scores, _, dots = _run(model, _gaussian, shared, per_image, image, item, t, score, batch_size)
    drops = f0[:, None] - scores.reshape(n, samples)
    dots = dots.reshape(n, samples)
    if normalise:
        den = (dots * dots).mean(-1, keepdims=True)
        beta = np.where(
            den > 0, (dots * drops).mean(-1, keepdims=True) / np.where(den > 0, den, 1), 0
        )
        dots = beta * dots
    return ((dots - drops) ** 2).mean(-1)


# --- IROF --------------------------------------------------------------------------------


def _slic(x: np.ndarray) -> np.ndarray:
    try:
        from skimage.segmentation import slic
    except ImportError:
        raise ImportError(
            "irof needs SLIC superpixels from scikit-image, an optional dependency: "
            "pip install scikit-image (or pass segments=, (N, H, W) int labels)"
        ) from None
    return np.stack([slic(np.asarray(img, np.float64), start_label=0) for img in x])


@register("irof", family="faithfulness", higher_is_better=True, reference="Rieger and Hansen 2020")
def irof(
    model,
    x,
    maps,
    target,
    *,
    explain=None,
    key: jax.Array | None = None,
    segments: np.ndarray | None = None,
    fill: float | str | np.ndarray = "mean",
    score: str = "probability",
    batch_size: int = 256,
) -> np.ndarray:
    r"""Iterative removal of features: the area over the normalised score curve as
    superpixels are removed, most relevant first (Rieger and Hansen 2020); see the module
    docstring.

    Args:
      model, x, maps, target, key, batch_size: as `pixel_flipping_curves`.
      explain: unused.
      segments: (N, H, W) int superpixel labels (any values); default SLIC superpixels
        (needs scikit-image).
      fill: what replaces a removed segment (Quantus's ``"mean"``).
      score: ``"probability"`` (Quantus's default) or ``"logit"``.

    Returns:
      (N,) areas over the curve, up to the number of segments: higher is better.

    Raises:
      ImportError: no segments given and scikit-image is not installed.
    """
    _check_score(score)
    x, a = _images(x, maps, "irof")
    seg = _slic(np.asarray(x)) if segments is None else np.asarray(segments)
    if seg.shape != a.shape:
        raise ValueError(f"irof: segments of shape {seg.shape} for images {x.shape}")
    n = len(x)
    labels = np.zeros(seg.shape, np.int32)
    counts = np.zeros(n, np.int64)
    for i in range(n):  # relabel 0..L-1 (host bookkeeping, no model call)
        _, inverse = np.unique(seg[i], return_inverse=True)
        labels[i] = inverse.reshape(seg.shape[1:])
        counts[i] = inverse.max() + 1
    most = int(counts.max())
    flat = jnp.asarray(labels.reshape(n, -1))
    a_flat = a.reshape(n, -1)
    seg_sum = jax.vmap(lambda v, s: jax.ops.segment_sum(v, s, most))(a_flat, flat)
    seg_size = jax.vmap(lambda s: jax.ops.segment_sum(jnp.ones_like(s), s, most))(flat)
    mean = jnp.where(seg_size > 0, seg_sum / jnp.maximum(seg_size, 1), -jnp.inf)  # absent last
    seg_rank = _ranks(mean, descending=True)
    rank = jnp.take_along_axis(seg_rank, flat, axis=1).reshape(a.shape)
    t, f0 = _base(model, x, target, score, batch_size)
    image = np.repeat(np.arange(n), counts)
    hi = np.concatenate([np.arange(1, c + 1) for c in counts]).astype(np.int32)
    per_image = {"x": x, "fill": _fill(x, fill, key), "rank": rank, "a": a}
    item = {"lo": np.zeros(len(hi), np.int32), "hi": hi}
    scores, _, _ = _run(model, _ranked, {}, per_image, image, item, t, score, batch_size)
    out = np.empty(n)
    for i, part in enumerate(np.split(scores, np.cumsum(counts)[:-1])):
        out[i] = counts[i] - curve_auc(part / f0[i])
    return out
