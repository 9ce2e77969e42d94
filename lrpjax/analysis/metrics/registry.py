"""One protocol and one registry for the metrics that score explanations.

A metric is a function

    metric(model, x, maps, target, *, explain=None, key=None, **settings) -> (N,) scores

of a model, a batch of inputs x (N, ...), their maps (N, ...) and the explained classes
target (N,), returning one score per image (NumPy float64). Metrics that re-explain
perturbed inputs (robustness, randomisation) take ``explain(x, target) -> maps``; metrics
that draw random numbers take a ``jax.random`` key. `register` records a metric with its
family and the direction in which it is better, so that `lrpjax evaluate --metrics a,b,c`
and the report loop over `REGISTRY` alone: a new metric is one function and its decorator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

__all__ = ["FAMILIES", "REGISTRY", "Metric", "get", "names", "register"]

#: The families of Quantus (Hedström et al. 2023), in the order reports show them.
FAMILIES = (
    "faithfulness", "robustness", "randomisation", "complexity", "localisation", "axiomatic",
)  # fmt: skip


class Metric(NamedTuple):
    """A registered metric.

    Attributes:
      name: its registry key (``lrpjax evaluate --metrics`` takes these).
      fn: the function, with the protocol of this module.
      family: one of `FAMILIES`.
      higher_is_better: the direction of a better explanation.
      needs_explain: whether it re-explains inputs (it then takes ``explain``).
      reference: the paper it follows.
    """

    name: str
    fn: Callable[..., np.ndarray]
    family: str
    higher_is_better: bool
    needs_explain: bool
    reference: str

    def __call__(self, model, x, maps, target, **kwargs) -> np.ndarray:
        return self.fn(model, x, maps, target, **kwargs)


#: name -> `Metric`, in the order of registration.
REGISTRY: dict[str, Metric] = {}


def register(
    name: str,
    *,
    family: str,
    higher_is_better: bool,
    reference: str,
    needs_explain: bool = False,
) -> Callable[[Callable], Callable]:
    """Decorator: record `fn` in `REGISTRY` under `name`.

    Raises:
      ValueError: an unknown family, or a name registered already.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown metric family {family!r}; families: {', '.join(FAMILIES)}")

    def record(fn: Callable) -> Callable:
        if name in REGISTRY:
            raise ValueError(f"metric {name!r} is registered already")
        REGISTRY[name] = Metric(name, fn, family, higher_is_better, needs_explain, reference)
        return fn

    return record


def get(name: str) -> Metric:
    """The registered metric `name`.

    Raises:
      ValueError: an unknown name, listing the known ones.
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown metric {name!r}; metrics: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def names(family: str | None = None) -> list[str]:
    """The registered metrics' names, of one family or all."""
    return [m.name for m in REGISTRY.values() if family is None or m.family == family]
