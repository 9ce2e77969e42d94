"""Every LRP rule against an independent float64 reference written with loops over neurons.

The references below never call lrpjax: a layer is described as an explicit list of
connections ``(input index j, output index k, weight w_jk)`` plus a bias per output, built
with loops over output positions and kernel taps for convolutions, and each rule is the
formula of Montavon et al. (2019) applied connection by connection.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lrpjax.layer_types import LayerError
from lrpjax.layers import MaxPool

from lrpjax import rules

# --- the independent reference --------------------------------------------------------


def stab(z: float, eps: float) -> float:
    """z + eps * sign(z), sign(0) = +1."""
    return z + eps * (1.0 if z >= 0 else -1.0)


def pos(x: float) -> float:
    return max(x, 0.0)


def neg(x: float) -> float:
    return min(x, 0.0)


def dense_connections(kernel: np.ndarray) -> list[tuple[int, int, float]]:
    """(j, k, w_jk) for a dense kernel of shape (in, out)."""
    n_in, n_out = kernel.shape
    return [(j, k, float(kernel[j, k])) for j in range(n_in) for k in range(n_out)]


def conv_geometry(size: int, k: int, stride: int, padding: str) -> tuple[int, int]:
    """(output size, padding before) of one spatial axis, as XLA defines SAME and VALID."""
    if padding == "VALID":
        return (size - k) // stride + 1, 0
    out = math.ceil(size / stride)
    return out, max((out - 1) * stride + k - size, 0) // 2


def conv_connections(
    kernel: np.ndarray, in_spatial: tuple[int, ...], strides: tuple[int, ...], padding: str
) -> tuple[list[tuple[int, int, float]], tuple[int, ...]]:
    """Connections of an N-d channels-last convolution, flattened (row-major) per sample.

    Returns the connection list and the output shape (*spatial, C_out).
    """
    *ksize, c_in, c_out = kernel.shape
    geometry = [
        conv_geometry(s, k, st, padding)
        for s, k, st in zip(in_spatial, ksize, strides, strict=True)
    ]
    out_spatial = tuple(o for o, _ in geometry)
    in_shape, out_shape = (*in_spatial, c_in), (*out_spatial, c_out)
    connections = []
    for o_pos in itertools.product(*(range(o) for o in out_spatial)):
        for tap in itertools.product(*(range(k) for k in ksize)):
            i_pos = tuple(
                o * st + t - lo
                for o, t, st, (_, lo) in zip(o_pos, tap, strides, geometry, strict=True)
            )
            if any(i < 0 or i >= s for i, s in zip(i_pos, in_spatial, strict=True)):
                continue  # a padded position: no connection
            for ci in range(c_in):
                j = int(np.ravel_multi_index((*i_pos, ci), in_shape))
                for co in range(c_out):
                    k = int(np.ravel_multi_index((*o_pos, co), out_shape))
                    connections.append((j, k, float(kernel[(*tap, ci, co)])))
    return connections, out_shape


def reference(kind, a, R, connections, bias, **p) -> np.ndarray:
    """R_in of one sample: a (n_in,), R (n_out,), bias (n_out,), loops over connections."""
    n_in, n_out = len(a), len(R)
    by_output: list[list[tuple[int, float]]] = [[] for _ in range(n_out)]
    for j, k, w in connections:
        by_output[k].append((j, w))
    R_in = np.zeros(n_in)
    for k in range(n_out):
        conns, b = by_output[k], float(bias[k])
        if kind in ("z", "epsilon"):
            zk = sum(a[j] * w for j, w in conns) + b
            if kind == "z" and zk == 0:
                continue
            den = zk if kind == "z" else stab(zk, p["eps"])
            for j, w in conns:
                R_in[j] += a[j] * w / den * R[k]
        elif kind == "alpha_beta":
            zp = sum(pos(a[j] * w) for j, w in conns) + pos(b)
            zn = sum(neg(a[j] * w) for j, w in conns) + neg(b)
            for j, w in conns:
                R_in[j] += (
                    p["alpha"] * pos(a[j] * w) / stab(zp, p["eps"])
                    - p["beta"] * neg(a[j] * w) / stab(zn, p["eps"])
                ) * R[k]
        elif kind == "gamma":
            g = p["gamma"]
            zk = sum(a[j] * w for j, w in conns) + b
            part = pos if zk > 0 else neg
            zmod = {j: a[j] * w + g * part(a[j] * w) for j, w in conns}
            den = stab(sum(zmod.values()) + b + g * part(b), p["eps"])
            for j, _ in conns:
                R_in[j] += zmod[j] / den * R[k]
        elif kind == "zbox":
            low, high = p["low"], p["high"]
            q = {j: a[j] * w - low[j] * pos(w) - high[j] * neg(w) for j, w in conns}
            den = stab(sum(q.values()), p["eps"])
            for j, _ in conns:
                R_in[j] += q[j] / den * R[k]
        elif kind == "flat":
            den = stab(float(len(conns)), p["eps"])
            for j, _ in conns:
                R_in[j] += 1.0 / den * R[k]
        elif kind == "wsquare":
            den = stab(sum(w * w for _, w in conns), p["eps"])
            for j, w in conns:
                R_in[j] += w * w / den * R[k]
        else:
            raise AssertionError(kind)
    return R_in


def reference_forward(a, connections, bias) -> np.ndarray:
    z = np.array(bias, np.float64)
    for j, k, w in connections:
        z[k] += a[j] * w
    return z


def batch_reference(kind, a, R, connections, bias, **p) -> np.ndarray:
    """The reference over a batch; a and R of any shape (N, ...), flattened per sample."""
    a64, R64 = np.asarray(a, np.float64), np.asarray(R, np.float64)
    n = a64.shape[0]
    extra = dict(p)
    out = []
    for i in range(n):
        if kind == "zbox":  # bounds broadcast to the input, then flattened like it
            extra["low"] = np.broadcast_to(p["low"], a64.shape[1:]).ravel()
            extra["high"] = np.broadcast_to(p["high"], a64.shape[1:]).ravel()
        out.append(reference(kind, a64[i].ravel(), R64[i].ravel(), connections, bias, **extra))
    return np.stack(out).reshape(a64.shape)


def assert_close(got, ref, rtol=1e-5):
    """Entrywise agreement to rtol, relative to each entry and to the array's scale."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape
    scale = float(np.abs(ref).max()) or 1.0
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * scale)


