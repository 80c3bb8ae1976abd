"""The toy CLIP's words and its scores: caption wording, concept/class prompts, evaluation.

Evaluation runs the circles stage's own encoder (lib.pipeline.circles.CircleEncoder) on the G x G ring
grid, so the local accuracy measures exactly the prompts the SALF-CBM pipeline will see.
"""

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lib.kernels.preprocess import Preprocess
from lib.kernels.rings import CircleEncoder, grid_centers
from lib.kernels.text import encode_texts
from lib.toy.captions import point_concepts, render_captions
from lib.toy.world import CLASSES, CONCEPT_TYPES, CONCEPTS, ToyWorld, concept_index

RING_COLOR = (255, 0, 0)
_OBJECT_TYPES = CONCEPT_TYPES[:3]  # columns of ToyWorld.objects: color, shape, pattern
# Concept ids of each type, in CONCEPT_TYPES order (contiguous: CONCEPTS is grouped by type).
CONCEPT_IDS_BY_TYPE = tuple(np.array([i for i, c in enumerate(CONCEPTS) if c.type == kind]) for kind in CONCEPT_TYPES)


def concept_prompts() -> list[str]:
    """One prompt per concept, in CONCEPTS order: "a blue object", "a star", "a striped object", "sand"."""
    k = len(CONCEPTS)
    objects = np.full((k, 1, 3), -1, np.int64)
    background = np.full(k, -1, np.int64)
    for concept_id, concept in enumerate(CONCEPTS):
        if concept.type == "background":
            background[concept_id] = concept_id
        else:
            objects[concept_id, 0, _OBJECT_TYPES.index(concept.type)] = concept_id
    return render_captions(objects, background)


def class_prompts() -> list[str]:
    """One prompt per class rule, in CLASSES order: "a star on sand", "a blue striped object", ..."""
    objects = np.full((len(CLASSES), 1, 3), -1, np.int64)
    background = np.full(len(CLASSES), -1, np.int64)
    for class_id, rule in enumerate(CLASSES):
        if rule.background is not None:
            background[class_id] = concept_index(rule.background)
        for name in rule.object_attributes:
            concept_id = concept_index(name)
            objects[class_id, 0, _OBJECT_TYPES.index(CONCEPTS[concept_id].type)] = concept_id
    return render_captions(objects, background)


def centre_pixels(centres: np.ndarray, input_size: int, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Toy-image pixel (ys, xs) int64 under ring centres given in CLIP input pixels (P, 2) (y, x).

    Input pixel i has its centre at i and covers toy pixel floor((i + 0.5) * image_size / input_size)
    when the image is resized by a factor input_size / image_size (open_clip's half-pixel convention).
    """
    centres = np.asarray(centres, dtype=np.float64)
    if centres.ndim != 2 or centres.shape[1] != 2:
        raise ValueError(f"centres must have shape (P, 2) (y, x), got {centres.shape}")
    pixels = np.clip(np.floor((centres + 0.5) * image_size / input_size), 0, image_size - 1).astype(np.int64)
    return pixels[:, 0], pixels[:, 1]


def evaluate_toy_clip_model(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    preprocess: Preprocess,
    world: ToyWorld,
    *,
    ring_radius: float,
    ring_width: float,
    grid: int = 7,
    batch_size: int = 32,
) -> dict:
    """Local (red-circle) and global (zero-shot class) accuracy of a CLIP on a toy world.

    `model` (in eval mode), `tokenizer` and `preprocess`: a loaded CLIP's parts (lib.models.clip), or
    a CLIP in training.

    Local: every ring of the `grid` x `grid` prompt grid (radius/width in CLIP input pixels),
    judged at the toy pixel under its centre. On an object, each of color/shape/pattern is right
    when that object's value ranks first among its type's concept_prompts(); on the background,
    background is right when the true background ranks first among the background prompts.
    Global: zero-shot class of the plain image over class_prompts().
    Returns {"clip_local_acc": {type: float}, "clip_local_points": {type: int points scored},
    "clip_global_acc": float}.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    encoder = CircleEncoder(model, preprocess, grid=grid, radius=ring_radius, width=ring_width, color=RING_COLOR)
    with torch.inference_mode():
        concept_text = encode_texts(model, tokenizer, concept_prompts())  # (K, D)
        class_text = encode_texts(model, tokenizer, class_prompts())  # (C, D)

    n_images, image_size = len(world.images), world.images.shape[1]
    ys, xs = centre_pixels(grid_centers(preprocess.size, grid).numpy(), preprocess.size, image_size)
    truth = point_concepts(world, np.repeat(np.arange(n_images), len(ys)), np.tile(ys, n_images), np.tile(xs, n_images))
    truth = torch.from_numpy(truth.astype(np.int64)).view(n_images, len(ys), 4)

    correct, total = torch.zeros(len(CONCEPT_TYPES)), torch.zeros(len(CONCEPT_TYPES))
    class_correct = 0
    for start in range(0, n_images, batch_size):
        part = slice(start, start + batch_size)
        images = torch.from_numpy(world.images[part])
        circles = encoder(images)
        with (
            torch.inference_mode(),
            torch.autocast(encoder.device.type, encoder.dtype or torch.bfloat16, enabled=encoder.dtype is not None),
        ):
            plain = F.normalize(model.encode_image(preprocess(images.to(encoder.device))).float(), dim=-1)
        scores = (circles.flatten(1, 2) @ concept_text.T).cpu()  # (B, G*G, K)
        for t, ids in enumerate(map(torch.from_numpy, CONCEPT_IDS_BY_TYPE)):
            predicted = ids[scores[..., ids].argmax(-1)]
            known = truth[part, :, t] >= 0  # object attributes on objects, the background off them
            correct[t] += (predicted == truth[part, :, t])[known].sum()
            total[t] += known.sum()
        labels = torch.from_numpy(world.labels[part])
        class_correct += int(((plain @ class_text.T).argmax(-1).cpu() == labels).sum())
    accuracy = (correct / total.clamp_min(1)).tolist()
    return {
        "clip_local_acc": dict(zip(CONCEPT_TYPES, accuracy)),
        "clip_local_points": dict(zip(CONCEPT_TYPES, total.long().tolist())),
        "clip_global_acc": class_correct / n_images,
    }
