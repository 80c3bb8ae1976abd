"""CE-FAM's concept-to-class contribution in `compare`: signed, for every ground-truth concept an image shows.

The regions stage stores the authors' contributions: the `cefam.regions.contribution_concepts` (8)
concepts of highest S^t per image, negatives dropped under `negatives: drop` (explain.py). The
comparison with the true effects needs every present concept, with its sign, so `SignedCefam`
recomputes the same masking AUC (explain.top_contributions -> association.class_contribution: the
predicted class's relative probability drop as the concept's top `top_k` channels (by beta * z) are
masked at its Top-1 layer, `contribution_fill`, `rule`) for each (image, present concept) pair:
the betas are explain_batch's (`beta` total: the spatial mean of dS^t/dA^l through the backbone, as
regions.concept_betas_total; jacobian: regions.concept_betas), here one backward per block of pairs,
each row an image with its own concept; the Top-1 layer is read from the regions store's association
scores. A nonzero stored contribution is the same number (tests/test_compare_cefam.py) and is reused.
Negatives are kept whatever `negatives` says; the stores stay as the regions stage wrote them
(evaluate and stats read those).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lib.core.layout import Layout
from lib.core.params import Params
from lib.core.stores import open_store
from lib.core.streams import read_rows
from lib.evaluate.adapters.cefam import CefamMaps
from lib.evaluate.registry import ConceptContributions, ConceptMapMethod, ConceptMaps, EvalBatch
from lib.methods.cefam.artifacts import REGION_ASSOCIATION, TrainedTranslator, explained_layers
from lib.methods.cefam.explain import top_contributions
from lib.methods.cefam.regions import concept_betas, pool_features
from lib.methods.cefam.taps import tapped_forward_with_prefixes
from lib.models.backbones import load_backbone_checked
from lib.models.classes import ClassMap, read_class_map
from lib.models.layers import split_at
from lib.pipeline.stored_concepts import read_concepts

__all__ = ["BLOCK", "TAIL_CHUNK", "SignedCefam", "signed_cefam"]

BLOCK = 32  # (image, concept) pairs per backbone forward and backward
TAIL_CHUNK = 8  # pairs per tail call (each brings top_k + 1 masked copies of its maps)


@dataclass
class SignedCefam(ConceptMapMethod):
    """CE-FAM's maps as evaluate reads them, its contributions recomputed signed for every present concept."""

    inner: CefamMaps
    model: nn.Module
    preprocess: object  # uint8 images (B, H, W, 3) -> the backbone's input
    translator: nn.Module
    text_emb: Tensor  # (M, D) of the regions store's concepts
    layers: tuple[str, ...]  # the translator's layers (z_cat order)
    explained: list[int]  # indices into them of the regions store's layers
    tails: list[nn.Module]
    class_map: ClassMap
    masks: object  # images.zarr masks (N, K, H, W)
    settings: object  # cefam.regions params
    name: str = "cefam"
    reuse_stored: bool = True  # take the regions stage's nonzero contributions as they are; False: recompute every pair

    def concept_maps(self, batch: EvalBatch) -> ConceptMaps | None:
        return self.inner.concept_maps(batch)

    def concept_contributions(self, batch: EvalBatch) -> ConceptContributions | None:
        """Signed contribution (B, M') of every ground-truth concept the image shows (its mask is not
        empty) to the backbone's predicted class; NaN for the concepts it does not show."""
        inner = self.inner
        if inner.columns.numel() == 0:
            return None
        device = batch.images.device
        index = batch.index.cpu().numpy()
        rows = inner.store.rows(index)
        present = torch.from_numpy(read_rows(self.masks, index)[:, inner.concepts.numpy()].any(axis=(2, 3))).to(device)  # (B, M')
        stored = torch.from_numpy(read_rows(inner.contributions, rows)[:, inner.columns.numpy()]).to(device, torch.float32)
        # a nonzero stored value is this very computation (tests/test_compare_cefam.py); 0 is a dropped negative or no value
        known = stored != 0 if self.reuse_stored else torch.zeros_like(present)
        values = torch.where(present & known, stored, torch.full_like(stored, float("nan")))
        association = torch.from_numpy(read_rows(inner.store.group[REGION_ASSOCIATION], rows)).to(device)  # (B, M, L)
        image, j = (present & ~known).nonzero(as_tuple=True)
        concept = inner.columns.to(device)[j]
        best = association[image, concept].argmax(dim=-1)  # Top-1 layer, an index into the explained layers
        for start in range(0, len(image), BLOCK):
            pick = slice(start, start + BLOCK)
            values[image[pick], j[pick]] = self._block(batch.images[image[pick]], concept[pick], best[pick])
        return ConceptContributions(values, inner.concepts.to(device))

    def _pair_forward(self, images: Tensor, concept: Tensor) -> tuple[Tensor, list[Tensor], list, list[Tensor], list[Tensor]]:
        """One row per (image, concept) pair: uint8 images (P, H, W, 3), store concepts (P,). Returns the
        backbone's logits (P, outputs), the tapped maps, their prefixes, pooled features and each row's
        own concept's betas (P, C_l) per translator layer (explain_batch's, for that concept only)."""
        total = self.settings.beta == "total"
        x = self.preprocess(images)
        with torch.enable_grad() if total else torch.no_grad():
            logits, maps, prefixes = tapped_forward_with_prefixes(self.model, x.detach().requires_grad_(total), self.layers)
            z_list, hw = pool_features(maps)
            if total:
                # concept_betas_total's beta^t = spatial mean of dS^t/dA^l (the total derivative), for each row's own
                # concept: the rows are independent images, so one backward of the sum serves them all
                scores = self.translator.scores(torch.cat(z_list, dim=1), self.text_emb).gather(1, concept[:, None])
                betas = [g.mean(dim=(2, 3)) for g in torch.autograd.grad(scores.sum(), maps)]
            else:
                index = torch.arange(len(concept), device=concept.device)
                betas = [b[index, concept] for b in concept_betas(self.translator, z_list, self.text_emb, hw)]
        return logits.detach(), [a.detach() for a in maps], prefixes, [z.detach() for z in z_list], betas

    def _padded(self, n: int, device: torch.device) -> Tensor:
        """Row indices 0..n-1 padded to BLOCK with repeats of row 0: on the CPU each new batch shape costs a
        kernel setup far above a small batch's compute."""
        return torch.cat([torch.arange(n, device=device), torch.zeros(BLOCK - n, dtype=torch.long, device=device)])

    def _block(self, images: Tensor, concept: Tensor, best: Tensor) -> Tensor:
        """Contributions (P,) of (image, concept) pairs, P <= BLOCK: uint8 images (P, H, W, 3), store concepts
        (P,), Top-1 layers best (P,) (indices into the explained layers). One row per pair, padded to BLOCK
        rows (dropped after), the tails called on TAIL_CHUNK pairs at a time, also padded."""
        n = len(images)
        rows = self._padded(n, images.device)
        images, concept, best = images[rows], concept[rows], best[rows]
        settings = self.settings
        logits, maps, prefixes, z_list, betas = self._pair_forward(images, concept)
        out = torch.empty(n, device=images.device)
        with torch.no_grad():
            target = self.class_map.output_of(self.class_map.predict(logits.float()))
            maps = [maps[i] for i in self.explained]
            importance = [(betas[i] * z_list[i])[:, None, :] for i in self.explained]
            prefixes = [None if prefixes[i] is None else prefixes[i].detach() for i in self.explained]
            for layer in best[:n].unique().tolist():  # the pairs masked at each layer, padded to a multiple of TAIL_CHUNK
                pick = (best[:n] == layer).nonzero()[:, 0]
                pad = torch.cat([pick, pick[:1].expand(-len(pick) % TAIL_CHUNK)])
                values = top_contributions(
                    self.tails, [a[pad] for a in maps], [imp[pad] for imp in importance], best[pad, None],
                    torch.zeros(len(pad), 1, dtype=torch.long, device=pad.device), target[pad], k=settings.top_k,
                    fills=self.fills, rule=settings.rule, chunk=TAIL_CHUNK, prefixes=[None if p is None else p[pad] for p in prefixes],
                )
                out[pick] = values[: len(pick), 0]
        return out

    @property
    def fills(self) -> list[str | None]:
        """The association's fill per explained layer: a channel's own spatial mean ("spatial") before the
        last layer, the paper's m^l (None) at the last (its maps reach the head only through the pool, where
        "spatial" would change nothing) or everywhere under contribution_fill: mean."""
        last = len(self.layers) - 1
        return [None if self.settings.contribution_fill == "mean" or i == last else "spatial" for i in self.explained]

    def top_channels(self, batch: EvalBatch, pairs: Tensor) -> tuple[Tensor, Tensor]:
        """For the (image, ground-truth concept column) pairs (P, 2) of a batch: each pair's Top-1 layer (P,)
        (an index into the explained layers) and the top_k channels there (P, k) by beta * z — the channels
        CE-FAM's association and contribution mask for that concept in that image (-1 pads a layer narrower than k)."""
        inner, k = self.inner, self.settings.top_k
        device = batch.images.device
        image, j = pairs[:, 0], pairs[:, 1]
        concept = inner.columns.to(device)[j]
        association = torch.from_numpy(read_rows(inner.store.group[REGION_ASSOCIATION], inner.store.rows(batch.index.cpu().numpy())))
        best = association.to(device)[image, concept].argmax(dim=-1)
        channels = torch.full((len(image), k), -1, dtype=torch.long, device=device)  # -1: a layer with fewer than k channels
        for start in range(0, len(image), BLOCK):
            pick = slice(start, start + BLOCK)
            n = len(image[pick])
            rows = self._padded(n, device)
            _, _, _, z_list, betas = self._pair_forward(batch.images[image[pick]][rows], concept[pick][rows])
            for position, layer in enumerate(self.explained):
                at = (best[pick] == position).nonzero()[:, 0]
                if len(at):
                    importance = (betas[layer] * z_list[layer])[at]
                    top = importance.topk(min(k, importance.shape[1]), dim=1).indices
                    channels[start + at, : top.shape[1]] = top
        return best, channels


def signed_cefam(method: CefamMaps, config: Params, layout: Layout, device: torch.device) -> SignedCefam:
    """CE-FAM's evaluate adapter with its contributions recomputed signed for every present concept."""
    trained = TrainedTranslator.load(layout.cefam_translator, device)
    concepts = read_concepts(layout.concepts)
    if list(concepts.names) != list(method.store.concepts):
        raise ValueError(f"{layout.concepts} lists other concepts than {layout.cefam_regions}: rerun the regions stage")
    layers = explained_layers(trained, config.cefam.regions.layers)
    if tuple(layers) != tuple(method.store.layers):
        raise ValueError(f"{layout.cefam_regions} explains layers {method.store.layers}, params {layers}: rerun the regions stage")
    backbone = load_backbone_checked(config.backbone)
    model = backbone.model.to(device).eval()
    class_map = read_class_map(open_store(layout.logits).attrs, layout.logits)
    masks = open_store(layout.images)["masks"]
    return SignedCefam(
        method, model, backbone.preprocess, trained.model, concepts.text_emb.to(device), tuple(trained.layers),
        [trained.layers.index(layer) for layer in layers], [split_at(model, layer)[1] for layer in layers], class_map,
        masks, config.cefam.regions,
    )
