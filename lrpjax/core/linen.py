"""Linen models: their layers as the NNX layers lrpjax knows, their code between as glue.

A Linen model (``flax.linen``), bridged with ``nnx.bridge.ToNNX`` or given as a module and
its variables, is converted to an NNX model that computes the same function:

- every call of a Linen layer of a type in the allow-list `LAYERS` (``nn.Dense``,
  ``nn.DenseGeneral``, ``nn.Conv``, ``nn.Embed``, ``nn.BatchNorm``, ``nn.LayerNorm``,
  ``nn.RMSNorm``, ``nn.Dropout``) becomes the equivalent NNX layer (``nnx.Linear``,
  ``nnx.LinearGeneral``, ``nnx.Conv``, ...) holding the same variables, at the Linen layer's
  path: ``Conv_0``, ``Block_0/MultiHeadDotProductAttention_0/query``. Composites map their
  rules onto these layers by NNX type, group, position or path, and ``layerwise=True`` keys
  relevance by these paths;
- the Linen code around them (``nn.relu``, ``nn.max_pool``, reshapes, residual additions,
  the attention of ``nn.MultiHeadDotProductAttention``, parameter-free Linen modules) runs as
  it is, and `lrpjax.core.glue` explains it as it does the code of an NNX model;
- it is explained in eval mode whatever flags the code passes: batch-norm uses its running
  statistics, dropout (also inside attention) is off.

Refused with a `LayerError`, never explained silently wrong: a Linen module of another type
that holds variables itself (``nn.ConvTranspose``, ``nn.GroupNorm``, a user layer calling
``self.param``), caches (``decode=True``), a layer method other than ``__call__``
(``nn.Embed.attend``), layers inside Linen's lifted transforms (``nn.scan``, ``nn.vmap``,
``nn.remat``, ``nn.jit``), options the NNX layer has not (a custom ``dot_general``, a
convolution mask), and Linen code that draws random numbers.

This module knows Linen types only to name their NNX equivalents; how those are explained
stays with `lrpjax.core.layer_types`.

`lrpjax.explain` converts the ``ToNNX`` modules of a model by itself (`convert`), with the
batch it explains; `lrpjax.explainer`, which sees no input, asks for ``convert(model, x)``.

Example::

    bridged = nnx.bridge.ToNNX(LinenCNN(), rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(bridged, x)
    R = lrpjax.explain(bridged, x)  # converted by itself
    model = lrpjax.linen.convert(bridged, x)  # or once, e.g. for lrpjax.explainer
    model = lrpjax.core.linen.from_linen(LinenCNN(), variables, x)  # from Linen's own variables
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any, NamedTuple

import jax
from flax import errors as flax_errors
from flax import linen as nn
from flax import nnx, traverse_util
from flax.core import meta, tracers
from flax.linen import dtypes as linen_dtypes
from flax.nnx.bridge import variables as bridge_variables

from lrpjax.core.layer_types import LayerError

__all__ = [
    "LAYERS",
    "LinenModel",
    "LinenScope",
    "check_converted",
    "convert",
    "from_linen",
    "has_linen",
]

#: Collections whose variables are outputs of a call (``sow``), not inputs of the function.
_OUTPUT_COLLECTIONS = frozenset(["intermediates"])
#: Attribute names of the converted model itself (Linen names may not take them).
_OWN = ("lrpjax_linen__module", "lrpjax_linen__layers", "lrpjax_linen__kwargs")


def _no_custom(module: nn.Module, *fields: str) -> None:
    for field in fields:
        if getattr(module, field) is not None:
            raise LayerError(
                f"Linen {type(module).__name__} with a custom {field} has no NNX equivalent "
                "lrpjax knows; use the default"
            )


def _default_promotion(module: nn.Module) -> None:
    """Linen's promote_dtype takes its arrays as arguments, NNX's as a tuple: only Linen's
    default, which NNX's default equals, converts."""
    if module.promote_dtype is not linen_dtypes.promote_dtype:
        raise LayerError(
            f"Linen {type(module).__name__} with a custom promote_dtype has no NNX "
            "equivalent lrpjax knows; use the default"
        )


def _int_axis(module: nn.Module, name: str) -> None:
    if not isinstance(getattr(module, name), int):
        raise LayerError(
            f"lrpjax converts Linen {type(module).__name__} with an int {name} only, "
            f"got {getattr(module, name)!r}"
        )


