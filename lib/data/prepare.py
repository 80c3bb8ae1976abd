"""The prepare stage's work: a manifest and an image store (with ground-truth masks where known)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.progress import Progress

from lib.core.layout import SPLITS, Layout
from lib.core.params import DataParams, Params, RuntimeParams, params_hash, source_hash
from lib.core.stores import ArraySpec, ShardedWriter
from lib.data import segfolder
from lib.data.imagefolder import DecodeDataset, bad_image_error, check_source, list_images
from lib.data.manifest import write_dataset_info, write_manifest
from lib.data.preview import save_preview
from lib.toy import captions as toy_captions
from lib.toy import world as toy_world


@dataclass
class PrepareReport:
    n_images: int
    split_counts: dict[str, int]
    bad_images: list[str] = field(default_factory=list)
    root: Path | None = None
    bad_list: Path | None = None

    def summary(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in self.split_counts.items())
        bad = f"; {len(self.bad_images)} bad images skipped (see {self.bad_list})" if self.bad_images else ""
        return f"{self.n_images} images ({counts}) in {self.root}{bad}"


def toy_split_draw(params: DataParams, split: str) -> tuple[int, int]:
    """(n, seed) of the toy world's `generate` call for one split: ``data.seed`` and the split name."""
    n = {"train": params.toy.n_train, "val": params.toy.n_val, "test": params.toy.n_test}[split]
    return n, int(np.random.SeedSequence([params.seed, SPLITS.index(split)]).generate_state(1)[0])


def toy_split(params: DataParams, split: str) -> toy_world.ToyWorld:
    """The toy world's images of one split, generated from ``data.seed`` and the split name.

    The toy model stages call this too, so they train on exactly the prepared train split
    without depending on ``data/<name>/`` (which may hold real data).
    """
    n, seed = toy_split_draw(params, split)
    return toy_world.generate(n, seed, params.image_size, params.toy.max_objects)


def prepare_toy(params: DataParams, layout: Layout, progress: Progress) -> PrepareReport:
    """Generate the toy world (train, val, test in that order) into the image store, masks included."""
    worlds = [toy_split(params, split) for split in SPLITS]
    world = toy_world.ToyWorld(**{f.name: np.concatenate([getattr(w, f.name) for w in worlds]) for f in fields(toy_world.ToyWorld)})
    splits = np.repeat(np.array(SPLITS, dtype=object), [len(w.labels) for w in worlds])
    n, size, k = len(splits), params.image_size, len(toy_world.CONCEPTS)
    fingerprint = params_hash(params, source_hash(toy_world))
    provenance = {"stage": "prepare", "params_hash": fingerprint, "dataset": "toy"}
    # one store per image: pixels, label and the exact ground truth of every concept
    writer = ShardedWriter(
        layout.images,
        [
            ArraySpec("images", (n, size, size, 3), "uint8", ("item", "y", "x", "rgb")),
            ArraySpec("labels", (n,), "int64", ("item",)),
            ArraySpec("masks", (n, k, size, size), "uint8", ("item", "concept", "y", "x")),
            ArraySpec("objects", (n, toy_world.MAX_OBJECTS, 3), "int16", ("item", "object", "attribute")),
            ArraySpec("background", (n,), "int16", ("item",)),
        ],
        params.rows_per_shard,
        provenance,
        fingerprint,
    )
    task = progress.add_task("write toy world", total=writer.n_shards)
    for shard in writer.pending():
        rows = writer.rows(shard)
        writer.write(
            shard,
            {
                "images": world.images[rows],
                "labels": world.labels[rows],
                "masks": world.concept_masks[rows],
                "objects": world.objects[rows],
                "background": world.background[rows],
            },
        )
        progress.advance(task)
    writer.finalize()

    manifest = pd.DataFrame({"index": np.arange(n), "source": [f"toy:{i}" for i in range(n)], "label": world.labels, "split": splits})
    manifest["caption"] = toy_captions.global_captions(world)
    write_manifest(layout.manifest, manifest)
    write_dataset_info(
        layout.dataset_info,
        {
            "kind": "toy",
            "classes": [c.name for c in toy_world.CLASSES],
            "concepts": [{"name": c.name, "type": c.type} for c in toy_world.CONCEPTS],
            "rules": toy_world.rules_table().to_dict(orient="records"),
        },
    )
    preview = slice(0, min(n, 16))
    save_preview(
        layout.preview,
        world.images[preview],
        world.labels[preview],
        [c.name for c in toy_world.CLASSES],
        masks=world.concept_masks[preview],
        concept_names=[c.name for c in toy_world.CONCEPTS],
    )
    return PrepareReport(n, {s: int((splits == s).sum()) for s in SPLITS})