# --- layers ----------------------------------------------------------------------------


def _set(layer: nnx.Module, rng: np.random.Generator, bias_scale: float = 0.5) -> nnx.Module:
    layer.kernel[...] = jnp.asarray(rng.normal(size=layer.kernel.shape), jnp.float32)
    if layer.bias is not None:
        b = rng.normal(scale=bias_scale, size=layer.bias.shape)
        layer.bias[...] = jnp.asarray(b, jnp.float32)
    return layer


def dense(seed: int = 0, n_in: int = 5, n_out: int = 4) -> nnx.Linear:
    return _set(nnx.Linear(n_in, n_out, rngs=nnx.Rngs(0)), np.random.default_rng(seed))


def params_of(layer) -> tuple[np.ndarray, np.ndarray]:
    kernel = np.asarray(layer.kernel[...], np.float64)
    bias = np.asarray(layer.bias[...], np.float64) if layer.bias is not None else None
    return kernel, bias


LOW_VEC = np.array([-1.0, -0.5, -2.0, -1.5, -1.0])  # per-feature bounds of the dense input
HIGH_VEC = np.array([2.0, 1.5, 1.0, 2.5, 3.0])
LOW_CH = np.array([-1.0, -0.5])  # per-channel bounds of the convolution inputs
HIGH_CH = np.array([2.0, 1.5])

# (id, rule, reference kind, reference parameters); zbox bounds are filled in per layer.
RULES = [
    ("z", rules.z(), "z", {}),
    ("epsilon0.1", rules.epsilon(0.1), "epsilon", {"eps": 0.1}),
    ("epsilon1e-6", rules.epsilon(1e-6), "epsilon", {"eps": 1e-6}),
    ("alpha2beta1", rules.alpha_beta(2, 1), "alpha_beta", {"alpha": 2, "beta": 1, "eps": 1e-6}),
    ("alpha1beta0", rules.alpha_beta(1, 0), "alpha_beta", {"alpha": 1, "beta": 0, "eps": 1e-6}),
    ("zplus", rules.zplus(), "alpha_beta", {"alpha": 1, "beta": 0, "eps": 1e-6}),
    ("gamma", rules.gamma(0.25), "gamma", {"gamma": 0.25, "eps": 1e-6}),
    ("gamma_eps", rules.gamma(1.0, eps=0.05), "gamma", {"gamma": 1.0, "eps": 0.05}),
    ("zbox", rules.zbox(low=-1, high=2), "zbox", {"low": -1.0, "high": 2.0, "eps": 1e-6}),
    ("zbox_vec", None, "zbox", {"eps": 1e-6}),
    ("flat", rules.flat(), "flat", {"eps": 1e-6}),
    ("wsquare", rules.wsquare(), "wsquare", {"eps": 1e-6}),
]
RULE_IDS = [r[0] for r in RULES]


