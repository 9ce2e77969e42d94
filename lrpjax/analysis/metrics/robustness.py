r"""Robustness: does the map stay put when the input barely moves?

Each metric draws ``samples`` perturbed copies :math:`x'_s = x + \delta_s` of every input,
re-explains them all, :math:`R'_s = R(x'_s)` (the explained class t fixed), and compares
them with the given map :math:`R = R(x)`; norms are Euclidean (Frobenius) over all
entries. Per image:

- `max_sensitivity`, `avg_sensitivity` (Yeh et al. 2019): with
  :math:`\delta_s \sim U[-r, r]` in every entry (Quantus's ``lower_bound`` r = 0.2),
  :math:`\max_s` and :math:`\operatorname{mean}_s` of :math:`\|R - R'_s\| / \|R\|`
  (0 for two all-zero maps, inf where only :math:`R` is zero; lower is better).
- `local_lipschitz_estimate` (Alvarez-Melis and Jaakkola 2018): with
  :math:`\delta_s \sim \mathcal N(0, \sigma^2)` (Quantus's ``perturb_std`` 0.1),
  :math:`\max_s \|R - R'_s\| / (\|x - x'_s\| + 10^{-10})` (lower is better). Quantus
  normalises the maps first (``normalise=True``, its default for this metric only), each
  batch by its largest absolute value (the given maps as one batch, the re-explained
  ones batch by batch), so that an image's estimate depends on the others of its batch;
  ``normalise=True`` divides each map by its own largest absolute value here (default
  False, as for the other metrics, so that the estimate is of the explainer itself). On
  8 shipped images with LRP-epsilon maps the per-map estimates are 1.16 to 2.6 times
  Quantus's of the 8 as one batch; with ``batch_size=1`` Quantus's are these.
- `relative_input_stability` (Agarwal et al. 2022): with
  :math:`\delta_s \sim U[0.02, 0.2]` (Quantus's ``lower_bound`` and ``upper_bound``),
  :math:`\max_s \big\| (R - R'_s) / \tilde R \big\| \,/\, \max\big(\|(x - x'_s) / \tilde x\|,
  \epsilon_{\min}\big)`, entrywise divisions, :math:`\tilde v = v + \epsilon_{\min} [v = 0]`,
  :math:`\epsilon_{\min} = 10^{-6}` (lower is better);
- `relative_output_stability` (Agarwal et al. 2022): the same numerator over
  :math:`\max(\|h(x) - h(x'_s)\|, \epsilon_{\min})`, h the logits (lower is better).

Agarwal et al. maximise over the perturbations that keep the prediction; so do the two
relative stabilities here (``exclude_changed=True``, Quantus's
``return_nan_when_prediction_changes=True``): a sample whose predicted class differs from
x's is left out of the max, and an image whose samples all change scores NaN. Quantus
writes NaN for such a sample and then takes ``np.max``, so that one changed sample makes
the whole image NaN. The sensitivities and the Lipschitz estimate keep every sample by
default (Quantus's ``False``). Where Quantus adds :math:`\epsilon_{\min}` to a zero
denominator, this takes :math:`\max(\cdot, \epsilon_{\min})` as in the paper (they differ
only for denominators in :math:`(0, \epsilon_{\min})`).

The perturbed inputs are built on the device (``jax.random``: sample s of image i draws
from ``fold_in(key, i * samples + s)``, shape x.shape[1:], x's dtype; default key 0) and
explained in batches of ``batch_size`` perturbed inputs (whole images' samples, the last
batch padded to the same shape: one compiled explainer program), never one sample at a
time; the comparisons are jit-compiled and vmapped over the samples.

References:
  Yeh, Hsieh, Suggala, Inouye, Ravikumar (2019). On the (in)fidelity and sensitivity of
  explanations. NeurIPS. Alvarez-Melis, Jaakkola (2018). On the robustness of
  interpretability methods. arXiv:1806.08049 (WHI workshop, ICML). Agarwal, Johnson, Pawelczyk,
  Krishna, Saxena, Zitnik, Lakkaraju (2022). Rethinking stability for attribution-based
  explanations. arXiv:2203.06877. Hedström et al. (2023). Quantus. JMLR 24(34).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrpjax.analysis.metrics.registry import register
from lrpjax.analysis.metrics.scoring import logits, resolve_target

__all__ = [
    "EPS_MIN",
    "avg_sensitivity",
    "local_lipschitz_estimate",
    "max_sensitivity",
    "perturbed_inputs",
    "relative_input_stability",
    "relative_output_stability",
    "sample_values",
]

#: Agarwal et al.'s (and Quantus's) :math:`\epsilon_{\min}` of the relative stabilities.
EPS_MIN = 1e-6
#: Added to the Lipschitz estimate's denominator (Quantus's ``lipschitz_constant``).
LIPSCHITZ_EPS = 1e-10


@functools.partial(jax.jit, static_argnames=("samples", "noise"))
def _perturb(key, x, image, sample, samples, noise, low, high):
    """x[image] + noise drawn from fold_in(key, image * samples + sample)."""

    def one(i, s):
        k = jax.random.fold_in(key, i * samples + s)
        shape, dtype = x.shape[1:], x.dtype
        if noise == "uniform":
            delta = jax.random.uniform(k, shape, dtype, low, high)
        else:  # gaussian: mean low, std high
            delta = low + high * jax.random.normal(k, shape, dtype)
        return x[i] + delta

    return jax.vmap(one)(image, sample)


def perturbed_inputs(
    x: np.ndarray | jax.Array,
    samples: int,
    *,
    key: jax.Array | None = None,
    noise: str = "uniform",
    low: float = -0.2,
    high: float = 0.2,
) -> np.ndarray:
    """The perturbed inputs the robustness metrics explain, (N, samples, ...).

    Args:
      x: (N, ...) inputs.
      samples: copies per input.
      key: ``jax.random`` key (default key 0); sample s of input i adds a draw from
        ``fold_in(key, i * samples + s)``.
      noise: ``"uniform"`` (U[low, high) in every entry) or ``"gaussian"`` (mean low,
        standard deviation high).
    """
    x = jnp.asarray(x)
    n = len(x)
    image = jnp.repeat(jnp.arange(n), samples)
    sample = jnp.tile(jnp.arange(samples), n)
    key = jax.random.key(0) if key is None else key
    out = _perturb(key, x, image, sample, samples, noise, low, high)
    return np.asarray(out).reshape(n, samples, *x.shape[1:])


def _norm(v):
    return jnp.sqrt((v * v).reshape(v.shape[0], -1).sum(-1))


def _ratio(num, den):
    """num / den, with 0 / 0 = 0 and c / 0 = inf."""
    safe = jnp.where(den > 0, den, 1)
    return jnp.where(den > 0, num / safe, jnp.where(num > 0, jnp.inf, 0.0))


def _by_max(r):
    peak = jnp.abs(r).reshape(r.shape[0], -1).max(-1)
    peak = jnp.where(peak > 0, peak, 1).reshape((-1,) + (1,) * (r.ndim - 1))
    return r / peak


def _tilde(v, eps):
    return v + (v == 0) * eps


def _objective(kind, normalise, r, r2, x, x2, h, h2, eps):
    """Per-sample values of (B, ...) maps r, r2, inputs x, x2 and logits h, h2."""
    if normalise:
        r, r2 = _by_max(r), _by_max(r2)
    if kind == "sensitivity":
        return _ratio(_norm(r - r2), _norm(r))
    if kind == "lipschitz":
        return _norm(r - r2) / (_norm(x - x2) + LIPSCHITZ_EPS)
    num = _norm((r - r2) / _tilde(r, eps))
    den = _norm((x - x2) / _tilde(x, eps)) if kind == "input" else _norm(h - h2)
    return num / jnp.maximum(den, eps)


@lru_cache(maxsize=32)
def _comparer(graphdef: nnx.GraphDef, kind: str, normalise: bool) -> Callable:
    """jit(state, r, r2, x, xs, z, image, eps) -> per-sample values and whether the
    perturbed input's predicted class differs from the input's (one program per chunk
    shape: the gathers, the model on xs and the comparison)."""

    def fn(state, r, r2, x, xs, z, image, eps):
        model = nnx.merge(graphdef, state, copy=True)
        model.eval()
        h2 = model(xs).astype(z.dtype)
        h = z[image]
        values = _objective(kind, normalise, r[image], r2.astype(r.dtype), x[image], xs, h, h2, eps)
        return values, h2.argmax(-1) != h.argmax(-1)

    return jax.jit(fn)


def sample_values(
    model: nnx.Module,
    x: np.ndarray | jax.Array,
    maps: np.ndarray | jax.Array,
    target,
    explain: Callable,
    *,
    kind: str,
    key: jax.Array | None = None,
    samples: int = 200,
    noise: str = "uniform",
    low: float = -0.2,
    high: float = 0.2,
    normalise: bool = False,
    eps: float = EPS_MIN,
    batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """The per-sample values behind the robustness metrics.

    Args:
      model: a Flax NNX model returning logits.
      x: (N, ...) inputs.
      maps: (N, ...) their relevance for `target`, from the same explainer as `explain`.
      target: (N,) or int explained classes (None or -1: the predicted class).
      explain: ``explain(x, target) -> maps`` (`lrpjax.analysis.metrics.explain_fn`).
      kind: ``"sensitivity"``, ``"lipschitz"``, ``"input"`` or ``"output"`` (relative
        stabilities); see the module docstring.
      key, noise, low, high: the perturbations (`perturbed_inputs`).
      samples: perturbed copies per input.
      normalise: divide both maps by their largest absolute value first.
      eps: :math:`\\epsilon_{\\min}` of the relative stabilities.
      batch_size: perturbed inputs per explain call (at least one image's samples).

    Returns:
      (N, samples) float64 values and (N, samples) bool: whether the sample changes the
      predicted class.

    Raises:
      ValueError: no explain, samples < 1, or re-explained maps of another shape.
    """
    if explain is None:
        raise ValueError("the robustness metrics need explain(x, target) -> maps (explain_fn)")
    if samples < 1:
        raise ValueError(f"samples must be positive, got {samples}")
    x = jnp.asarray(x)
    r = jnp.asarray(maps)
    n = len(x)
    if r.shape[0] != n:
        raise ValueError(f"maps of shape {r.shape} for inputs {x.shape}")
    z = logits(model, x, batch_size)
    t = resolve_target(target, z)
    per = max(1, min(n, batch_size // samples))  # images per explain call
    key = jax.random.key(0) if key is None else key
    graphdef, state = nnx.split(model)
    compare = _comparer(graphdef, kind, normalise)
    zj = jnp.asarray(z, x.dtype)
    values, changed = [], []
    for lo in range(0, n, per):
        idx = np.arange(lo, lo + per)
        idx = np.where(idx < n, idx, 0)  # pad the last call with image 0 (dropped)
        image = np.repeat(idx, samples)
        sample = np.tile(np.arange(samples), per)
        xs = _perturb(key, x, image, sample, samples, noise, low, high)
        r2 = jnp.asarray(explain(xs, t[image]))
        if r2.shape[1:] != r.shape[1:]:
            raise ValueError(f"re-explained maps have shape {r2.shape[1:]}, maps {r.shape[1:]}")
        v, c = compare(state, r, r2, x, xs, zj, image, eps)
        keep = min(per, n - lo) * samples
        values.append(np.asarray(v, np.float64)[:keep])
        changed.append(np.asarray(c)[:keep])
    return np.concatenate(values).reshape(n, samples), np.concatenate(changed).reshape(n, samples)


def _reduce(values, changed, exclude_changed, how):
    if exclude_changed:
        values = np.where(changed, np.nan, values)
        kept = (~changed).any(-1)
        safe = np.where(kept[:, None], values, 0.0)
        out = np.nanmax(safe, -1) if how == "max" else np.nanmean(safe, -1)
        return np.where(kept, out, np.nan)
    return values.max(-1) if how == "max" else values.mean(-1)


def _sensitivity(how: str, name: str, reduce_doc: str):
    def metric(
        model,
        x,
        maps,
        target,
        *,
        explain: Callable | None = None,
        key: jax.Array | None = None,
        samples: int = 200,
        lower_bound: float = 0.2,
        upper_bound: float | None = None,
        exclude_changed: bool = False,
        batch_size: int = 256,
    ) -> np.ndarray:
        low, high = (
            (-lower_bound, lower_bound) if upper_bound is None else (lower_bound, upper_bound)
        )
        values, changed = sample_values(
            model, x, maps, target, explain, kind="sensitivity", key=key, samples=samples,
            low=low, high=high, batch_size=batch_size,
        )  # fmt: skip
        return _reduce(values, changed, exclude_changed, how)

    metric.__name__ = name
    metric.__doc__ = f"""The {reduce_doc} over perturbed inputs of the relative change of the map
    (Yeh et al. 2019); see the module docstring.

    Args:
      model: a Flax NNX model returning logits.
      x: (N, ...) inputs.
      maps: (N, ...) their relevance for `target`, from the same explainer as `explain`.
      target: (N,) or int explained classes (None or -1: the predicted class).
      explain: ``explain(x, target) -> maps`` (`lrpjax.analysis.metrics.explain_fn`;
        required).
      key: ``jax.random`` key of the perturbations (`perturbed_inputs`; default key 0).
      samples: perturbed copies per input (Quantus's ``nr_samples``).
      lower_bound, upper_bound: the noise is U[-lower_bound, lower_bound] in every entry,
        or U[lower_bound, upper_bound] if upper_bound is given (Quantus's).
      exclude_changed: leave out the samples that change the predicted class (NaN if all
        do).
      batch_size: perturbed inputs per explain call.

    Returns:
      (N,) float64 relative changes >= 0: lower is more robust.
    """
    return metric


max_sensitivity = register(
    "max_sensitivity",
    family="robustness",
    higher_is_better=False,
    reference="Yeh et al. 2019",
    needs_explain=True,
)(_sensitivity("max", "max_sensitivity", "largest"))
avg_sensitivity = register(
    "avg_sensitivity",
    family="robustness",
    higher_is_better=False,
    reference="Yeh et al. 2019",
    needs_explain=True,
)(_sensitivity("mean", "avg_sensitivity", "mean"))


@register(
    "local_lipschitz_estimate",
    family="robustness",
    higher_is_better=False,
    reference="Alvarez-Melis and Jaakkola 2018",
    needs_explain=True,
)
def local_lipschitz_estimate(
    model,
    x,
    maps,
    target,
    *,
    explain: Callable | None = None,
    key: jax.Array | None = None,
    samples: int = 200,
    perturb_mean: float = 0.0,
    perturb_std: float = 0.1,
    normalise: bool = False,
    exclude_changed: bool = False,
    batch_size: int = 256,
) -> np.ndarray:
    r"""The largest :math:`\|R - R'\| / \|x - x'\|` over Gaussian perturbations
    (Alvarez-Melis and Jaakkola 2018); see the module docstring.

    Args:
      model, x, maps, target, explain, key, samples, exclude_changed, batch_size: as
        `max_sensitivity`.
      perturb_mean, perturb_std: the Gaussian noise added to every entry (Quantus's).
      normalise: divide both maps by their largest absolute value first (Quantus's
        default for this metric, which divides by the batch's; see the module docstring).

    Returns:
      (N,) float64 estimates >= 0: lower is more robust.
    """
    values, changed = sample_values(
        model, x, maps, target, explain, kind="lipschitz", key=key, samples=samples,
        noise="gaussian", low=perturb_mean, high=perturb_std, normalise=normalise,
        batch_size=batch_size,
    )  # fmt: skip
    return _reduce(values, changed, exclude_changed, "max")


def _relative(kind: str, name: str, denominator: str):
    def metric(
        model,
        x,
        maps,
        target,
        *,
        explain: Callable | None = None,
        key: jax.Array | None = None,
        samples: int = 200,
        lower_bound: float = 0.02,
        upper_bound: float | None = 0.2,
        eps_min: float = EPS_MIN,
        exclude_changed: bool = True,
        batch_size: int = 256,
    ) -> np.ndarray:
        low, high = (
            (-lower_bound, lower_bound) if upper_bound is None else (lower_bound, upper_bound)
        )
        values, changed = sample_values(
            model, x, maps, target, explain, kind=kind, key=key, samples=samples, low=low,
            high=high, eps=eps_min, batch_size=batch_size,
        )  # fmt: skip
        return _reduce(values, changed, exclude_changed, "max")

    metric.__name__ = name
    metric.__doc__ = f"""The largest relative change of the map over the relative change of
    {denominator} (Agarwal et al. 2022); see the module docstring.

    Args:
      model, x, maps, target, explain, key, samples, batch_size: as `max_sensitivity`.
      lower_bound, upper_bound: the noise, U[lower_bound, upper_bound] in every entry
        (Quantus's 0.02 and 0.2), or U[-lower_bound, lower_bound] if upper_bound is None.
      eps_min: the floor of the denominators and of the entries divided by.
      exclude_changed: leave out the samples that change the predicted class (Agarwal et
        al.; Quantus's default); NaN where all do.

    Returns:
      (N,) float64 ratios >= 0: lower is more stable.
    """
    return metric


relative_input_stability = register(
    "relative_input_stability",
    family="robustness",
    higher_is_better=False,
    reference="Agarwal et al. 2022",
    needs_explain=True,
)(_relative("input", "relative_input_stability", "the input"))
relative_output_stability = register(
    "relative_output_stability",
    family="robustness",
    higher_is_better=False,
    reference="Agarwal et al. 2022",
    needs_explain=True,
)(_relative("output", "relative_output_stability", "the logits"))
