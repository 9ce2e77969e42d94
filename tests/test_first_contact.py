"""Cases that once gave a silently wrong map or a cryptic error (issue #23): a softmax at
the model's output, composite keys that match nothing, inputs out of range or of the wrong
rank, and the default composite. (User layer types in the presets: test_extending.py.)"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lrpjax
from lrpjax import composites, rules


class Head(nnx.Module):
    """Bias-free Linear-ReLU-Linear, returning logits or a normalisation of them."""

    def __init__(self, out: str = "logits", *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(6, 5, use_bias=False, rngs=rngs)
        self.head = nnx.Linear(5, 4, use_bias=False, rngs=rngs)
        self.out = out

    def __call__(self, x):
        z = self.head(nnx.relu(self.hidden(x)))
        if self.out == "softmax":
            return jax.nn.softmax(z)
        if self.out == "nnx_softmax":
            return nnx.softmax(z, axis=-1)
        if self.out == "log_softmax":
            return jax.nn.log_softmax(z)
        if self.out == "written_out":  # unstabilised, as people write it
            e = jnp.exp(z)
            return e / e.sum(-1, keepdims=True)
        if self.out == "softmax_in_jit":  # fused with other work: the logits are out of reach
            return jax.jit(lambda h: jax.nn.softmax(h * 2.0))(z)
        return z


X = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)


def _explain(model, x=X, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        R = lrpjax.explain(model, x, **kwargs)
    return np.asarray(R), [str(w.message) for w in caught]


@pytest.mark.parametrize("out", ["softmax", "nnx_softmax", "log_softmax", "written_out"])
@pytest.mark.parametrize("init", ["logit", "probability"])
def test_a_trailing_softmax_is_explained_below_with_a_warning(out, init):
    logits_model = Head(rngs=nnx.Rngs(0))
    R_logits, quiet = _explain(logits_model, composite="zero", init=init)
    assert not any("softmax" in m for m in quiet)
    R, said = _explain(Head(out, rngs=nnx.Rngs(0)), composite="zero", init=init)
    np.testing.assert_allclose(R, R_logits, rtol=1e-5, atol=1e-7)
    kind = "log_softmax" if out == "log_softmax" else "softmax"
    assert any(f"ends in a {kind}" in m for m in said), said
    # conservation on a bias-free ReLU net: the relevance sums to the target's score, once
    z = np.asarray(logits_model(X))
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    score = (z if init == "logit" else p)[np.arange(len(X)), z.argmax(-1)]
    np.testing.assert_allclose(R.sum(-1), score, rtol=1e-4)


def test_a_trailing_softmax_keeps_logits_and_predictions_in_the_explainer():
    fn, state = lrpjax.explainer(Head("softmax", rngs=nnx.Rngs(0)), composite="epsilon")
    out = jax.jit(fn)(state, jnp.asarray(X), jnp.full((len(X),), -1))
    logits = np.asarray(Head(rngs=nnx.Rngs(0))(X))
    np.testing.assert_allclose(out.logits, logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.target, logits.argmax(-1))


def test_a_softmax_fused_with_other_work_is_refused():
    with pytest.raises(lrpjax.LayerError, match="ends in a softmax computed inside"):
        lrpjax.explain(Head("softmax_in_jit", rngs=nnx.Rngs(0)), X, composite="epsilon")


@pytest.mark.parametrize("key", ["cnv*", "hiden", "head/kernel"])
def test_a_path_key_matching_no_layer_is_an_error_naming_the_paths(key):
    composite = {nnx.Linear: rules.epsilon(), key: rules.zplus()}
    with pytest.raises(lrpjax.LayerError, match=r"matches no layer.*\['hidden', 'head'\]"):
        lrpjax.explain(Head(rngs=nnx.Rngs(0)), X, composite=composite)


def test_a_path_key_matching_a_layer_is_used():
    composite = {nnx.Linear: rules.epsilon(), "hid*": rules.alpha_beta(1, 0)}
    R = lrpjax.explain(Head(rngs=nnx.Rngs(0)), X, composite=composite)
    assert R.shape == X.shape


@pytest.mark.parametrize("scale", [255.0, -30.0])
def test_images_far_outside_the_unit_range_warn_with_any_rule(scale):
    model = lrpjax.models.MiniVGG(rngs=nnx.Rngs(0))
    model.eval()
    x = np.random.default_rng(1).random((2, 32, 32, 3), dtype=np.float32)
    for composite in ("epsilon", "epsilon_alpha2_beta1"):
        _, quiet = _explain(model, x, composite=composite)
        assert not any("far outside" in m for m in quiet)
        _, said = _explain(model, x * scale, composite=composite)
        assert any("far outside [0, 1]" in m for m in said), said


def test_flat_images_get_a_shape_error_that_says_how_to_fix_them():
    model = lrpjax.models.MiniVGG(rngs=nnx.Rngs(0))
    model.eval()
    x = np.random.default_rng(1).random((2, 3072), dtype=np.float32)
    with pytest.raises(ValueError, match=r"takes \(N, H, W, 3\) .*x.reshape\(2, 32, 32, 3\)"):
        lrpjax.explain(model, x)


def test_the_default_composite_is_the_evaluations_best_preset():
    assert composites.DEFAULT == "epsilon_gamma_box"
    model = lrpjax.models.MiniVGG(rngs=nnx.Rngs(0))
    model.eval()
    x = np.random.default_rng(1).random((2, 32, 32, 3), dtype=np.float32)
    default = np.asarray(lrpjax.explain(model, x))
    np.testing.assert_array_equal(
        default, np.asarray(lrpjax.explain(model, x, composite="epsilon_gamma_box"))
    )
    assert not np.allclose(default, np.asarray(lrpjax.explain(model, x, composite="epsilon")))


def test_the_zero_preset_is_lrp0_equal_to_gradient_times_input():
    model = Head(rngs=nnx.Rngs(3))
    R = np.asarray(lrpjax.explain(model, X, composite="zero"))
    target = np.asarray(model(X)).argmax(-1)
    grad = jax.grad(lambda x: jnp.take_along_axis(model(x), target[:, None], 1).sum())(X)
    np.testing.assert_allclose(R, X * np.asarray(grad), rtol=1e-5, atol=1e-6)
