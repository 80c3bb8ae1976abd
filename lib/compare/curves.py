"""Deletion and insertion curves of every method at two levels, with a random baseline (ours ★).

They generalise CE-FAM's Fig. 5 (pixels of a concept's map deleted, the class score watched) and the
deletion / insertion curves of the XAI literature to the methods side by side:

* **concept level**, in the model the method explains: the concepts the method scores are removed
  in the order of its contributions (most positive first), and the logit of the model's original
  prediction is recorded after each removal (`compare.concept_steps` removals). Insertion starts
  from all the method's scored concepts removed and puts them back in the same order. SALF-CBM
  removes concept m by zeroing its (standardised) activation c*[m] before the sparse layer; FaCT
  by dropping its matched latent j from the SAE's codes, x̂ − z_j ⊗ d_j, before the backbone's
  tail; CE-FAM by replacing the concept's top channels at its Top-1 layer as its association step
  does, the replacements of several concepts applied together in one forward (`CefamRemoval`).
  The CAM methods (the backbone has no concepts to remove) have none: N/A.
* **pixel level**, in the backbone: the top `compare.pixel_fractions` of the pixels of the
  method's map of its most-credited concept (the class map for the CAM methods) are deleted, and
  the backbone's logit of its original prediction recorded. The primary fill keeps the image in
  distribution: the toy renderer paints the deleted pixels as the scene's background (the same
  scene rendered without objects, lib/toy/counterfactual.py, same texture noise). A Gaussian blur
  of the image and the image's mean colour are secondary fills (deletion only). Insertion starts
  from the background rendering and puts the top pixels of the original back.

Normalisation and AUC: each curve is the logit divided by the original logit (images whose original
logit is not positive are left out), and its AUC is the mean over the removal steps / fractions
(step 0, the original, excluded), then the mean over images. Deletion: lower is better; insertion:
higher is better. The random baseline runs the same procedure with a seeded random order
(`evaluate.seed`): at the concept level a random permutation of the same scored concepts in the
same model (per method), at the pixel level the same shares of random pixels (the `random` row).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from lib.compare.cefam import SignedCefam
from lib.compare.explained_models import ExplainedModels, load_explained_models
from lib.core.errors import UserError
from lib.core.layout import Layout
from lib.core.outputs import write_csv
from lib.core.params import Params
from lib.core.stores import open_store
from lib.core.streams import read_rows
from lib.data.prepare import toy_split_draw
from lib.evaluate.adapters.fact import FactMaps
from lib.evaluate.adapters.salf import SalfMaps
from lib.evaluate.registry import ConceptMapMethod, EvalBatch
from lib.methods.fact.contributions import splice
from lib.toy import counterfactual, world

__all__ = [
    "BLUR_SIGMA",
    "CURVE_COLUMNS",
    "FILLS",
    "CefamRemoval",
    "ConceptRemoval",
    "CurveResult",
    "add_curves",
    "background_images",
    "blur",
    "compare_curves",
    "composite",
    "concept_removal",
    "curve_auc",
    "curve_values",
    "removal_states",
    "top_pixel_masks",
    "write_curve_plots",
]

FILLS = ("background", "blur", "mean")  # pixel deletion fills: the first is primary (and the only insertion)
FORWARD_CHUNK = 256  # images per backbone forward (bounds the activations' memory)
BLUR_SIGMA = 4.0  # px of the Gaussian blur fill (toy images are 64 px: a 6 px square becomes a faint smudge)


# ---------------------------------------------------------------------------------------------------
# orders and curves
def removal_states(contributions: np.ndarray, steps: int, insertion: bool) -> np.ndarray:
    """Which concepts are removed at each step: bool (N, steps + 1, K) from contributions (N, K)
    (NaN: not scored, never removed). Deletion: step s removes the s concepts of highest
    contribution (all scored ones once s reaches their number). Insertion: step s removes every
    scored concept but those s."""
    scored = np.isfinite(contributions)
    rank = np.argsort(np.argsort(np.where(scored, -contributions, np.inf), axis=1, kind="stable"), axis=1)  # 0 = most credited
    step = np.arange(steps + 1)[None, :, None]
    first = rank[:, None, :] < step  # (N, S+1, K): among the top s
    return scored[:, None, :] & (~first if insertion else first)


def random_order(contributions: np.ndarray, seed: int) -> np.ndarray:
    """Contributions that rank the same scored concepts in a seeded random order."""
    draw = np.random.default_rng(seed).random(contributions.shape)
    return np.where(np.isfinite(contributions), draw, np.nan)


def normalised(logits: np.ndarray, original: np.ndarray) -> np.ndarray:
    """Curves (N, S) relative to the original logit (N,); NaN rows where the original is not positive."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(original[:, None] > 0, logits / original[:, None], np.nan)