def prepare_imagefolder(params: DataParams, runtime: RuntimeParams, layout: Layout, progress: Progress) -> PrepareReport:
    """Decode a folder tree or list of real images into the image store.

    A bad file stops the run with its name (on_bad_image: error), or (skip) leaves a zero row in
    the store that the manifest omits and ``bad_images.txt`` lists.
    """
    source = params.imagefolder
    listing = list_images(source, params.seed)
    n, size = len(listing.paths), params.image_size
    fingerprint = params_hash(params, listing.paths)
    writer = ShardedWriter(
        layout.images,
        [
            ArraySpec("images", (n, size, size, 3), "uint8", ("item", "y", "x", "rgb")),
            ArraySpec("labels", (n,), "int64", ("item",)),
            ArraySpec("ok", (n,), "uint8", ("item",)),  # 0 = undecodable file, left out of the manifest
        ],
        params.rows_per_shard,
        {"stage": "prepare", "params_hash": fingerprint, "dataset": "imagefolder", "row_order": listing.row_order},
        fingerprint,
    )
    task = progress.add_task("decode images", total=n)
    for shard in writer.pending():
        rows = writer.rows(shard)
        loader = torch.utils.data.DataLoader(
            DecodeDataset(listing.paths[rows], size, source.max_pixels), batch_size=64, num_workers=runtime.num_workers, collate_fn=list
        )
        images, errors = zip(*(item for batch in loader for item in batch), strict=True)
        good = np.array([error is None for error in errors])
        if source.on_bad_image == "error" and not good.all():
            raise bad_image_error(next(e for e in errors if e is not None), "data.imagefolder", source.max_pixels)
        writer.write(shard, {"images": np.stack(images), "labels": listing.labels[rows], "ok": good})
        progress.advance(task, rows.stop - rows.start)
    writer.finalize()

    ok = writer.group["ok"][:].astype(bool)
    # re-decoding only the few bad files recovers their messages, also for shards of an earlier run
    problems = {int(i): str(DecodeDataset([listing.paths[i]], size, source.max_pixels)[0][1]) for i in np.flatnonzero(~ok)}
    images = writer.group["images"]
    layout.bad_images.write_text("".join(f"{problems[i]}\n" for i in sorted(problems)))
    keep = np.flatnonzero(ok)
    write_manifest(
        layout.manifest,
        pd.DataFrame(
            {"index": keep, "source": [listing.paths[i] for i in keep], "label": listing.labels[keep], "split": listing.splits[keep]}
        ),
    )
    write_dataset_info(layout.dataset_info, {"kind": "imagefolder", "classes": listing.class_names, "concepts": [], "rules": []})
    sample = keep[: min(len(keep), 16)]
    save_preview(layout.preview, images.get_orthogonal_selection((sample,)), listing.labels[sample], listing.class_names)
    splits = listing.splits[keep]
    return PrepareReport(len(keep), {s: int((splits == s).sum()) for s in SPLITS}, [problems[i] for i in sorted(problems)])


