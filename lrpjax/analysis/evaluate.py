"""Compare explainers by region perturbation (AOPC) and sanity checks (``lrpjax evaluate``).

For every explainer spec (`lrpjax.analysis.baselines.make`: LRP composites with their parameters
and inits, and the baselines), the images are explained for the class the model predicts;
the maps are scored by region perturbation, most relevant first (MoRF) and least relevant
first (LeRF), and by the cascading model-randomization check on the first few images
(`lrpjax.analysis.metrics`). Written to the output folder:

- ``aopc.json``: settings, and per explainer the MoRF and LeRF AOPC (mean and standard
  error over images), the per-image difference MoRF - LeRF (mean, standard error), the
  mean curves, and the rank correlations of the sanity check;
- ``aopc.md``: the same as a markdown table;
- ``curves.png``: the mean MoRF and LeRF curves per explainer against the fraction of
  regions removed;
- ``sanity.png``: rank correlation with the trained model's maps against the layers
  randomized, top down.

References:
  Samek et al. (2017), IEEE TNNLS 28(11); Adebayo et al. (2018), NeurIPS.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrpjax.analysis import baselines, metrics
from lrpjax.core import compilation

__all__ = [
    "DEFAULT_EXPLAINERS",
    "curves_figure",
    "evaluate",
    "explain_all",
    "predict",
    "sanity_figure",
    "table",
]

DEFAULT_EXPLAINERS: tuple[str, ...] = (
    "random",
    "gradient",
    "gradient_x_input",
    "integrated_gradients",
    "smoothgrad",
    "lrp:epsilon",
    "lrp:epsilon_plus_flat",
    "lrp:epsilon_gamma_box",
    "lrp:epsilon_alpha2_beta1",
    "lrp:epsilon:init=sglrp",
)


def predict(model: nnx.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """(N, C) float32 logits of `images` (N, ...), computed in jit-compiled batches."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x):
        m = nnx.merge(graphdef, state, copy=True)
        m.eval()
        return m(x)

    return np.concatenate(
        [
            np.asarray(forward(state, jnp.asarray(images[i : i + batch_size])))
            for i in range(0, len(images), batch_size)
        ]
    )


