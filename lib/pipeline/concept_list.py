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

__all__ = ["concept_prompts", "filter_concepts", "read_concept_list"]

_TYPE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# LF-CBM's activation filter: mean of each concept's 5 best image similarities.
TOP_K = 5


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


def filter_concepts(
    concepts: Sequence[str],
    text_emb: torch.Tensor,
    image_batches: Iterable[torch.Tensor] | None,
    *,
    class_names: Sequence[str] = (),
    class_emb: torch.Tensor | None = None,
    max_chars: int = 30,
    class_similarity_threshold: float = 0.85,
    duplicate_threshold: float = 0.9,
    min_top5_similarity: float = 0.25,
) -> tuple[torch.Tensor, list[str | None]]:
    """LF-CBM's concept filters; returns (kept bool (M,), reason per concept or None if kept).

    Applied in LF-CBM's order, each to the survivors of the previous ones:
    1. longer than `max_chars` characters;
    2. text cosine to a class name's embedding (`class_emb` (L, D), rows named by `class_names`)
       above `class_similarity_threshold`;
    3. text cosine above `duplicate_threshold` to an earlier kept concept (the first one stays);
    4. mean of the 5 highest cosines with the global image embeddings streamed from
       `image_batches` ((n, D) each) below `min_top5_similarity` (skipped when image_batches is None).
    Differences from LF-CBM: similarities use CLIP text embeddings only (no mpnet), and
    near-duplicates keep the earlier concept. Raises ValueError if nothing survives.
    """
    if not concepts:
        raise ValueError("concepts is empty: nothing to filter")
    if text_emb.ndim != 2 or text_emb.shape[0] != len(concepts):
        raise ValueError(
            f"text_emb must have shape ({len(concepts)}, D) for {len(concepts)} concepts, "
            f"got {tuple(text_emb.shape)}"
        )
    text = F.normalize(text_emb.float(), dim=-1)
    # Every reason reads "<filter>: <details>"; the first filter that fires wins.
    reasons: list[str | None] = [None] * len(concepts)

    for i, concept in enumerate(concepts):
        if len(concept) > max_chars:
            reasons[i] = f"too long: {len(concept)} > {max_chars} characters"

    if class_emb is not None:
        if class_emb.shape != (len(class_names), text.shape[1]):
            raise ValueError(
                f"class_emb must have shape ({len(class_names)}, {text.shape[1]}) for the "
                f"{len(class_names)} class_names, got {tuple(class_emb.shape)}"
            )
        best, which = (text @ F.normalize(class_emb.to(text), dim=-1).T).max(dim=1)
        for i in torch.nonzero(best > class_similarity_threshold).flatten().tolist():
            if reasons[i] is None:
                name, cos = class_names[which[i]], best[i]
                reasons[i] = f"similar to class: {name!r} cos {cos:.3f} > {class_similarity_threshold}"

    sims = text @ text.T
    # Greedy in list order; only concepts with an earlier near-duplicate need a look.
    earlier_close = torch.tril(sims > duplicate_threshold, diagonal=-1)
    for j in torch.nonzero(earlier_close.any(dim=1)).flatten().tolist():
        kept_before = [i for i in torch.nonzero(earlier_close[j]).flatten().tolist() if reasons[i] is None]
        if reasons[j] is None and kept_before:
            i = kept_before[0]
            reasons[j] = f"near-duplicate: of {concepts[i]!r} cos {sims[j, i]:.3f} > {duplicate_threshold}"

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