def curve_auc(curves: np.ndarray) -> float | None:
    """AUC of normalised curves (N, S) (their steps after the original): the mean over steps, then images."""
    per_image = curves.mean(axis=1)
    per_image = per_image[np.isfinite(per_image)]
    return float(per_image.mean()) if len(per_image) else None


def _mean_curve(curves: np.ndarray) -> np.ndarray:
    keep = np.isfinite(curves).all(axis=1)
    return curves[keep].mean(axis=0) if keep.any() else np.full(curves.shape[1], np.nan)


# ---------------------------------------------------------------------------------------------------
# concept level: a removal operator per method
class ConceptRemoval(Protocol):
    """Removes ground-truth concepts inside a method's own model."""

    def logits(self, batch: EvalBatch, removed: Tensor) -> tuple[Tensor, Tensor]:
        """(original logit (B,) of the model's prediction, that logit (B, S) with the concepts
        removed[:, s] (bool (B, S, K) over ground-truth concepts) removed)."""
        ...


@dataclass
class SalfRemoval:
    """SALF-CBM: concept m removed = its standardised activation c*[m] zeroed before the sparse layer."""

    method: SalfMaps

    @torch.no_grad()
    def logits(self, batch: EvalBatch, removed: Tensor) -> tuple[Tensor, Tensor]:
        classifier = self.method.model.classifier
        acts, logits = classifier.classify(self.method._maps(batch))  # (B, M), (B, classes)
        predicted = logits.argmax(dim=1)
        keep = torch.ones(*removed.shape[:2], acts.shape[1], device=acts.device)
        keep[:, :, self.method.columns.to(acts.device)] = (~removed[:, :, self.method.concepts.to(removed.device)]).float().to(acts.device)
        weights = classifier.weight.to(acts.device)[predicted]  # (B, M)
        bias = classifier.bias.to(acts.device)[predicted]
        return logits.gather(1, predicted[:, None])[:, 0], torch.einsum("bsm,bm->bs", keep * acts[:, None], weights) + bias[:, None]


@dataclass
class FactRemoval:
    """FaCT: concept k removed = its matched latent j dropped from the SAE's codes (x̂ − z_j ⊗ d_j; the
    decoder is linear and bias-free) before the backbone's tail."""

    method: FactMaps

    @torch.no_grad()
    def logits(self, batch: EvalBatch, removed: Tensor) -> tuple[Tensor, Tensor]:
        m = self.method
        acts = m._acts(batch)
        codes, x_hat = splice(m.sae, acts)  # (B, P, J), (B, C, H, W)
        _, output = m.backbone.explained_output(m.backbone.tail(x_hat))
        dropped = torch.zeros(*removed.shape[:2], codes.shape[2], dtype=torch.bool, device=codes.device)
        for latent, concept in zip(m.latents.tolist(), m.concepts.tolist(), strict=True):  # concepts, not images
            dropped[:, :, latent] |= removed[:, :, concept].to(codes.device)
        b, c, h, w = x_hat.shape
        # only the latents some state drops: the decoder's other atoms never change x̂
        used = dropped.flatten(0, 1).any(dim=0).nonzero()[:, 0]
        delta = torch.einsum("bpj,bsj,cj->bscp", codes[:, :, used], dropped[:, :, used].to(codes.dtype), m.sae.decoder.weight[:, used])
        edited = (x_hat[:, None] - delta.reshape(b, -1, c, h, w)).reshape(-1, c, h, w)
        scores = m.backbone.tail(torch.cat([x_hat, edited]))
        original = scores[:b].gather(1, output[:, None])[:, 0]
        return original, scores[b:].reshape(b, -1, scores.shape[1]).gather(2, output[:, None, None].expand(b, removed.shape[1], 1))[..., 0]


