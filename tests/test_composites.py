"""Composites: which rule each layer gets (presets, precedence, globs, subclasses, positions),
name lookup, equality (for jit cache hits), and composites given to `lrpjax.explain`."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lrpjax.composites import FIRST, LAST
from lrpjax.layers import Flatten, MaxPool, ReLU

import lrpjax
from lrpjax import composites, rules

RNGS = nnx.Rngs(0)
CONV = nnx.Conv(3, 4, (3, 3), rngs=RNGS)
LINEAR = nnx.Linear(4, 2, rngs=RNGS)
BN = nnx.BatchNorm(4, rngs=RNGS)
NONE = frozenset()
FIRST_ONLY = frozenset({FIRST})
LAST_ONLY = frozenset({LAST})


class MyConv(nnx.Conv):
    """A subclass: matches nnx.Conv keys unless it has its own."""


MY_CONV = MyConv(3, 4, (3, 3), rngs=RNGS)

# preset name -> (kwargs, conv rule, first-layer conv rule, linear rule)
EPS = rules.epsilon(1e-6)
PRESET_MAPPINGS = {
    "epsilon": ({"eps": 0.1}, rules.epsilon(0.1), rules.epsilon(0.1), rules.epsilon(0.1)),
    "epsilon_plus": ({"eps": 0.1}, rules.zplus(), rules.zplus(), rules.epsilon(0.1)),
    "epsilon_plus_flat": ({"eps": 0.1}, rules.zplus(), rules.flat(), rules.epsilon(0.1)),
    "epsilon_gamma_box": (
        {"gamma": 0.5, "low": -1.0, "high": 2.0},
        rules.gamma(0.5),
        rules.zbox(-1.0, 2.0),
        EPS,
    ),
    "epsilon_alpha2_beta1": ({}, rules.alpha_beta(2, 1), rules.alpha_beta(2, 1), EPS),
    "epsilon_alpha2_beta1_flat": ({}, rules.alpha_beta(2, 1), rules.flat(), EPS),
    "sequential_a": ({}, rules.alpha_beta(1, 0), rules.alpha_beta(1, 0), rules.epsilon(0.25)),
    "sequential_b": ({}, rules.alpha_beta(2, 1), rules.alpha_beta(2, 1), rules.epsilon(0.25)),
}


@pytest.mark.parametrize("name", list(PRESET_MAPPINGS))
def test_preset_mappings(name):
    kwargs, conv, first_conv, linear = PRESET_MAPPINGS[name]
    comp = composites.PRESETS[name](**kwargs)
    assert comp.rule_for("conv2", CONV, NONE) == conv
    assert comp.rule_for("conv1", CONV, FIRST_ONLY) == first_conv
    assert comp.rule_for("dense1", LINEAR, NONE) == linear
    assert comp.rule_for("dense2", LINEAR, LAST_ONLY) == linear
    assert comp.rule_for("bn1", BN, NONE) == rules.epsilon(1e-6)
    for layer in (ReLU(), Flatten(), MaxPool((2, 2)), nnx.Dropout(0.5, rngs=RNGS)):
        assert comp.rule_for("x", layer, NONE) == rules.gradient()
    assert comp.rule_for("norm", nnx.LayerNorm(4, rngs=RNGS), NONE) == rules.epsilon()
    assert comp.rule_for("norm", nnx.GroupNorm(4, num_groups=2, rngs=RNGS), NONE) is None
    # the batchnorm argument
    assert (
        composites.PRESETS[name](batchnorm=rules.identity()).rule_for("bn1", BN, NONE)
        == rules.identity()
    )


def test_epsilon_gamma_box_example_from_brief():
    comp = composites.epsilon_gamma_box(gamma=0.5)
    first = comp.rule_for("conv1", CONV, frozenset({FIRST}))
    assert first == rules.zbox(0.0, 1.0)
    assert isinstance(first, rules.ZBox)
    assert comp.rule_for("conv3", CONV, NONE) == rules.gamma(0.5)
    assert comp.rule_for("dense1", LINEAR, NONE) == rules.epsilon()
    # per-channel bounds
    per_channel = composites.epsilon_gamma_box(low=np.zeros(3), high=np.ones(3))
    assert per_channel.rule_for("conv1", CONV, FIRST_ONLY) == rules.zbox(np.zeros(3), np.ones(3))


def test_precedence_path_then_position_then_type():
    a, b, c, d = rules.z(), rules.flat(), rules.epsilon(0.5), rules.wsquare()
    for mapping in (
        {nnx.Conv: a, FIRST: b, "conv1": c, LAST: d},
        {"conv1": c, LAST: d, FIRST: b, nnx.Conv: a},  # order of the dict does not matter
    ):
        comp = composites.get(mapping)
        assert comp.rule_for("conv1", CONV, FIRST_ONLY) == c  # path beats position
        assert comp.rule_for("conv1", CONV, NONE) == c  # path beats type
        assert comp.rule_for("conv2", CONV, FIRST_ONLY) == b  # position beats type
        assert comp.rule_for("conv9", CONV, LAST_ONLY) == d
        assert comp.rule_for("conv2", CONV, NONE) == a


def test_glob_path_keys():
    comp = composites.get({"block*/conv": rules.z(), "blocks/*/bn": rules.identity()})
    assert comp.rule_for("block1/conv", CONV, NONE) == rules.z()
    assert comp.rule_for("blockA/conv", CONV, NONE) == rules.z()
    assert comp.rule_for("stem/conv", CONV, NONE) is None
    assert comp.rule_for("block1/conv2", CONV, NONE) is None  # the glob is anchored
    assert comp.rule_for("blocks/0/bn", BN, NONE) == rules.identity()
    # a glob path also beats the position
    comp = composites.get({"l?": rules.z(), FIRST: rules.flat()})
    assert comp.rule_for("l1", LINEAR, FIRST_ONLY) == rules.z()


def test_subclasses_match_type_keys_closest_class_wins():
    a, b, c = rules.z(), rules.epsilon(0.3), rules.identity()
    assert composites.get({nnx.Conv: a}).rule_for("c", MY_CONV, NONE) == a
    for mapping in ({nnx.Conv: a, MyConv: b}, {MyConv: b, nnx.Conv: a}):
        comp = composites.get(mapping)
        assert comp.rule_for("c", MY_CONV, NONE) == b
        assert comp.rule_for("c", CONV, NONE) == a
    comp = composites.get({nnx.Module: c, nnx.Conv: a})
    assert comp.rule_for("c", MY_CONV, NONE) == a
    assert comp.rule_for("l", LINEAR, NONE) == c
    # a type key overrides the pass-through default of parameter-free layers
    comp = composites.get({MaxPool: rules.proportional()})
    assert comp.rule_for("pool", MaxPool((2,)), NONE) == rules.proportional()


def test_get_by_name_and_errors():
    assert composites.get("epsilon") == composites.epsilon()
    assert composites.get("epsilon_gamma_box") == composites.epsilon_gamma_box()
    for name, preset in composites.PRESETS.items():
        assert composites.get(name) == preset()
    comp = composites.sequential_b()
    assert composites.get(comp) is comp
    assert isinstance(composites.get({nnx.Linear: rules.z()}), composites.Composite)
    with pytest.raises(ValueError, match="nope") as info:
        composites.get("nope")
    for name in composites.PRESETS:
        assert name in str(info.value)
    with pytest.raises(TypeError):
        composites.get(42)
    with pytest.raises(TypeError, match="key"):
        composites.get({3: rules.z()})
    with pytest.raises(TypeError, match="rule"):
        composites.get({nnx.Linear: "epsilon"})


def test_presets_compare_equal_and_hash_equal():
    for make in (
        lambda: composites.epsilon(eps=0.25),
        lambda: composites.epsilon_gamma_box(gamma=0.5, low=np.zeros(3), high=np.ones(3)),
        lambda: composites.epsilon_plus_flat(batchnorm=rules.identity()),
        lambda: composites.get({nnx.Linear: rules.alpha_beta(2, 1), FIRST: rules.flat()}),
    ):
        one, two = make(), make()
        assert one == two and hash(one) == hash(two)
    assert composites.epsilon(0.25) != composites.epsilon(0.5)
    assert composites.epsilon_gamma_box(gamma=0.5) != composites.epsilon_gamma_box(gamma=0.25)
    assert composites.epsilon() == composites.epsilon(batchnorm=rules.epsilon(1e-6))


def test_presets_equal_for_equal_numbers():
    assert composites.epsilon(1) == composites.epsilon(1.0)


# --- through explain -------------------------------------------------------------------


class Net(nnx.Module):
    """Flatten layer, then two Linear layers with a ReLU between (function call)."""

    def __init__(self, rngs):
        self.flatten = Flatten()
        self.l1 = nnx.Linear(6, 5, use_bias=False, rngs=rngs)
        self.l2 = nnx.Linear(5, 3, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(self.flatten(x))))


class Direct(nnx.Module):
    """Two Linear layers; the first takes the model input itself."""

    def __init__(self, rngs):
        self.l1 = nnx.Linear(6, 5, use_bias=False, rngs=rngs)
        self.l2 = nnx.Linear(5, 3, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x)))


def _x(shape=(3, 2, 3), seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_dict_composite_through_explain_equals_preset():
    model = Direct(nnx.Rngs(1))
    x = _x((3, 6))
    as_dict = lrpjax.explain(model, x, composite={nnx.Linear: rules.epsilon(0.1)})
    preset = lrpjax.explain(model, x, composite=composites.epsilon(0.1))
    by_name = lrpjax.explain(model, x, composite="epsilon")  # eps=1e-6
    np.testing.assert_allclose(as_dict, preset, rtol=1e-6)
    assert not np.allclose(as_dict, by_name, rtol=1e-3)


def test_positions_resolve_to_first_and_last_layers_with_parameters():
    """FIRST is the first layer with parameters (not the Flatten before it), LAST the last."""
    model = Net(nnx.Rngs(2))
    x = _x()
    by_position = {nnx.Linear: rules.z(), FIRST: rules.epsilon(0.5), LAST: rules.epsilon(0.2)}
    by_path = {nnx.Linear: rules.z(), "l1": rules.epsilon(0.5), "l2": rules.epsilon(0.2)}
    r_pos = lrpjax.explain(model, x, composite=by_position, target=0)
    r_path = lrpjax.explain(model, x, composite=by_path, target=0)
    np.testing.assert_allclose(r_pos, r_path, rtol=1e-6)
    r_z = lrpjax.explain(model, x, composite={nnx.Linear: rules.z()}, target=0)
    assert not np.allclose(r_pos, r_z, rtol=1e-3)


def test_resolve_rules_gives_every_layer_its_rule_in_call_order():
    model = Net(nnx.Rngs(2))
    x = _x()
    mapping = {nnx.Linear: rules.z(), FIRST: rules.flat()}
    resolved = lrpjax.resolve_rules(model, x, mapping)
    assert list(resolved) == [path for path, _ in lrpjax.engine.layer_calls(model, x)]
    assert resolved == {"flatten": rules.gradient(), "l1": rules.flat(), "l2": rules.z()}
    # The resolved rules, as a composite of paths, explain as the composite does.
    np.testing.assert_allclose(
        lrpjax.explain(model, x, composite=resolved), lrpjax.explain(model, x, composite=mapping)
    )
    default = lrpjax.resolve_rules(model, x)  # epsilon_gamma_box
    assert default["l1"] == rules.zbox(0.0, 1.0)
    assert default["l2"] == rules.epsilon()
    with pytest.raises(lrpjax.LayerError, match="'l3', which matches no layer"):
        lrpjax.resolve_rules(model, x, {**mapping, "l3": rules.z()})
    with pytest.raises(lrpjax.LayerError, match="no rule for layer 'l2'"):
        lrpjax.resolve_rules(model, x, {FIRST: rules.flat()})


def test_explainer_reuses_the_function_for_equal_composites():
    """Equal composites built separately give the same cached function (a jit cache hit)."""
    model = Direct(nnx.Rngs(3))
    fn1, _ = lrpjax.explainer(model, composite=composites.epsilon_gamma_box(gamma=0.5))
    fn2, _ = lrpjax.explainer(model, composite=composites.epsilon_gamma_box(gamma=0.5))
    assert fn1 is fn2
    fn3, _ = lrpjax.explainer(model, composite="epsilon")
    fn4, _ = lrpjax.explainer(model, composite=composites.epsilon())
    assert fn3 is fn4
    fn5, _ = lrpjax.explainer(model, composite=composites.epsilon_gamma_box(gamma=0.25))
    assert fn5 is not fn1


def test_proportional_max_pool_through_explain_conserves():
    class PoolNet(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(2, 3, (3,), padding="SAME", use_bias=False, rngs=rngs)
            self.pool = MaxPool((2,))
            self.dense = nnx.Linear(12, 2, use_bias=False, rngs=rngs)

        def __call__(self, x):
            x = self.pool(nnx.relu(self.conv(x)))
            return self.dense(x.reshape((x.shape[0], -1)))

    model = PoolNet(nnx.Rngs(4))
    x = _x((2, 8, 2), seed=5)
    comp = {nnx.Conv: rules.z(), nnx.Linear: rules.z(), MaxPool: rules.proportional(1e-9)}
    r, layers = lrpjax.explain(model, x, composite=comp, target=1, layerwise=True)
    logit = np.asarray(model(jnp.asarray(x)))[:, 1]
    np.testing.assert_allclose(np.asarray(r).reshape(2, -1).sum(1), logit, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(layers["pool"]).reshape(2, -1).sum(1), logit, rtol=1e-4)
    # proportional differs from winner-take-all
    wta = lrpjax.explain(model, x, composite={**comp, MaxPool: rules.gradient()}, target=1)
    assert not np.allclose(r, wta, rtol=1e-3)


@pytest.mark.parametrize("first", [rules.flat(), rules.zbox(-3.0, 3.0)], ids=["flat", "zbox"])
def test_first_layer_relevance_reaches_zero_inputs_directly(first):
    """flat and z^B give zero inputs relevance; the input map keeps it (first layer reads x)."""
    model = Direct(nnx.Rngs(6))
    x = _x((2, 6), seed=7)
    x[:, :2] = 0.0
    _check_zero_input_relevance(model, x, first)


@pytest.mark.parametrize("first", [rules.flat(), rules.zbox(-3.0, 3.0)], ids=["flat", "zbox"])
def test_first_layer_relevance_reaches_zero_inputs_behind_flatten(first):
    model = Net(nnx.Rngs(6))
    x = _x((2, 2, 3), seed=7)
    x[:, 0, :2] = 0.0
    _check_zero_input_relevance(model, x, first)


def _check_zero_input_relevance(model, x, first):
    comp = {nnx.Linear: rules.z(), FIRST: first}
    r, layers = lrpjax.explain(model, x, composite=comp, target=2, layerwise=True)
    r = np.asarray(r).reshape(len(x), -1)
    at_first = np.asarray(layers["l1"])
    logit = np.asarray(model(jnp.asarray(x)))[:, 2]
    np.testing.assert_allclose(at_first.sum(1), logit, rtol=1e-4)  # the layer conserves
    assert np.abs(at_first.reshape(len(x), -1)[:, :2]).min() > 0  # zeros do get some
    np.testing.assert_allclose(r, at_first.reshape(len(x), -1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(composites.PRESETS))
def test_every_preset_survives_a_json_file(name, tmp_path):
    path = tmp_path / f"{name}.json"
    composites.save(name, path, scores={"morf": 1.5})
    loaded = composites.load(path)
    assert loaded == composites.get(name)
    assert composites.get(str(path)) == loaded
    assert json.loads(path.read_text())["scores"] == {"morf": 1.5}
    assert not list(tmp_path.glob(".*partial"))


def test_a_saved_custom_composite_explains_as_the_original(tmp_path):
    model = Direct(nnx.Rngs(3))
    x = np.abs(_x((3, 6), seed=4)) / 3
    custom = {
        "l1": rules.zbox((0.0,) * 6, (1.0,) * 6),
        composites.LAST: rules.epsilon(0.25),
        nnx.Linear: rules.gamma(0.5),
        lrpjax.layer_types.DENSE: rules.alpha_beta(2, 1),
        composites.SOFTMAX: rules.hold_constant(),
    }
    composites.save(custom, tmp_path / "c.json")
    expected = lrpjax.explain(model, x, composite=custom)
    got = lrpjax.explain(model, x, composite=str(tmp_path / "c.json"))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


class _UserLayer(nnx.Module):
    pass


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "not a readable JSON composite"),
        ('{"format": "other"}', "not an lrpjax composite"),
        ('{"format": "lrpjax-composite", "mapping": [{"key": {"path": "a"}, "rule": "Evil"}]}',
         "unknown rule 'Evil'"),
        ('{"format": "lrpjax-composite", "mapping": [{"key": {"type": "os.system"}, '
         '"rule": "Z"}]}', "unknown layer type 'os.system'"),
        ('{"format": "lrpjax-composite", "mapping": [{"key": {"path": "a"}, "rule": "Gamma", '
         '"params": {"gama": 1}}]}', "no parameters"),
        ('{"format": "lrpjax-composite"}', "missing 'mapping'"),
    ],
)  # fmt: skip
def test_bad_composite_files_are_clear_errors(content, message, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        composites.load(path)


def test_what_a_file_cannot_name_safely_is_refused(tmp_path):
    with pytest.raises(ValueError, match="cannot be saved"):
        composites.save({_UserLayer: rules.z()}, tmp_path / "x.json")
    with pytest.raises(ValueError, match="cannot be saved"):
        composites.save({"a": lambda layer, a, R: R}, tmp_path / "x.json")
    with pytest.raises(ValueError, match="no composite file"):
        composites.load(tmp_path / "missing.json")
