"""Composites: which rule explains which layer.

A composite maps keys to rules (`lrpjax.core.rules`). A key is one of:

- a layer path, ``"conv1"`` or ``"blocks/0/conv"``, or a glob over paths (``"block*/conv"``);
- a position: `FIRST` (the first layer with parameters to see the input) or `LAST`
  (the last layer with parameters, which produces the output);
- a layer type, e.g. ``nnx.Conv``; it also matches subclasses, the closest class winning;
- a layer group (`lrpjax.core.layer_types.LayerGroup`: `DENSE`, `CONV`, `BATCH_NORMS`,
  `LAYER_NORMS`), which the presets map: a type registered with
  `layer_types.register_affine` joins `DENSE` (or the group it names) and so every preset.

A path key or glob that matches no layer of the model is an error naming the paths there
are (a typo would otherwise leave the layer to its type's rule, silently).

A layer takes the rule of its path if one matches, else that of its position, else that of
its type. Parameter-free layers lrpjax knows (ReLU, dropout, flatten, max-pool) default to
`rules.gradient` (winner-take-all through max-pool), token embeddings to `rules.embedding`.
A layer with parameters and no rule is an error, never a silent guess. A module with
sub-modules mapped by path or type (``{nnx.MultiHeadAttention: rules.gradient()}``) is
explained as one unit with that rule; its inside is not walked.

The model's code between layers (glue, `lrpjax.core.glue`) follows AttnLRP (Achtibat et al.
2024) unless the composite maps these keys: `ACTIVATION` (elementwise non-linearities:
`rules.identity`), `PRODUCT` (products of two input-dependent tensors: `rules.uniform`) and
`SOFTMAX` (`rules.gradient`, AttnLRP's softmax rule; `rules.hold_constant` for CP-LRP, as in
the `cp_lrp` preset).

Write a composite as a plain dict (``{nnx.Conv: rules.zplus(), FIRST: rules.flat()}``) or
use a preset below by calling it (``epsilon(eps=0.25)``) or by name (``"epsilon"``).

Every preset maps batch-norm, an affine layer in inference mode that here follows a ReLU and
so cannot be merged into the linear layer before it, to `rules.epsilon` with eps=1e-6
(argument ``batchnorm``): each input keeps the share ``a w / z`` of the normalised output
and the shift's share is absorbed, as LRP does for any bias. The alternative,
`rules.identity`, hands the whole output relevance to the input, including the share that
the shift (not the input) produced.

References:
  Kohlbrenner, Bauer, Nakajima, Binder, Samek, Lapuschkin (2020). Towards best practice in
  explaining neural network decisions with LRP. IJCNN.
  Montavon, Binder, Lapuschkin, Samek, Müller (2019). Layer-Wise Relevance Propagation:
  An Overview. LNCS 11700.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from flax import nnx

from lrpjax.core import canonizers, layer_types, layers, rules
from lrpjax.core.glue import ACTIVATION, PRODUCT, SOFTMAX
from lrpjax.core.layer_types import LayerError

__all__ = [
    "ACTIVATION",
    "DEFAULT",
    "FILE_FORMAT",
    "FIRST",
    "GLUE_DEFAULTS",
    "LAST",
    "PRESETS",
    "PRODUCT",
    "SOFTMAX",
    "Composite",
    "cp_lrp",
    "epsilon",
    "epsilon_alpha2_beta1",
    "epsilon_alpha2_beta1_flat",
    "epsilon_gamma_box",
    "epsilon_plus",
    "epsilon_plus_flat",
    "from_json",
    "get",
    "load",
    "save",
    "sequential_a",
    "sequential_b",
    "to_json",
    "with_canonizers",
    "zero",
]

FIRST = "<first>"
LAST = "<last>"
# ACTIVATION, PRODUCT, SOFTMAX: the glue keys, defined by `lrpjax.core.glue`, which uses them.
_SPECIAL = (FIRST, LAST, ACTIVATION, PRODUCT, SOFTMAX)

RuleLike = Callable[..., Any]

#: Glue rules unless a composite maps their key: AttnLRP (Achtibat et al. 2024).
GLUE_DEFAULTS: dict[str, rules.Rule] = {
    ACTIVATION: rules.identity(),
    PRODUCT: rules.uniform(),
    SOFTMAX: rules.gradient(),
}


class Composite(NamedTuple):
    """An ordered, hashable mapping of keys (path, position, type) to rules, and the
    canonizers (`lrpjax.core.canonizers`) applied to the model before it is explained."""

    name: str
    mapping: tuple[tuple[Any, RuleLike], ...]
    canonizers: tuple[Callable, ...] = ()

    def explicit_rule(self, path: str, layer: nnx.Module) -> rules.Rule | None:
        """The rule mapped to `path`, to the layer's type or to a `layer_types.LayerGroup`
        holding it, or None (no defaults). A type key beats a group key; among each, the
        closest class wins."""
        for key, rule in self.mapping:
            if isinstance(key, str) and key not in _SPECIAL and fnmatch.fnmatchcase(path, key):
                return rules.as_rule(rule)
        mro = type(layer_types.unbound(layer)).__mro__
        typed = [(mro.index(key), rule) for key, rule in self.mapping if key in mro]
        if typed:
            return rules.as_rule(min(typed, key=lambda t: t[0])[1])
        grouped = [
            (key.distance(layer), rule)
            for key, rule in self.mapping
            if isinstance(key, layer_types.LayerGroup) and layer in key
        ]
        if grouped:
            return rules.as_rule(min(grouped, key=lambda t: t[0])[1])
        return None

    def rule_for(
        self, path: str, layer: nnx.Module, positions: frozenset[str]
    ) -> rules.Rule | None:
        """The rule for a layer at `path` with `positions` (a subset of {FIRST, LAST})."""
        for key, rule in self.mapping:
            if isinstance(key, str) and key not in _SPECIAL and fnmatch.fnmatchcase(path, key):
                return rules.as_rule(rule)
        for key, rule in self.mapping:
            if key in (FIRST, LAST) and key in positions:
                return rules.as_rule(rule)
        explicit = self.explicit_rule(path, layer)
        if explicit is not None:
            return explicit
        if isinstance(layer, layer_types.PASS_THROUGH):
            return rules.gradient()
        if isinstance(layer, layer_types.EMBEDDINGS):
            return rules.embedding()
        return None

    def resolve(self, plan) -> dict[str, rules.Rule]:
        """The rule of every unit of a traced model (`lrpjax.engine.resolve_rules` takes a
        model and an input instead).

        Args:
          plan: the model's units as one call traces them (`lrpjax.core.tracing.Plan`): their
            paths in call order (``calls``), the modules (``units``) and the units that take
            the model's input (``takes_input``).

        Returns:
          ``{path: rule}`` in call order. `FIRST` is the first affine unit (none where the
          input is token ids, which an embedding takes), `LAST` the last one.

        Raises:
          LayerError: for a unit without a rule, or a path key that matches no unit.
        """
        affine = [p for p in plan.calls if layer_types.is_affine(plan.units[p])]
        tokens = any(isinstance(plan.units[p], layer_types.EMBEDDINGS) for p in plan.takes_input)
        first = affine[0] if affine and not tokens else None
        last = affine[-1] if affine else None
        resolved = {}
        for path in plan.calls:
            layer = plan.units[path]
            positions = frozenset(k for k, p in ((FIRST, first), (LAST, last)) if p == path)
            rule = self.rule_for(path, layer, positions)
            if rule is None:
                raise LayerError(
                    f"no rule for layer {path!r} ({type(layer).__name__}) in composite "
                    f"{self.name}: map its type or path to a rule from lrpjax.core.rules"
                )
            resolved[path] = rule
        for key in self.path_keys():
            if not any(fnmatch.fnmatchcase(path, key) for path in plan.units):
                raise LayerError(
                    f"composite {self.name} maps {key!r}, which matches no layer of the model;"
                    f" its layer paths are {list(plan.calls)}"
                )
        return resolved

    def path_keys(self) -> tuple[str, ...]:
        """The keys that name layer paths or globs over them (not positions or glue)."""
        return tuple(k for k, _ in self.mapping if isinstance(k, str) and k not in _SPECIAL)

    def glue_rule(self, kind: str) -> rules.Rule:
        """The rule for a kind of glue: `ACTIVATION`, `PRODUCT` or `SOFTMAX`."""
        for key, rule in self.mapping:
            if key == kind:
                return rules.as_rule(rule)
        return GLUE_DEFAULTS[kind]

    def __repr__(self) -> str:
        return f"Composite({self.name})"


def from_mapping(mapping: Mapping[Any, RuleLike], name: str = "custom") -> Composite:
    """Make a `Composite` from a dict of key -> rule."""
    for key, rule in mapping.items():
        if not isinstance(key, str | type | layer_types.LayerGroup):
            raise TypeError(
                f"composite key {key!r} is not a path, position, layer type or layer group"
            )
        if not callable(rule):
            raise TypeError(f"composite value for {key!r} is not a rule: {rule!r}")
    return Composite(name, tuple(mapping.items()))


def _preset(name: str, dense, conv, bn=None, first=None) -> Composite:
    """Dense layers (`layer_types.DENSE`), convolutions (`CONV`), batch-norm (default
    `rules.epsilon`); layer norms take `rules.epsilon` (AttnLRP's rule: the normalising
    scale held constant)."""
    mapping: dict[Any, RuleLike] = {
        layer_types.DENSE: dense,
        layer_types.CONV: conv,
        layer_types.BATCH_NORMS: bn or rules.epsilon(),
        layer_types.LAYER_NORMS: rules.epsilon(),
    }
    if first is not None:
        mapping[FIRST] = first
    return from_mapping(mapping, name)._replace(canonizers=(canonizers.MergeBatchNorm(),))


def epsilon(eps: float = 1e-6, batchnorm: RuleLike | None = None) -> Composite:
    """LRP-epsilon everywhere (the reference study's choice).

    Mapping: Linear -> epsilon(eps); Conv -> epsilon(eps); BatchNorm -> `batchnorm`
    (default epsilon(1e-6)).
    """
    rule = rules.epsilon(eps)
    return _preset(f"epsilon(eps={float(eps)})", rule, rule, batchnorm)


def zero(batchnorm: RuleLike | None = None) -> Composite:
    """LRP-0 everywhere (Bach et al. 2015): :math:`R_j = \\sum_k a_j w_{jk} / z_k \\, R_k`.

    On a bias-free ReLU network it equals gradient x input (Montavon et al. 2019);
    deep networks give noisy maps, as it has no stabiliser. Zennit's and LXT's
    ``z``/``lrp.z``.

    Mapping: Linear, Conv -> `rules.z`; BatchNorm -> `batchnorm` (default `rules.z`).
    """
    rule = rules.z()
    return _preset("zero", rule, rule, batchnorm or rules.z())


def epsilon_plus(eps: float = 1e-6, batchnorm: RuleLike | None = None) -> Composite:
    """Mapping: Linear -> epsilon(eps); Conv -> zplus; BatchNorm -> epsilon(1e-6)."""
    return _preset("epsilon_plus", rules.epsilon(eps), rules.zplus(), batchnorm)


def epsilon_plus_flat(eps: float = 1e-6, batchnorm: RuleLike | None = None) -> Composite:
    """Mapping: first layer -> flat; Linear -> epsilon(eps); Conv -> zplus;
    BatchNorm -> epsilon(1e-6)."""
    return _preset(
        "epsilon_plus_flat", rules.epsilon(eps), rules.zplus(), batchnorm, first=rules.flat()
    )


def epsilon_gamma_box(
    gamma: float = 0.25,
    eps: float = 1e-6,
    low: Any = 0.0,
    high: Any = 1.0,
    batchnorm: RuleLike | None = None,
) -> Composite:
    """Mapping: first layer -> zbox(low, high); Linear -> epsilon(eps); Conv -> gamma(gamma);
    BatchNorm -> epsilon(1e-6). `low`, `high`: the input's bounds (scalars or per channel)."""
    return _preset(
        "epsilon_gamma_box", rules.epsilon(eps), rules.gamma(gamma), batchnorm,
        first=rules.zbox(low, high),
    )  # fmt: skip


def epsilon_alpha2_beta1(eps: float = 1e-6, batchnorm: RuleLike | None = None) -> Composite:
    """Mapping: Linear -> epsilon(eps); Conv -> alpha_beta(2, 1); BatchNorm -> epsilon(1e-6)."""
    return _preset("epsilon_alpha2_beta1", rules.epsilon(eps), rules.alpha_beta(2, 1), batchnorm)


def epsilon_alpha2_beta1_flat(eps: float = 1e-6, batchnorm: RuleLike | None = None) -> Composite:
    """Mapping: first layer -> flat; Linear -> epsilon(eps); Conv -> alpha_beta(2, 1);
    BatchNorm -> epsilon(1e-6)."""
    return _preset(
        "epsilon_alpha2_beta1_flat", rules.epsilon(eps), rules.alpha_beta(2, 1), batchnorm,
        first=rules.flat(),
    )  # fmt: skip


def sequential_a(eps: float = 0.25, batchnorm: RuleLike | None = None) -> Composite:
    """Sequential composite A (Kohlbrenner et al. 2020): dense layers epsilon, convolutions
    alpha1-beta0.

    Mapping: Linear -> epsilon(eps); Conv -> alpha_beta(1, 0); BatchNorm -> epsilon(1e-6).
    """
    return _preset(
        f"sequential_a(eps={float(eps)})", rules.epsilon(eps), rules.alpha_beta(1, 0), batchnorm
    )


def sequential_b(eps: float = 0.25, batchnorm: RuleLike | None = None) -> Composite:
    """Sequential composite B (Kohlbrenner et al. 2020): dense layers epsilon, convolutions
    alpha2-beta1.

    Mapping: Linear -> epsilon(eps); Conv -> alpha_beta(2, 1); BatchNorm -> epsilon(1e-6).
    """
    return _preset(
        f"sequential_b(eps={float(eps)})", rules.epsilon(eps), rules.alpha_beta(2, 1), batchnorm
    )


def cp_lrp(eps: float = 1e-6, batchnorm: RuleLike | None = None) -> Composite:
    """LRP-epsilon with attention weights held constant (CP-LRP, Ali et al. 2022): the
    softmax passes no relevance, and each head's relevance goes to its values.

    Mapping: as `epsilon`, and SOFTMAX -> `rules.hold_constant()`.
    """
    base = epsilon(eps, batchnorm)
    return Composite(f"cp_lrp(eps={float(eps)})", (*base.mapping, (SOFTMAX, rules.hold_constant())))


PRESETS: dict[str, Callable[..., Composite]] = {
    f.__name__: f
    for f in (
        zero,
        epsilon,
        epsilon_plus,
        epsilon_plus_flat,
        epsilon_gamma_box,
        epsilon_alpha2_beta1,
        epsilon_alpha2_beta1_flat,
        sequential_a,
        sequential_b,
        cp_lrp,
    )
}


#: The composite `lrpjax.explain` and `lrpjax explain` use unless told otherwise: the preset
#: our evaluation ranks first on the shipped miniVGG (MoRF AOPC on the CIFAR-10 test split;
#: see the README). LRP-epsilon, the reference study's rule, is ``composite="epsilon"``.
DEFAULT = "epsilon_gamma_box"


def get(composite: str | Composite | Mapping[Any, RuleLike]) -> Composite:
    """Resolve a preset name, a saved composite (a ``.json`` file of `save`), a `Composite`,
    or a dict into a `Composite`.

    Raises:
      ValueError: for an unknown preset name, listing the known ones, or a bad file.
    """
    if isinstance(composite, Composite):
        return composite
    if isinstance(composite, str):
        if composite.endswith(".json"):
            return load(composite)
        if composite not in PRESETS:
            raise ValueError(f"unknown composite {composite!r}; presets: {', '.join(PRESETS)}")
        return PRESETS[composite]()
    if isinstance(composite, Mapping):
        return from_mapping(composite)
    raise TypeError(f"a composite is a preset name, a Composite or a dict, not {composite!r}")


def with_canonizers(composite: str | Composite | Mapping[Any, RuleLike], *canonizers) -> Composite:
    """The composite (a preset name, `Composite` or dict) with canonizers
    (`lrpjax.core.canonizers`) added after its own."""
    base = get(composite)
    return base._replace(canonizers=(*base.canonizers, *canonizers))


# --- composites as JSON files -------------------------------------------------------------

#: Format tag of `save`'s files.
FILE_FORMAT = "lrpjax-composite"
_GROUPS = {g.name: g for g in (
    layer_types.DENSE, layer_types.CONV, layer_types.BATCH_NORMS, layer_types.LAYER_NORMS,
)}  # fmt: skip
#: Modules whose layer types a file may name: an allow-list, so that loading a file never
#: imports or runs code of its choosing.
_TYPE_MODULES = {"flax.nnx": nnx, "lrpjax.core.layers": layers}


def _rule_classes() -> dict[str, type]:
    return {
        name: cls
        for name, cls in vars(rules).items()
        if isinstance(cls, type) and issubclass(cls, rules.Rule) and cls is not rules.Rule
        and not name.startswith("_") and dataclasses.is_dataclass(cls)
    }  # fmt: skip


def _key_to_json(key: Any) -> dict:
    if isinstance(key, layer_types.LayerGroup):
        return {"group": key.name}
    if isinstance(key, str):
        return {"special": key} if key in _SPECIAL else {"path": key}
    for module_name, module in _TYPE_MODULES.items():
        if getattr(module, key.__name__, None) is key:
            return {"type": f"{module_name}.{key.__name__}"}
    raise ValueError(
        f"layer type {key.__module__}.{key.__qualname__} cannot be saved: a file names types "
        f"of {', '.join(_TYPE_MODULES)} only; map its path or a layer group instead"
    )


def _key_from_json(entry: Mapping) -> Any:
    if "group" in entry:
        if entry["group"] not in _GROUPS:
            raise ValueError(f"unknown layer group {entry['group']!r}; groups: {list(_GROUPS)}")
        return _GROUPS[entry["group"]]
    if "special" in entry:
        if entry["special"] not in _SPECIAL:
            raise ValueError(f"unknown position or glue key {entry['special']!r}")
        return entry["special"]
    if "path" in entry:
        return str(entry["path"])
    if "type" in entry:
        module_name, _, name = str(entry["type"]).rpartition(".")
        found = getattr(_TYPE_MODULES.get(module_name), name, None)
        if not isinstance(found, type):
            raise ValueError(f"unknown layer type {entry['type']!r}")
        return found
    raise ValueError(f"a key is a group, special, path or type entry, not {dict(entry)}")


def _rule_to_json(rule: Any) -> dict:
    rule = rules.as_rule(rule)
    name = type(rule).__name__
    if _rule_classes().get(name) is not type(rule):
        raise ValueError(f"rule {rule!r} cannot be saved: only the rules of lrpjax.rules can")
    params = {}
    for field in dataclasses.fields(rule):
        value = getattr(rule, field.name)
        params[field.name] = list(value) if isinstance(value, tuple) else value
    return {"rule": name, "params": params}


def _rule_from_json(entry: Mapping) -> rules.Rule:
    cls = _rule_classes().get(str(entry.get("rule")))
    if cls is None:
        raise ValueError(f"unknown rule {entry.get('rule')!r}; rules: {sorted(_rule_classes())}")
    params = dict(entry.get("params", {}))
    names = {f.name for f in dataclasses.fields(cls)}
    if set(params) - names:
        raise ValueError(f"rule {cls.__name__} has no parameters {sorted(set(params) - names)}")
    for name in ("low", "high"):  # z^B's bounds: scalars or per-channel tuples
        if isinstance(params.get(name), list):
            params[name] = tuple(float(v) for v in params[name])
    return cls(**params)


def to_json(composite: str | Composite | Mapping[Any, RuleLike], **extra: Any) -> dict:
    """A composite as a JSON-serialisable dict (`from_json` reads it back).

    Args:
      composite: a preset name, `Composite` or dict; its keys may be paths, positions, glue
        kinds, layer groups, and layer types of ``flax.nnx`` or ``lrpjax.layers``.
      extra: JSON fields kept beside it (e.g. the scores a tuner measured).

    Raises:
      ValueError: a user layer type or a rule outside `lrpjax.rules`, which a file cannot
        name safely.
    """
    c = get(composite)
    canon = []
    for canonizer in c.canonizers:
        if type(canonizer) is not canonizers.MergeBatchNorm:
            raise ValueError(f"canonizer {canonizer!r} cannot be saved")
        canon.append(type(canonizer).__name__)
    return {
        "format": FILE_FORMAT,
        "name": c.name,
        "mapping": [{"key": _key_to_json(k), **_rule_to_json(r)} for k, r in c.mapping],
        "canonizers": canon,
        **extra,
    }


def from_json(data: Mapping) -> Composite:
    """The `Composite` of a `to_json` dict.

    Raises:
      ValueError: not such a dict, or one naming an unknown rule, key, type or canonizer.
    """
    if not isinstance(data, Mapping) or data.get("format") != FILE_FORMAT:
        raise ValueError(f'not an lrpjax composite (no "format": "{FILE_FORMAT}")')
    mapping = tuple((_key_from_json(e["key"]), _rule_from_json(e)) for e in data["mapping"])
    canon = []
    for name in data.get("canonizers", []):
        if name != canonizers.MergeBatchNorm.__name__:
            raise ValueError(f"unknown canonizer {name!r}")
        canon.append(canonizers.MergeBatchNorm())
    return Composite(str(data.get("name", "saved")), mapping, tuple(canon))


def save(composite: str | Composite | Mapping[Any, RuleLike], path: str | os.PathLike, **extra):
    """Write a composite to a JSON file (`to_json`), atomically: a temporary file beside
    it, renamed into place, so that a crash never leaves half a file."""
    path = Path(path)
    text = json.dumps(to_json(composite, **extra), indent=2)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text + "\n")
    os.replace(partial, path)


def load(path: str | os.PathLike) -> Composite:
    """Read a composite written by `save`.

    Raises:
      ValueError: a missing file, invalid JSON, or not an lrpjax composite.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"no composite file {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a readable JSON composite: {error}") from None
    try:
        return from_json(data)
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path} is not an lrpjax composite: missing {error}") from None