def _full_precision_stats(module: nn.Module) -> None:
    if not getattr(module, "force_float32_reductions", True):
        raise LayerError(
            f"Linen {type(module).__name__} with force_float32_reductions=False has no NNX "
            "equivalent; use the default"
        )


def _dense(m: nn.Dense, shapes: Mapping, a_shape: tuple) -> tuple:
    _default_promotion(m)
    _no_custom(m, "dot_general", "dot_general_cls")
    kwargs = dict(use_bias=m.use_bias, dtype=m.dtype, param_dtype=m.param_dtype,
                  precision=m.precision)  # fmt: skip
    return nnx.Linear, (shapes["kernel"][0], m.features), kwargs


def _dense_general(m: nn.DenseGeneral, shapes: Mapping, a_shape: tuple) -> tuple:
    _default_promotion(m)
    _no_custom(m, "dot_general", "dot_general_cls")
    if m.batch_dims:
        raise LayerError("lrpjax converts Linen DenseGeneral without batch_dims only")
    axis = (m.axis,) if isinstance(m.axis, int) else tuple(m.axis)
    features = m.features if isinstance(m.features, int) else tuple(m.features)
    kwargs = dict(axis=m.axis, use_bias=m.use_bias, dtype=m.dtype, param_dtype=m.param_dtype,
                  precision=m.precision)  # fmt: skip
    return nnx.LinearGeneral, (tuple(shapes["kernel"][: len(axis)]), features), kwargs


def _conv(m: nn.Conv, shapes: Mapping, a_shape: tuple) -> tuple:
    _default_promotion(m)
    _no_custom(m, "conv_general_dilated", "conv_general_dilated_cls", "mask")
    if isinstance(m.kernel_size, int):
        raise LayerError(
            f"Linen Conv needs kernel_size as a tuple, e.g. ({m.kernel_size}, {m.kernel_size})"
        )
    in_features = shapes["kernel"][-2] * m.feature_group_count
    kwargs = dict(
        padding=m.padding, input_dilation=m.input_dilation, kernel_dilation=m.kernel_dilation,
        feature_group_count=m.feature_group_count, use_bias=m.use_bias, dtype=m.dtype,
        param_dtype=m.param_dtype, precision=m.precision,
    )  # fmt: skip
    return nnx.Conv, (in_features, m.features, tuple(m.kernel_size), m.strides), kwargs


def _embed(m: nn.Embed, shapes: Mapping, a_shape: tuple) -> tuple:
    _default_promotion(m)
    kwargs = dict(dtype=m.dtype, param_dtype=m.param_dtype)
    return nnx.Embed, (m.num_embeddings, m.features), kwargs


def _batch_norm(m: nn.BatchNorm, shapes: Mapping, a_shape: tuple) -> tuple:
    _int_axis(m, "axis")
    _full_precision_stats(m)
    kwargs = dict(
        use_running_average=True, axis=m.axis, momentum=m.momentum, epsilon=m.epsilon,
        dtype=m.dtype, param_dtype=m.param_dtype, use_bias=m.use_bias, use_scale=m.use_scale,
        axis_name=m.axis_name, axis_index_groups=m.axis_index_groups,
        use_fast_variance=m.use_fast_variance,
    )  # fmt: skip
    return nnx.BatchNorm, (a_shape[m.axis],), kwargs


def _norm_kwargs(m: nn.Module) -> dict:
    _full_precision_stats(m)
    return dict(
        epsilon=m.epsilon, dtype=m.dtype, param_dtype=m.param_dtype, use_scale=m.use_scale,
        reduction_axes=m.reduction_axes, feature_axes=m.feature_axes, axis_name=m.axis_name,
        axis_index_groups=m.axis_index_groups, use_fast_variance=m.use_fast_variance,
    )  # fmt: skip


def _layer_norm(m: nn.LayerNorm, shapes: Mapping, a_shape: tuple) -> tuple:
    return nnx.LayerNorm, (a_shape[-1],), dict(_norm_kwargs(m), use_bias=m.use_bias)


def _rms_norm(m: nn.RMSNorm, shapes: Mapping, a_shape: tuple) -> tuple:
    return nnx.RMSNorm, (a_shape[-1],), _norm_kwargs(m)


def _dropout(m: nn.Dropout, shapes: Mapping, a_shape: tuple) -> tuple:
    kwargs = dict(broadcast_dims=tuple(m.broadcast_dims), deterministic=True,
                  rng_collection=m.rng_collection, rngs=None)  # fmt: skip
    return nnx.Dropout, (m.rate,), kwargs


