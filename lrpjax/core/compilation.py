"""How lrpjax compiles: `jit` is `jax.jit` with the XLA options that suit backward passes.

On CPU, XLA (jaxlib 0.10) hands convolutions and matrix products to YNNPACK fusions. A
forward pass that keeps no activations gains from them: XLA fuses the whole network into a
few such kernels. A backward pass keeps every layer's activations, so each convolution
becomes a fusion of its own, and such single-convolution fusions ran on one core here
while XLA's own convolutions use all of them. Measured on this project's 2-core CPU
(miniVGG, batch 256, `lrpjax bench` with and without `--jax-defaults`): LRP-epsilon 446 ms
with YNNPACK fusions and 246 ms without, the input gradient 475 and 249 ms, the training
step 764 and 629 ms; the forward pass alone is faster with them (about 90 against 110 ms).
So explanations, gradients and training steps are compiled without YNNPACK
fusions on CPU, and forward-only functions (prediction, pixel flipping) keep the default.
Other backends get no options, and neither does any backend with the environment
variable ``LRPJAX_XLA_DEFAULTS=1`` set; `lrpjax bench --jax-defaults` sets it to measure
the difference.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["DEFAULTS_VARIABLE", "compiler_options", "jax_defaults", "jit"]

DEFAULTS_VARIABLE = "LRPJAX_XLA_DEFAULTS"  # set (not 0): plain jax.jit everywhere
_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}  # "": no YNNPACK fusions


@cache
def _cpu_options_supported() -> bool:
    """Whether this jaxlib knows the option (older ones reject unknown options)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=_CPU_OPTIONS)(jnp.zeros((), jnp.float32))
    except Exception:  # an XLA INVALID_ARGUMENT; its exception type varies between versions
        return False
    return True


def compiler_options() -> dict[str, Any] | None:
    """The XLA options `jit` adds for the default backend: a dict on CPU, else None."""
    if os.environ.get(DEFAULTS_VARIABLE, "") not in ("", "0"):
        return None
    if jax.default_backend() == "cpu" and _cpu_options_supported():
        return dict(_CPU_OPTIONS)
    return None


def jit(fn: Callable, **kwargs: Any) -> Callable:
    """`jax.jit(fn, **kwargs)` with `compiler_options()` for functions with a backward pass.

    Args:
      fn: the function to compile (an explanation, a gradient, a training step).
      kwargs: any other argument of `jax.jit` (shardings, donated arguments, ...).

    Returns:
      The compiled function, as `jax.jit` returns it.
    """
    return jax.jit(fn, compiler_options=compiler_options(), **kwargs)


@contextlib.contextmanager
def jax_defaults() -> Iterator[None]:
    """Within the block, `jit` is plain `jax.jit` (as with ``LRPJAX_XLA_DEFAULTS=1``)."""
    before = os.environ.get(DEFAULTS_VARIABLE)
    os.environ[DEFAULTS_VARIABLE] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[DEFAULTS_VARIABLE]
        else:
            os.environ[DEFAULTS_VARIABLE] = before