def _rule_and_params(case, low, high):
    name, rule, kind, p = case
    if name == "zbox_vec":
        rule = rules.zbox(low=low, high=high)
        p = {**p, "low": low, "high": high}
    return rule, kind, p


def _inputs(rng, shape, lo=-1.0, hi=2.0):
    """Signed inputs of moderate size, inside the zbox bounds [-1, 2] (and the vectors)."""
    return rng.uniform(lo, hi, size=shape).astype(np.float32)


# --- dense -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", RULES, ids=RULE_IDS)
def test_dense_rule_matches_loop_reference(case):
    rule, kind, p = _rule_and_params(case, LOW_VEC, HIGH_VEC)
    layer = dense(seed=1)
    rng = np.random.default_rng(2)
    a = _inputs(rng, (3, 5), -0.5, 1.0)  # inside every bound above
    R = rng.normal(size=(3, 4)).astype(np.float32)
    kernel, bias = params_of(layer)
    conns = dense_connections(kernel)
    # The reference's forward is the layer's forward (checks the connection list).
    assert_close(layer(a), np.stack([reference_forward(x, conns, bias) for x in a.astype(float)]))
    got = rule(layer, jnp.asarray(a), jnp.asarray(R))
    assert got.shape == a.shape
    assert_close(got, batch_reference(kind, a, R, conns, bias, **p))


def test_dense_rules_without_bias():
    layer = _set(nnx.Linear(5, 4, use_bias=False, rngs=nnx.Rngs(0)), np.random.default_rng(3))
    rng = np.random.default_rng(4)
    a, R = _inputs(rng, (3, 5), -0.5, 1.0), rng.normal(size=(3, 4)).astype(np.float32)
    kernel, _ = params_of(layer)
    conns, zero = dense_connections(kernel), np.zeros(4)
    for case in RULES:
        rule, kind, p = _rule_and_params(case, LOW_VEC, HIGH_VEC)
        assert_close(rule(layer, a, R), batch_reference(kind, a, R, conns, zero, **p))


def test_alpha_beta_separates_signs_of_inputs_and_weights():
    """(a w)^+ = a^+ w^+ + a^- w^-: a negative input with a negative weight is positive."""
    layer = nnx.Linear(2, 1, use_bias=False, rngs=nnx.Rngs(0))
    layer.kernel[...] = jnp.array([[-1.0], [1.0]])
    a = jnp.array([[-2.0, -1.0]])  # contributions +2 (positive) and -1 (negative)
    R = jnp.array([[1.0]])
    np.testing.assert_allclose(rules.zplus(eps=0)(layer, a, R), [[1.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(rules.alpha_beta(2, 1, eps=0)(layer, a, R), [[2.0, -1.0]], atol=1e-6)


def test_gamma_is_paper_rule_for_positive_inputs_and_outputs():
    """For a >= 0 and z_k > 0, LRP-gamma is rho(w) = w + gamma w^+, rho(b) = b + gamma b^+."""
    layer = _set(nnx.Linear(5, 4, rngs=nnx.Rngs(0)), np.random.default_rng(5))
    layer.kernel[...] = layer.kernel[...] + 1.5  # mostly positive weights
    layer.bias[...] = jnp.abs(layer.bias[...])
    rng = np.random.default_rng(6)
    a = rng.uniform(0.1, 1.0, size=(3, 5)).astype(np.float32)
    assert np.all(np.asarray(layer(a)) > 0)
    R = rng.normal(size=(3, 4)).astype(np.float32)
    w, b = params_of(layer)
    g = 0.25
    w_g, b_g = w + g * np.maximum(w, 0), b + g * np.maximum(b, 0)
    zg = a.astype(float) @ w_g + b_g
    expected = a * ((R / (zg + 1e-6)) @ w_g.T)
    assert_close(rules.gamma(g)(layer, a, R), expected)


def test_z_rule_passes_nothing_where_output_is_zero():
    layer = nnx.Linear(3, 2, use_bias=False, rngs=nnx.Rngs(0))
    layer.kernel[...] = jnp.array([[1.0, 1.0], [1.0, -1.0], [0.0, 2.0]])
    a = jnp.array([[1.0, -1.0, 0.0], [0.0, 0.0, 0.0]])  # z = (0, 2) and (0, 0)
    R = jnp.array([[5.0, 1.0], [1.0, 1.0]])
    out = np.asarray(rules.z()(layer, a, R))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]], atol=1e-7)
    # epsilon with sign(0) = +1 is finite too, and passes 0 for zero inputs.
    np.testing.assert_allclose(rules.epsilon(1e-3)(layer, a, R)[1], 0.0)


