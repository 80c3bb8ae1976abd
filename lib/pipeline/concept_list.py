"""Concept lists: reading, prompts and LF-CBM-style filtering.

Concept list format (UTF-8, one concept per line):
    blue<TAB>color        a concept, a TAB, then its type (an identifier) ...
    hexagon               ... or the concept alone (untyped)
    # a comment           lines starting with '#' and blank lines are skipped
The type picks the concept's prompt template ("a {} object" -> "a blue object"); untyped
concepts use the default template. Concepts are unique ignoring case and outer whitespace.
"""

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from lib.core.errors import UserError

__all__ = ["concept_prompts", "filter_concepts", "read_concept_list", "text_similarity"]

_TYPE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# LF-CBM's activation filter: mean of each concept's 5 best image similarities.
TOP_K = 5
# LF-CBM's text similarity with a sentence encoder (conceptset_utils.py): (sentence cos + 3 CLIP cos) / 4,
# CLIP weighted up "since mpnet has higher variance"
CLIP_WEIGHT = 3.0


def read_concept_list(
    path: str | Path, allowed_types: Iterable[str] | None = None
) -> list[tuple[str, str | None]]:
    """Read a concept list file into [(concept, type or None), ...] in file order.

    Raises UserError (key concepts.file) naming the file and line for: no concepts, more than two TAB columns,
    an empty concept, a type that is not an identifier (or not in `allowed_types` when given,
    e.g. the types that have a prompt template), and duplicate concepts (case-insensitive,
    whitespace-trimmed). A missing file raises FileNotFoundError.
    """
    allowed = None if allowed_types is None else set(allowed_types)
    concepts: list[tuple[str, str | None]] = []
    first_seen: dict[str, int] = {}
    for lineno, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        where = f"line {lineno}"
        columns = [c.strip() for c in raw.split("\t")]
        if len(columns) > 2:
            raise UserError(
                f"{where}: expected 'concept' or 'concept<TAB>type', got {len(columns)} columns",
                key="concepts.file", value=str(path),
            )
        concept, ctype = columns[0], (columns[1] if len(columns) == 2 else None)
        if not concept:
            raise UserError(
                f"{where}: empty concept before the type column",
                key="concepts.file", value=str(path),
            )
        if ctype is not None and not _TYPE_RE.fullmatch(ctype):
            raise UserError(
                f"{where}: concept type {ctype!r} must be an identifier like 'color'",
                key="concepts.file", value=str(path),
            )
        if ctype is not None and allowed is not None and ctype not in allowed:
            raise UserError(
                f"{where}: unknown concept type {ctype!r}; allowed: {sorted(allowed)}",
                key="concepts.file", value=str(path),
            )
        key = concept.casefold()
        if key in first_seen:
            raise UserError(
                f"{where}: duplicate concept {concept!r} (first on line {first_seen[key]})",
                key="concepts.file", value=str(path),
            )
        first_seen[key] = lineno
        concepts.append((concept, ctype))
    if not concepts:
        raise UserError("concept list is empty (no concept lines)", key="concepts.file", value=str(path))
    return concepts


def concept_prompts(
    concepts: Sequence[tuple[str, str | None]], templates: Mapping[str, str], default_template: str = "{}"
) -> list[str]:
    """Each (concept, type) put in its type's template, '{}' marking the slot.

    Untyped concepts use `default_template`, e.g. templates={"shape": "a {}"} and
    default_template="a photo of a {}". Raises ValueError for a type without a template or a
    template without exactly one '{}'.
    """
    for name, template in [*templates.items(), ("default", default_template)]:
        if template.count("{}") != 1:
            raise ValueError(f"template {name!r}={template!r} must contain exactly one '{{}}'")
    prompts = []
    for concept, ctype in concepts:
        if ctype is not None and ctype not in templates:
            raise ValueError(
                f"concept {concept!r} has type {ctype!r} with no template; templates: {sorted(templates)}"
            )
        # str.replace, not str.format: concepts may contain braces.
        prompts.append((default_template if ctype is None else templates[ctype]).replace("{}", concept))
    return prompts