@dataclass
class CefamRemoval:
    """CE-FAM: concept k removed = its top_k channels (by beta * z) at its Top-1 layer replaced as its
    association step replaces them (a channel's own spatial mean before the last layer, the paper's m^l
    at the last: SignedCefam.fills). The replacements of several concepts compose in one forward of the
    backbone: a hook on each explained layer replaces the union of the removed concepts' channels there
    (a later layer's fill is computed on its maps as the earlier replacements left them)."""

    method: SignedCefam

    @torch.no_grad()
    def logits(self, batch: EvalBatch, removed: Tensor) -> tuple[Tensor, Tensor]:
        m = self.method
        device = batch.images.device
        b, s = removed.shape[:2]
        members = removed[:, :, m.inner.concepts.to(device)].to(device)  # (B, S, M'): the method's columns
        pairs = members.any(dim=1).nonzero()  # (P, 2): (image, column) removed in some state
        best, channels = m.top_channels(batch, pairs)
        names = [m.layers[i] for i in m.explained]
        logits = m.model(m.preprocess(batch.images)).float()
        target = m.class_map.output_of(m.class_map.predict(logits))
        original = logits.gather(1, target[:, None])[:, 0]
        per_chunk = max(1, FORWARD_CHUNK // s)
        out = []
        for start in range(0, b, per_chunk):
            span = slice(start, min(start + per_chunk, b))
            mine = (pairs[:, 0] >= span.start) & (pairs[:, 0] < span.stop)
            hooks = [
                m.model.get_submodule(name).register_forward_hook(
                    self._replacer(pairs[mine & (best == position)], channels[mine & (best == position)], members, span, fill))
                for position, (name, fill) in enumerate(zip(names, m.fills, strict=True))
            ]
            try:
                images = batch.images[span, None].expand(-1, s, *batch.images.shape[1:]).reshape(-1, *batch.images.shape[1:])
                scores = m.model(m.preprocess(images)).float().reshape(span.stop - span.start, s, -1)
            finally:
                for hook in hooks:
                    hook.remove()
            out.append(scores.gather(2, target[span, None, None].expand(-1, s, 1))[..., 0])
        return original, torch.cat(out)

    @staticmethod
    def _replacer(pairs: Tensor, channels: Tensor, members: Tensor, span: slice, fill: str | None):
        """A forward hook replacing, in each (image, state) row of the span's batch, the channels of the
        pairs (image, column) (their top channels (P, k), -1: none) whose concept that state removes."""

        def hook(_module, _inputs, output: Tensor) -> Tensor:
            n, s = span.stop - span.start, members.shape[1]
            c = output.shape[1]
            onehot = torch.zeros(len(pairs), c + 1, device=output.device)
            onehot.scatter_(1, torch.where(channels < 0, c, channels), 1.0)  # column c collects the padding
            state = members[pairs[:, 0], :, pairs[:, 1]].float()  # (P, S): which states remove the pair's concept
            replace = torch.zeros(n, s, c, device=output.device)
            replace.index_put_((pairs[:, 0] - span.start,), state[:, :, None] * onehot[:, None, :c], accumulate=True)
            if fill == "spatial":
                filled = output.mean(dim=(2, 3), keepdim=True)
            else:  # m^l: the image's mean over channels of its pooled features
                filled = output.mean(dim=(1, 2, 3), keepdim=True)
            return torch.where(replace.reshape(n * s, c, 1, 1) > 0, filled, output)

        return hook


def concept_removal(method: ConceptMapMethod) -> ConceptRemoval | None:
    """The removal operator of a method's own model, or None where it has none (module docstring)."""
    if isinstance(method, SalfMaps):
        return SalfRemoval(method)
    if isinstance(method, FactMaps):
        return FactRemoval(method)
    if isinstance(method, SignedCefam):
        return CefamRemoval(method)
    return None


# ---------------------------------------------------------------------------------------------------
# pixel level
def background_images(config: Params, layout: Layout, rows: np.ndarray) -> np.ndarray:
    """uint8 (n, S, S, 3): the first n scenes of evaluate.split (images.zarr rows `rows`) rendered
    without their objects, checked to equal the stored images wherever no object lies."""
    n_split, seed = toy_split_draw(config.data, config.evaluate.split)
    scenes = counterfactual.replay(n_split, seed, config.data.image_size, config.data.toy.max_objects)
    parts = []
    for chunk in range(len(scenes.chunk_states)):
        span = scenes.chunk_rows(chunk)
        if span.start >= len(rows):
            break
        empty = np.full_like(scenes.objects[span], -1)
        parts.append(counterfactual.render_chunk(scenes, chunk, empty)[0])
    backgrounds = np.concatenate(parts)[: len(rows)]
    store = open_store(layout.images)
    images, masks = read_rows(store["images"], rows), read_rows(store["masks"], rows)
    scenery = masks[:, [i for i, c in enumerate(world.CONCEPTS) if c.type == "background"]].any(axis=1)  # (n, S, S)
    if images.shape != backgrounds.shape or not (images[scenery] == backgrounds[scenery]).all():
        raise UserError(f"{layout.images} does not hold the toy world that data params describe (split {config.evaluate.split!r})",
                        key="data", fix="rerun the prepare stage (dvc repro prepare)")
    return backgrounds


def blur(images: Tensor, sigma: float = BLUR_SIGMA) -> Tensor:
    """Gaussian blur (separable, edge pixels repeated) of uint8 images (B, H, W, 3), as uint8."""
    radius = int(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=images.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = images.permute(0, 3, 1, 2).float().reshape(-1, 1, *images.shape[1:3])
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="replicate"), kernel[None, None, None, :])
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), kernel[None, None, :, None])
    return out.reshape(images.shape[0], 3, *images.shape[1:3]).permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8)


