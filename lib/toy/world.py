"""Procedural toy world: objects with a colour, shape and pattern on a textured background.

Every concept has an exact pixel mask and every class is a documented rule over concepts
(CONTRACTS.md), so the explanation methods can be scored against ground truth. Rendering is
hard-edged (no antialiasing): a mask pixel is exactly a drawn pixel.
"""

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd


class Concept(NamedTuple):
    """A named concept and its type (one of CONCEPT_TYPES)."""

    name: str
    type: str


class ClassRule(NamedTuple):
    """A class: the background it needs (or None) and the attributes one object must have."""

    name: str
    background: str | None
    object_attributes: tuple[str, ...]


CONCEPT_TYPES: tuple[str, ...] = ("color", "shape", "pattern", "background")
_VOCABULARY: dict[str, tuple[str, ...]] = {
    "color": ("blue", "green", "yellow", "white", "purple"),
    "shape": ("square", "triangle", "cross", "diamond", "star"),
    "pattern": ("solid", "striped", "dotted"),
    "background": ("grass", "sand", "water", "night"),
}
CONCEPTS: tuple[Concept, ...] = tuple(
    Concept(name, kind) for kind in CONCEPT_TYPES for name in _VOCABULARY[kind]
)
CLASSES: tuple[ClassRule, ...] = (
    ClassRule("desert_star", "sand", ("star",)),
    ClassRule("sea_star", "water", ("star",)),
    ClassRule("night_cross", "night", ("cross",)),
    ClassRule("field_cross", "grass", ("cross",)),
    ClassRule("blue_stripes", None, ("blue", "striped")),
    ClassRule("yellow_dots", None, ("yellow", "dotted")),
    ClassRule("purple_diamond", None, ("purple", "diamond")),
    ClassRule("white_triangle", None, ("white", "triangle")),
)
MAX_OBJECTS = 3

_NAMES = tuple(c.name for c in CONCEPTS)
# First concept id of each type; ids of one type are contiguous (CONCEPTS is grouped by type).
_OFFSET = {kind: _NAMES.index(_VOCABULARY[kind][0]) for kind in CONCEPT_TYPES}
_OBJECT_TYPES = ("color", "shape", "pattern")  # column order of ToyWorld.objects


def concept_index(name: str) -> int:
    """Concept id of `name` (its position in CONCEPTS)."""
    if name not in _NAMES:
        raise ValueError(f"concept {name!r} is unknown; valid names: {', '.join(_NAMES)}")
    return _NAMES.index(name)


def rules_table() -> pd.DataFrame:
    """The class rules as data: one row per (class, required concept)."""
    rows = [
        (class_id, rule.name, concept_index(name), name, CONCEPTS[concept_index(name)].type)
        for class_id, rule in enumerate(CLASSES)
        for name in ((rule.background,) if rule.background else ()) + rule.object_attributes
    ]
    return pd.DataFrame(rows, columns=["class_id", "class_name", "concept_id", "concept", "concept_type"])