#: The allow-list: Linen layer type (exactly; a subclass may compute something else) ->
#: ``converter(module, variable shapes, input shape) -> (NNX type, args, kwargs)``.
LAYERS: dict[type, Callable[..., tuple]] = {
    nn.Dense: _dense,
    nn.DenseGeneral: _dense_general,
    nn.Conv: _conv,
    nn.Embed: _embed,
    nn.BatchNorm: _batch_norm,
    nn.LayerNorm: _layer_norm,
    nn.RMSNorm: _rms_norm,
    nn.Dropout: _dropout,
}

#: Call arguments besides the input: "none" (must be None) or "eval" (ignored: eval mode).
_CALL_OPTIONS: dict[type, dict[str, str]] = {
    nn.BatchNorm: {"use_running_average": "eval", "mask": "none"},
    nn.LayerNorm: {"mask": "none"},
    nn.RMSNorm: {"mask": "none"},
    nn.Dropout: {"deterministic": "eval", "rng": "eval"},
}


def _path_str(path: tuple) -> str:
    return "/".join(map(str, path)) or "<root>"


def _layer_input(module: nn.Module, method: str, args: tuple, kwargs: dict) -> jax.Array:
    """The input of a call of an allow-listed layer, after checking its other arguments."""
    kind = type(module)
    where = f"Linen {kind.__name__} {_path_str(module.path)!r}"
    if method != "__call__":
        raise LayerError(f"{where} is called through {method}(); lrpjax converts __call__ only")
    bound = inspect.signature(kind.__call__).bind(module, *args, **kwargs)
    names = list(bound.signature.parameters)
    options = _CALL_OPTIONS.get(kind, {})
    for name, value in bound.arguments.items():
        if name in names[:2]:  # self and the input
            continue
        if (options.get(name) == "none" and value is None) or options.get(name) == "eval":
            continue
        raise LayerError(f"{where} is called with {name}={value!r}, which lrpjax cannot convert")
    return bound.arguments[names[1]]


class _Spec(NamedTuple):
    """How to build the NNX layer of one Linen layer."""

    path: tuple[str, ...]
    linen_type: str
    cls: type
    args: tuple
    kwargs: tuple[tuple[str, Any], ...]


class _Record:
    """What one conversion trace saw: the allow-listed layers called, and every module."""

    def __init__(self):
        self.specs: dict[tuple, _Spec] = {}
        self.called: dict[tuple, str] = {}


def _shapes(values: Mapping) -> dict[str, tuple]:
    return {k: tuple(jax.numpy.shape(v)) for k, v in values.items()}


def _frozen(value: Any) -> Any:
    """Lists as tuples (``padding=[(1, 1), (1, 1)]``): NNX layers' options are static and
    the engine hashes them."""
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


def _spec(module: nn.Module, values: Mapping, a_shape: tuple) -> _Spec:
    cls, args, kwargs = LAYERS[type(module)](module, _shapes(values), a_shape)
    kwargs = tuple((k, _frozen(v)) for k, v in kwargs.items())
    return _Spec(tuple(module.path), type(module).__name__, cls, _frozen(args), kwargs)


def _make_template(spec: _Spec) -> tuple[Any, Any]:

    def make() -> nnx.Module:
        kwargs = dict(spec.kwargs)
        kwargs.setdefault("rngs", nnx.Rngs(0))  # the values are replaced: any key will do
        return spec.cls(*spec.args, **kwargs)

    return nnx.split(nnx.eval_shape(make))


_cached_template = lru_cache(maxsize=256)(_make_template)


def _template(spec: _Spec) -> tuple[Any, Any]:
    try:
        hash(spec)
    except TypeError:
        return _make_template(spec)
    return _cached_template(spec)


def _build(spec: _Spec, values: Mapping) -> nnx.Module:
    """The NNX layer of `spec` holding the Linen layer's variable `values` (by name)."""
    graphdef, abstract = _template(spec)
    expected = nnx.to_pure_dict(abstract)
    where = f"Linen {spec.linen_type} {_path_str(spec.path)!r}"
    if set(expected) != set(values):
        raise LayerError(
            f"{where} holds variables {sorted(values)}; its NNX equivalent "
            f"{spec.cls.__name__} holds {sorted(expected)}"
        )
    for name, value in values.items():
        if tuple(expected[name].shape) != tuple(jax.numpy.shape(value)):
            raise LayerError(
                f"{where}: variable {name!r} has shape {jax.numpy.shape(value)}, its NNX "
                f"equivalent {spec.cls.__name__} {tuple(expected[name].shape)}"
            )
    return nnx.merge(graphdef, dict(values))


