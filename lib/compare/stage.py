"""The compare stage: every method side by side, its contributions held against the true effects.

Each method's signed per-concept contributions to the prediction (the evaluate protocol's
`concept_contributions`; a method with only a class map, the Grad-CAM family, credits each concept
with its map's share inside the concept's mask, so an object's colour, shape and pattern tie) are
scored with the causal-fidelity metrics (lib/metrics/causal.py, ours ★) against the true effects
Δ of the counterfactuals stage, on two models: the one the method explains (SALF-CBM's concept
model, the backbone with FaCT's SAE spliced in, the backbone for CE-FAM and the CAMs) and the
backbone. Three baselines go through the same code: `random` (Gaussian contributions), `oracle`
(contributions = Δ of the model) and `rule` (1 for the concepts of the predicted class's rule, 0
otherwise: with a near-perfect backbone Δ is close to rule membership, so a method must beat it to
claim its contributions add anything).

The table also gathers, per method, what the other stages measured (NRA / EPG / Hit from
`evaluate`, L0 and PosCover-80 and the accuracy with the concept model from `stats`); a cell that
does not apply is N/A. Outputs: metrics/compare.json, metrics/compare.md, and the scatter of
contribution against true effect (metrics/plots/compare_scatter.csv), and the deletion and insertion
curves at the concept and pixel level (lib/compare/curves.py, metrics/plots/compare_{concept,pixel}_*.csv).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.progress import Progress

from lib.compare.c2 import c2_row, method_c2
from lib.compare.cefam import signed_cefam
from lib.compare.curves import CURVE_COLUMNS, add_curves, compare_curves, curve_values, write_curve_plots
from lib.compare.explained_models import BACKBONE, FACT, SALF
from lib.compare.figures import MethodPanel, comparison_figure, index_html
from lib.core.errors import UserError
from lib.core.layout import Layout
from lib.core.outputs import write_csv, write_figure, write_json, write_text
from lib.core.params import Params
from lib.core.skipped import no_renderer, skipped, write_skipped_folder
from lib.core.stores import open_store
from lib.core.streams import batch_source
from lib.data.manifest import read_dataset_info
from lib.evaluate.adapters import METHODS
from lib.evaluate.registry import ConceptMapMethod, EvalBatch, EvalContext, build_methods
from lib.evaluate.truth import GroundTruth
from lib.metrics.causal import fidelity, spearman, true_effects

__all__ = ["CompareReport", "run_compare"]

# Which model's decision each method explains (lib/compare/explained_models.py); the rest explain the backbone.
EXPLAINS = {"salf": SALF, "fact": FACT}
# Methods whose contributions are their class map's mass inside each concept's mask (the CAM baselines).
MASS_METHODS = ("gradcam", "gradcam++", "scorecam")
SKIP = ("random", "centre", "cefam_best4")  # map baselines of `evaluate`; cefam_best4 credits as cefam does
BASELINES = ("random", "oracle", "rule")
SCATTER_PER_METHOD = 2000  # points of the contribution-vs-effect scatter per method (seeded sample)
TAGS = ("neutral", "rule_breaking", "rule_creating")


@dataclass(frozen=True)
class CompareReport:
    rows: dict[str, dict]
    path: Path
    skipped: str | None = None

    def details(self) -> str:
        return "" if self.skipped else compare_table(self.rows)

    def summary(self) -> str:
        if self.skipped:
            return f"skipped: {self.skipped} ({self.path})"
        methods = (r for r in self.rows.items() if r[0].split("_")[0] not in BASELINES and r[1]["causal"]["own"]["spearman"] is not None)
        best = max(methods,
                   key=lambda r: r[1]["causal"]["own"]["spearman"], default=None)
        lead = f"; best causal ρ: {best[0]} {best[1]['causal']['own']['spearman']:.3f}" if best else ""
        return f"{len(self.rows)} rows -> {self.path}{lead}"


def _mass_in_masks(class_maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of each image's (non-negative) class map inside each concept mask: (B, K)."""
    maps = torch.nn.functional.interpolate(class_maps[:, None].float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    maps = maps.clamp(min=0)
    total = maps.sum(dim=(1, 2)).clamp(min=1e-12)
    return torch.einsum("bhw,bkhw->bk", maps, masks.float()) / total[:, None]


def compared_methods(config: Params, layout: Layout, device: torch.device, truth: GroundTruth) -> list[ConceptMapMethod]:
    """The methods of evaluate's table that the comparison holds against the true effects."""
    methods, _ = build_methods(EvalContext(config, layout, device, truth), METHODS)
    # CE-FAM: its contributions signed for every present concept, not the regions stage's top 8 (lib/compare/cefam.py)
    return [signed_cefam(m, config, layout, device) if m.name == "cefam" else m for m in methods if m.name not in SKIP]


def method_contributions(methods: Sequence[ConceptMapMethod], config: Params, layout: Layout, device: torch.device,
                         truth: GroundTruth, rows: np.ndarray, progress: Progress | None) -> dict[str, np.ndarray]:
    """{method: contributions (N, K) in ground-truth concept order, NaN where unscored} of every method
    that gives contributions."""
    store = open_store(layout.images)
    out = {m.name: np.full((len(rows), truth.n_concepts), np.nan, np.float32) for m in methods}
    source = batch_source({"images": store["images"], "labels": store["labels"], "masks": store["masks"]}, rows,
                          config.evaluate.batch_size, device=device)
    task = progress.add_task("contributions", total=len(rows)) if progress is not None else None
    start = 0
    for batch_rows in source():
        batch = EvalBatch(batch_rows["index"], batch_rows["images"], batch_rows["labels"])
        span = slice(start, start + len(batch.index))
        for method in methods:
            if method.name in MASS_METHODS:
                maps = method.class_maps(batch)
                out[method.name][span] = _mass_in_masks(maps.detach(), batch_rows["masks"]).cpu().numpy()
                continue
            given = method.concept_contributions(batch)
            if given is not None:
                out[method.name][span, given.concepts.cpu().numpy()] = given.values.detach().float().cpu().numpy()
        start = span.stop
        if task is not None:
            progress.advance(task, len(batch.index))
    return {name: values for name, values in out.items() if np.isfinite(values).any()}


def tagged_effects(store, tag: int) -> np.ndarray:
    """Δ (N, K, models) from the edits of one tag only (NaN where a concept has none)."""
    return true_effects(store["logit"][:], store["edit_concept"][:], store["edit_logit"][:], store["effect"].shape[1],
                        keep=store["edit_tag"][:] == tag)


def _scatter(name: str, contributions: np.ndarray, effects: np.ndarray, seed: int) -> pd.DataFrame:
    image, concept = np.nonzero(np.isfinite(contributions) & np.isfinite(effects))
    keep = np.sort(np.random.default_rng(seed).permutation(len(image))[:SCATTER_PER_METHOD])
    return pd.DataFrame({"method": name, "contribution": contributions[image[keep], concept[keep]],
                         "true_effect": effects[image[keep], concept[keep]]})


def _read_metrics(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _other_metrics(evaluate: dict, stats: dict, name: str) -> dict[str, float | None]:
    """What the other stages measured for method `name` (their metrics JSON; None where it does not apply)."""
    maps = evaluate.get("concept_maps", {}).get(name, {}).get("avg", {})
    stat = stats.get(name, {})
    cost = None if "acc_model" not in stat or stat.get("acc_backbone") is None else stat["acc_backbone"] - stat["acc_model"]
    return {"nra": maps.get("nra"), "epg": maps.get("epg"), "hit": maps.get("hit"), "accuracy_cost": cost,
            "l0": stat.get("l0"), "poscover80": stat.get("poscover80")}


def run_compare(config: Params, layout: Layout, device: torch.device, progress: Progress | None = None) -> CompareReport:
    """Write metrics/compare.json, metrics/compare.md, the scatter plot data and the figures (stubs saying
    why on data without a renderer)."""
    reason = no_renderer(config.data.kind)
    if reason:
        write_json(layout.compare_metrics, skipped(reason))
        write_text(layout.compare_table, f"skipped: {reason}\n")
        write_csv(layout.compare_scatter, pd.DataFrame(columns=["method", "contribution", "true_effect"]))
        write_curve_plots(layout, {})
        write_skipped_folder(layout.compare_figures, reason)
        return CompareReport({}, layout.compare_metrics, reason)
    truth = GroundTruth.from_info(read_dataset_info(layout.dataset_info))
    counterfactuals = open_store(layout.counterfactuals)
    if counterfactuals.attrs["split"] != config.evaluate.split:
        raise UserError(f"{layout.counterfactuals} holds split {counterfactuals.attrs['split']!r}, not evaluate.split",
                        key="evaluate.split", value=config.evaluate.split, fix="rerun the counterfactuals stage (dvc repro)")
    models = list(counterfactuals.attrs["models"])
    rows = counterfactuals["image"][:]
    effects = counterfactuals["effect"][:]  # (N, K, models)
    by_tag = {name: tagged_effects(counterfactuals, tag) for tag, name in enumerate(TAGS)}
    methods = compared_methods(config, layout, device, truth)
    contributions = method_contributions(methods, config, layout, device, truth, rows, progress)
    c2 = method_c2(config, layout, device, methods, rows)

    backbone = effects[..., models.index(BACKBONE)]
    predicted = counterfactuals["prediction"][:][:, models.index(BACKBONE)]
    info = read_dataset_info(layout.dataset_info)
    members = np.zeros((len(truth.class_names), truth.n_concepts), np.float32)
    for r in info.get("rules", []):
        members[r["class_id"], r["concept_id"]] = 1.0
    contributions["random"] = np.random.default_rng(config.evaluate.seed).normal(size=backbone.shape).astype(np.float32)
    contributions["rule"] = members[predicted]

    evaluate, stats = _read_metrics(layout.evaluate_metrics), _read_metrics(layout.stats_metrics)
    table, scatter = {}, []
    for name, values in contributions.items():
        model = EXPLAINS.get(name, BACKBONE)
        if model not in models:
            continue
        own = effects[..., models.index(model)]
        table[name] = {
            "explains": model,
            "causal": {
                "own": fidelity(values, own),
                "backbone": fidelity(values, backbone),
                "spearman_by_tag": {tag: fidelity(values, by_tag[tag][..., models.index(model)])["spearman"] for tag in TAGS},
            },
            **_other_metrics(evaluate, stats, name),
            "c2": c2_row(c2, name),
        }
        scatter.append(_scatter(name, values, own, config.evaluate.seed))
    for model in models:  # the oracle of each model: its own Δ as contributions (ρ = 1 through the same code)
        own = effects[..., models.index(model)]
        name = "oracle" if model == BACKBONE else f"oracle_{model}"
        table[name] = {"explains": model, "causal": {"own": fidelity(own, own), "backbone": fidelity(own, backbone),
                                                    "spearman_by_tag": {}}, **_other_metrics(evaluate, stats, name),
                       "c2": c2_row(c2, name)}

    curves = compare_curves(config, layout, device, methods, contributions, rows, MASS_METHODS)
    add_curves(table, curves)

    write_json(layout.compare_metrics, {"n_images": int(len(rows)), "split": config.evaluate.split, "methods": table}, digits=4)
    write_text(layout.compare_table, compare_table(table) + "\n")
    write_csv(layout.compare_scatter, pd.concat(scatter))
    write_curve_plots(layout, curves)
    failures = failure_images({m.name: (contributions[m.name], effects[..., models.index(EXPLAINS.get(m.name, BACKBONE))])
                               for m in methods if m.name in contributions and EXPLAINS.get(m.name, BACKBONE) in models})
    write_figures(config, layout, device, truth, methods, rows, contributions, backbone, table, failures)
    return CompareReport(table, layout.compare_metrics)


def failure_images(scored: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, int]:
    """{method: the position of the compared image where its contributions track the true effects of the
    model it explains worst (lowest per-image Spearman ρ; ties: the first)} from {method: (contributions,
    effects)}, both (N, K); methods with no finite ρ are left out."""
    out = {}
    for name, (values, effects) in scored.items():
        rho = spearman(values, effects)
        if np.isfinite(rho).any():
            out[name] = int(np.nanargmin(rho))
    return out


def write_figures(config: Params, layout: Layout, device: torch.device, truth: GroundTruth, methods: Sequence[ConceptMapMethod],
                  rows: np.ndarray, contributions: dict[str, np.ndarray], effects: np.ndarray, table: dict[str, dict],
                  failures: dict[str, int]) -> None:
    """The side-by-side PNGs of compare.n_figures seeded images of the split and of each method's worst image
    (`failure_images`), and index.html beside them."""
    folder = layout.compare_figures
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):  # a run with fewer figures leaves none of the last run's
        old.unlink()
    sample = np.random.default_rng(config.evaluate.seed).permutation(len(rows))[: config.compare.n_figures]
    picked = np.unique(np.concatenate([sample, np.fromiter(failures.values(), np.int64, len(failures))]))
    store = open_store(layout.images)
    images = np.stack([store["images"][int(rows[i])] for i in picked]) if len(picked) else np.zeros((0, 1, 1, 3), np.uint8)
    batch = EvalBatch(torch.from_numpy(rows[picked]).to(device), torch.from_numpy(images).to(device),
                      torch.from_numpy(store["labels"][:][rows[picked]]).to(device))
    size = images.shape[1:3]
    panels: dict[str, list[MethodPanel]] = {i: [] for i in range(len(picked))}
    for method in methods if len(picked) else []:
        if method.name not in contributions:
            continue
        maps = method.concept_maps(batch) if method.name not in MASS_METHODS else None
        dense = None
        if maps is not None:
            values = maps.maps.detach().float()
            values = values[:, :, 0] if values.ndim == 5 else values  # candidate maps: the first (Top-1)
            values = torch.nn.functional.interpolate(values, size=size, mode="bilinear", align_corners=False).cpu().numpy()
            dense = np.full((len(picked), truth.n_concepts, *size), np.nan, np.float32)
            dense[:, maps.concepts.cpu().numpy()] = values
        class_maps = method.class_maps(batch) if method.name in MASS_METHODS else None
        if class_maps is not None:
            class_maps = torch.nn.functional.interpolate(class_maps[:, None].detach().float(), size=size, mode="bilinear",
                                                         align_corners=False)[:, 0].cpu().numpy()
        for i, row in enumerate(picked):
            panels[i].append(MethodPanel(method.name, contributions[method.name][row], None if dense is None else dense[i],
                                         None if class_maps is None else class_maps[i]))
    names = {}
    for i, row in enumerate(picked):
        label = int(batch.labels[i])
        worst = [name for name, position in failures.items() if position == row]
        note = f" (lowest ρ of {', '.join(worst)})" if worst else ""
        figure = comparison_figure(images[i], truth.concept_names, effects[row],
                                   f"image {int(rows[row])}: {truth.class_names[label]}{note}", panels[i])
        names[int(row)] = f"image_{int(rows[row]):05d}.png"
        write_figure(folder / names[int(row)], figure)
    sections = {"Images": [names[int(i)] for i in np.sort(sample)],
                "Each method's worst image (lowest ρ against the model it explains)": [names[i] for i in failures.values()]}
    write_text(folder / "index.html", index_html("conceptrace: the methods side by side", compare_table(table), sections))


def _cell(value: float | None) -> str:
    return "N/A" if value is None else f"{value:.3f}"


def compare_table(table: dict[str, dict]) -> str:
    """The comparison as a Markdown table (metrics/compare.md)."""
    columns = ["explains", "ρ", "τ", "top-1", "sign", "absent", "coverage", "ρ backbone",
               "NRA", "EPG", "Hit", "acc cost", "L0", "PosCover-80", "C² Δ_rand", *CURVE_COLUMNS]
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, row in table.items():
        own, bb = row["causal"]["own"], row["causal"]["backbone"]
        cells = [row["explains"], *(_cell(own[k]) for k in ("spearman", "kendall", "top1", "sign", "absent_share", "coverage")),
                 _cell(bb["spearman"]), *(_cell(row[k]) for k in ("nra", "epg", "hit", "accuracy_cost", "l0", "poscover80")),
                 _cell(row.get("c2", {}).get("delta")), *(_cell(v) for v in curve_values(row))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
