"""Benchmark of `lrpjax.concepts` on the shipped miniVGG (numbers in the README).

1. One batch step: plain LRP-epsilon (`lrpjax.runs.explain.make_step`, what ``lrpjax explain``
   runs) against the channel relevance of every layer whose output relevance can be read,
   without and with the activations (what ``lrpjax concepts`` runs).
2. Conditional heatmaps for 64 channels of one batch in one compiled call (`jax.vmap` over
   the channel masks): images x channels per second.

Run: ``python docs/concepts_bench.py [--batch 256] [--cond-batch 32] [--out FILE.json]``.
Times are the median of `--repeats` calls after a compiling call.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import lrpjax
from lrpjax import concepts
from lrpjax.runs import explain


def _median_seconds(fn, args: tuple, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--cond-batch", type=int, default=32)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out")
    args = p.parse_args()

    model = lrpjax.load_pretrained()
    images, _ = lrpjax.data.sample()
    x = np.concatenate([images] * (-(-args.batch // len(images))))[: args.batch]
    t = np.full(len(x), -1, np.int32)
    layers = concepts.concept_layers(model, x[:1])
    readable = {p: i for p, i in layers.items() if i.reader}
    result = {"device": str(jax.devices()[0]), "cpu": platform.processor(), "batch": len(x)}

    step, state, _ = explain.make_step(model, "epsilon", "logit")
    result["explain_s"] = _median_seconds(step, (state, x, t), args.repeats)
    for name, acts in (("channels_s", False), ("channels_activations_s", True)):
        fn, st = concepts.channel_explainer(model, readable, activations=acts)
        compiled = lrpjax.jit(fn)
        result[name] = _median_seconds(compiled, (st, x, t), args.repeats)
    result["layers"] = len(readable)
    result["channels_vs_explain"] = result["channels_s"] / result["explain_s"]
    result["channels_activations_vs_explain"] = (
        result["channels_activations_s"] / result["explain_s"]
    )

    xc, tc = jnp.asarray(x[: args.cond_batch]), jnp.asarray(t[: args.cond_batch])
    print(json.dumps(result, indent=2), flush=True)
    result["conditional"] = {}
    for layer in ("conv3", "conv4", "dense1"):
        info = layers[layer]
        masks = concepts.channel_masks(info.channels, np.arange(args.channels), 1 + len(info.shape))
        fn, st = concepts.conditional_explainer(model, layer)
        compiled = lrpjax.jit(fn)
        seconds = _median_seconds(compiled, (st, xc, tc, masks), args.repeats)
        result["conditional"][layer] = {
            "images": len(xc),
            "channels": args.channels,
            "seconds": seconds,
            "image_channels_per_second": len(xc) * args.channels / seconds,
        }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
