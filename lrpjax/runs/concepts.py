"""``lrpjax concepts`` over a whole dataset: Concept Relevance Propagation (`lrpjax.concepts`)
as a dataset run on the machinery every run shares (`lrpjax.runs.store`,
`lrpjax.runs.batches`).

The run streams the channel relevance and activations of some layers for every image into
memory-mapped arrays (one compiled step per batch, sharded over the local devices,
resumable), then derives from them the top-k reference images per channel, the class
statistics, where each channel peaks on its reference images, and the concept atlas.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from lrpjax import models, viz
from lrpjax.analysis import concepts as crp
from lrpjax.analysis.concepts import ConceptLayer, TopK
from lrpjax.core import compilation
from lrpjax.runs import batches, store

__all__ = ["PER_LAYER", "SUMMARY", "WORK_PREFIX", "concepts_dataset", "make_step"]

#: The streamed arrays of each layer L, ``L/<name>.npy``.
PER_LAYER = ("relevance", "activation")
#: The summary of a finished result, written last.
SUMMARY = "concepts.json"

#: Work folders of ``lrpjax concepts`` in its output folder: ``.partial-concepts-<key>/``.
#: Only folders with this prefix are ever cleaned up, so a ``lrpjax explain`` run's own
#: resumable work in the same folder is left alone.
WORK_PREFIX = ".partial-concepts-"


def _file_name(path: str) -> str:
    return path.replace("/", ".")


def make_step(model: nnx.Module, layers: Mapping[str, ConceptLayer], composite, init, devices=None):
    """The channel step (`lrpjax.concepts.channel_explainer` with the activations, logits
    as probabilities) compiled with the batch axis sharded over `devices`
    (`lrpjax.runs.batches.sharded_step`). Returns ``(step, state, num_devices)``."""
    fn, state = crp.channel_explainer(
        model, layers, composite=composite, init=init, activations=True
    )

    def step(state, x, target):
        out = fn(state, x, target)
        return out._replace(logits=jax.nn.softmax(out.logits))

    return batches.sharded_step(step, state, devices)


def concepts_dataset(
    model: nnx.Module,
    images: np.ndarray,
    labels: np.ndarray,
    out: str | os.PathLike,
    *,
    settings: dict,
    layers: Sequence[str] | Mapping[str, ConceptLayer] | None = None,
    composite: Any = "epsilon",
    init: str = "logit",
    target: str | int = "label",
    batch_size: int = 256,
    k: int = 8,
    class_names: Sequence[str] | None = None,
    progress: bool = True,
    atlas_channels: int = 2,
    atlas_references: int = 3,
) -> dict:
    """CRP over a whole dataset: channel relevance and activations of `layers` for every
    image, top-k reference images per channel, class statistics, a concept atlas.

    One compiled step per batch (batch axis sharded over all local devices, parameters
    replicated); results stream into memory-mapped arrays in ``out/.partial-concepts-<key>/``
    (`WORK_PREFIX`), with a manifest of finished batches: a rerun with the same settings
    computes only the missing ones (`k` and the atlas are not part of the key: they derive
    from the streamed arrays). Other ``.partial-concepts-*`` folders (runs with other
    settings) are removed; other commands' work folders are not. When every batch is done,
    the top-k, class statistics, peak positions and the atlas are made in the work folder;
    then (`lrpjax.runs.store.publish`) the previous ``concepts.json`` is removed, the new
    files are moved into `out`, the layer folders of the previous result that this run does
    not write are removed, and ``concepts.json`` is moved in last, before the work folder is
    removed. Killed at any point, `out` holds either the previous complete result (with its
    ``concepts.json``) or no ``concepts.json`` and a work folder from which the same command
    resumes. The output folder is locked (`lrpjax.runs.store.lock_output`) while the run
    lasts.

    Output (per layer L, in ``out/L/``, "/" in paths written as "."):
      ``relevance.npy`` (N, C) channel relevance; ``activation.npy`` (N, C) largest
      activation; ``top_relevance_index.npy``, ``top_relevance_score.npy`` (C, k) by
      relevance normalised per image, ``top_relevance_position.npy`` (C, k) the flat spatial
      index of the channel's most relevant position on each of them (the neuron whose
      heatmap is the reference; 0 for dense layers, -1 where no image); the same three
      ``top_activation_*.npy`` by activation (position: the largest activation);
      ``class_mean.npy``, ``class_share.npy`` (classes, C).
      In ``out/``: ``targets.npy``, ``predictions.npy``, ``labels.npy`` (N,),
      ``concepts.json`` (settings, layers, per class the top channels with their share and
      reference images, timing) and ``atlas.png``.

    Args:
      model: the model (explained in eval mode).
      images: (N, H, W, C) float32 (checked by the caller); labels: (N,) int (-1: unknown).
      out: output folder.
      settings: what determines the results besides the arguments below (model, data).
      layers: layer paths (default: `lrpjax.concepts.default_layers`), or
        ``{path: ConceptLayer}`` from `lrpjax.concepts.concept_layers` (the model is then
        not traced again).
      composite, init: as for `lrpjax.explain`; target: ``"label"``, ``"pred"`` or an int.
      batch_size: images per compiled call (rounded up to a multiple of the device count).
      k: reference images per channel.
      class_names: for the atlas and JSON.
      atlas_channels, atlas_references: channels per class and images per channel shown.

    Returns:
      The summary written to ``concepts.json``.

    Raises:
      LayerError: an unknown or unreadable layer (the message lists the usable ones).
      lrpjax.runs.store.OutputLockedError: another run holds `out`.
    """
    out = Path(out)
    if layers and isinstance(layers, Mapping):
        chosen_info = dict(layers)
        crp.check_layers(chosen_info, list(chosen_info))
    else:
        info = crp.concept_layers(model, images[:1], composite)
        chosen = crp.check_layers(info, crp.default_layers(info) if not layers else list(layers))
        chosen_info = {p: info[p] for p in chosen}
    with store.lock_output(out):
        return _concepts_locked(
            model, images, labels, out, chosen_info, settings=settings, composite=composite,
            init=init, target=target, batch_size=batch_size, k=k, class_names=class_names,
            progress=progress, atlas_channels=atlas_channels, atlas_references=atlas_references,
        )  # fmt: skip


def _concepts_locked(
    model, images, labels, out: Path, layers: dict[str, ConceptLayer], *, settings, composite,
    init, target, batch_size, k, class_names, progress, atlas_channels, atlas_references,
) -> dict:  # fmt: skip
    """The run, with `out` locked: stream the arrays (`_compute`), derive the rest from them
    in the work folder, publish."""
    n = len(images)
    step, state, num_devices = make_step(model, layers, composite, init)
    batch_size = batches.device_multiple(batch_size, num_devices)
    keyed = {
        **settings, "layers": list(layers), "composite": str(composite), "init": init,
        "target": target, "batch_size": batch_size, "n": n, "kind": "concepts",
    }  # fmt: skip
    key = store.run_key(keyed)
    work = store.work_folder(out, WORK_PREFIX, key)
    num_classes = models.output_size(model, images.shape[1:])
    files = {"targets": ((n,), "int32"), "predictions": ((n,), "int32")}
    for path, layer in layers.items():
        for name in PER_LAYER:
            files[f"{_file_name(path)}/{name}"] = ((n, layer.channels), "float32")
    seconds, manifest = _compute(
        images, labels, out, work, key, keyed, step, state, layers, files, target=target,
        batch_size=batch_size, progress=progress,
    )  # fmt: skip

    # Everything below derives from the finished arrays; a kill here reruns only this part.
    names = list(class_names) if class_names and len(class_names) == num_classes else None
    names = names or [str(i) for i in range(num_classes)]
    summary_layers, derived = _derive(
        model, images, work, layers, files, num_classes, names, composite=composite, init=init,
        batch_size=batch_size, k=k, atlas_channels=atlas_channels,
        atlas_references=atlas_references,
        title=f"concept atlas: {Path(str(settings.get('data', ''))).name}, LRP {composite}, "
        f"target {target}",
    )  # fmt: skip
    labels_arr = np.asarray(labels, np.int32)
    known = labels_arr >= 0
    preds = np.load(work / "predictions.npy")
    computed = manifest.computed
    summary = {
        "images": n,
        "accuracy": float((preds[known] == labels_arr[known]).mean()) if known.any() else None,
        "seconds": seconds,
        "images_per_second": computed / seconds if computed and seconds > 0 else None,
        "computed": computed,
        "devices": [str(d) for d in jax.devices()],
        "settings": keyed,
        "key": key,
        "k": k,
        "class_names": names,
        "convention": "channels are a layer's OUTPUT channels; channel relevance is the "
        "relevance at the output summed over positions (read at the input of the layer in "
        "read_at_input_of); top-k by relevance ranks relevance normalised per image "
        "(R_nc / sum_c' |R_nc'|)",
        "layers": summary_layers,
    }
    np.save(work / "labels.npy", labels_arr)
    replaces = set(manifest.fields["replaces"])
    previous = store.read_json(out / SUMMARY) or {}
    if isinstance(previous.get("layers"), dict):
        replaces |= {_file_name(str(p)) for p in previous["layers"]}
    manifest.write(replaces=sorted(replaces), publishing=True)  # before the previous result goes
    models.write_json(work / SUMMARY, summary)
    moved = [*(f"{name}.npy" for name in [*files, *derived, "labels"]), "atlas.png"]
    stale = sorted(replaces - set(manifest.fields["folders"]))
    store.publish(work, out, moved, SUMMARY, remove=stale)
    return summary


def _compute(
    images, labels, out: Path, work: Path, key: str, keyed: dict, step, state, layers, files,
    *, target, batch_size, progress,
) -> tuple[float, store.Manifest]:  # fmt: skip
    """The streamed arrays `files` in `work`, resumed from its manifest; the other runs' work
    folders removed once this one's manifest holds what they said. Returns (seconds, the
    manifest)."""
    n = len(images)
    folders = sorted({_file_name(p) for p in layers})
    # Layer folders in `out` that the published result must not keep: those of the previous
    # result (read when publishing) and those of runs killed while publishing, inherited
    # from their work folders (this run's own included) before these are removed.
    replaces: set[str] = set()
    for folder in out.glob(f"{WORK_PREFIX}*"):
        left = store.read_json(folder / store.MANIFEST) or {}
        replaces |= set(left.get("replaces", []))
        if left.get("publishing"):
            replaces |= set(left.get("folders", []))
    others = store.stale_work(out, WORK_PREFIX, key)
    resumed = _resume(work, out, key, [f"{f}.npy" for f in files])
    work.mkdir(parents=True, exist_ok=True)
    arrays = store.open_arrays(work, files, resume=bool(resumed))
    manifest = store.Manifest(
        work, key, keyed, resumed=resumed, folders=folders, replaces=sorted(replaces),
        publishing=False,
    )  # fmt: skip
    manifest.write()  # what `replaces` inherited is safe here: now remove the others
    for other in others:
        shutil.rmtree(other, ignore_errors=True)

    def rows(result, start, stop) -> dict:
        m = stop - start
        got = {"targets": result.target[:m], "predictions": result.logits[:m].argmax(-1)}
        for path in layers:
            f = _file_name(path)
            got[f"{f}/relevance"] = result.relevance[path][:m]
            got[f"{f}/activation"] = result.activation[path][:m]
        return got

    seconds = batches.stream(
        step, state, images, labels, arrays, batches.chunks(n, batch_size), manifest, rows,
        target=target, batch_size=batch_size, progress=progress, unit="batches",
    )  # fmt: skip
    del arrays
    return seconds, manifest


def _resume(work: Path, out: Path, key: str, arrays: Sequence[str]) -> dict | None:
    """The manifest of `work` if the run can resume from it, else None.

    A run killed while publishing has moved some of `arrays` into `out` and removed the
    previous ``concepts.json``: they are moved back, and the rest of the run is redone
    from the finished arrays. If ``concepts.json`` is there with this run's key, the
    publishing had finished and only the work folder was left: it is started afresh.
    """
    manifest = store.read_json(work / store.MANIFEST)
    if manifest and manifest.get("key") == key and manifest.get("publishing"):
        published = store.read_json(out / SUMMARY)
        if published and published.get("key") == key:
            shutil.rmtree(work, ignore_errors=True)
            return None
        for name in arrays:
            if not (work / name).exists() and (out / name).exists():
                (work / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(out / name, work / name)
    return store.resumable(work, key, arrays)


def _derive(
    model, images, work: Path, layers, files, num_classes: int, names: list[str], *,
    composite, init, batch_size, k, atlas_channels, atlas_references, title,
) -> tuple[dict, dict]:  # fmt: skip
    """From the finished arrays in `work`: per layer the top-k, class statistics and peak
    positions (saved there) and its summary; the atlas (``work/atlas.png``, titled `title`).
    Returns (the summary's ``layers``, the derived arrays by name)."""
    res = {name: np.load(work / f"{name}.npy", mmap_mode="r") for name in files}
    targets = np.asarray(res["targets"])
    summary_layers = {}
    derived: dict[str, np.ndarray] = {}
    tops: dict[str, tuple[TopK, TopK]] = {}
    for path, layer in layers.items():
        f = _file_name(path)
        rel = res[f"{f}/relevance"]
        normed = _Normalized(rel)
        by_rel = crp.top_k(normed, k)
        by_act = crp.top_k(res[f"{f}/activation"], k)
        tops[path] = (by_rel, by_act)
        stats = crp.class_statistics(rel, targets, num_classes)
        derived |= {
            f"{f}/top_relevance_index": by_rel.index, f"{f}/top_relevance_score": by_rel.score,
            f"{f}/top_activation_index": by_act.index, f"{f}/top_activation_score": by_act.score,
            f"{f}/class_mean": stats.mean, f"{f}/class_share": stats.share,
        }  # fmt: skip
        per_class = {}
        for c in range(num_classes):
            if stats.count[c] == 0:
                continue
            best = stats.order[c, :5]
            shown = best[:atlas_channels]
            refs = crp.top_k(_Normalized(rel, shown), atlas_references, where=targets == c)
            per_class[names[c]] = {
                "images": int(stats.count[c]),
                "top_channels": [int(ch) for ch in best],
                "share": [round(float(stats.share[c, ch]), 4) for ch in best],
                "mean_relevance": [round(float(stats.mean[c, ch]), 5) for ch in best],
                "channels_for_50%": int(stats.channels_for[0.5][c]),
                "channels_for_90%": int(stats.channels_for[0.9][c]),
                "references": {
                    str(int(ch)): [int(i) for i in refs.index[j] if i >= 0]
                    for j, ch in enumerate(shown)
                },
            }
        summary_layers[path] = {
            "kind": layer.kind,
            "channels": layer.channels,
            "output_shape": list(layer.shape),
            "read_at_input_of": layer.reader,
            "mean_abs_share_per_channel": float(np.mean(np.abs(stats.share))),
            "classes": per_class,
            "top_relevance": by_rel.index[:, : min(k, 4)].tolist(),
        }
    del res
    # Where each channel peaks on its reference images: one more pass over those alone.
    wanted = set()
    for path, layer in layers.items():
        if layer.positions > 1:
            wanted |= {int(i) for t in tops[path] for i in t.index.ravel() if i >= 0}
            for cls in summary_layers[path]["classes"].values():
                wanted |= {i for refs in cls["references"].values() for i in refs}
    peaks = _peaks_at(
        model, images, targets, layers, np.array(sorted(wanted), np.int64), composite, init,
        batch_size,
    )  # fmt: skip
    for path in layers:
        f = _file_name(path)
        for kind, top in zip(("relevance", "activation"), tops[path], strict=True):
            derived[f"{f}/top_{kind}_position"] = peaks.lookup(path, kind, top.index)
    for name, arr in derived.items():
        np.save(work / f"{name}.npy", arr)
    atlas_entries = _atlas_entries(
        model, images, targets, layers, peaks, summary_layers, names, composite, init,
        atlas_channels, atlas_references,
    )  # fmt: skip
    crp.atlas_figure(atlas_entries, title=title, path=work / "atlas.png")
    return summary_layers, derived


class _Peaks:
    """Where each channel's relevance and activation peak, on some images of the set."""

    def __init__(self, rows: dict[int, int], found: dict[str, dict[str, np.ndarray]]):
        self.rows, self.found = rows, found

    def lookup(
        self, path: str, kind: str, index: np.ndarray, channels: np.ndarray | None = None
    ) -> np.ndarray:
        """Positions (flat spatial index) for dataset `index` (C, k) of channel row c, or of
        `channels` (M,) for index (M, 1); -1 where index is -1; 0 for dense layers."""
        index = np.asarray(index)
        if channels is None:
            channels = np.broadcast_to(np.arange(index.shape[0])[:, None], index.shape)
        else:
            channels = np.broadcast_to(np.asarray(channels)[:, None], index.shape)
        out = np.zeros(index.shape, np.int32)
        if path in self.found:
            rows = np.array([self.rows.get(int(i), 0) for i in index.ravel()]).reshape(index.shape)
            out = self.found[path][kind][rows, channels].astype(np.int32)
        return np.where(index < 0, -1, out)


def _peaks_at(
    model, images, targets, layers, index: np.ndarray, composite, init, batch_size: int
) -> _Peaks:
    """Peak positions of the spatial `layers` on the images `index` (M,), in batches."""
    spatial = {p: info for p, info in layers.items() if info.positions > 1}
    found: dict[str, dict[str, list]] = {p: {"relevance": [], "activation": []} for p in spatial}
    if spatial and len(index):
        fn, state = crp.channel_explainer(
            model, spatial, composite=composite, init=init, activations=True, peaks=True
        )
        step = compilation.jit(fn)
        size = min(batch_size, len(index))
        for start in range(0, len(index), size):
            idx = index[start : start + size]
            pad = size - len(idx)
            x = np.concatenate([images[idx], np.zeros((pad, *images.shape[1:]), images.dtype)])
            t = np.concatenate([np.asarray(targets[idx], np.int32), np.zeros(pad, np.int32)])
            out = jax.device_get(step(state, x, t))
            for p in spatial:
                found[p]["relevance"].append(out.peak[p][: len(idx)])
                found[p]["activation"].append(out.activation_peak[p][: len(idx)])
    arrays = {
        p: {k: np.concatenate(v) for k, v in d.items()} for p, d in found.items() if d["relevance"]
    }
    return _Peaks({int(i): r for r, i in enumerate(index)}, arrays)


class _Normalized:
    """`normalize` (rel) applied block by block as rows are read, so that `top_k` streams
    over a memory-mapped (N, C) array; `columns` keeps only some channels (normalised by
    all of them)."""

    def __init__(self, rel: np.ndarray, columns: np.ndarray | None = None):
        self.rel, self.columns = rel, columns
        width = rel.shape[1] if columns is None else len(columns)
        self.shape = (rel.shape[0], width)

    def __getitem__(self, rows: slice) -> np.ndarray:
        normed = crp.normalize(self.rel[rows])
        return normed if self.columns is None else normed[:, self.columns]


def _atlas_entries(
    model, images, targets, layers, peaks, summary_layers, names, composite, init, n_channels,
    n_refs,
) -> list[dict]:  # fmt: skip
    """Reference images and heatmaps for the atlas: one row per class; per layer, the class's
    most relevant channels, each with its top images of that class cropped to the receptive
    field of the neuron at the channel's most relevant position."""
    empty = {"images": [], "heatmaps": []}
    rows = {c: {"label": c, "channels": []} for c in names}
    for path, layer in layers.items():
        picks = []  # (class, slot, image index, channel)
        slots: dict[tuple[str, int], dict] = {}
        for cname in names:
            cls = summary_layers[path]["classes"].get(cname)
            refs_by_channel = list(cls["references"].items())[:n_channels] if cls else []
            for slot in range(n_channels):
                if slot >= len(refs_by_channel):
                    slots[cname, slot] = {"label": "", **empty}
                    continue
                ch_str, refs = refs_by_channel[slot]
                ch = int(ch_str)
                share = cls["share"][cls["top_channels"].index(ch)]
                slots[cname, slot] = {"label": f"{path} #{ch} {100 * share:.0f}%"}
                picks += [(cname, slot, i, ch) for i in refs[:n_refs]]
        if picks:
            idx = np.array([p[2] for p in picks])
            chans = np.array([p[3] for p in picks])
            positions = peaks.lookup(path, "relevance", idx[:, None], chans)[:, 0]
            heat = crp.reference_heatmaps(
                model, images[idx], targets[idx], layer, chans, positions,
                composite=composite, init=init, batch_size=min(64, len(idx)),
            )  # fmt: skip
            boxes = crp.receptive_field_box(heat)
            maps = viz.channel_sum(heat)
            for j, (cname, slot, i, _) in enumerate(picks):
                img, hm = _crop(np.asarray(images[i]), maps[j], boxes[j])
                d = slots[cname, slot]
                d.setdefault("images", []).append(img)
                d.setdefault("heatmaps", []).append(hm / max(float(np.abs(hm).max()), 1e-12))
        for cname in names:
            for slot in range(n_channels):
                rows[cname]["channels"].append({**empty, **slots[cname, slot]})
    return [row for c, row in rows.items() if any(ch["images"] for ch in row["channels"])]


def _crop(image: np.ndarray, heat: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t, b, left, right = (int(v) for v in box)
    return image[t:b, left:right], heat[t:b, left:right]