def test_identity_on_square_layer():
    layer = dense(seed=7, n_in=4, n_out=4)
    rng = np.random.default_rng(8)
    a, R = rng.normal(size=(3, 4)), rng.normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_array_equal(rules.identity()(layer, jnp.asarray(a), jnp.asarray(R)), R)


def test_identity_refuses_size_change():
    with pytest.raises(LayerError, match="identity"):
        rules.identity()(dense(), jnp.ones((3, 5)), jnp.ones((3, 4)))


def test_rules_are_jittable():
    layer = dense(seed=9)
    rng = np.random.default_rng(10)
    a, R = _inputs(rng, (3, 5), -0.5, 1.0), rng.normal(size=(3, 4)).astype(np.float32)
    for rule in (rules.epsilon(0.1), rules.alpha_beta(2, 1), rules.gamma(), rules.zbox(-1, 2)):
        jitted = jax.jit(lambda a, R, rule=rule: rule(layer, a, R))
        np.testing.assert_allclose(jitted(a, R), rule(layer, a, R), rtol=1e-5, atol=1e-6)


# --- convolutions ----------------------------------------------------------------------

CONV_CONFIGS = {
    "same": {"padding": "SAME", "strides": 1},  # few input channels: `few_channel_conv`
    # The layer's own conv; input seed with all |z| > 0.08, since float32 against float64
    # is ill-conditioned where a denominator is near 0 (here another seed gave |z| = 0.006).
    "same_6ch": {"padding": "SAME", "strides": 1, "channels": 6, "input_seed": 15},
    "valid_stride2": {"padding": "VALID", "strides": 2},
}


@pytest.mark.parametrize("config", list(CONV_CONFIGS), ids=list(CONV_CONFIGS))
@pytest.mark.parametrize("case", RULES, ids=RULE_IDS)  # identity: sizes differ
def test_conv2d_rule_matches_loop_reference(case, config):
    cfg = CONV_CONFIGS[config]
    c_in = cfg.get("channels", 2)
    layer = nnx.Conv(
        c_in, 3, (3, 3), padding=cfg["padding"], strides=cfg["strides"], rngs=nnx.Rngs(0)
    )
    _set(layer, np.random.default_rng(11))
    rule, kind, p = _rule_and_params(case, np.resize(LOW_CH, c_in), np.resize(HIGH_CH, c_in))
    rng = np.random.default_rng(cfg.get("input_seed", 12))
    a = _inputs(rng, (2, 5, 5, c_in), -0.5, 1.0)
    kernel, bias = params_of(layer)
    s = cfg["strides"]
    conns, out_shape = conv_connections(kernel, (5, 5), (s, s), cfg["padding"])
    bias_full = np.broadcast_to(bias, out_shape).ravel()
    y = np.asarray(layer(a))
    assert y.shape[1:] == out_shape
    ref_y = [reference_forward(x.ravel(), conns, bias_full) for x in a.astype(float)]
    assert_close(y, np.stack(ref_y).reshape(y.shape))
    R = rng.normal(size=y.shape).astype(np.float32)
    got = rule(layer, jnp.asarray(a), jnp.asarray(R))
    assert got.shape == a.shape
    assert_close(got, batch_reference(kind, a, R, conns, bias_full, **p))


@pytest.mark.parametrize(
    "case",
    [c for c in RULES if c[0] in ("epsilon0.1", "epsilon1e-6", "alpha2beta1", "zplus", "flat")],
    ids=lambda c: c[0],
)
def test_conv1d_rule_matches_loop_reference(case):
    layer = _set(nnx.Conv(2, 3, (3,), padding="SAME", rngs=nnx.Rngs(0)), np.random.default_rng(13))
    rule, kind, p = _rule_and_params(case, LOW_CH, HIGH_CH)
    rng = np.random.default_rng(14)
    a = _inputs(rng, (2, 7, 2), -0.5, 1.0)
    kernel, bias = params_of(layer)
    conns, out_shape = conv_connections(kernel, (7,), (1,), "SAME")
    assert out_shape == (7, 3)
    bias_full = np.broadcast_to(bias, out_shape).ravel()
    R = rng.normal(size=(2, 7, 3)).astype(np.float32)
    assert_close(rule(layer, a, R), batch_reference(kind, a, R, conns, bias_full, **p))


