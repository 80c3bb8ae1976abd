"""The concepts stage's work and its outputs: the filtered concept list and its CLIP text embeddings.

Outputs:
- data/<name>/concepts (Zarr store): "text_emb" (M, D) fp16, one row per kept concept, and the
  attributes "concepts" ([{name, type, prompt}] in row order), "dropped" ([{name, type, prompt,
  reason}]) and the CLIP provenance that `lib.similarity.check_compatible` compares;
- data/<name>/concepts.tsv: every listed concept with its prompt, whether it was kept and why not.
Read them back with :func:`read_concepts`.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import zarr

from lib.circle_store import GLOBAL
from lib.concepts import concept_prompts, encode_texts, filter_concepts, read_concept_list
from lib.data.manifest import read_dataset_info, read_manifest, split_indices
from lib.layout import Layout
from lib.models.clip import load_clip
from lib.params import Params, params_hash
from lib.similarity import check_compatible, clip_provenance
from lib.stores import ArraySpec, ShardedWriter, open_store
from lib.streams import batch_source

__all__ = ["TEXT_EMB", "Concepts", "ConceptsReport", "build_concepts", "read_concepts"]

TEXT_EMB = "text_emb"


@dataclass(frozen=True)
class Concepts:
    """The kept concepts, in the order of P's concept axis."""

    names: tuple[str, ...]
    types: tuple[str | None, ...]
    prompts: tuple[str, ...]
    text_emb: torch.Tensor  # (M, D) float32, L2-normalised
    attrs: Mapping[str, Any]  # provenance, including the CLIP that embedded them


@dataclass(frozen=True)
class ConceptsReport:
    n_listed: int
    n_kept: int
    dropped: dict[str, int]  # filter name -> concepts it dropped
    embed_dim: int


def read_concepts(path: str | Path) -> Concepts:
    """Read a concepts store written by :func:`build_concepts` (refuses an incomplete one)."""
    group = open_store(path)
    attrs = dict(group.attrs)
    listed = attrs.get("concepts") or []
    text_emb = torch.from_numpy(group[TEXT_EMB][:]).to(torch.float32)
    if len(listed) != text_emb.shape[0]:
        raise ValueError(
            f"{path}: attribute 'concepts' lists {len(listed)} concepts for {text_emb.shape[0]} text embeddings; "
            "rerun the concepts stage"
        )
    return Concepts(
        tuple(c["name"] for c in listed), tuple(c["type"] for c in listed), tuple(c["prompt"] for c in listed),
        text_emb, attrs,
    )


def _global_embeddings(circles: zarr.Group, rows: np.ndarray, device: torch.device) -> Iterator[torch.Tensor]:
    """The plain-image embeddings of the given store rows, one shard's worth at a time."""
    array = circles[GLOBAL]
    source = batch_source({GLOBAL: array}, rows, (array.shards or array.chunks)[0], device=device)
    return (batch[GLOBAL] for batch in source())


def build_concepts(config: Params, layout: Layout, device: torch.device) -> ConceptsReport:
    """Embed, filter (LF-CBM) and store the concept list of ``config.concepts.file``.

    Before any encoding: the list is parsed (types must have a template) and the circles store's
    CLIP is checked against ``config.clip``. The activation filter sees the train split's plain-image
    embeddings only, and is skipped when its threshold (min_top5_similarity = -1) can never fire.
    """
    settings = config.concepts
    listed = read_concept_list(settings.file, allowed_types=settings.templates)
    circles = open_store(layout.circles)
    clip = load_clip(config.clip.model, config.clip.pretrained)
    check_compatible(circles.attrs, clip_provenance(clip.model_id, clip.embed_dim))
    prompts = concept_prompts(listed, settings.templates, settings.default_template)
    classes = read_dataset_info(layout.dataset_info)["classes"]
    # Class names are identifiers ("desert_star"); CLIP reads them as words.
    class_prompts = concept_prompts([(c.replace("_", " "), None) for c in classes], {}, settings.default_template)

    model = clip.model.to(device)
    text = encode_texts(model, clip.tokenizer, prompts)
    # Cosines are >= -1: a threshold of -1 keeps everything, so no image needs to be read.
    images = None
    if settings.min_top5_similarity > -1:
        images = _global_embeddings(circles, split_indices(read_manifest(layout.manifest), "train"), device)
    kept, reasons = filter_concepts(
        [name for name, _ in listed], text, images,
        class_names=classes, class_emb=encode_texts(model, clip.tokenizer, class_prompts),
        max_chars=settings.max_chars, class_similarity_threshold=settings.class_similarity_threshold,
        duplicate_threshold=settings.duplicate_threshold, min_top5_similarity=settings.min_top5_similarity,
    )

    records = [
        {"name": name, "type": ctype, "prompt": prompt, "reason": reason}
        for (name, ctype), prompt, reason in zip(listed, prompts, reasons)
    ]
    kept_records = [{k: r[k] for k in ("name", "type", "prompt")} for r in records if r["reason"] is None]
    dropped_records = [r for r in records if r["reason"] is not None]
    concept_file_hash = hashlib.sha256(Path(settings.file).read_bytes()).hexdigest()
    fingerprint = params_hash(
        settings, clip.model_id, concept_file_hash, circles.attrs["fingerprint"], "\n".join(classes)
    )
    attributes = {
        "stage": "concepts",
        "params_hash": fingerprint,
        **clip_provenance(clip.model_id, clip.embed_dim),
        "concepts": kept_records,
        "dropped": dropped_records,
    }
    kept_emb = text[kept.to(text.device)].cpu().numpy()
    spec = ArraySpec(TEXT_EMB, kept_emb.shape, "float16", ("concept", "embed"))
    writer = ShardedWriter(layout.concepts, [spec], config.data.rows_per_shard, attributes, fingerprint)
    for shard in writer.pending():
        writer.write(shard, {TEXT_EMB: kept_emb[writer.rows(shard)]})
    writer.finalize()

    table = pd.DataFrame(records).assign(kept=kept.tolist())[["name", "type", "prompt", "kept", "reason"]]
    table.to_csv(layout.concepts_report, sep="\t", index=False)
    dropped = Counter(record["reason"].split(":")[0] for record in dropped_records)
    return ConceptsReport(len(listed), len(kept_records), dict(dropped), clip.embed_dim)
