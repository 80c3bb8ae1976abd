"""The results tables of README.md and docs/*.md, rendered from the committed metrics/*.json (`make readme`).

A table that quotes metrics sits between two markers,

    <!-- metrics:NAME -->
    ...
    <!-- /metrics:NAME -->

and `python -m docs.generate` rewrites what lies between them from `BLOCKS[NAME]`; `--check` only
reports the blocks that differ (tests/test_docs.py runs the same check). No pipeline stage writes
the docs: an uncached stage output would turn off DVC's run-cache for that stage.

Every table is a list of columns (or rows) naming metric keys; a key absent from the metrics
renders as "–", so a table gains a column by adding one entry to its list.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib.evaluate.report import HEADERS, markdown_table, number

ROOT = Path(__file__).resolve().parents[1]
METRICS = ROOT / "metrics"
# A marker is a line of its own; one quoted inside a line (as in the docs describing them) is text.
BLOCK = re.compile(r"^<!-- metrics:(?P<name>[\w-]+) -->\n(?P<body>.*?)^<!-- /metrics:(?P=name) -->$", re.DOTALL | re.MULTILINE)
MARKER = re.compile(r"^<!-- /?metrics:[\w-]+ -->$", re.MULTILINE)


@dataclass(frozen=True)
class Field:
    """One metric in a table: its key in the JSON (dots go into nested objects), its heading, its format."""

    key: str
    header: str
    spec: str = ".3f"


class Metrics:
    """The JSON files of a metrics folder, read on first use; a missing file reads as {}."""

    def __init__(self, folder: Path = METRICS) -> None:
        self.folder = folder
        self._files: dict[str, dict[str, Any]] = {}

    def __getitem__(self, name: str) -> dict[str, Any]:
        if name not in self._files:
            path = self.folder / f"{name}.json"
            self._files[name] = json.loads(path.read_text()) if path.is_file() else {}
        return self._files[name]


def lookup(values: dict[str, Any] | None, key: str) -> Any:
    """values[a][b] for key "a.b"; None where any part is missing."""
    for part in key.split("."):
        if not isinstance(values, dict) or part not in values:
            return None
        values = values[part]
    return values


def cell(value: Any, spec: str = ".3f") -> str:
    """A value as a table cell: numbers in `spec`, an object as "key value, ...", "–" when missing."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {cell(v, spec)}" for k, v in value.items()) or "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return ", ".join(cell(v, spec) for v in value) or "–"
    if spec.endswith("d") and isinstance(value, float) and value.is_integer():
        value = int(value)  # a count written as 600.0
    return number(value, spec)


def _methods_table(groups: dict[str, dict[str, Any]], fields: Sequence[Field], labels: dict[str, str]) -> str:
    rows = ([labels.get(m, f"`{m}`"), *(cell(lookup(values, f.key), f.spec) for f in fields)] for m, values in groups.items())
    return "\n".join(markdown_table(["method", *(f.header for f in fields)], rows)) + "\n"


def _key_table(values: dict[str, Any], fields: Sequence[Field], source: str) -> str:
    rows = ([f.header, f"`{f.key}`", cell(lookup(values, f.key), f.spec)] for f in fields)
    return "\n".join(markdown_table(["figure", f"key in `{source}`", "value"], rows, text_columns=2)) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# The tables. Add a metric by adding a Field to a list; a method by a label (unlabelled ones show their key).

METHOD_LABELS = {
    "random": "random maps",
    "centre": "centre (a centred Gaussian)",
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "scorecam": "Score-CAM",
    "salf": "SALF-CBM (`salf`)",
    "cefam": "CE-FAM, Top-1 layer (`cefam`)",
    "cefam_best4": "CE-FAM, best candidate layer (`cefam_best4`)",
    "fact": "FaCT, matched latents (`fact`)",
    "rule": "the class rule's concepts (`rule`)",
    "oracle": "oracle: the backbone's true effects",
    "oracle_salf": "oracle: SALF-CBM's model's true effects",
    "oracle_fact": "oracle: the spliced model's true effects",
}
CONCEPT_MAP_FIELDS = [Field(k, HEADERS[k]) for k in ("nra", "nra_chance", "epg", "hit", "coverage")]
SEGMENTATION_FIELDS = [Field(k, HEADERS[k]) for k in ("pixel_acc", "miou", "map")]
CONCEPT_TYPE_FIELDS = [Field("nra", "NRA"), Field("hit", "Hit rate")]

