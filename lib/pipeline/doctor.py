"""`python -m stages doctor`: every stage checked before hours of work start, and what each will do.

For every stage of dvc.yaml, in its order: the stage's own pre-work check (the `check` its command
passes to `run_stage`: params against the models' skeletons on the meta device, files, weights;
nothing loaded) and one line saying what it will do with these params. Every problem is collected,
not just the first, one line each (`key: value — what is wrong; fix`); a problem several stages
share (a backbone weights file) is said once with the stages it stops. The plans read params
only (they run before `prepare`), so counts come from params, not from the data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lib.core.device import autocast_dtype, precision_name, resolve_device
from lib.core.errors import UserError
from lib.core.params import Params, load_params
from lib.core.skipped import no_masks, no_renderer
from lib.pipeline.concept_list import read_concept_list

Check = Callable[[Params], None]
Plan = Callable[[Params, torch.device], str]


@dataclass
class Diagnosis:
    """One line per stage (what it will do) and every problem found, one line each."""

    plans: dict[str, str]
    problems: dict[str, list[str]] = field(default_factory=dict)  # problem line -> the stages it stops

    def lines(self) -> list[str]:
        return [f"{stage}: {plan}" for stage, plan in self.plans.items()]

    def problem_lines(self) -> list[str]:
        return [f"{', '.join(stages)}: {problem}" for problem, stages in self.problems.items()]


def _images(config: Params) -> str:
    """How many images, as far as params say."""
    data = config.data
    if data.kind == "toy":
        toy = data.toy
        return f"{toy.n_train + toy.n_val + toy.n_test} images"
    if data.kind == "imagefolder" and data.imagefolder.list_file is not None:
        return f"the images of {data.imagefolder.list_file}"
    root = Path(data.imagefolder.root) if data.kind == "imagefolder" else Path(data.segfolder.root) / "images"
    classes = sum(1 for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else 0
    return f"the images of {root} ({classes} class folders)"  # the folders only: listing every file may take minutes


def _precision(device: torch.device, autocast: bool | str) -> str:
    return f"{device.type}, {precision_name(autocast_dtype(device, autocast))}"


def _weights(config: Params) -> str:
    weights = config.backbone.weights
    return f"{config.backbone.arch} ({'random init' if weights is None else weights})"


def _concepts(config: Params) -> str:
    try:
        count = f"{len(read_concept_list(config.concepts.file))} concepts of {config.concepts.file}"
    except (UserError, OSError, UnicodeDecodeError):  # the concepts check reports it
        count = f"the concepts of {config.concepts.file}"
    return count


def _prepare(c: Params, device: torch.device) -> str:
    data = c.data
    masks = "with ground-truth masks" if no_masks(data.kind) is None else "no ground-truth masks"
    if data.kind == "toy":
        what = f"toy world: {data.toy.n_train} train / {data.toy.n_val} val / {data.toy.n_test} test images"
    elif data.kind == "imagefolder":
        folder = data.imagefolder
        what = (f"{_images(c)}, val {folder.val_fraction:.0%} / test {folder.test_fraction:.0%} of each class, "
                f"bad images: {folder.on_bad_image},")
    else:
        what = f"image + mask pairs of {data.segfolder.root} (test {data.segfolder.test_fraction:.0%} of each class)"
    return f"{what} at {data.image_size} px, {masks} -> data/{data.name}"


def _toy_model(what: str, out: str) -> Plan:
    return lambda c, d: f"{what} -> {out} (shipped in git: runs only when its params or code change)"


def _evaluate(c: Params, device: torch.device) -> str:
    reason = no_masks(c.data.kind)
    if reason is not None:
        return f"concept maps and segmentation skipped: {reason}; accuracy paths of the sparse layers kept"
    cams = ", ".join(c.evaluate.cam_methods) or "no CAMs"
    return (f"concept maps and segmentation of every method whose outputs exist, random, centre, {cams} "
            f"on the {c.evaluate.split} split ({c.evaluate.steps} top-n steps; {device.type})")


def _contributions(c: Params, device: torch.device) -> str:
    reason = no_masks(c.data.kind)
    matching = f"ground-truth matching skipped: {reason}" if reason else f"latent per ground-truth concept (r >= {c.fact.match_threshold})"
    c2 = "every concept with enough images" if c.fact.c2.max_concepts is None else f"{c.fact.c2.max_concepts} concepts"
    if c.fact.c2.featurizer == "gt" and reason:
        c2 = f"no concept (skipped: {reason})"
    return f"FaCT presence and contributions on the test split, C² ({c.fact.c2.featurizer}) of {c2}; {matching} ({device.type})"


def _counterfactuals(c: Params, device: torch.device) -> str:
    reason = no_renderer(c.data.kind)
    if reason:
        return f"skipped: {reason}"
    n = c.data.toy.n_test if c.evaluate.split == "test" else c.data.toy.n_val if c.evaluate.split == "val" else c.data.toy.n_train
    n = min(n, c.compare.max_images or n)
    return (f"~19 counterfactual images for each of {n} {c.evaluate.split} images through the backbone and the concept models "
            f"({device.type})")


def _fact_layer(c: Params) -> str:
    return c.fact.layer or c.features.layers[-1]


def _cefam_layers(c: Params) -> str:
    return ", ".join(c.cefam.layers or c.features.layers)


PLANS: dict[str, Plan] = {
    "prepare": _prepare,
    "toy_backbone": _toy_model("toy CNN and B-cos CNN training", "models/toy/cnn.pt, bcos.pt"),
    "toy_clip": _toy_model("toy CLIP training", "models/toy/clip"),
    "toy_report": lambda c, d: f"the shipped toy models scored on the toy test split ({c.data.toy.n_test} images)",
    "features": lambda c, d: (f"{_images(c)} through {_weights(c)}: {', '.join(c.features.layers)} and logits "
                              f"({_precision(d, c.features.autocast)})"),
    "clip_images": lambda c, d: (f"{_images(c)} embedded by {c.clip.model}{' with its dense map' if c.clip_images.dense else ''} "
                                 f"({_precision(d, c.clip_images.autocast)})"),
    "circles": lambda c, d: (f"{_images(c)} x {c.circles.grid}x{c.circles.grid} rings on {c.clip.model} "
                             f"({_precision(d, c.circles.autocast)})"),
    "concepts": lambda c, d: f"{_concepts(c)} embedded by {c.clip.model}, LF-CBM filters",
    "similarity": lambda c, d: f"P = circles x concepts (materialize: {c.similarity.materialize})",
    "cbl": lambda c, d: (f"SALF-CBM bottleneck on {c.cbl.layer or c.features.layers[-1]}, up to {c.cbl.max_steps} steps, "
                         f"cos^3 cut {c.cbl.cos3_threshold} ({d.type})"),
    "sparse": lambda c, d: (f"SALF-CBM final layer: {c.sparse.pooling} pooling, "
                            f"{'lambda ' + str(c.sparse.lam) if c.sparse.lam else str(c.sparse.n_lambdas) + ' lambdas'}"
                            f"{', Table 1 baselines' if c.sparse.baselines else ''} ({d.type})"),
    "salf_stats": lambda c, d: "SALF-CBM concept presence and contributions on the test split",
    "explain": lambda c, d: f"{c.explain.n_images} SALF-CBM explanations and a gallery of {c.explain.gallery_concepts} concepts",
    "translator": lambda c, d: (f"CE-FAM translator {_cefam_layers(c)} -> {c.clip.model}, {c.cefam.translator.optimizer}, "
                                f"up to {c.cefam.translator.max_epochs} epochs ({d.type})"),
    "regions": lambda c, d: (f"CE-FAM regions of the {c.evaluate.split} split on "
                             f"{', '.join(c.cefam.regions.layers or ()) or _cefam_layers(c)}, "
                             f"top-{c.cefam.regions.top_k} channels, beta {c.cefam.regions.beta} ({d.type})"),
    "sae_data": lambda c, d: f"FaCT training vectors of {_fact_layer(c)} (budget {c.fact.positions_budget} per image; {d.type})",
    "sae": lambda c, d: (f"FaCT TopK SAE: {c.fact.sae.expansion:g} latents per channel, k {c.fact.sae.k}, "
                         f"{c.fact.sae.epochs:g} epochs of batch {c.fact.sae.batch_size}"
                         f"{', from ' + c.fact.sae.checkpoint if c.fact.sae.checkpoint else ''} ({d.type})"),
    "contributions": _contributions,
    "fact_explain": lambda c, d: f"{c.fact.explain.n_images} FaCT explanations and a gallery of {c.fact.explain.gallery_concepts} latents",
    "evaluate": _evaluate,
    "stats": lambda c, d: f"every method's concept statistics with dask ({c.stats.scheduler})",
    "counterfactuals": _counterfactuals,
    "compare": lambda c, d: (f"skipped: {no_renderer(c.data.kind)}" if no_renderer(c.data.kind) else
                             "every method's contributions against the true effects, side by side, "
                             f"{c.compare.n_figures} figures ({d.type})"),
}


def _problem(error: UserError) -> str:
    return " ".join(error.format().split())  # one line, whatever the message holds


def diagnose(config: Params, stages: Iterable[str], checks: Mapping[str, Check | None]) -> Diagnosis:
    """Run every stage's check (all of them, whatever fails) and plan; `stages` in pipeline order.

    runtime.device is resolved first: a device this machine lacks is a problem of every stage."""
    diagnosis = Diagnosis({})
    try:
        device = resolve_device(config.runtime.device)
    except UserError as error:
        diagnosis.problems[_problem(error)] = ["runtime"]
        device = torch.device("cpu")
    for stage in stages:
        check = checks.get(stage)
        try:
            if check is not None:
                check(config)
        except UserError as error:
            diagnosis.problems.setdefault(_problem(error), []).append(stage)
        diagnosis.plans[stage] = PLANS[stage](config, device)
    return diagnosis



def run_doctor(params: Path, stages: Iterable[str], checks: Mapping[str, Check | None]) -> int:
    """The doctor command: print each stage's plan, then every problem and their count (stdout);
    return the exit status, 2 when there is a problem (an invalid params file is one, every bad key listed)."""
    from rich.console import Console

    out = Console(soft_wrap=True, highlight=False)
    try:
        config = load_params(params)
    except UserError as error:
        out.print(f"[bold red]error:[/bold red] {error}")
        return 2
    diagnosis = diagnose(config, stages, checks)
    for line in diagnosis.lines():
        out.print(line, markup=False)
    for line in diagnosis.problem_lines():
        out.print("[bold red]problem:[/bold red] ", end="")
        out.print(line, markup=False)
    count = len(diagnosis.problems)
    out.print(f"{count} problem{'s' if count != 1 else ''} in {params}" if count else f"no problems in {params}", markup=False)
    return 2 if count else 0