def _variables_at(variables: Mapping, path: tuple) -> dict[str, Any]:
    """The variables a Linen module at `path` holds itself, by name (all collections)."""
    found = {}
    for collection, tree in variables.items():
        if collection in _OUTPUT_COLLECTIONS:
            continue
        node = tree
        for key in path:
            node = node.get(key) if isinstance(node, Mapping) else None
            if node is None:
                break
        if not isinstance(node, Mapping):
            continue
        for name, value in node.items():
            if not isinstance(value, Mapping):
                found[name] = value
    return found


class _Interceptor:
    """Runs a Linen model with its allow-listed layers replaced by NNX layers.

    ``layer_at(module, a)`` gives the NNX layer (or the engine's stand-in for it) of an
    allow-listed Linen layer called on `a`; ``through(module, path)`` is called for the
    other modules before their own code runs.
    """

    def __init__(self, layer_at: Callable, through: Callable | None = None):
        self.layer_at, self.through = layer_at, through
        self.trace = tracers.current_trace()

    def __call__(self, next_fun, args, kwargs, context):
        module, method = context.module, context.method_name
        if method == "setup":  # a converted layer's own variables (nn.Embed's) are not made
            return None if type(module) in LAYERS else next_fun(*args, **kwargs)
        path = tuple(module.path)
        if type(module) in LAYERS:
            if tracers.current_trace() != self.trace:
                raise LayerError(
                    f"Linen {type(module).__name__} {_path_str(path)!r} is called inside a "
                    "JAX transform of the Linen code (nn.scan, nn.vmap, nn.remat, nn.jit, or "
                    "jax.* inside a module); lrpjax cannot see into it: call the layer directly"
                )
            a = _layer_input(module, method, args, kwargs)
            return self.layer_at(module, a)(a)
        if self.through is not None:
            self.through(module, path)
        return next_fun(*args, **_eval_kwargs(module, kwargs))


def _eval_kwargs(module: nn.Module, kwargs: dict) -> dict:
    """Linen attention with dropout, called deterministically; a cache is refused."""
    if not isinstance(module, nn.MultiHeadDotProductAttention):
        return kwargs
    where = f"Linen {type(module).__name__} {_path_str(module.path)!r}"
    if module.decode:
        raise LayerError(f"{where} decodes with a cache (decode=True); lrpjax explains a call")
    if module.dropout_rate > 0 and module.deterministic is not True:
        if module.deterministic is False:
            raise LayerError(f"{where} has deterministic=False; lrpjax explains eval mode")
        kwargs = {**kwargs, "deterministic": True}
    return kwargs


def _apply(module: nn.Module, variables: Mapping, interceptor: _Interceptor, args, kwargs):
    method = kwargs.pop("method", None)
    for name in ("rngs", "mutable"):  # eval mode: no random numbers, nothing updated
        kwargs.pop(name, None)
    try:
        with nn.intercept_methods(interceptor):
            return module.apply(variables, *args, method=method, **kwargs)
    except flax_errors.InvalidRngError as error:
        raise LayerError(
            f"the Linen model draws random numbers ({error}); lrpjax explains it in eval mode: "
            "make that code deterministic"
        ) from error


def _record(module: nn.Module, variables: Mapping, record: _Record, args, kwargs):
    """Run the Linen model (inside a trace), recording and converting its layers."""

    def layer_at(linen_layer: nn.Module, a: jax.Array) -> nnx.Module:
        values = _variables_at(variables, tuple(linen_layer.path))
        spec = _spec(linen_layer, values, tuple(a.shape))
        record.specs.setdefault(spec.path, spec)
        record.called[spec.path] = spec.linen_type
        return _build(spec, values)

    def through(linen_module: nn.Module, path: tuple) -> None:
        record.called.setdefault(path, type(linen_module).__name__)

    return _apply(module, variables, _Interceptor(layer_at, through), args, dict(kwargs))