@pytest.mark.parametrize(
    "case",
    [c for c in RULES if c[0] in ("epsilon0.1", "alpha2beta1", "alpha1beta0", "gamma")],
    ids=lambda c: c[0],
)
def test_grouped_conv_rule_matches_loop_reference(case):
    """Two groups of 2 input channels: the reference sees the block-diagonal full kernel.

    Alpha-beta stacks a+ and a- along the input channels for ungrouped layers; grouped ones
    keep the four separate products, which this checks.
    """
    layer = nnx.Conv(4, 4, (3, 3), feature_group_count=2, padding="SAME", rngs=nnx.Rngs(0))
    _set(layer, np.random.default_rng(21))
    rule, kind, p = _rule_and_params(case, LOW_CH, HIGH_CH)
    rng = np.random.default_rng(22)
    a = _inputs(rng, (2, 4, 4, 4), -0.5, 1.0)
    kernel, bias = params_of(layer)  # (3, 3, 2, 4): outputs 0-1 see inputs 0-1, 2-3 see 2-3
    full = np.zeros((3, 3, 4, 4))
    full[:, :, :2, :2], full[:, :, 2:, 2:] = kernel[:, :, :, :2], kernel[:, :, :, 2:]
    conns, out_shape = conv_connections(full, (4, 4), (1, 1), "SAME")
    conns = [c for c in conns if c[2] != 0.0]
    bias_full = np.broadcast_to(bias, out_shape).ravel()
    y = np.asarray(layer(a))
    assert_close(
        y, np.stack([reference_forward(x.ravel(), conns, bias_full) for x in a]).reshape(y.shape)
    )
    R = rng.normal(size=y.shape).astype(np.float32)
    assert_close(
        rule(layer, jnp.asarray(a), jnp.asarray(R)),
        batch_reference(kind, a, R, conns, bias_full, **p),
    )


def test_flat_counts_connections_at_padded_border():
    """With SAME padding, a corner output sees 2x2 of the 3x3 taps: n_k = 4 * C_in there."""
    layer = _set(nnx.Conv(2, 1, (3, 3), padding="SAME", rngs=nnx.Rngs(0)), np.random.default_rng(0))
    R = jnp.zeros((1, 4, 4, 1)).at[0, 0, 0, 0].set(1.0)
    out = np.asarray(rules.flat(eps=0)(layer, jnp.ones((1, 4, 4, 2)), R))
    expected = np.zeros((1, 4, 4, 2))
    expected[0, :2, :2, :] = 1 / 8
    np.testing.assert_allclose(out, expected, rtol=1e-6)


# --- batch-norm ------------------------------------------------------------------------


def batchnorm(seed: int = 15) -> nnx.BatchNorm:
    rng = np.random.default_rng(seed)
    bn = nnx.BatchNorm(4, rngs=nnx.Rngs(0))
    bn.mean[...] = jnp.asarray(rng.normal(size=4), jnp.float32)
    bn.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, size=4), jnp.float32)
    bn.scale[...] = jnp.asarray(rng.normal(size=4), jnp.float32)
    bn.bias[...] = jnp.asarray(rng.normal(size=4), jnp.float32)
    bn.eval()
    return bn


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 3, 4)], ids=["dense", "image"])
@pytest.mark.parametrize("eps", [1e-6, 0.1])
def test_batchnorm_epsilon_is_per_channel_affine(shape, eps):
    bn = batchnorm()
    rng = np.random.default_rng(16)
    a = rng.normal(size=shape).astype(np.float32)
    R = rng.normal(size=shape).astype(np.float32)
    mean, var = np.asarray(bn.mean[...], float), np.asarray(bn.var[...], float)
    scale, shift = np.asarray(bn.scale[...], float), np.asarray(bn.bias[...], float)
    w = scale / np.sqrt(var + bn.epsilon)
    b = shift - mean * w
    expected = np.empty(shape)
    a64, R64 = a.astype(float), R.astype(float)
    for idx in np.ndindex(*shape):
        c = idx[-1]
        zj = a64[idx] * w[c] + b[c]
        expected[idx] = a64[idx] * w[c] / stab(zj, eps) * R64[idx]
    assert_close(bn(a), a64 * w + b)  # eval mode uses the running statistics
    assert_close(rules.epsilon(eps)(bn, a, R), expected)


