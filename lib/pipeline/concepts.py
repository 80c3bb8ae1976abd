"""The concepts stage's work and its outputs: the filtered concept list and its CLIP text embeddings.

Outputs:
- data/<name>/concepts (Zarr store): "text_emb" (M, D) fp16, one row per kept concept, and the
  attributes "concepts" ([{name, type, prompt}] in row order), "dropped" ([{name, type, prompt,
  reason}]) and the CLIP provenance that `lib.core.schema.check_compatible` compares;
- data/<name>/concepts.tsv: every listed concept with its prompt, whether it was kept and why not.
Read them back with :func:`lib.pipeline.stored_concepts.read_concepts`.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import zarr
from rich.progress import Progress

from lib.core.errors import UserError, user_error_for
from lib.core.layout import Layout
from lib.core.params import ConceptsParams, Params, params_hash
from lib.core.schema import IMAGE_EMB, TEXT_EMB, check_compatible, clip_provenance
from lib.core.stores import ArraySpec, ShardedWriter, open_store
from lib.core.streams import batch_source
from lib.data.manifest import read_dataset_info, read_manifest, split_indices
from lib.kernels.text import encode_texts
from lib.models.classes import class_words
from lib.models.clip import check_clip, load_clip_checked
from lib.pipeline.concept_list import TOP_K, concept_prompts, filter_concepts, read_concept_list
from lib.pipeline.sentence import check_sentence_model, load_sentence_encoder

__all__ = ["ConceptsReport", "check_concepts", "run_concepts"]


@dataclass(frozen=True)
class ConceptsReport:
    n_listed: int
    n_kept: int
    dropped: dict[str, int]  # filter name -> concepts it dropped
    embed_dim: int
    report_path: Path

    def summary(self) -> str:
        dropped = ", ".join(f"{count} {reason}" for reason, count in self.dropped.items()) or "none"
        return f"kept {self.n_kept} of {self.n_listed} concepts (D={self.embed_dim}); dropped: {dropped} (see {self.report_path})"


def _image_embeddings(store: zarr.Group, rows: np.ndarray, device: torch.device) -> Iterator[torch.Tensor]:
    """The plain-image embeddings of the given store rows, one shard's worth at a time."""
    array = store[IMAGE_EMB]
    source = batch_source({IMAGE_EMB: array}, rows, (array.shards or array.chunks)[0], device=device)
    return (batch[IMAGE_EMB] for batch in source())


def _concept_list(settings: ConceptsParams) -> list[tuple[str, str | None]]:
    """The parsed concept list; an unreadable file is a UserError naming concepts.file."""
    fix = "set concepts.file to a UTF-8 text file, one concept per line (e.g. concepts/toy.txt)"
    with user_error_for("concepts.file", str(settings.file), catch=(FileNotFoundError, IsADirectoryError, UnicodeDecodeError), fix=fix):
        return read_concept_list(settings.file, allowed_types=settings.templates)


def check_concepts(config: Params) -> None:
    """The stage's checks before any work: the concept list parses, the `clip` section and the
    sentence model's folder (no weights loaded)."""
    _concept_list(config.concepts)
    check_clip(config.clip)
    check_sentence_model(config.concepts.sentence_model)


def run_concepts(config: Params, layout: Layout, device: torch.device, progress: Progress | None = None) -> ConceptsReport:
    """Embed, filter (LF-CBM) and store the concept list of ``config.concepts.file``.

    Before any encoding: the list is parsed (types must have a template) and the clip_images store's
    CLIP is checked against ``config.clip``. The activation filter sees the train split's plain-image
    embeddings only, and is skipped when its threshold (min_top5_similarity = -1) can never fire.
    """
    settings = config.concepts
    listed = _concept_list(settings)
    image_store = open_store(layout.clip_images)
    clip = load_clip_checked(config.clip)
    check_compatible(image_store.attrs, clip_provenance(clip.model_id, clip.embed_dim), ("clip_images", "clip params"))
    prompts = concept_prompts(listed, settings.templates, settings.default_template)
    classes = read_dataset_info(layout.dataset_info)["classes"]
    # Class names are identifiers ("desert_star") or WordNet ids (ImageNet's folders); CLIP reads words.
    words = class_words(classes)
    class_prompts = concept_prompts([(word, None) for word in words], {}, settings.default_template)

    model = clip.model.to(device)
    text = encode_texts(model, clip.tokenizer, prompts)
    # LF-CBM's similarity for the class and duplicate filters: a sentence encoder of the same texts besides CLIP
    sentence, class_sentence = None, None
    filtering = settings.class_similarity_threshold is not None or settings.duplicate_threshold is not None
    if settings.sentence_model is not None and filtering:
        encode = load_sentence_encoder(settings.sentence_model, device)
        sentence, class_sentence = encode(prompts), encode(class_prompts)
    # Cosines are >= -1: a threshold of -1 keeps everything, so no image needs to be read.
    images = None
    if settings.min_top5_similarity > -1:
        train = split_indices(read_manifest(layout.manifest), "train")
        if len(train) < TOP_K:
            raise UserError(
                f"the train split has {len(train)} images; the top-{TOP_K} activation filter needs {TOP_K}",
                key="concepts.min_top5_similarity", value=settings.min_top5_similarity, fix="set it to -1 (off) or add train images",
            )
        images = _image_embeddings(image_store, train, device)
    kept, reasons = filter_concepts(
        [name for name, _ in listed], text, images,
        class_names=words, class_emb=encode_texts(model, clip.tokenizer, class_prompts),
        max_chars=settings.max_chars, class_similarity_threshold=settings.class_similarity_threshold,
        duplicate_threshold=settings.duplicate_threshold, min_top5_similarity=settings.min_top5_similarity,
        sentence_emb=sentence, class_sentence_emb=class_sentence,
    )

    records = [
        {"name": name, "type": ctype, "prompt": prompt, "reason": reason}
        for (name, ctype), prompt, reason in zip(listed, prompts, reasons)
    ]
    kept_records = [{k: r[k] for k in ("name", "type", "prompt")} for r in records if r["reason"] is None]
    dropped_records = [r for r in records if r["reason"] is not None]
    concept_file_hash = hashlib.sha256(Path(settings.file).read_bytes()).hexdigest()
    # keys at null (filters off, no sentence model) are left out: a store made before such a key existed stays valid
    fingerprint = params_hash(
        settings.model_dump(mode="json", exclude_none=True), clip.model_id, concept_file_hash, image_store.attrs["fingerprint"],
        "\n".join(classes),
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
    return ConceptsReport(len(listed), len(kept_records), dict(dropped), clip.embed_dim, layout.concepts_report)