def _check_owned(variables: Mapping, record: _Record) -> None:
    """Refuse variables held by a called Linen module lrpjax does not convert."""
    unknown: dict[tuple, list[str]] = {}
    for key in traverse_util.flatten_dict(dict(variables)):
        collection, *path, name = key
        owner = tuple(path)
        if collection in _OUTPUT_COLLECTIONS or owner in record.specs:
            continue
        if owner in record.called:  # modules never called are not part of the function
            unknown.setdefault(owner, []).append(f"{collection}/{name}")
    if unknown:
        owner, names = next(iter(unknown.items()))
        known = ", ".join(f"nn.{t.__name__}" for t in LAYERS)
        raise LayerError(
            f"Linen module {_path_str(owner)!r} ({record.called[owner]}) holds variables "
            f"({', '.join(names)}) in code lrpjax cannot see into; lrpjax converts the Linen "
            f"layers {known} to NNX layers and explains the code between them. Build it "
            "from those layers, or write it as an NNX module with a rule "
            "(lrpjax.core.layer_types.register_affine)"
        )


class _Static:
    """A static attribute compared by identity (a Linen module may hold unhashable fields)."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Static) and other.value is self.value

    def __hash__(self) -> int:
        return id(self.value)

    def __repr__(self) -> str:
        return repr(self.value)


class LinenScope(nnx.Module):
    """The place of a Linen module that holds converted layers (a path, no function)."""

    def __init__(self, linen_type: str):
        self.linen_type = linen_type

    def __call__(self, *args, **kwargs):
        raise LayerError(
            f"a Linen module ({self.linen_type}) is not explained as one unit; map its layers "
            "(their paths or types) to rules instead"
        )


class LinenModel(nnx.Module):
    """A Linen model whose allow-listed layers are NNX layers (attributes at their Linen
    paths) and whose other code runs as Linen code; see the module docstring."""

    def __init__(
        self,
        module: nn.Module,
        layers: Mapping[tuple, nnx.Module],
        types: Mapping[tuple, str],
        kwargs: Mapping[str, Any] | None = None,
    ):
        self.lrpjax_linen__module = _Static(module)
        self.lrpjax_linen__layers = tuple(layers)
        self.lrpjax_linen__kwargs = _Static(dict(kwargs or {}))
        for path, layer in layers.items():
            node = self
            for i, key in enumerate(path):
                if not isinstance(key, str) or key in _OWN or hasattr(nnx.Module, key):
                    raise LayerError(
                        f"the Linen module name {key!r} at {_path_str(path[: i + 1])!r} "
                        "clashes with an attribute of NNX modules; rename it"
                    )
                if i == len(path) - 1:
                    setattr(node, key, layer)
                elif not hasattr(node, key):
                    setattr(node, key, LinenScope(types.get(path[: i + 1], "?")))
                node = getattr(node, key)

    def _layer_at(self, module: nn.Module, a: jax.Array) -> Any:
        path = tuple(module.path)
        if path not in self.lrpjax_linen__layers:
            raise LayerError(
                f"Linen {type(module).__name__} {_path_str(path)!r} was not called when the "
                "model was converted; convert it with inputs that take this path "
                "(lrpjax.linen.convert(model, x))"
            )
        node = self
        for key in path:
            node = getattr(node, key)
        return node

    def _through(self, module: nn.Module, path: tuple) -> None:
        node = self
        for key in path:
            node = getattr(node, key, None) if isinstance(node, nnx.Module) else None
        if path and node is not None and not isinstance(node, LinenScope):
            raise LayerError(
                f"Linen module {_path_str(path)!r} ({type(module).__name__}) is not explained "
                "as one unit; map its layers (their paths or types) to rules instead"
            )

    def __call__(self, *args, **kwargs):
        interceptor = _Interceptor(self._layer_at, self._through)
        kwargs = {**self.lrpjax_linen__kwargs.value, **kwargs}
        return _apply(self.lrpjax_linen__module.value, {}, interceptor, args, kwargs)


def _linen_variables(bridged: nnx.bridge.ToNNX) -> dict:
    """The variables of a bridged Linen module, in Linen's layout, unboxed."""
    attrs = {
        k: v
        for k, v in vars(bridged).items()
        if not k.startswith("to_nnx__") and not k.startswith("_pytree__")
    }
    return meta.unbox(bridge_variables.nnx_attrs_to_linen_vars(attrs))


def _converted(
    module: nn.Module, variables: Mapping, record: _Record, kwargs: Mapping | None = None
) -> nnx.Module:
    _check_owned(variables, record)
    layers = {
        path: _build(spec, _variables_at(variables, path)) for path, spec in record.specs.items()
    }
    if () in layers:  # the model is one layer
        return layers[()]
    return LinenModel(module, layers, record.called, kwargs)