def test_batchnorm_identity_returns_relevance():
    rng = np.random.default_rng(17)
    a, R = rng.normal(size=(3, 4)), rng.normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_array_equal(rules.identity()(batchnorm(), a, jnp.asarray(R)), R)


# --- max-pooling -----------------------------------------------------------------------


def pool_reference(a: np.ndarray, R: np.ndarray, mode: str, eps: float = 1e-6) -> np.ndarray:
    """2x2 non-overlapping windows; a trailing row/column outside every window gets 0."""
    n, h, w, c = a.shape
    out = np.zeros(a.shape)
    for i, oi, oj, ch in itertools.product(range(n), range(h // 2), range(w // 2), range(c)):
        cells = [(2 * oi + di, 2 * oj + dj) for di in range(2) for dj in range(2)]
        values = [float(a[i, y, x, ch]) for y, x in cells]
        r = float(R[i, oi, oj, ch])
        if mode == "proportional":
            den = stab(sum(values), eps)
            for (y, x), v in zip(cells, values, strict=True):
                out[i, y, x, ch] = v / den * r
        else:  # winner-take-all, ties share
            top = max(values)
            winners = [cell for cell, v in zip(cells, values, strict=True) if v == top]
            for y, x in winners:
                out[i, y, x, ch] = r / len(winners)
    return out


@pytest.mark.parametrize("size", [4, 5], ids=["even", "cropped"])
@pytest.mark.parametrize("eps", [1e-6, 0.1])
def test_maxpool_proportional(size, eps):
    rng = np.random.default_rng(18)
    a = rng.uniform(0.1, 1.0, size=(2, size, size, 3)).astype(np.float32)
    pool = MaxPool((2, 2))
    R = rng.normal(size=pool(a).shape).astype(np.float32)
    got = rules.proportional(eps)(pool, jnp.asarray(a), jnp.asarray(R))
    assert got.shape == a.shape
    assert_close(got, pool_reference(a, R, "proportional", eps))


@pytest.mark.parametrize("size", [4, 5], ids=["even", "cropped"])
def test_maxpool_gradient_is_winner_take_all(size):
    rng = np.random.default_rng(19)
    a = rng.uniform(0.1, 1.0, size=(2, size, size, 3)).astype(np.float32)
    pool = MaxPool((2, 2))
    R = rng.normal(size=pool(a).shape).astype(np.float32)
    got = rules.gradient()(pool, jnp.asarray(a), jnp.asarray(R))
    assert_close(got, pool_reference(a, R, "gradient"))


def test_maxpool_gradient_splits_ties_equally():
    a = np.zeros((1, 2, 4, 1), np.float32)
    a[0, :, :2, 0] = [[0.5, 0.9], [0.9, 0.1]]  # two maxima
    a[0, :, 2:, 0] = 0.2  # four maxima
    pool = MaxPool((2, 2))
    R = jnp.array([[[[3.0], [2.0]]]])
    got = np.asarray(rules.gradient()(pool, jnp.asarray(a), R))
    expected = np.zeros((1, 2, 4, 1))
    expected[0, 0, 1, 0] = expected[0, 1, 0, 0] = 1.5
    expected[0, :, 2:, 0] = 0.5
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert_close(got, pool_reference(a, np.asarray(R), "gradient"))


def test_proportional_refuses_other_layers():
    with pytest.raises(TypeError, match="MaxPool"):
        rules.proportional()(dense(), jnp.ones((1, 5)), jnp.ones((1, 4)))


# --- presets ---------------------------------------------------------------------------


def test_alpha_beta_must_conserve():
    with pytest.raises(ValueError, match="alpha - beta must be 1"):
        rules.alpha_beta(3, 1)
    with pytest.raises(ValueError):
        rules.alpha_beta(1, 1)


def test_rules_compare_equal_by_parameters():
    assert rules.epsilon(0.1) == rules.epsilon(0.1)
    assert hash(rules.epsilon(0.1)) == hash(rules.epsilon(0.1))
    assert rules.epsilon(0.1) != rules.epsilon(0.2)
    assert rules.zplus() == rules.alpha_beta(1, 0)
    assert rules.zbox(np.array([0.0, 1.0]), 1) == rules.zbox([0.0, 1.0], 1.0)
    hash(rules.zbox(np.array([0.0, 1.0]), np.array([1.0, 2.0])))  # per-channel bounds hash
    assert repr(rules.epsilon(0.25)) == "Epsilon(eps=0.25)"


@pytest.mark.parametrize("sign", [-1.0, 1.0], ids=["weak_negative_side", "weak_positive_side"])
def test_alpha_beta_weak_side_of_a_neuron(sign):
    """64 contributions of one sign and one small one of the other sign (1.5e-4, 150 eps):
    the formula gives the small one nearly beta R (alpha R for z+); float32 resolves it."""
    n = 64
    rng = np.random.default_rng(20)
    w = -sign * rng.uniform(0.5, 1.0, size=(n, 1))
    w[0, 0] = sign * 2e-4
    layer = nnx.Linear(n, 1, use_bias=False, rngs=nnx.Rngs(0))
    layer.kernel[...] = jnp.asarray(w, jnp.float32)
    a = rng.uniform(0.5, 1.0, size=(2, n)).astype(np.float32)
    R = np.ones((2, 1), np.float32)
    kernel, _ = params_of(layer)
    conns = dense_connections(kernel)
    for rule, p in (
        (rules.alpha_beta(2, 1), {"alpha": 2, "beta": 1, "eps": 1e-6}),
        (rules.zplus(), {"alpha": 1, "beta": 0, "eps": 1e-6}),
    ):
        expected = batch_reference("alpha_beta", a, R, conns, np.zeros(1), **p)
        assert_close(rule(layer, a, R), expected, rtol=1e-4)


# --- per-unit forms --------------------------------------------------------------------

PER_UNIT_RULES = [
    rules.epsilon(1e-6),
    rules.epsilon(0.1),
    rules.z(),
    rules.alpha_beta(2, 1),
    rules.zplus(),
    rules.gamma(0.25),
    rules.gamma(1.0, eps=0.05),
]
PER_UNIT_LAYERS = {
    "dense": (lambda: dense(seed=3), (4, 5)),
    "conv_rgb": (lambda: _set(nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)), np.random.default_rng(4)),
                 (2, 6, 6, 3)),
    "conv_strided": (lambda: _set(nnx.Conv(5, 4, (3, 3), strides=2, padding="VALID",
                                           rngs=nnx.Rngs(0)), np.random.default_rng(5)),
                     (2, 7, 7, 5)),
    "batchnorm": (batchnorm, (2, 3, 3, 4)),
}  # fmt: skip