def prepare_segfolder(params: DataParams, runtime: RuntimeParams, layout: Layout, progress: Progress) -> PrepareReport:
    """Decode image + mask pairs (lib/data/segfolder.py) into the image store (masks included).

    Masks are stored one-hot per concept, like the toy world's, so the evaluate stage reads both
    the same way. Bad pairs are handled as bad images are for imagefolder (on_bad_image).
    """
    source = params.segfolder
    pairs = segfolder.list_pairs(source, params.seed)
    vocabulary = segfolder.read_vocabulary(Path(source.root), pairs.class_names)
    n, size, k = len(pairs.images), params.image_size, len(vocabulary.concepts)
    fingerprint = params_hash(params, pairs.images, vocabulary.concepts)
    provenance = {"stage": "prepare", "params_hash": fingerprint, "dataset": "segfolder", "row_order": pairs.row_order}
    images = ShardedWriter(
        layout.images,
        [
            ArraySpec("images", (n, size, size, 3), "uint8", ("item", "y", "x", "rgb")),
            ArraySpec("labels", (n,), "int64", ("item",)),
            ArraySpec("ok", (n,), "uint8", ("item",)),  # 0 = bad pair, left out of the manifest
            ArraySpec("masks", (n, k, size, size), "uint8", ("item", "concept", "y", "x")),
        ],
        params.rows_per_shard,
        provenance,
        fingerprint,
    )
    task = progress.add_task("decode images and masks", total=n)
    for shard in images.pending():
        rows = images.rows(shard)
        dataset = segfolder.PairDataset(pairs, range(rows.start, rows.stop), vocabulary, size, source.max_pixels)
        loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=runtime.num_workers, collate_fn=list)
        rgb, ids, errors = zip(*(item for batch in loader for item in batch), strict=True)
        good = np.array([error is None for error in errors])
        if source.on_bad_image == "error" and not good.all():
            raise bad_image_error(next(e for e in errors if e is not None), "data.segfolder", source.max_pixels)
        blocks = {"images": np.stack(rgb), "labels": pairs.labels[rows], "ok": good, "masks": segfolder.one_hot(np.stack(ids), k)}
        images.write(shard, blocks)
        progress.advance(task, rows.stop - rows.start)
    images.finalize()

    ok = images.group["ok"][:].astype(bool)
    # re-decoding only the bad pairs recovers their messages, also for shards of an earlier run
    bad = np.flatnonzero(~ok)
    problems = [str(segfolder.PairDataset(pairs, range(i, i + 1), vocabulary, size, source.max_pixels)[0][2]) for i in bad]
    layout.bad_images.write_text("".join(f"{m}\n" for m in problems))
    keep = np.flatnonzero(ok)
    write_manifest(
        layout.manifest,
        pd.DataFrame({"index": keep, "source": [pairs.images[i] for i in keep], "label": pairs.labels[keep], "split": pairs.splits[keep]}),
    )
    write_dataset_info(
        layout.dataset_info, {"kind": "segfolder", "classes": pairs.class_names, "concepts": vocabulary.concepts, "rules": vocabulary.rules}
    )
    sample = keep[: min(len(keep), 16)]
    save_preview(
        layout.preview,
        images.group["images"].get_orthogonal_selection((sample,)),
        pairs.labels[sample],
        pairs.class_names,
        masks=images.group["masks"].get_orthogonal_selection((sample,)).astype(bool),
        concept_names=[c["name"] for c in vocabulary.concepts],
    )
    splits = pairs.splits[keep]
    return PrepareReport(len(keep), {s: int((splits == s).sum()) for s in SPLITS}, problems)


def check_prepare(config: Params) -> None:
    """The stage's checks before any work: the image folder or list the `data` section names exists
    (its classes and files are checked as it is listed, before anything is written)."""
    check_source(config.data)


def run_prepare(config: Params, layout: Layout, device: torch.device, progress: Progress) -> PrepareReport:
    """The prepare stage: build data/<name>/ for `data.kind` (decoding runs on CPU workers, not `device`).

    Nothing is written before the source is listed: a folder or list the user must fix leaves no
    trace (the stores create data/<name>/)."""
    if config.data.kind == "toy":
        report = prepare_toy(config.data, layout, progress)
    elif config.data.kind == "imagefolder":
        report = prepare_imagefolder(config.data, config.runtime, layout, progress)
    else:
        report = prepare_segfolder(config.data, config.runtime, layout, progress)
    return replace(report, root=layout.root, bad_list=layout.bad_images)