def from_linen(module: nn.Module, variables: Mapping, x: Any, **kwargs) -> nnx.Module:
    """The NNX model of a Linen model and its variables (``variables = module.init(key, x)``):
    ``model(x)`` computes ``module.apply(variables, x, **kwargs)``.

    Args:
      module: the Linen model.
      variables: its variables (``params``, ``batch_stats``, ...).
      x: an input batch; the Linen code runs on inputs of its shape.
      kwargs: static keyword arguments of every call (``train=False``).

    Raises:
      LayerError: for Linen layers or code lrpjax cannot convert (see the module docstring).
    """
    variables = meta.unbox(dict(variables))
    record = _Record()
    jax.eval_shape(lambda v, x: _record(module, v, record, (x,), kwargs), variables, x)
    return _converted(module, variables, record, kwargs)


def _bridged(model: nnx.Module) -> list[tuple[tuple, nnx.bridge.ToNNX]]:
    return [(p, m) for p, m in nnx.iter_graph(model) if isinstance(m, nnx.bridge.ToNNX)]


def has_linen(model: Any) -> bool:
    """Whether the model is or holds a bridged Linen module (``nnx.bridge.ToNNX``)."""
    return isinstance(model, nnx.Module) and bool(_bridged(model))


class _Recorder(nnx.Module):
    """Stands in for a ``ToNNX`` module in the conversion trace."""

    def __init__(self, bridged: nnx.bridge.ToNNX, record: _Record):
        self.bridged, self.record = bridged, record

    def __call__(self, *args, **kwargs):
        linen_module = self.bridged.to_nnx__module
        return _record(linen_module, _linen_variables(self.bridged), self.record, args, kwargs)


def _replace(model: nnx.Module, path: tuple, node: Any) -> None:
    parent = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = node
    else:
        setattr(parent, path[-1], node)


#: (graphdef, input shape, dtype) -> {path of a ToNNX module: its record}.
_RECORDS: dict[tuple, dict[tuple, _Record]] = {}


def _records(model: nnx.Module, x: jax.Array) -> dict[tuple, _Record]:
    graphdef, state = nnx.split(model)
    shapes = tuple((tuple(v.shape), str(v.dtype)) for v in jax.tree.leaves(state))
    key = (graphdef, shapes, tuple(x.shape), str(x.dtype))
    try:
        if key in _RECORDS:
            return _RECORDS[key]
    except TypeError:  # a Linen module with unhashable fields: not cached
        key = None
    paths = [p for p, _ in _bridged(model)]
    records = {p: _Record() for p in paths}

    def run(state, x):
        copy = nnx.merge(graphdef, state, copy=True)
        copy.eval()
        if () in records:
            return _Recorder(copy, records[()])(x)
        for path, bridged in _bridged(copy):
            _replace(copy, path, _Recorder(bridged, records[path]))
        return copy(x)

    jax.eval_shape(run, state, x)
    if key is None:
        return records
    _RECORDS[key] = records
    while len(_RECORDS) > 64:
        _RECORDS.pop(next(iter(_RECORDS)))
    return records


def convert(model: nnx.Module, x: Any) -> nnx.Module:
    """The model with each bridged Linen module (``nnx.bridge.ToNNX``, after
    ``nnx.bridge.lazy_init``) converted to a `LinenModel` of NNX layers, as ``model(x)``
    calls it; the model itself if it holds none. The model is not changed.

    Args:
      model: an NNX model that is, or holds, ``ToNNX`` modules.
      x: an input batch for the model; the Linen code runs on inputs of its shape.

    Raises:
      LayerError: for Linen layers or code lrpjax cannot convert (see the module docstring).
    """
    if not has_linen(model):
        return model
    x = jax.numpy.asarray(x)
    records = _records(model, x)
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state, copy=True)  # the same arrays, new module objects
    if () in records:
        return _converted(copy.to_nnx__module, _linen_variables(copy), records[()])
    for path, bridged in _bridged(copy):
        record = records.get(path)
        if record is not None and record.called:
            converted = _converted(bridged.to_nnx__module, _linen_variables(bridged), record)
            _replace(copy, path, converted)
    return copy


def check_converted(model: Any) -> None:
    """Raise a `LayerError` naming the call to make if the model holds bridged Linen."""
    if has_linen(model):
        raise LayerError(
            "the model holds a bridged Linen module (nnx.bridge.ToNNX); convert it first "
            "with model = lrpjax.linen.convert(model, x) for an input batch x "
            "(lrpjax.explain does this by itself)"
        )