@pytest.mark.parametrize("layer_id", list(PER_UNIT_LAYERS))
@pytest.mark.parametrize("rule", PER_UNIT_RULES, ids=repr)
def test_per_unit_form_equals_rule(rule, layer_id):
    """a * c_in from rule.backward(layer, a, y, R / y) is the rule's R_in (its definition),
    with y the layer's own output."""
    make, shape = PER_UNIT_LAYERS[layer_id]
    layer = make()
    rng = np.random.default_rng(6)
    a = jnp.asarray(_inputs(rng, shape))
    y = layer(a)
    c = jnp.asarray(rng.normal(size=y.shape).astype(np.float32))
    assert type(rule).backward is not rules.Rule.backward  # a per-unit form of its own
    c_in, R_in = rule.backward(layer, a, y, c)
    assert_close(a * c_in, rule(layer, a, y * c), rtol=2e-5)
    assert_close(R_in, a * c_in, rtol=1e-6)


def test_rules_without_per_unit_form_use_their_definition():
    """flat, w^2, z^B, identity and plain functions: backward = definition, c_in = R_in / a."""
    layer = dense(seed=3)
    rng = np.random.default_rng(6)
    a = jnp.asarray(_inputs(rng, (4, 5)))
    y = layer(a)
    c = jnp.asarray(rng.normal(size=y.shape).astype(np.float32))
    for rule in (rules.flat(), rules.wsquare(), rules.zbox(-2, 2), rules.as_rule(_halves)):
        assert type(rule).backward is rules.Rule.backward
        c_in, R_in = rule.backward(layer, a, y, c)
        assert_close(R_in, rule(layer, a, y * c), rtol=1e-6)
        assert_close(a * c_in, R_in, rtol=1e-5)


def _halves(layer, a, R):
    """A user rule as a plain function: half of the epsilon rule's relevance."""
    return 0.5 * rules.epsilon()(layer, a, R)