SALF_TABLE1 = [  # (model, sparse accuracy, its weights per class, dense accuracy, concepts)
    ("Standard (the backbone)", "acc_backbone_sparse", "nonzero_per_class_backbone_sparse", "acc_backbone", None),
    ("LF-CBM", "acc_lfcbm_sparse", "nonzero_per_class_lfcbm_sparse", "acc_lfcbm_dense", "n_concepts_lfcbm"),
    ("SALF-CBM", "acc_sparse", "nonzero_per_class", "acc_dense", "n_concepts"),
]
SALF_FIELDS = [
    Field("acc_backbone", "backbone test accuracy (its own head)"),
    Field("acc_sparse", "SALF-CBM, sparse final layer"),
    Field("nonzero_per_class", "weights per class", ".2f"),
    Field("acc_dense", "SALF-CBM, dense final layer"),
    Field("val_acc_sparse", "val accuracy of the chosen λ"),
    Field("lambda", "λ", ".2e"),
    Field("rule_recovery", "rule recovery"),
    Field("n_concepts", "concepts kept", "d"),
]
CEFAM_FIELDS = [
    Field("translator_cos", "translator: test cosine with CLIP's embedding"),
    Field("concept_agreement", "top-1 concept agreement with CLIP"),
    Field("concept_corr", "concept-score correlation with CLIP"),
    Field("val_cos", "val cosine"),
    Field("best_epoch", "best val epoch", "d"),
    Field("epochs", "epochs run", "d"),
    Field("lam", "λ (concept-score loss)", "g"),
    Field("n_concepts", "concepts", "d"),
]
CEFAM_REGIONS_FIELDS = [
    Field("top1_layer_share", "share of (image, concept) pairs per Top-1 layer"),
    Field("contribution_mean", "mean contribution"),
    Field("contribution_negative_share", "share of negative contributions"),
    Field("contribution_kept_share", "share of computed contributions kept (nonzero)"),
    Field("acc_backbone", "backbone accuracy"),
    Field("n_images", "images explained", "d"),
]
FACT_FIELDS = [
    Field("fve", "fraction of variance explained (test)"),
    Field("acc_backbone", "backbone accuracy"),
    Field("acc_spliced", "accuracy with the SAE spliced in"),
    Field("completeness_max_rel_err", "largest completeness error (Σ_j C_j)", ".1e"),
    Field("completeness_concept_max_err", "largest per-concept error (C_j vs the frozen tail)", ".1e"),
    Field("spliced_logit_mean_rel_err", "mean change of the explained logit by the splice", ".1e"),
    Field("l0", "concepts present per image (L0)", ".1f"),
    Field("alive_pct", "alive concepts (%)", ".1f"),
    Field("poscover80", "PosCover-80", ".2f"),
    Field("c2", "C²-Score"),
    Field("c2_random", "C²-Score of random maps"),
    Field("c2_delta", "C²-Score Δ_rand (FaCT's headline)"),
    Field("c2_concepts", "concepts in the C² mean", "d"),
    Field("c2_featurizer", "C² featurizer"),
    Field("gt_found", "ground-truth concepts found", "d"),
    Field("gt_concepts", "ground-truth concepts", "d"),
    Field("match_score", "mean best match (Pearson r)"),
    Field("n_concepts", "SAE latents", "d"),
    Field("k", "k (top-k)", "d"),
]
COMPARE_FIELDS = [  # metrics/compare.json methods.<name>: causal fidelity (ours) against the model it explains, then the rest
    Field("causal.own.spearman", "ρ"),
    Field("causal.own.kendall", "τ"),
    Field("causal.own.top1", "top-1"),
    Field("causal.own.sign", "sign"),
    Field("causal.own.absent_share", "absent share"),
    Field("causal.own.coverage", "coverage"),
    Field("causal.backbone.spearman", "ρ (backbone)"),
    Field("nra", "NRA"),
    Field("epg", "EPG"),
    Field("hit", "Hit"),
    Field("accuracy_cost", "acc. cost"),
    Field("l0", "L0", ".1f"),
    Field("poscover80", "PosCover-80", ".2f"),
    Field("c2.delta", "C² Δ_rand"),  # FaCT's C²-Score, every method with concept maps through its code (lib/compare/c2.py)
]
COMPARE_CURVE_FIELDS = [  # metrics/compare.json methods.<name>.curves: deletion / insertion AUCs (ours; lib/compare/curves.py)
    Field("curves.concept.deletion", "concept deletion ↓"),
    Field("curves.concept.deletion_random", "… random order"),
    Field("curves.concept.insertion", "concept insertion ↑"),
    Field("curves.concept.insertion_random", "… random order"),
    Field("curves.pixel.deletion", "pixel deletion ↓ (background)"),
    Field("curves.pixel.insertion", "pixel insertion ↑ (background)"),
    Field("curves.pixel.deletion_blur", "pixel deletion (blur)"),
    Field("curves.pixel.deletion_mean", "pixel deletion (mean)"),
]
FACT_SAE_FIELDS = [
    Field("n_latents", "SAE latents", "d"),
    Field("k", "k (top-k)", "d"),
    Field("aux_k", "aux-k", "d"),
    Field("fve_val", "fraction of variance explained (val)"),
    Field("val_acc_spliced", "val accuracy with the SAE spliced in"),
    Field("val_loss", "val loss (FaCT's mse)", ".4f"),
    Field("l2_error_mean", "reconstruction error ‖x − x̂‖ (val mean)", ".2f"),
    Field("dead_pct", "dead latents (%)", ".1f"),
    Field("kept_epoch", "epoch of the kept state", ".2f"),
]
COMPARE_SUMMARY_FIELDS = [  # the README's narrower cut of the same table
    Field("causal.own.spearman", "ρ ★"),
    Field("causal.own.top1", "top-1 ★"),
    Field("causal.own.coverage", "coverage ★"),
    Field("causal.backbone.spearman", "ρ (backbone) ★"),
    Field("nra", "NRA"),
    Field("hit", "Hit"),
    Field("accuracy_cost", "acc. cost"),
]
STATS_FIELDS = [
    Field("acc_backbone", "backbone acc"),
    Field("acc_model", "concept model acc"),
    Field("agreement", "agreement"),
    Field("l0", "L0", ".1f"),
    Field("alive_pct", "alive %", ".1f"),
    Field("always_on", "always on", "d"),
    Field("poscover80", "PosCover-80", ".2f"),
    Field("always_on_share_pct", "always-on share %", ".1f"),
    Field("n_concepts", "concepts", "d"),
    Field("n_images", "images", "d"),
]
TOY_MODEL_FIELDS = [
    Field("backbone_acc", "toy CNN, test accuracy"),
    Field("bcos_acc", "toy B-cos CNN, test accuracy"),
    Field("clip_local_acc.color", "toy CLIP, red-circle accuracy: colour"),
    Field("clip_local_acc.shape", "toy CLIP, red-circle accuracy: shape"),
    Field("clip_local_acc.pattern", "toy CLIP, red-circle accuracy: pattern"),
    Field("clip_local_acc.background", "toy CLIP, red-circle accuracy: background"),
    Field("clip_global_acc", "toy CLIP, zero-shot class accuracy"),
]