def mean_fill(images: Tensor) -> Tensor:
    """Each image's mean colour at every pixel: uint8 (B, H, W, 3)."""
    return images.float().mean(dim=(1, 2), keepdim=True).round().to(torch.uint8).expand_as(images)


def top_pixel_masks(maps: Tensor, fractions: Sequence[float]) -> Tensor:
    """bool (B, F, H, W): the round(f * H * W) pixels of highest value of each map (B, H, W), per fraction."""
    b, h, w = maps.shape
    rank = torch.empty(b, h * w, dtype=torch.long, device=maps.device)
    order = maps.reshape(b, -1).argsort(dim=1, descending=True, stable=True)
    rank.scatter_(1, order, torch.arange(h * w, device=maps.device).expand(b, -1))
    counts = torch.tensor([round(f * h * w) for f in fractions], device=maps.device)
    return (rank[:, None, :] < counts[None, :, None]).reshape(b, len(fractions), h, w)


def composite(images: Tensor, fill: Tensor, masks: Tensor) -> Tensor:
    """uint8 (B, F, H, W, 3): images (B, H, W, 3) with the pixels of masks (B, F, H, W) taken from fill."""
    return torch.where(masks[..., None], fill[:, None], images[:, None])


def _top_maps(method: ConceptMapMethod, batch: EvalBatch, best: Tensor, class_map: bool) -> Tensor:
    """(B, H, W) map of each image's most-credited concept `best` (B,) (the class map for class-map
    methods), upsampled bilinearly to the image; NaN where the method has no map of that concept."""
    size = tuple(batch.images.shape[1:3])
    if class_map:
        maps = method.class_maps(batch).detach().float()
    else:
        given = method.concept_maps(batch)
        values = given.maps.detach().float()
        values = values[:, :, 0] if values.ndim == 5 else values
        column = (given.concepts[None, :] == best[:, None]).float()  # (B, M')
        maps = torch.einsum("bm,bmhw->bhw", column, values)
        maps = torch.where(column.any(dim=1)[:, None, None], maps, torch.full_like(maps, float("nan")))
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


@dataclass(frozen=True)
class CurveResult:
    """One method's cells (`curves` of its compare row) and its mean curves for the plots."""

    cells: dict
    plots: dict[tuple[str, str], pd.DataFrame]  # (level, kind) -> rows (method, x, logit)


def _plot(name: str, x: Sequence[float], curves: np.ndarray, original: bool = True) -> pd.DataFrame:
    mean = _mean_curve(curves)
    xs = [0.0, *x] if original else list(x)
    ys = [1.0, *mean] if original else list(mean)
    return pd.DataFrame({"method": name, "x": xs, "logit": ys})


def _backbone_logits(models: ExplainedModels, images: Tensor, chunk: int = FORWARD_CHUNK) -> Tensor:
    """The backbone's class scores (N, classes) of uint8 images (N, H, W, 3), `chunk` images per forward."""
    outputs = torch.tensor(models.class_map.outputs, device=images.device)
    with torch.no_grad():
        return torch.cat([models.backbone.model(models.backbone.preprocess(images[i : i + chunk]))[:, outputs].float()
                          for i in range(0, len(images), chunk)])


