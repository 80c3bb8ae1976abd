"""Counterfactual toy images: the same scene with one concept replaced.

The toy world renders from a scene description (objects' colour, shape and pattern, the
background), so replacing one concept and rendering again gives an image that differs from the
original only where the old or the new concept lies; the change of a model's logit is then the
concept's true effect (the causal-fidelity metrics compare each method's contributions with it).

`lib/toy/world.py` is not touched (it is a dependency of the shipped toy models). Instead,
`replay` repeats `generate`'s draws with the same generator and keeps the generator's state before
each chunk is rendered: a chunk draws its background textures in shapes that depend only on the
chunk's size and the image size, so rendering an edited chunk from that state reuses exactly the
original texture noise. Edits are rendered in rounds, one edit per image and round, one chunk
render per round.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import pandas as pd

from lib.toy import world

_OBJECT_TYPES = ("color", "shape", "pattern")  # column order of ToyWorld.objects


class EditTag(IntEnum):
    """What an edit does to the class rules the image shows (lib.toy.world.shown_rules)."""

    NEUTRAL = 0  # the image still shows its own rule and no other
    RULE_BREAKING = 1  # the image then shows no class rule
    RULE_CREATING = 2  # the image then shows another class's rule


@dataclass(frozen=True)
class Scenes:
    """The scene description of a generated split and what re-rendering it needs."""

    labels: np.ndarray  # int64 (N,)
    objects: np.ndarray  # int16 (N, MAX_OBJECTS, 3): concept ids (color, shape, pattern); -1 empty
    background: np.ndarray  # int16 (N,)
    corners: np.ndarray  # int64 (N, MAX_OBJECTS, 2): top-left [y, x] of each object's box
    sides: np.ndarray  # int64 (N, MAX_OBJECTS)
    image_size: int
    chunk_states: tuple[dict, ...]  # generator state before rendering each chunk of world._RENDER_CHUNK images

    def chunk_rows(self, chunk: int) -> slice:
        """The images of one render chunk."""
        return slice(chunk * world._RENDER_CHUNK, min((chunk + 1) * world._RENDER_CHUNK, len(self.labels)))


def replay(n: int, seed: int, image_size: int = 64, max_objects: int = world.MAX_OBJECTS) -> Scenes:
    """Replay `world.generate(n, seed, image_size, max_objects)`'s draws without rendering:
    its scenes and the generator state before each chunk's render."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(world.CLASSES)).astype(np.int64)
    objects, background = world._sample_valid_scenes(rng, labels, max_objects)
    corners, sides = world._place_objects(rng, objects[:, :, 0] >= 0, image_size)
    states = []
    for start in range(0, n, world._RENDER_CHUNK):
        states.append(rng.bit_generator.state)
        # Advance the generator exactly as rendering this chunk does: the texture draws only.
        world._render_backgrounds(rng, background[start : start + world._RENDER_CHUNK], image_size)
    return Scenes(labels, objects, background.astype(np.int16), corners, sides, image_size, tuple(states))