def concept_maps(m: Metrics) -> str:
    """Methods × concept-map averages and segmentation of the class maps (metrics/evaluate.json)."""
    maps, segmentation = m["evaluate"].get("concept_maps", {}), m["evaluate"].get("segmentation", {})
    groups = {
        method: {**{f.key: lookup(maps, f"{method}.avg.{f.key}") for f in CONCEPT_MAP_FIELDS}, **segmentation.get(method, {})}
        for method in dict.fromkeys([*maps, *segmentation])
    }
    return _methods_table(groups, [*CONCEPT_MAP_FIELDS, *SEGMENTATION_FIELDS], METHOD_LABELS)


def concept_maps_by_type(m: Metrics) -> str:
    """Each concept method's NRA and Hit rate per concept type (metrics/evaluate.json)."""
    maps = m["evaluate"].get("concept_maps", {})
    kinds, fields = list(dict.fromkeys(k for groups in maps.values() for k in groups if k != "avg")), CONCEPT_TYPE_FIELDS
    header = ["method", *(f"{kind} {f.header}" for kind in kinds for f in fields)]
    rows = (
        [METHOD_LABELS.get(method, f"`{method}`"), *(cell(lookup(groups, f"{kind}.{f.key}"), f.spec) for kind in kinds for f in fields)]
        for method, groups in maps.items()
    )
    return "\n".join(markdown_table(header, rows)) + "\n"


def salf_table1(m: Metrics) -> str:
    """SALF-CBM's Table 1 on this data: test accuracy of sparse (weights per class) and dense final layers."""
    salf = m["salf"]

    def sparse(acc: str, nonzero: str) -> str:
        return f"{cell(salf.get(acc))} ({cell(salf.get(nonzero), '.2f')})" if acc in salf else "–"

    rows = (
        [model, sparse(acc, nonzero), cell(salf.get(dense)), cell(salf.get(n), "d") if n else "–"]
        for model, acc, nonzero, dense, n in SALF_TABLE1
    )
    return "\n".join(markdown_table(["model", "sparse (weights per class)", "dense", "concepts"], rows)) + "\n"