def _rule_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Rules as id arrays: background (C,) and per-object attributes (C, 3), -1 = unconstrained."""
    background = np.full(len(CLASSES), -1, dtype=np.int16)
    attributes = np.full((len(CLASSES), len(_OBJECT_TYPES)), -1, dtype=np.int16)
    for class_id, rule in enumerate(CLASSES):
        if rule.background is not None:
            background[class_id] = concept_index(rule.background)
        for name in rule.object_attributes:
            attributes[class_id, _OBJECT_TYPES.index(CONCEPTS[concept_index(name)].type)] = concept_index(name)
    return background, attributes


_RULE_BACKGROUND, _RULE_ATTRIBUTES = _rule_arrays()

# Object palette: (main, darker shade) per colour, in vocabulary order. Chosen far (L-inf > 50)
# from every background colour plus its texture amplitude, so objects never blend in
# (green is a saturated bright green against an olive grass).
_MAIN_RGB = np.array([[40, 90, 235], [60, 225, 60], [250, 215, 30], [245, 245, 245], [165, 70, 215]], np.uint8)
_DARK_RGB = np.array([[20, 45, 150], [25, 140, 25], [170, 140, 0], [160, 160, 160], [95, 30, 130]], np.uint8)
# Background base colour and texture amplitude (max per-channel deviation) per background.
_BACKGROUND_RGB = np.array([[95, 125, 55], [215, 190, 140], [30, 125, 150], [18, 20, 40]], np.float32)
_BACKGROUND_AMPLITUDE = np.array([18.0, 15.0, 18.0, 12.0], np.float32)
# Texture mix weights [smooth blobs, structure, pixel grain] (each term in [-1, 1], weights sum
# to 1 so the texture stays within the amplitude). Structure: grass = vertical blades,
# water = horizontal waves; sand and night have none.
_TEXTURE_WEIGHTS = np.array([[0.35, 0.4, 0.25], [0.6, 0.0, 0.4], [0.3, 0.5, 0.2], [0.3, 0.0, 0.7]], np.float32)

_SIZE_RANGE = (0.22, 0.35)  # object side as a fraction of the image side
_GAP = 2  # pixels kept free between object boxes so objects never touch
_PLACEMENT_CANDIDATES = 32
_RENDER_CHUNK = 512  # images rendered at once; bounds the float temporaries


@dataclass(frozen=True)
class ToyWorld:
    """A generated toy data set with exact ground truth (K = len(CONCEPTS))."""

    images: np.ndarray  # uint8 (N, S, S, 3)
    labels: np.ndarray  # int64 (N,)
    concept_masks: np.ndarray  # bool (N, K, S, S)
    object_map: np.ndarray  # int8 (N, S, S): -1 background, j = object slot
    objects: np.ndarray  # int16 (N, MAX_OBJECTS, 3): concept ids (color, shape, pattern); -1 empty
    background: np.ndarray  # int16 (N,): concept id of the background


def satisfied_rules(objects: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Which class rules each scene satisfies: bool (N, len(CLASSES)).

    objects: (N, M, 3) concept ids (color, shape, pattern), -1 for empty slots;
    background: (N,) concept ids.
    """
    objects, background = np.asarray(objects), np.asarray(background)
    if objects.ndim != 3 or objects.shape[2] != len(_OBJECT_TYPES):
        raise ValueError(f"objects must have shape (N, M, 3), got {objects.shape}")
    if background.shape != objects.shape[:1]:
        raise ValueError(f"background must have shape ({objects.shape[0]},), got {background.shape}")
    background_ok = (_RULE_BACKGROUND < 0) | (background[:, None] == _RULE_BACKGROUND)  # (N, C)
    attribute_ok = (_RULE_ATTRIBUTES < 0) | (objects[:, :, None, :] == _RULE_ATTRIBUTES)  # (N, M, C, 3)
    object_ok = attribute_ok.all(axis=3) & (objects[:, :, None, 0] >= 0)  # (N, M, C)
    return background_ok & object_ok.any(axis=1)


