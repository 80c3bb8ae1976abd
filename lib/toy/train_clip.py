"""The toy world's teacher CLIP: a tiny open_clip model trained contrastively on toy captions.

Two kinds of training pairs share each batch:
- plain images with (partial) global captions, "a star, a blue striped object on sand";
- images with a red ring (drawn by lib.kernels.rings, exactly as the circles stage draws it) whose
  caption names only what lies at the ring centre: the object there, or the background.

Captions are sampled at several granularities ("a star", "a blue object", "a blue striped
star", "sand") so single-concept prompts are in distribution. Every caption is kept as
structured ids, so which captions truly describe which images is computed exactly: the
contrastive loss has multiple positives (no false negatives from repeated captions). Hard
negatives: each ringed image adds a caption of another thing in the same image (the ring is
the only cue that tells them apart), and every caption gets copies with one attribute swapped
("a star" against "a cross"), so each attribute is a contrast the loss must resolve.
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import open_clip
import pandas as pd
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from lib.core.layout import Layout
from lib.core.outputs import write_csv
from lib.core.params import Params
from lib.kernels.rings import blend_rings, grid_centers, ring_alpha, validate_grid
from lib.toy import world as toy_world
from lib.toy.captions import point_concepts, render_captions
from lib.toy.clip_eval import CONCEPT_IDS_BY_TYPE, RING_COLOR, centre_pixels, evaluate_toy_clip_model
from lib.toy.models import CLIP_DIR
from lib.toy.models.clip import TOY_CLIP_NAME, create_toy_clip, save_open_clip_checkpoint, toy_clip_preprocess
from lib.toy.world import ToyWorld

# Non-empty subsets of (color, shape, pattern) an object caption keeps, and how often: single
# attributes are what the per-concept prompts ask about, the full triple what global captions say.
_KEEP_MASKS = np.array(
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1]], dtype=bool
)
_KEEP_PROBS = np.array([1 / 6, 1 / 6, 1 / 6, 1 / 12, 1 / 12, 1 / 12, 1 / 4])
_CANDIDATES = 32  # candidate ring centres per ring when aiming at an object


# ---------------------------------------------------------------------------------------------
# Structured captions. A "scene" is (objects (P, 3, 3) concept ids [color, shape, pattern] per
# object slot, background (P,)), -1 meaning absent/unconstrained. Both what an image shows
# (its content) and what a caption asserts are scenes; a caption describes an image when every
# object it names matches some object of the image and its background (if named) matches.
# ---------------------------------------------------------------------------------------------


def caption_matches(
    caption_objects: torch.Tensor,
    caption_background: torch.Tensor,
    content_objects: torch.Tensor,
    content_background: torch.Tensor,
) -> torch.Tensor:
    """Which captions describe which images: bool (B, C), on the inputs' device.

    caption_objects (C, M, 3) / caption_background (C,): what each caption asserts, -1 =
    unconstrained (an all -1 row names no object). content_objects (B, M', 3) /
    content_background (B,): what each image shows, -1 = absent.
    """
    named = (caption_objects >= 0).any(-1)  # (C, M)
    wanted = caption_objects[None, :, :, None, :]  # (1, C, M, 1, 3)
    shown = content_objects[:, None, None, :, :]  # (B, 1, 1, M', 3)
    attribute_ok = (wanted < 0) | (wanted == shown)
    present = (content_objects[:, :, 0] >= 0)[:, None, None, :]
    object_found = (attribute_ok.all(-1) & present).any(-1)  # (B, C, M)
    objects_ok = (object_found | ~named[None]).all(-1)
    background_ok = (caption_background[None] < 0) | (caption_background[None] == content_background[:, None])
    return objects_ok & background_ok


def _keep_masks(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random non-empty attribute subsets, bool shape + (3,)."""
    return _KEEP_MASKS[rng.choice(len(_KEEP_MASKS), size=shape, p=_KEEP_PROBS)]


def _swap_one(rng: np.random.Generator, objects: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hard negatives: each caption with one asserted id replaced by another of its type."""
    ids = np.concatenate([objects.reshape(len(objects), -1), background[:, None]], axis=1)  # (P, 3M+1)
    # Pick one asserted position per caption uniformly (random keys, -inf where unasserted).
    keys = np.where(ids >= 0, rng.random(ids.shape), -np.inf)
    position = keys.argmax(axis=1)
    old = ids[np.arange(len(ids)), position]
    new = old.copy()
    for type_ids in CONCEPT_IDS_BY_TYPE:
        of_kind = np.isin(old, type_ids)
        # Shift by 1..n-1 within the type's contiguous id range: always a different value.
        step = rng.integers(1, len(type_ids), of_kind.sum())
        new[of_kind] = type_ids[0] + (old[of_kind] - type_ids[0] + step) % len(type_ids)
    ids[np.arange(len(ids)), position] = new
    return ids[:, :-1].reshape(objects.shape), ids[:, -1]


class _Batch:
    """One sampled training batch: which images, where their rings go, and all captions."""

    def __init__(
        self,
        world: ToyWorld,
        rng: np.random.Generator,
        batch_size: int,
        ring_fraction: float,
        input_size: int,
        grid_points: np.ndarray,
        object_fraction: float,
        n_swaps: int,
    ) -> None:
        n_images, n_slots = world.objects.shape[:2]
        self.index = rng.integers(0, n_images, batch_size)
        n_ring = int(round(batch_size * ring_fraction))
        ringed = self.index[:n_ring]

        # Ring centres (input pixels): on the circles stage's grid or anywhere, half each. Objects
        # cover ~10% of an image, so an `object_fraction` of rings takes the first of several
        # candidate centres that lands on an object (else the first candidate).
        on_grid = rng.random((n_ring, 1)) < 0.5
        candidates = np.where(
            on_grid[:, :, None],
            grid_points[rng.integers(0, len(grid_points), (n_ring, _CANDIDATES))],
            rng.uniform(0, input_size - 1, (n_ring, _CANDIDATES, 2)),
        )
        cy, cx = centre_pixels(candidates.reshape(-1, 2), input_size, world.images.shape[1])
        hits = world.object_map[np.repeat(ringed, _CANDIDATES), cy, cx].reshape(n_ring, _CANDIDATES) >= 0
        pick = np.where(rng.random(n_ring) < object_fraction, hits.argmax(axis=1), 0)
        self.centres = candidates[np.arange(n_ring), pick]
        ys, xs = centre_pixels(self.centres, input_size, world.images.shape[1])
        at_centre = point_concepts(world, ringed, ys, xs)  # (R, 4) [color, shape, pattern, background]
        slot = world.object_map[ringed, ys, xs].astype(np.int64)  # -1 on the background

        # Content: a ringed image shows only what is at its centre; a plain one shows everything.
        content_objects = np.full((batch_size, n_slots, 3), -1, np.int16)
        content_objects[:n_ring, 0] = at_centre[:, :3]
        content_objects[n_ring:] = world.objects[self.index[n_ring:]]
        content_background = np.concatenate([at_centre[:, 3], world.background[self.index[n_ring:]]])

        # Positive captions: ring -> the thing at the centre with a random attribute subset;
        # plain -> each object kept w.p. 3/4 (at least one), background kept w.p. 3/4.
        kept = _keep_masks(rng, (batch_size, n_slots))
        plain_present = content_objects[n_ring:, :, 0] >= 0
        keep_object = (rng.random(plain_present.shape) < 0.75) & plain_present
        first = np.argmax(plain_present, axis=1)  # every toy image has an object in slot 0
        keep_object[np.arange(len(first)), first] |= ~keep_object.any(axis=1)
        kept[n_ring:] &= keep_object[:, :, None]
        positive_objects = np.where(kept, content_objects, -1).astype(np.int16)
        say_background = (np.arange(batch_size) < n_ring) | (rng.random(batch_size) < 0.75)
        positive_background = np.where(say_background, content_background, -1).astype(np.int16)

        # Distractors: another thing in the same image, said with the positive's attribute
        # subset: another object, or the background when the ring is on an object (every toy
        # image has an object, so a ring on the background always has one to name).
        keys = rng.random((n_ring, n_slots + 1))
        present = world.objects[ringed, :, 0] >= 0
        keys[:, :n_slots] = np.where(present & (np.arange(n_slots) != slot[:, None]), keys[:, :n_slots], -1)
        keys[:, n_slots] = np.where(slot >= 0, keys[:, n_slots], -1)
        other = keys.argmax(axis=1)
        other_is_object = other < n_slots
        distractor_objects = np.full((n_ring, n_slots, 3), -1, np.int16)
        other_attributes = world.objects[ringed, np.minimum(other, n_slots - 1)]
        distractor_objects[:, 0] = np.where(other_is_object[:, None] & kept[:n_ring, 0], other_attributes, -1)
        distractor_background = np.where(other_is_object, -1, world.background[ringed]).astype(np.int16)

        # Hard negatives: `n_swaps` copies of each positive with one asserted id changed.
        swapped_objects, swapped_background = _swap_one(
            rng, np.tile(positive_objects, (n_swaps, 1, 1)), np.tile(positive_background, n_swaps)
        )
        self.caption_objects = np.concatenate([positive_objects, distractor_objects, swapped_objects])
        self.caption_background = np.concatenate([positive_background, distractor_background, swapped_background])
        self.content_objects, self.content_background = content_objects, content_background
        self.n_ring = n_ring


def multi_positive_clip_loss(logits: torch.Tensor, matches: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where every true (image, caption) pair is a positive.

    logits (B, C) scaled similarities, matches bool (B, C); every image needs a positive.
    Image->text spreads the target over an image's matching captions; text->image is taken
    over the captions that match at least one image (pure negatives only serve image->text).
    """
    target = matches.to(logits.dtype)
    if not bool(matches.any(1).all()):
        raise ValueError("matches: every image (row) needs at least one matching caption")
    image_to_text = -(F.log_softmax(logits, dim=1) * target / target.sum(1, keepdim=True)).sum(1).mean()
    has_image = matches.any(0)
    column_target = target[:, has_image]
    text_to_image = -(
        (F.log_softmax(logits[:, has_image], dim=0) * column_target / column_target.sum(0, keepdim=True)).sum(0).mean()
    )
    return (image_to_text + text_to_image) / 2


def _parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's recipe: no weight decay on gains, biases, norms, embeddings' 1-d params, logit scale."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        exclude = parameter.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_toy_clip(
    world_train: ToyWorld,
    world_val: ToyWorld,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device | str,
    ring_radius: float,
    ring_width: float,
    grid: int = 7,
    ring_fraction: float = 0.8,
    object_fraction: float = 0.8,
    n_swaps: int = 6,
    weight_decay: float = 0.1,
    warmup: int = 100,
    eval_every: int = 500,
    progress: Callable[[dict], None] | None = None,
) -> tuple[nn.Module, dict]:
    """Train a fresh toy CLIP (TOY_CLIP_NAME config, initialised from `seed`) on `world_train`.

    Each step samples `batch_size` images; a `ring_fraction` of them get a red ring (radius and
    width in CLIP input pixels) centred on the `grid` x `grid` prompt grid or anywhere, aimed at
    an object for an `object_fraction` of rings; `n_swaps` one-attribute-swapped negatives per
    caption. AdamW (open_clip's no-decay groups), linear warm-up then cosine decay to 0.
    Every `eval_every` steps and at the end the model is scored on `world_val`
    (evaluate_toy_clip_model); `progress` gets each record.
    Returns (model in eval mode on `device`, history {"loss": per-step floats, "eval": records
    {"step", "loss", "seconds", "clip_local_acc", "clip_local_points", "clip_global_acc"},
    "seconds": float}).
    """
    counts = {"steps": steps, "batch_size": batch_size, "warmup": warmup, "eval_every": eval_every, "n_swaps": n_swaps}
    for name, value in counts.items():
        minimum = 0 if name in ("warmup", "n_swaps") else 1
        if not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 for a contrastive loss, got {batch_size}")
    for name, value in (("ring_fraction", ring_fraction), ("object_fraction", object_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    if lr <= 0 or weight_decay < 0:
        raise ValueError(f"lr must be > 0 and weight_decay >= 0, got lr={lr!r}, weight_decay={weight_decay!r}")

    device = torch.device(device)
    model = create_toy_clip(seed).to(device)
    preprocess = toy_clip_preprocess(model)
    validate_grid(preprocess.size, grid, ring_radius, ring_width)
    tokenizer = open_clip.get_tokenizer(TOY_CLIP_NAME)
    images = torch.from_numpy(world_train.images).to(device)
    red = preprocess.normalise_color(RING_COLOR, device)
    grid_points = grid_centers(preprocess.size, grid).numpy()
    rng = np.random.default_rng(seed)

    optimizer = torch.optim.AdamW(_parameter_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / max(1, warmup))
        * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0, step - warmup) / max(1, steps - warmup)))),
    )
    history: dict = {"loss": [], "eval": []}
    started = time.perf_counter()
    for step in range(1, steps + 1):
        model.train()
        batch = _Batch(
            world_train, rng, batch_size, ring_fraction, preprocess.size, grid_points, object_fraction, n_swaps
        )
        x = preprocess(images[torch.from_numpy(batch.index).to(device)])
        centres = torch.from_numpy(batch.centres).to(device, torch.float32)
        alpha = ring_alpha(preprocess.size, centres, ring_radius, ring_width)
        x = torch.cat([blend_rings(x[: batch.n_ring], alpha, red, per_image=True), x[batch.n_ring :]])
        tokens = tokenizer(render_captions(batch.caption_objects, batch.caption_background)).to(device)
        matches = caption_matches(
            *(torch.from_numpy(a).to(device, torch.int64) for a in (
                batch.caption_objects, batch.caption_background, batch.content_objects, batch.content_background))
        )
        # Captions repeat a lot ("sand", "a star"): encode each distinct one once.
        unique_tokens, caption_of = torch.unique(tokens, dim=0, return_inverse=True)
        image_features = F.normalize(model.encode_image(x), dim=-1)
        text_features = F.normalize(model.encode_text(unique_tokens), dim=-1)[caption_of]
        logit_scale = model.logit_scale.exp()
        loss = multi_positive_clip_loss(logit_scale * image_features @ text_features.T, matches)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():  # CLIP's clamp: temperature at most 100
            model.logit_scale.clamp_(0, math.log(100))
        history["loss"].append(loss.item())
        if step % eval_every == 0 or step == steps:
            model.eval()
            scores = evaluate_toy_clip_model(
                model, tokenizer, preprocess, world_val, ring_radius=ring_radius, ring_width=ring_width, grid=grid
            )
            record = {"step": step, "loss": float(np.mean(history["loss"][-eval_every:])),
                      "seconds": time.perf_counter() - started, **scores}
            history["eval"].append(record)
            if progress is not None:
                progress(record)
    history["seconds"] = time.perf_counter() - started
    model.eval()
    return model, history