def _keys(name: str, fields: Sequence[Field]) -> Callable[[Metrics], str]:
    def render(m: Metrics) -> str:
        return _key_table(m[name], fields, f"metrics/{name}.json")

    render.__doc__ = f"Key figures of metrics/{name}.json."
    return render


def compare(m: Metrics) -> str:
    """Every method's causal fidelity against the counterfactuals' true effects, beside its other metrics (metrics/compare.json)."""
    return _methods_table(m["compare"].get("methods", {}), COMPARE_FIELDS, METHOD_LABELS)


def compare_curves(m: Metrics) -> str:
    """Deletion and insertion AUCs of every method at the concept and the pixel level."""
    return _methods_table(m["compare"].get("methods", {}), COMPARE_CURVE_FIELDS, METHOD_LABELS)


def compare_summary(m: Metrics) -> str:
    """The README's cut of the compare table: causal fidelity, localisation and accuracy cost per method."""
    return _methods_table(m["compare"].get("methods", {}), COMPARE_SUMMARY_FIELDS, METHOD_LABELS)


def stats(m: Metrics) -> str:
    """Every concept method's statistics over its concept_stats store (metrics/stats.json)."""
    return _methods_table(m["stats"], STATS_FIELDS, {"salf": "SALF-CBM", "fact": "FaCT", "cefam": "CE-FAM"})


BLOCKS: dict[str, Callable[[Metrics], str]] = {
    "concept_maps": concept_maps,
    "concept_maps_by_type": concept_maps_by_type,
    "salf_table1": salf_table1,
    "salf": _keys("salf", SALF_FIELDS),
    "cefam": _keys("cefam", CEFAM_FIELDS),
    "cefam_regions": _keys("cefam_regions", CEFAM_REGIONS_FIELDS),
    "fact": _keys("fact", FACT_FIELDS),
    "fact_sae": _keys("fact_sae", FACT_SAE_FIELDS),
    "stats": stats,
    "compare": compare,
    "compare_curves": compare_curves,
    "compare_summary": compare_summary,
    "toy_models": _keys("toy_models", TOY_MODEL_FIELDS),
}


# ---------------------------------------------------------------------------------------------------------------
# Blocks in files


def render(name: str, metrics: Metrics) -> str:
    """The body of block `name` (between its markers)."""
    if name not in BLOCKS:
        raise ValueError(f"unknown metrics block {name!r}; known: {', '.join(BLOCKS)}")
    return BLOCKS[name](metrics)


def _check_markers(text: str, where: str) -> None:
    spans = [match.span() for match in BLOCK.finditer(text)]
    for marker in MARKER.finditer(text):
        if not any(start <= marker.start() < end for start, end in spans):
            raise ValueError(f"{where}: {marker.group()} has no matching marker (each marker on its own line)")


def regenerate(text: str, metrics: Metrics, where: str = "text") -> str:
    """`text` with every metrics block's body rendered afresh."""
    _check_markers(text, where)
    return BLOCK.sub(lambda b: f"<!-- metrics:{b['name']} -->\n{render(b['name'], metrics)}<!-- /metrics:{b['name']} -->", text)


def stale_blocks(text: str, metrics: Metrics, where: str = "text") -> list[str]:
    """Names of the blocks of `text` whose body differs from what the metrics render."""
    _check_markers(text, where)
    return [b["name"] for b in BLOCK.finditer(text) if b["body"] != render(b["name"], metrics)]


def doc_files(root: Path = ROOT) -> list[Path]:
    """README, CHANGELOG and the docs pages (docs/*.md)."""
    return [p for p in [root / "README.md", root / "CHANGELOG.md", *sorted((root / "docs").glob("*.md"))] if p.is_file()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only list the blocks that differ; exit 1 if any")
    args = parser.parse_args(argv)
    metrics, stale = Metrics(), []
    for path in doc_files():
        text, where = path.read_text(), str(path.relative_to(ROOT))
        if args.check:
            stale += [f"{where}: {name}" for name in stale_blocks(text, metrics, where)]
            continue
        new = regenerate(text, metrics, where)
        if new != text:
            path.write_text(new)
            print(f"{where}: blocks regenerated")
    if stale:
        print("stale metrics blocks (run `make readme`):\n  " + "\n  ".join(stale))
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