def _top_k_mean(image_batches: Iterable[torch.Tensor], text_emb: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of each concept's k highest image cosines, streaming (n, D) batches: memory O((n + k) M)."""
    best = text_emb.new_empty(0, text_emb.shape[0])
    for batch in image_batches:
        if batch.ndim != 2 or batch.shape[1] != text_emb.shape[1]:
            raise ValueError(
                f"image_batches must yield (n, {text_emb.shape[1]}) embeddings, got {tuple(batch.shape)}"
            )
        sims = F.normalize(batch.to(text_emb.device, torch.float32), dim=-1) @ text_emb.T
        pool = torch.cat([best, sims])
        best = pool.topk(min(k, pool.shape[0]), dim=0).values
    if best.shape[0] < k:
        raise ValueError(f"image_batches gave {best.shape[0]} images; the top-{k} filter needs >= {k}")
    return best.mean(dim=0)


def text_similarity(
    clip_a: torch.Tensor, clip_b: torch.Tensor, sentence_a: torch.Tensor | None = None, sentence_b: torch.Tensor | None = None
) -> torch.Tensor:
    """(A, B) similarity of two lists of texts: the cosine of their CLIP text embeddings, or with
    sentence-encoder embeddings of the same texts LF-CBM's mix (sentence cos + 3 CLIP cos) / 4."""
    clip = F.normalize(clip_a.float(), dim=-1) @ F.normalize(clip_b.float(), dim=-1).to(clip_a.device).T
    if sentence_a is None or sentence_b is None:
        return clip
    sentence = F.normalize(sentence_a.float(), dim=-1) @ F.normalize(sentence_b.float(), dim=-1).T
    return (sentence.to(clip.device) + CLIP_WEIGHT * clip) / (1 + CLIP_WEIGHT)


def filter_concepts(
    concepts: Sequence[str],
    text_emb: torch.Tensor,
    image_batches: Iterable[torch.Tensor] | None,
    *,
    class_names: Sequence[str] = (),
    class_emb: torch.Tensor | None = None,
    max_chars: int = 30,
    class_similarity_threshold: float | None = 0.85,
    duplicate_threshold: float | None = 0.9,
    min_top5_similarity: float = 0.25,
    sentence_emb: torch.Tensor | None = None,
    class_sentence_emb: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[str | None]]:
    """LF-CBM's concept filters; returns (kept bool (M,), reason per concept or None if kept).

    Applied in LF-CBM's order, each to the survivors of the previous ones:
    1. longer than `max_chars` characters;
    2. text similarity (`text_similarity`) to a class name (`class_emb` (L, D), rows named by
       `class_names`) above `class_similarity_threshold` (None: off);
    3. text similarity above `duplicate_threshold` to an earlier kept concept (the first one
       stays; None: off);
    4. mean of the 5 highest cosines with the global image embeddings streamed from
       `image_batches` ((n, D) each) below `min_top5_similarity` (skipped when image_batches is None).
    The text similarity is the CLIP cosine, or with `sentence_emb` (M, D') and `class_sentence_emb`
    (L, D') of a sentence encoder LF-CBM's (sentence + 3 CLIP) / 4. Differences from LF-CBM: its
    filters fire at >= the threshold, ours above it; of two near-duplicates LF-CBM drops the one
    less similar to all others, ours the later one. Raises ValueError if nothing survives.
    """
    if not concepts:
        raise ValueError("concepts is empty: nothing to filter")
    if text_emb.ndim != 2 or text_emb.shape[0] != len(concepts):
        raise ValueError(
            f"text_emb must have shape ({len(concepts)}, D) for {len(concepts)} concepts, "
            f"got {tuple(text_emb.shape)}"
        )
    if sentence_emb is not None and sentence_emb.shape[0] != len(concepts):
        raise ValueError(f"sentence_emb must have {len(concepts)} rows, one per concept, got {tuple(sentence_emb.shape)}")
    text = F.normalize(text_emb.float(), dim=-1)
    measure = "cos" if sentence_emb is None else "sim"  # the CLIP cosine, or LF-CBM's mixed similarity
    # Every reason reads "<filter>: <details>"; the first filter that fires wins.
    reasons: list[str | None] = [None] * len(concepts)

    for i, concept in enumerate(concepts):
        if len(concept) > max_chars:
            reasons[i] = f"too long: {len(concept)} > {max_chars} characters"

    if class_emb is not None and class_similarity_threshold is not None:
        if class_emb.shape != (len(class_names), text.shape[1]):
            raise ValueError(
                f"class_emb must have shape ({len(class_names)}, {text.shape[1]}) for the "
                f"{len(class_names)} class_names, got {tuple(class_emb.shape)}"
            )
        best, which = text_similarity(text, class_emb.to(text), sentence_emb, class_sentence_emb).max(dim=1)
        for i in torch.nonzero(best > class_similarity_threshold).flatten().tolist():
            if reasons[i] is None:
                name, cos = class_names[which[i]], best[i]
                reasons[i] = f"similar to class: {name!r} {measure} {cos:.3f} > {class_similarity_threshold}"

    if duplicate_threshold is not None:
        sims = text_similarity(text, text, sentence_emb, sentence_emb)
        # Greedy in list order; only concepts with an earlier near-duplicate need a look.
        earlier_close = torch.tril(sims > duplicate_threshold, diagonal=-1)
        for j in torch.nonzero(earlier_close.any(dim=1)).flatten().tolist():
            kept_before = [i for i in torch.nonzero(earlier_close[j]).flatten().tolist() if reasons[i] is None]
            if reasons[j] is None and kept_before:
                i = kept_before[0]
                reasons[j] = f"near-duplicate: of {concepts[i]!r} {measure} {sims[j, i]:.3f} > {duplicate_threshold}"

    activation = None
    if image_batches is not None:
        activation = _top_k_mean(image_batches, text, TOP_K)
        for i in torch.nonzero(activation < min_top5_similarity).flatten().tolist():
            if reasons[i] is None:
                reasons[i] = (
                    f"low activation: top-{TOP_K} mean image cos {activation[i]:.3f} < {min_top5_similarity}"
                )

    kept = torch.tensor([r is None for r in reasons], dtype=torch.bool)
    if not kept.any():
        counts = Counter(r.split(":")[0] for r in reasons if r is not None)
        scale = "" if activation is None else (
            f" (top-{TOP_K} mean image cosines range from {activation.min():.3f} to {activation.max():.3f};"
            " the activation threshold is specific to each CLIP)"
        )
        raise UserError(
            f"all {len(concepts)} concepts were filtered out: {dict(counts)}", key="concepts",
            fix=f"relax the thresholds of those filters{scale}",
        )
    return kept, reasons