def train_teacher_clip(config: Params, device: torch.device, log: Callable[[dict], None]) -> pd.DataFrame:
    """Train and save the toy CLIP as an open_clip folder; returns the per-step loss curve."""
    params = config.toy_clip
    train = toy_world.generate(params.n_train, params.data_seed, params.image_size)
    val = toy_world.generate(params.n_val, params.data_seed + 1, params.image_size)
    model, history = train_toy_clip(
        train, val,
        steps=params.steps, batch_size=params.batch_size, lr=params.lr, seed=params.seed, device=device,
        ring_radius=params.ring_radius, ring_width=params.ring_width, grid=params.grid,
        ring_fraction=params.ring_fraction, object_fraction=params.object_fraction, n_swaps=params.n_swaps,
        weight_decay=params.weight_decay, warmup=params.warmup, eval_every=params.eval_every, progress=log,
    )  # fmt: skip
    save_open_clip_checkpoint(model.cpu(), CLIP_DIR)
    return pd.DataFrame({"step": np.arange(1, len(history["loss"]) + 1), "loss": history["loss"]})


@dataclass(frozen=True)
class ToyClipReport:
    curve: pd.DataFrame

    def summary(self) -> str:
        return f"{len(self.curve)} steps, final loss {self.curve['loss'].iloc[-1]:.3f}"


def run_toy_clip(config: Params, layout: Layout, device: torch.device, progress: Progress | None = None) -> ToyClipReport:
    """The toy_clip stage: train the teacher CLIP, write its loss curve."""
    show = progress.console.print if progress is not None else print
    curve = train_teacher_clip(config, device, show)
    write_csv(layout.toy_plot("toy_clip"), curve)
    return ToyClipReport(curve)