def explain_all(
    fn,
    state: nnx.State,
    images: np.ndarray,
    target: np.ndarray,
    batch_size: int = 256,
    progress: bool = False,
    desc: str | None = None,
) -> np.ndarray:
    """Maps of all images from an explainer ``(fn, state)``, in batches.

    The batch is divided by the explainer's passes per image (`lrpjax.analysis.baselines.passes`),
    so that integrated gradients and SmoothGrad send about `batch_size` inputs through the
    model at a time.

    Args:
      fn, state: an explainer, ``fn(state, x, target) -> (N, ...)``.
      images: (N, ...) inputs.
      target: (N,) int classes.
      batch_size: inputs per model pass.

    Returns:
      (N, ...) float32 maps.
    """
    from tqdm.auto import tqdm

    run = compilation.jit(fn)
    bs = max(1, batch_size // baselines.passes(fn))
    out = []
    for lo in tqdm(
        range(0, len(images), bs), disable=not progress, desc=desc, leave=False, unit="batch"
    ):
        x = jnp.asarray(images[lo : lo + bs])
        out.append(np.asarray(run(state, x, jnp.asarray(target[lo : lo + bs], jnp.int32))))
    return np.concatenate(out).astype(np.float32)


def _column_se(curves: np.ndarray) -> list[float | None]:
    if len(curves) < 2:
        return [None] * curves.shape[1]
    return (curves.std(axis=0, ddof=1) / np.sqrt(len(curves))).tolist()


def _clean(obj):
    """JSON-ready copy: tuples as lists, NaN and infinities as None."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return _finite(float(obj))
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _finite(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def evaluate(
    model: nnx.Module,
    images: np.ndarray,
    labels: np.ndarray | None,
    explainers: Sequence[str],
    out_dir: str | Path,
    *,
    region: int = 4,
    steps: int | None = 16,
    replacement: str = "blur",
    score: str = "logit",
    orders: Sequence[str] = ("morf", "lerf"),
    batch_size: int = 256,
    sanity_images: int = 16,
    threshold: float = 0.5,
    seed: int = 0,
    progress: bool = True,
    settings: dict | None = None,
    scores: Sequence[str] = (),
    masks: np.ndarray | None = None,
) -> dict:
    """Compare explainers by AOPC and the model-randomization check; write the report.

    Args:
      model: a Flax NNX classifier returning logits.
      images: (N, H, W, C) inputs.
      labels: (N,) int labels (for the accuracy only), or None.
      explainers: specs for `lrpjax.analysis.baselines.make` (e.g. ``"lrp:epsilon:init=sglrp"``).
      out_dir: folder for aopc.json, aopc.md, curves.png, sanity.png (created).
      region, steps, replacement, score: region perturbation settings
        (`lrpjax.analysis.metrics.region_perturbation`); steps None: all regions.
      orders: which orders to run, of ``"morf"``, ``"lerf"``.
      batch_size: inputs per model pass.
      sanity_images: images (the first ones) for the randomization check; 0 skips it.
      threshold: rank correlation above which an explainer is flagged insensitive.
      seed: seed of random maps, noise and re-initialisation.
      progress: show progress bars.
      settings: extra fields recorded under ``settings`` in the JSON (e.g. the data source).
      scores: names of registered metrics (`lrpjax.analysis.metrics.REGISTRY`) to score
        every explainer's maps with as well, each per image (mean and standard error in
        the report); metrics that re-explain get the explainer's own ``explain``.
      masks: (N, H, W) bool evidence regions, for the localisation metrics.

    Returns:
      The report written to aopc.json (a dict).

    Raises:
      ValueError: an unknown explainer spec, or bad perturbation settings.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or not len(images):
        raise ValueError(f"images must be a non-empty (N, H, W, C) batch, got {images.shape}")
    if not explainers:
        raise ValueError("no explainers given")
    if not orders or any(o not in metrics.ORDERS for o in orders):
        raise ValueError(f"orders must be some of {', '.join(metrics.ORDERS)}, got {orders}")
    if len(set(explainers)) != len(explainers):
        raise ValueError(f"explainers repeated: {', '.join(explainers)}")
    built = {spec: baselines.make(model, spec) for spec in explainers}  # fail early
    chosen = [metrics.get(name) for name in scores]
    if masks is None and any(m.family == "localisation" for m in chosen):
        raise ValueError("localisation metrics need masks: (N, H, W) evidence regions")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    h, w = images.shape[1:3]
    num_regions = math.ceil(h / region) * math.ceil(w / region)
    steps = num_regions if steps is None else int(steps)
    if not 0 < steps <= num_regions:
        raise ValueError(
            f"steps must lie in 1..{num_regions} (regions of {region} px), got {steps}"
        )
    logits = predict(model, images, batch_size)
    target = logits.argmax(axis=1).astype(np.int32)
    accuracy = None
    if labels is not None and len(labels) and (np.asarray(labels) >= 0).all():
        accuracy = float((target == np.asarray(labels)).mean())
    results: dict[str, dict] = {}
    for spec, (fn, state) in built.items():
        t0 = time.perf_counter()
        rel = explain_all(fn, state, images, target, batch_size, progress, desc=f"explain {spec}")
        entry: dict = {}
        per_image = {}
        for order in orders:
            curves = metrics.region_perturbation(
                model, images, rel, target, region=region, steps=steps, order=order,
                replacement=replacement, score=score, seed=seed, batch_size=batch_size,
                progress=progress, desc=f"{order} {spec}",
            )  # fmt: skip
            per_image[order] = metrics.aopc(curves)
            mean, se = metrics.summary(per_image[order])
            entry[order] = {
                "aopc": _finite(mean),
                "se": _finite(se),
                "curve": curves.mean(axis=0).tolist(),
                "curve_se": _column_se(curves),
            }
        if "morf" in per_image and "lerf" in per_image:
            mean, se = metrics.summary(per_image["morf"] - per_image["lerf"])
            entry["morf_minus_lerf"] = {"mean": _finite(mean), "se": _finite(se)}
        for metric in chosen:
            entry.setdefault("metrics", {})[metric.name] = _score(
                metric, model, images, rel, target, built[spec], masks, seed
            )
        entry["seconds"] = time.perf_counter() - t0
        results[spec] = entry
        del rel
    sanity = None
    if sanity_images > 0:
        sanity = metrics.model_randomization(
            model, images[:sanity_images], built, target[:sanity_images],
            seed=seed, threshold=threshold, progress=progress,
        )  # fmt: skip
        for spec in explainers:
            _, rho = sanity["correlation"][spec][-1]
            _, rho_signed = sanity["correlation_signed"][spec][-1]
            results[spec]["randomized_correlation"] = rho
            results[spec]["randomized_correlation_signed"] = rho_signed
            results[spec]["insensitive"] = spec in sanity["insensitive"]
    report = {
        "settings": {
            "images": len(images),
            "region": region,
            "steps": steps,
            "regions": num_regions,
            "replacement": replacement,
            "score": score,
            "orders": list(orders),
            "target": "predicted class",
            "batch_size": batch_size,
            "sanity_images": min(sanity_images, len(images)),
            "threshold": threshold,
            "seed": seed,
            "device": str(jax.devices()[0]),
            "date": time.strftime("%Y-%m-%d"),
            **(settings or {}),
        },
        "accuracy": accuracy,
        "explainers": results,
        "sanity": sanity,
        "files": ["aopc.json", "aopc.md", "curves.png"] + (["sanity.png"] if sanity else []),
    }
    report = _clean(report)
    (out / "aopc.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    (out / "aopc.md").write_text(table(report) + "\n")
    curves_figure(report, out / "curves.png")
    if sanity:
        sanity_figure(sanity, out / "sanity.png")
    return report


def _score(metric, model, images, maps, target, explainer, masks, seed: int) -> dict:
    """One registered metric on one explainer's maps: mean and standard error over images."""
    kwargs: dict = {"key": jax.random.key(seed)}
    if metric.needs_explain:
        kwargs["explain"] = metrics.explain_fn(model, explainer)
    if metric.family == "localisation":
        kwargs["masks"] = masks
    values = np.asarray(metric(model, images, maps, target, **kwargs), np.float64)
    mean, se = metrics.summary(values[np.isfinite(values)])
    return {
        "mean": _finite(mean),
        "se": _finite(se),
        "higher_is_better": metric.higher_is_better,
        "family": metric.family,
    }


def _pm(d: dict | None, key: str = "aopc") -> str:
    if not d or d.get(key) is None:
        return "-"
    se = d.get("se")
    return f"{d[key]:.3f} ± {se:.3f}" if se is not None else f"{d[key]:.3f}"


def table(report: dict) -> str:
    """The markdown table of an `evaluate` report."""
    s = report["settings"]
    acc = report.get("accuracy")
    lines = [
        f"Region perturbation: {s['images']} images, {s['region']}x{s['region']} px regions, "
        f"{s['steps']} of {s['regions']} removed, replacement {s['replacement']}, "
        f"score {s['score']} of the predicted class"
        + (f", accuracy {acc:.3f}" if acc is not None else "")
        + ". AOPC: mean ± standard error over images (MoRF: higher is better; LeRF: lower "
        "is better).",
        "",
    ]
    sanity = report.get("sanity")
    header = "| explainer | MoRF AOPC | LeRF AOPC | MoRF - LeRF |"
    rule = "|---|---:|---:|---:|"
    if sanity:
        header += " rank corr., all layers random | sanity |"
        rule += "---:|---|"
    lines += [header, rule]
    for spec, r in report["explainers"].items():
        diff = r.get("morf_minus_lerf")
        row = f"| {spec} | {_pm(r.get('morf'))} | {_pm(r.get('lerf'))} | {_pm(diff, 'mean')} |"
        if sanity:
            flag = "insensitive" if r.get("insensitive") else "ok"
            row += f" {r['randomized_correlation']:.3f} | {flag} |"
        lines.append(row)
    named = list(
        dict.fromkeys(n for r in report["explainers"].values() for n in r.get("metrics", {}))
    )
    if named:
        arrows = {
            n: "↑" if r["metrics"][n]["higher_is_better"] else "↓"
            for r in report["explainers"].values()
            for n in r.get("metrics", {})
        }
        lines += [
            "",
            "| explainer | " + " | ".join(f"{n} {arrows[n]}" for n in named) + " |",
            "|---|" + "---:|" * len(named),
        ]
        for spec, r in report["explainers"].items():
            cells = [_pm(r.get("metrics", {}).get(n), "mean") for n in named]
            lines.append(f"| {spec} | " + " | ".join(cells) + " |")
    if sanity:
        lines += [
            "",
            f"Sanity check (Adebayo et al. 2018): layers re-initialised top down on "
            f"{sanity['images']} images; Spearman rank correlation of the channel-summed "
            f"absolute maps with the trained model's; above {sanity['threshold']} after "
            "randomizing all layers: flagged insensitive.",
        ]
    return "\n".join(lines)


def curves_figure(report: dict, path: str | Path) -> None:
    """Mean MoRF and LeRF curves per explainer against the fraction of regions removed."""
    from matplotlib.figure import Figure

    s = report["settings"]
    orders = s["orders"]
    fig = Figure(figsize=(5.2 * len(orders), 4.2))
    axes = fig.subplots(1, len(orders), squeeze=False)[0]
    x = np.arange(s["steps"] + 1) / s["regions"]
    for ax, order in zip(axes, orders, strict=True):
        for spec, r in report["explainers"].items():
            res = r[order]
            value = "-" if res["aopc"] is None else f"{res['aopc']:.3f}"
            curve = [np.nan if v is None else v for v in res["curve"]]
            ax.plot(x, curve, label=f"{spec} ({value})", lw=1.4)
        ax.set_title(
            f"{order.upper()}: {'most' if order == 'morf' else 'least'} relevant first", fontsize=10
        )
        ax.set_xlabel("fraction of regions removed")
        ax.set_ylabel(f"mean {s['score']} of the explained class")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="explainer (AOPC)", title_fontsize=7, loc="best")
    fig.suptitle(
        f"Region perturbation, {s['images']} images, {s['region']} px regions, "
        f"replacement {s['replacement']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def sanity_figure(sanity: dict, path: str | Path) -> None:
    """Rank correlation with the trained model's maps against the layers randomized."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.4))
    axes = fig.subplots(1, 2)
    layers = sanity["layers"]
    x = np.arange(len(layers) + 1)
    for ax, key, title in (
        (axes[0], "correlation", "|map| (absolute)"),
        (axes[1], "correlation_signed", "signed map"),
    ):
        for spec, pairs in sanity[key].items():
            style = "--" if spec in sanity["insensitive"] else "-"
            ax.plot(x, [1.0] + [v for _, v in pairs], style, marker="o", ms=3, lw=1.3, label=spec)
        ax.axhline(sanity["threshold"], color="grey", lw=0.8, ls=":")
        ax.set_xticks(x, ["none", *layers], rotation=60, fontsize=7)
        ax.set_xlabel("randomized down to layer (cumulative, from the top)")
        ax.set_ylabel("Spearman rank correlation")
        ax.set_ylim(-0.3, 1.05)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(
        f"Model randomization (Adebayo et al. 2018), {sanity['images']} images; dashed: "
        "insensitive",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