@pytest.mark.parametrize("layer_id", ["dense", "conv_rgb", "conv_strided", "batchnorm"])
def test_zplus_from_the_output_matches_loop_reference_where_output_is_positive(layer_id):
    """z+ for a layer before a ReLU (relevance zero wherever y <= 0) takes z+ from y and
    one product of |W| and |a|: it is the per-neuron z+ there."""
    make, shape = PER_UNIT_LAYERS[layer_id]
    layer = make()
    rng = np.random.default_rng(7)
    a = jnp.asarray(_inputs(rng, shape))
    y = layer(a)
    c = jnp.where(y > 0, jnp.asarray(rng.normal(size=y.shape).astype(np.float32)), 0.0)
    rule = rules.zplus().for_rectified_output()
    assert rule.rectified
    _, R_in = rule.backward(layer, a, y, c)
    assert_close(R_in, rules.zplus()(layer, a, y * c), rtol=2e-5)
    if layer_id != "batchnorm":
        kernel, bias = params_of(layer)
        if layer_id == "dense":
            conns, bias_full = dense_connections(kernel), bias
        else:
            stride = 2 if layer_id == "conv_strided" else 1
            padding = "VALID" if layer_id == "conv_strided" else "SAME"
            conns, out_shape = conv_connections(kernel, shape[1:3], (stride, stride), padding)
            bias_full = np.broadcast_to(bias, out_shape).ravel()
        ref = batch_reference("alpha_beta", a, y * c, conns, bias_full, alpha=1, beta=0, eps=1e-6)
        assert_close(R_in, ref, rtol=2e-5)


def test_only_zplus_has_a_form_for_rectified_outputs():
    assert rules.alpha_beta(2, 1).for_rectified_output() == rules.alpha_beta(2, 1)
    assert rules.epsilon().for_rectified_output() == rules.epsilon()
    assert rules.zplus().for_rectified_output() != rules.zplus()
    with pytest.raises(ValueError, match="z\\+"):
        rules.AlphaBeta(2.0, 1.0, 1e-6, rectified=True)


GROUPED = (
    lambda: _set(
        nnx.Conv(4, 4, (3, 3), feature_group_count=2, rngs=nnx.Rngs(0)),
        np.random.default_rng(21),
    ),
    (2, 4, 4, 4),
)


@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (2.0, 1.0)])
@pytest.mark.parametrize("layer_id", ["dense", "conv_rgb", "conv_strided", "grouped"])
def test_alpha_beta_for_nonnegative_inputs_matches_loop_reference(layer_id, alpha, beta):
    """With a >= 0, alpha-beta's two-product form (one for z+) is the per-neuron rule."""
    make, shape = GROUPED if layer_id == "grouped" else PER_UNIT_LAYERS[layer_id]
    layer = make()
    rng = np.random.default_rng(8)
    a_np = np.maximum(_inputs(rng, shape), 0.0)  # about a third of the entries are zero
    a = jnp.asarray(a_np)
    y = layer(a)
    c = jnp.asarray(rng.normal(size=y.shape).astype(np.float32))
    rule = rules.alpha_beta(alpha, beta).for_nonnegative_input()
    assert rule.nonnegative_input
    for exact in (rule, rule.for_rectified_output()):  # the non-negative form wins
        _, R_in = exact.backward(layer, a, y, c)
        assert_close(R_in, rules.alpha_beta(alpha, beta)(layer, a, y * c), rtol=2e-5)
    kernel, bias = params_of(layer)
    if layer_id == "dense":
        conns, bias_full = dense_connections(kernel), bias
    else:
        if layer_id == "grouped":  # block-diagonal full kernel, as in the grouped test above
            full = np.zeros((3, 3, 4, 4))
            full[:, :, :2, :2], full[:, :, 2:, 2:] = kernel[:, :, :, :2], kernel[:, :, :, 2:]
            kernel = full
        stride = 2 if layer_id == "conv_strided" else 1
        padding = "VALID" if layer_id == "conv_strided" else "SAME"
        conns, out_shape = conv_connections(kernel, shape[1:3], (stride, stride), padding)
        conns = [k for k in conns if k[2] != 0.0]
        bias_full = np.broadcast_to(bias, out_shape).ravel()
    ref = batch_reference(
        "alpha_beta", a_np, np.asarray(y * c), conns, bias_full, alpha=alpha, beta=beta, eps=1e-6
    )
    assert_close(R_in, ref, rtol=2e-5)


def test_only_alpha_beta_has_a_form_for_nonnegative_inputs():
    assert rules.epsilon().for_nonnegative_input() == rules.epsilon()
    assert rules.gamma().for_nonnegative_input() == rules.gamma()
    assert rules.alpha_beta(2, 1).for_nonnegative_input().nonnegative_input