def pixel_logits(models: ExplainedModels, images: Tensor, backgrounds: Tensor, masks: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """(original logit (B,) of the backbone's prediction; {curve: that logit (B, F)}) for top-pixel
    masks (B, F, H, W): deletion with each fill, insertion into the background. One backbone forward."""
    fills = {"background": backgrounds, "blur": blur(images), "mean": mean_fill(images)}
    variants = [composite(images, fills[f], masks) for f in FILLS] + [composite(backgrounds, images, masks)]
    b, n = masks.shape[:2]
    scores = _backbone_logits(models, torch.cat([images, *(v.reshape(-1, *images.shape[1:]) for v in variants)]))
    predicted = scores[:b].argmax(dim=1)
    original = scores[:b].gather(1, predicted[:, None])[:, 0]
    rest = scores[b:].reshape(len(variants), b, n, -1).gather(3, predicted[None, :, None, None].expand(len(variants), b, n, 1))[..., 0]
    names = [f"deletion_{f}" for f in FILLS] + ["insertion_background"]
    return original, dict(zip(names, rest, strict=True))


# ---------------------------------------------------------------------------------------------------
# the stage's entry point
def _empty_cells() -> dict:
    return {"concept": dict.fromkeys(("deletion", "insertion", "deletion_random", "insertion_random")),
            "pixel": dict.fromkeys(("deletion", "insertion", *(f"deletion_{f}" for f in FILLS[1:])))}


def _pixel_cells(curves: dict[str, np.ndarray]) -> dict:
    return {"deletion": curve_auc(curves["deletion_background"]), "insertion": curve_auc(curves["insertion_background"]),
            **{f"deletion_{f}": curve_auc(curves[f"deletion_{f}"]) for f in FILLS[1:]}}


def method_curves(config: Params, device: torch.device, models: ExplainedModels, methods: Sequence[ConceptMapMethod],
                  contributions: dict[str, np.ndarray], images: np.ndarray, backgrounds: np.ndarray, rows: np.ndarray,
                  labels: np.ndarray, class_map_methods: Sequence[str]) -> dict[str, CurveResult]:
    """Curves of every method in `methods` with contributions (its rows (n, K) of the first n images),
    and the pixel-level random baseline as "random". images, backgrounds: uint8 (n, S, S, 3) of
    images.zarr rows `rows` (true classes `labels`)."""
    settings, seed = config.compare, config.evaluate.seed
    steps, fractions, n = settings.concept_steps, list(settings.pixel_fractions), len(rows)
    batches = [slice(s, min(s + config.evaluate.batch_size, n)) for s in range(0, n, config.evaluate.batch_size)]
    results: dict[str, CurveResult] = {}

    def batch_of(span: slice) -> EvalBatch:
        return EvalBatch(torch.from_numpy(rows[span]).to(device), torch.from_numpy(images[span]).to(device),
                         torch.from_numpy(labels[span]).to(device))

    def pixel_curves(masks_of) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {}
        for span in batches:
            batch = batch_of(span)
            masks, valid = masks_of(batch, span)
            original, logits = pixel_logits(models, batch.images, torch.from_numpy(backgrounds[span]).to(device), masks)
            for name, values in logits.items():
                curve = normalised(values.cpu().numpy(), original.cpu().numpy())
                parts.setdefault(name, []).append(np.where(valid[:, None], curve, np.nan))
        return {name: np.concatenate(p) for name, p in parts.items()}

    def plots(name: str, concept: dict | None, pixel: dict | None) -> dict[tuple[str, str], pd.DataFrame]:
        out = {}
        for kind in ("deletion", "insertion"):
            if concept is not None:
                random = _plot(f"{name} (random order)", range(steps + 1), concept[f"{kind}_random"], original=False)
                out["concept", kind] = pd.concat([_plot(name, range(steps + 1), concept[kind], original=False), random])
            if pixel is not None:
                out["pixel", kind] = _plot(name, fractions, pixel[f"{kind}_background"])
        return out

    for method in methods:
        if method.name not in contributions:
            continue
        values = contributions[method.name][:n]
        cells, concept, pixel = _empty_cells(), None, None
        removal = concept_removal(method)
        if removal is not None and np.isfinite(values).any():
            shuffled = random_order(values, seed)
            states = np.concatenate([removal_states(values, steps, False), removal_states(values, steps, True),
                                     removal_states(shuffled, steps, False), removal_states(shuffled, steps, True)], axis=1)
            parts = []
            for span in batches:
                original, logits = removal.logits(batch_of(span), torch.from_numpy(states[span]).to(device))
                parts.append(normalised(logits.float().cpu().numpy(), original.float().cpu().numpy()))
            split = np.split(np.concatenate(parts), 4, axis=1)
            concept = dict(zip(("deletion", "insertion", "deletion_random", "insertion_random"), split, strict=True))
            cells["concept"] = {name: curve_auc(curve[:, 1:]) for name, curve in concept.items()}
        has_maps = method.name in class_map_methods or type(method).concept_maps is not ConceptMapMethod.concept_maps
        if has_maps and np.isfinite(values).any():
            best = np.nanargmax(np.where(np.isfinite(values), values, -np.inf), axis=1)
            scored = np.isfinite(values).any(axis=1)

            def masks_of(batch: EvalBatch, span: slice, method=method, best=best, scored=scored) -> tuple[Tensor, np.ndarray]:
                maps = _top_maps(method, batch, torch.from_numpy(best[span]).to(device), method.name in class_map_methods)
                valid = scored[span] & torch.isfinite(maps).all(dim=2).all(dim=1).cpu().numpy()
                return top_pixel_masks(torch.nan_to_num(maps, nan=0.0), fractions), valid

            pixel = pixel_curves(masks_of)
            cells["pixel"] = _pixel_cells(pixel)
        results[method.name] = CurveResult(cells, plots(method.name, concept, pixel))

    def random_masks(batch: EvalBatch, span: slice) -> tuple[Tensor, np.ndarray]:
        draw = np.random.default_rng([seed, span.start]).random(batch.images.shape[:3]).astype(np.float32)
        return top_pixel_masks(torch.from_numpy(draw).to(device), fractions), np.ones(len(batch.index), bool)

    pixel = pixel_curves(random_masks)
    cells = _empty_cells()
    cells["pixel"] = _pixel_cells(pixel)
    results["random"] = CurveResult(cells, plots("random pixels", None, pixel))
    return results


def compare_curves(config: Params, layout: Layout, device: torch.device, methods: Sequence[ConceptMapMethod],
                   contributions: dict[str, np.ndarray], rows: np.ndarray, class_map_methods: Sequence[str]) -> dict[str, CurveResult]:
    """The curves of the first compare.curve_images of the compared images (images.zarr rows `rows`,
    the first of evaluate.split; contributions' rows in the same order)."""
    rows = rows[: config.compare.curve_images]
    store = open_store(layout.images)
    images, labels = read_rows(store["images"], rows), store["labels"][:][rows]
    models = load_explained_models(config, layout, device)
    return method_curves(config, device, models, methods, contributions, images, background_images(config, layout, rows), rows,
                         labels, class_map_methods)


def add_curves(table: dict[str, dict], curves: dict[str, CurveResult]) -> None:
    """Put each row's curve AUCs under "curves" (every leaf None where a level does not apply)."""
    for name, row in table.items():
        row["curves"] = curves[name].cells if name in curves else _empty_cells()


def write_curve_plots(layout: Layout, curves: dict[str, CurveResult]) -> None:
    """One CSV per (level, kind): the mean normalised curve of each method (metrics/plots/compare_*.csv)."""
    for level in ("concept", "pixel"):
        for kind in ("deletion", "insertion"):
            frames = [c.plots[level, kind] for c in curves.values() if (level, kind) in c.plots]
            frame = pd.concat(frames) if frames else pd.DataFrame(columns=["method", "x", "logit"])
            write_csv(layout.compare_curve(level, kind), frame)


CURVE_COLUMNS = ["del C", "del C rnd", "ins C", "ins C rnd", "del px", "ins px", "del px blur", "del px mean"]


def curve_values(row: dict) -> list[float | None]:
    """The row's values of CURVE_COLUMNS."""
    curves = row.get("curves") or _empty_cells()
    concept, pixel = curves["concept"], curves["pixel"]
    return [concept["deletion"], concept["deletion_random"], concept["insertion"], concept["insertion_random"],
            pixel["deletion"], pixel["insertion"], pixel["deletion_blur"], pixel["deletion_mean"]]