def _sample_scenes(rng: np.random.Generator, labels: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scene attributes with each label's rule planted on a random object; other rules may hold."""
    n = len(labels)
    objects = np.stack(
        [rng.integers(0, len(_VOCABULARY[t]), (n, MAX_OBJECTS)) + _OFFSET[t] for t in _OBJECT_TYPES], axis=2
    ).astype(np.int16)
    objects[np.arange(MAX_OBJECTS) >= counts[:, None]] = -1
    background = (rng.integers(0, len(_VOCABULARY["background"]), n) + _OFFSET["background"]).astype(np.int16)

    carrier = (rng.random(n) * counts).astype(np.int64)  # the object slot that carries the rule
    required = _RULE_ATTRIBUTES[labels]  # (n, 3)
    rows = np.arange(n)
    objects[rows, carrier] = np.where(required >= 0, required, objects[rows, carrier])
    background = np.where(_RULE_BACKGROUND[labels] >= 0, _RULE_BACKGROUND[labels], background)
    return objects, background


def _sample_valid_scenes(rng: np.random.Generator, labels: np.ndarray, max_objects: int) -> tuple[np.ndarray, np.ndarray]:
    """Scenes that satisfy exactly their own class rule: plant the rule, resample violators.

    Object counts are drawn once and kept, so rejection does not skew them towards one object.
    """
    counts = rng.integers(1, max_objects + 1, len(labels))
    objects, background = _sample_scenes(rng, labels, counts)
    wanted = np.eye(len(CLASSES), dtype=bool)[labels]
    bad = (satisfied_rules(objects, background) != wanted).any(axis=1)
    while bad.any():  # each round keeps a constant fraction of scenes, so this ends fast
        objects[bad], background[bad] = _sample_scenes(rng, labels[bad], counts[bad])
        bad[bad] = (satisfied_rules(objects[bad], background[bad]) != wanted[bad]).any(axis=1)
    return objects, background


def _place_objects(rng: np.random.Generator, present: np.ndarray, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping square boxes inside the image: top-left corners (N, M, 2) [y, x], sides (N, M).

    Draws several candidate layouts per image at once and keeps the first whose boxes are pairwise
    apart by _GAP; images with no valid candidate draw again.
    """
    n, m = present.shape
    low, high = (round(f * image_size) for f in _SIZE_RANGE)
    sides = rng.integers(low, high + 1, (n, m))
    corners = np.zeros((n, m, 2), np.int64)
    pending = np.arange(n)
    pairs = [(j, k) for j in range(m) for k in range(j + 1, m)]
    while pending.size:
        side = sides[pending][:, None, :, None]  # (p, 1, m, 1)
        candidate = (rng.random((pending.size, _PLACEMENT_CANDIDATES, m, 2)) * (image_size - side + 1)).astype(np.int64)
        start, end = candidate, candidate + side + _GAP
        ok = np.ones((pending.size, _PLACEMENT_CANDIDATES), bool)
        for j, k in pairs:
            overlap = ((start[:, :, j] < end[:, :, k]) & (start[:, :, k] < end[:, :, j])).all(axis=2)
            ok &= ~(overlap & present[pending][:, None, j] & present[pending][:, None, k])
        found = ok.any(axis=1)
        first = ok.argmax(axis=1)
        corners[pending[found]] = candidate[found, first[found]]
        pending = pending[~found]
    return corners, sides


def _square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Apex up (image y grows downwards): half-width grows linearly from the top edge.
    return (v >= -1) & (v <= 1) & (np.abs(u) <= (v + 1) / 2)


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    return ((au <= 1) & (av <= 0.32)) | ((au <= 0.32) & (av <= 1))


def _diamond(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.abs(u) + np.abs(v) <= 1


_STAR_INNER = 0.45  # inner-vertex radius of the 5-point star (outer radius 1)


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Fold the angle into one half-spike [0, 36 deg] (tip along +axis), then test which side of the
    # edge from the tip (1, 0) to the inner vertex the point lies on.
    sector = 2 * np.pi / 5
    angle = np.arctan2(u, -v)  # 0 = pointing up
    folded = np.abs(np.mod(angle + sector / 2, sector) - sector / 2)
    radius = np.hypot(u, v)
    px, py = radius * np.cos(folded), radius * np.sin(folded)
    ix, iy = _STAR_INNER * np.cos(sector / 2), _STAR_INNER * np.sin(sector / 2)
    # Cross product (I - T) x (P - T) is >= 0 on the origin side of the edge T->I.
    return (ix - 1) * py - iy * (px - 1) >= 0


_SHAPE_FUNCTIONS = (_square, _triangle, _cross, _diamond, _star)  # vocabulary order


def _smooth_noise(rng: np.random.Generator, n: int, image_size: int, grid: int = 5) -> np.ndarray:
    """Smooth blobs in [-1, 1]: a coarse uniform grid bilinearly upsampled, (n, S, S) float32."""
    coarse = rng.uniform(-1, 1, (n, grid, grid)).astype(np.float32)
    # Separable linear interpolation as a matrix product: weights of the 2 nearest grid nodes.
    position = (np.arange(image_size) + 0.5) / image_size * (grid - 1)
    interp = np.maximum(0, 1 - np.abs(position[:, None] - np.arange(grid)[None, :])).astype(np.float32)
    return interp @ coarse @ interp.T


def _render_backgrounds(rng: np.random.Generator, background: np.ndarray, image_size: int) -> np.ndarray:
    """Textured backgrounds, float32 (n, S, S, 3)."""
    n = len(background)
    kind = background - _OFFSET["background"]
    blobs = _smooth_noise(rng, n, image_size)
    grain = rng.uniform(-1, 1, (n, image_size, image_size)).astype(np.float32)
    blades = rng.uniform(-1, 1, (n, 1, image_size)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1)).astype(np.float32)
    rows = np.arange(image_size, dtype=np.float32)[None, :, None]
    waves = np.sin(2 * np.pi * rows / max(4.0, image_size / 10) + phase + 1.5 * blobs)
    structure = np.where((kind == 0)[:, None, None], blades, np.where((kind == 2)[:, None, None], waves, 0))
    w = _TEXTURE_WEIGHTS[kind][:, :, None, None]
    texture = w[:, 0] * blobs + w[:, 1] * structure + w[:, 2] * grain
    amplitude = _BACKGROUND_AMPLITUDE[kind][:, None, None, None]
    return _BACKGROUND_RGB[kind][:, None, None, :] + amplitude * texture[..., None]


def _pattern_dark(pattern: np.ndarray, ly: np.ndarray, lx: np.ndarray, image_size: int) -> np.ndarray:
    """Where an object's darker shade goes, from object-local integer pixel coordinates."""
    width = max(2, image_size // 24)  # diagonal stripe width
    period = max(5, image_size // 12)  # dot spacing
    dot = max(2, period // 2)
    stripes = ((lx + ly) // width) % 2 == 1
    dots = ((lx - 1) % period < dot) & ((ly - 1) % period < dot)
    kind = (pattern - _OFFSET["pattern"])[:, None, None]
    return np.where(kind == 1, stripes, np.where(kind == 2, dots, False))


def _render(
    rng: np.random.Generator,
    objects: np.ndarray,
    background: np.ndarray,
    corners: np.ndarray,
    sides: np.ndarray,
    image_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one chunk of scenes: images uint8 (n, S, S, 3) and object_map int8 (n, S, S)."""
    images = _render_backgrounds(rng, background, image_size)
    object_map = np.full((len(objects), image_size, image_size), -1, np.int8)
    pixel = np.arange(image_size)
    for slot in range(objects.shape[1]):
        color, shape, pattern = (objects[:, slot, a] for a in range(3))
        y0, x0 = corners[:, slot, 0, None, None], corners[:, slot, 1, None, None]
        ly, lx = pixel[None, :, None] - y0, pixel[None, None, :] - x0  # (n, S, 1), (n, 1, S)
        half = sides[:, slot, None, None] / 2
        # Object-local coordinates in [-1, 1] over the box, at pixel centres.
        v, u = (ly + 0.5 - half) / half, (lx + 0.5 - half) / half
        inside = np.zeros(object_map.shape, bool)
        for shape_id, shape_fn in enumerate(_SHAPE_FUNCTIONS):
            chosen = shape == shape_id + _OFFSET["shape"]
            if chosen.any():
                inside[chosen] = shape_fn(u[chosen], v[chosen])
        dark = _pattern_dark(np.where(pattern >= 0, pattern, _OFFSET["pattern"]), ly, lx, image_size)
        hue = np.maximum(color - _OFFSET["color"], 0)  # empty slots draw nothing (inside is False)
        rgb = np.where(dark[..., None], _DARK_RGB[hue][:, None, None], _MAIN_RGB[hue][:, None, None])
        images = np.where(inside[..., None], rgb, images)
        object_map[inside] = slot
    return np.clip(np.rint(images), 0, 255).astype(np.uint8), object_map


def _concept_masks(object_map: np.ndarray, objects: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Exact concept masks bool (N, K, S, S) from the object map and the scene attributes."""
    n = len(objects)
    masks = np.zeros((n, len(CONCEPTS)) + object_map.shape[1:], bool)
    rows = np.arange(n)
    masks[rows, background] = object_map == -1
    for slot in range(objects.shape[1]):
        on_slot = object_map == slot
        for attribute in range(objects.shape[2]):
            ids = objects[:, slot, attribute]
            has = ids >= 0
            masks[rows[has], ids[has]] |= on_slot[has]
    return masks


def generate(n: int, seed: int, image_size: int = 64, max_objects: int = MAX_OBJECTS) -> ToyWorld:
    """Generate `n` toy images with balanced labels and exact concept masks, deterministic in `seed`."""
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not isinstance(image_size, (int, np.integer)) or image_size < 32:
        raise ValueError(f"image_size must be an integer >= 32, got {image_size!r}")
    if not isinstance(max_objects, (int, np.integer)) or not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be an integer in [1, {MAX_OBJECTS}], got {max_objects!r}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(CLASSES)).astype(np.int64)
    objects, background = _sample_valid_scenes(rng, labels, max_objects)
    corners, sides = _place_objects(rng, objects[:, :, 0] >= 0, image_size)

    images = np.empty((n, image_size, image_size, 3), np.uint8)
    object_map = np.empty((n, image_size, image_size), np.int8)
    for start in range(0, n, _RENDER_CHUNK):
        part = slice(start, start + _RENDER_CHUNK)
        images[part], object_map[part] = _render(
            rng, objects[part], background[part], corners[part], sides[part], image_size
        )
    return ToyWorld(
        images=images,
        labels=labels,
        concept_masks=_concept_masks(object_map, objects, background),
        object_map=object_map,
        objects=objects,
        background=background.astype(np.int16),
    )
