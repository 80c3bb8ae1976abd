"""The prepare stage's work: a manifest, an image store and (toy world) ground-truth masks."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from rich.progress import Progress

from lib.data.imagefolder import DecodeDataset, list_images
from lib.data.manifest import write_dataset_info, write_manifest
from lib.layout import SPLITS, Layout
from lib.params import DataParams, RuntimeParams, params_hash
from lib.preview import save_preview
from lib.stores import ArraySpec, ShardedWriter, open_store
from lib.toy import captions as toy_captions
from lib.toy import world as toy_world


@dataclass
class PrepareReport:
    n_images: int
    split_counts: dict[str, int]
    bad_images: list[str] = field(default_factory=list)


def _shard_seed(seed: int, shard: int) -> int:
    """Independent, reproducible seed per shard, so a resumed run regenerates identical shards."""
    return int(np.random.SeedSequence([seed, shard]).generate_state(1)[0])


def _toy_splits(params: DataParams) -> np.ndarray:
    toy = params.toy
    return np.repeat(np.array(SPLITS, dtype=object), [toy.n_train, toy.n_val, toy.n_test])


def prepare_toy(params: DataParams, layout: Layout, progress: Progress) -> PrepareReport:
    """Generate the toy world shard by shard into the image and mask stores.

    Each shard is generated from its own seed, so memory is bounded by one shard and an
    interrupted run resumes to identical bytes.
    """
    splits = _toy_splits(params)
    n, size, k = len(splits), params.image_size, len(toy_world.CONCEPTS)
    fingerprint = params_hash(params)
    provenance = {"stage": "prepare", "params_hash": fingerprint, "dataset": "toy"}
    images = ShardedWriter(
        layout.images,
        [ArraySpec("images", (n, size, size, 3), "uint8", ("item", "y", "x", "rgb")), ArraySpec("labels", (n,), "int64", ("item",))],
        params.rows_per_shard,
        provenance,
        fingerprint,
    )
    masks = ShardedWriter(
        layout.masks,
        [
            ArraySpec("masks", (n, k, size, size), "uint8", ("item", "concept", "y", "x")),
            ArraySpec("objects", (n, toy_world.MAX_OBJECTS, 3), "int16", ("item", "object", "attribute")),
            ArraySpec("background", (n,), "int16", ("item",)),
        ],
        params.rows_per_shard,
        {**provenance, "concepts": [c.name for c in toy_world.CONCEPTS], "concept_types": [c.type for c in toy_world.CONCEPTS]},
        fingerprint,
    )
    captions: list[str] = [""] * n
    task = progress.add_task("toy world", total=images.n_shards)
    for shard in range(images.n_shards):
        rows = images.rows(shard)
        world = toy_world.generate(rows.stop - rows.start, _shard_seed(params.seed, shard), size, params.toy.max_objects)
        # captions are cheap and small: recomputed for every shard so the table is whole on resume
        captions[rows] = toy_captions.global_captions(world)
        if shard in images.pending():
            images.write(shard, {"images": world.images, "labels": world.labels})
        if shard in masks.pending():
            masks.write(shard, {"masks": world.concept_masks, "objects": world.objects, "background": world.background})
        progress.advance(task)
    images.finalize()
    masks.finalize()

    labels = open_store(layout.images)["labels"][:]
    write_manifest(layout.manifest, pd.DataFrame({"index": np.arange(n), "source": [f"toy:{i}" for i in range(n)], "label": labels, "split": splits}))
    pd.DataFrame({"index": np.arange(n), "caption": captions}).to_parquet(layout.captions, index=False)
    write_dataset_info(
        layout.dataset_info,
        {
            "kind": "toy",
            "classes": [c.name for c in toy_world.CLASSES],
            "concepts": [{"name": c.name, "type": c.type} for c in toy_world.CONCEPTS],
            "rules": toy_world.rules_table().to_dict(orient="records"),
        },
    )
    preview_rows = slice(0, min(n, 16))
    save_preview(
        layout.preview,
        open_store(layout.images)["images"][preview_rows],
        labels[preview_rows],
        [c.name for c in toy_world.CLASSES],
        masks=open_store(layout.masks)["masks"][preview_rows].astype(bool),
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
        {"stage": "prepare", "params_hash": fingerprint, "dataset": "imagefolder"},
        fingerprint,
    )
    task = progress.add_task("decode images", total=n)
    for shard in writer.pending():
        rows = writer.rows(shard)
        loader = torch.utils.data.DataLoader(
            DecodeDataset(listing.paths[rows], size), batch_size=64, num_workers=runtime.num_workers, collate_fn=list
        )
        decoded = [item for batch in loader for item in batch]
        good = np.array([d[1] for d in decoded])
        if source.on_bad_image == "error" and not good.all():
            raise ValueError(f"{decoded[int(np.argmin(good))][2]} (set data.imagefolder.on_bad_image: skip to leave it out)")
        writer.write(shard, {"images": np.stack([d[0] for d in decoded]), "labels": listing.labels[rows], "ok": good})
        progress.advance(task, rows.stop - rows.start)
    writer.finalize()

    ok = writer.group["ok"][:].astype(bool)
    # re-decoding only the few bad files recovers their messages, also for shards of an earlier run
    problems = {int(i): DecodeDataset([listing.paths[i]], size)[0][2] for i in np.flatnonzero(~ok)}
    images = writer.group["images"]
    layout.bad_images.write_text("".join(f"{problems[i]}\n" for i in sorted(problems)))
    keep = np.flatnonzero(ok)
    write_manifest(
        layout.manifest,
        pd.DataFrame({"index": keep, "source": [listing.paths[i] for i in keep], "label": listing.labels[keep], "split": listing.splits[keep]}),
    )
    write_dataset_info(layout.dataset_info, {"kind": "imagefolder", "classes": listing.class_names, "concepts": [], "rules": []})
    sample = keep[: min(len(keep), 16)]
    save_preview(layout.preview, images.get_orthogonal_selection((sample,)), listing.labels[sample], listing.class_names)
    splits = listing.splits[keep]
    return PrepareReport(len(keep), {s: int((splits == s).sum()) for s in SPLITS}, [problems[i] for i in sorted(problems)])