def render_chunk(
    scenes: Scenes, chunk: int, objects: np.ndarray | None = None, background: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (n, S, S, 3) and concept masks bool (n, K, S, S) of one chunk, with the chunk's
    scene replaced by `objects` / `background` where given (same shapes as the chunk's)."""
    rows = scenes.chunk_rows(chunk)
    objects = scenes.objects[rows] if objects is None else objects
    background = scenes.background[rows] if background is None else background
    rng = np.random.default_rng()
    rng.bit_generator.state = scenes.chunk_states[chunk]
    images, object_map, attributes = world._render(rng, objects, background, scenes.corners[rows], scenes.sides[rows], scenes.image_size)
    return images, world._concept_masks(object_map, attributes, background)


def present_concepts(objects: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Which concepts each scene shows: bool (N, K)."""
    present = np.zeros((len(background), len(world.CONCEPTS)), bool)
    rows, _, _ = np.nonzero(objects >= 0)
    present[rows, objects[objects >= 0]] = True
    present[np.arange(len(background)), background] = True
    return present


def _type_ids(kind: str) -> np.ndarray:
    return np.array([i for i, c in enumerate(world.CONCEPTS) if c.type == kind])


def concept_edits(scenes: Scenes) -> pd.DataFrame:
    """Every single-concept edit of every scene: for each concept an image shows, each other value of
    its type in its place (on every object that carries it, or as the background).

    Columns: image, concept (replaced), replacement, tag (EditTag), round (the edit's rank among its
    image's edits: edits of one round are rendered together). Ordered by image, concept, replacement.
    """
    present = present_concepts(scenes.objects, scenes.background)
    kind_of = np.array([world.CONCEPT_TYPES.index(c.type) for c in world.CONCEPTS])
    images, concepts = np.nonzero(present)
    parts = []
    for kind_index, kind in enumerate(world.CONCEPT_TYPES):
        ids = _type_ids(kind)
        of_kind = kind_of[concepts] == kind_index
        image, concept = np.repeat(images[of_kind], len(ids)), np.repeat(concepts[of_kind], len(ids))
        replacement = np.tile(ids, of_kind.sum())
        keep = replacement != concept
        parts.append((image[keep], concept[keep], replacement[keep]))
    image, concept, replacement = (np.concatenate(column) for column in zip(*parts))
    order = np.lexsort((replacement, concept, image))
    edits = pd.DataFrame({"image": image[order], "concept": concept[order], "replacement": replacement[order]})
    objects, background = apply_edits(scenes.objects[edits["image"]], scenes.background[edits["image"]], edits)
    edits["tag"] = edit_tags(objects, background, scenes.labels[edits["image"]])
    edits["round"] = edits.groupby("image").cumcount()
    return edits


def apply_edits(objects: np.ndarray, background: np.ndarray, edits: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The scenes (one row per edit: objects (E, M, 3), background (E,)) with each edit's concept
    replaced by its replacement; returns new arrays."""
    objects, background = objects.copy(), background.copy()
    concept, replacement = edits["concept"].to_numpy(), edits["replacement"].to_numpy()
    objects = np.where(objects == concept[:, None, None], replacement[:, None, None], objects).astype(objects.dtype)
    background = np.where(background == concept, replacement, background).astype(background.dtype)
    return objects, background


def edit_tags(objects: np.ndarray, background: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """EditTag of each edited scene against its original class `labels`: rule-creating when it shows
    another class's rule, else rule-breaking when it no longer shows its own, else neutral."""
    shown = world.shown_rules(objects, background)
    own = shown[np.arange(len(labels)), labels]
    other = shown.copy()
    other[np.arange(len(labels)), labels] = False
    return np.where(other.any(axis=1), EditTag.RULE_CREATING, np.where(own, EditTag.NEUTRAL, EditTag.RULE_BREAKING)).astype(np.int8)


def render_edits(scenes: Scenes, edits: pd.DataFrame) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Render `edits` (rows of `concept_edits`) chunk by chunk and round by round: yields (edit row
    positions in `edits`, images uint8 (E, S, S, 3), concept masks bool (E, K, S, S)), each edit
    rendered exactly once."""
    chunk_of = edits["image"].to_numpy() // world._RENDER_CHUNK
    for chunk in np.unique(chunk_of):
        rows = scenes.chunk_rows(chunk)
        in_chunk = np.flatnonzero(chunk_of == chunk)
        for round_ in np.unique(edits["round"].to_numpy()[in_chunk]):
            positions = in_chunk[edits["round"].to_numpy()[in_chunk] == round_]
            batch = edits.iloc[positions]
            local = batch["image"].to_numpy() - rows.start
            objects, background = scenes.objects[rows].copy(), scenes.background[rows].copy()
            objects[local], background[local] = apply_edits(objects[local], background[local], batch)
            images, masks = render_chunk(scenes, chunk, objects, background)
            yield positions, images[local], masks[local]
