"""Procedural toy world: objects with a colour, shape and pattern on a textured background.

Every concept has an exact pixel mask and every class is a documented rule over concepts
(CONTRACTS.md), so the explanation methods can be scored against ground truth. An image shows
the concepts of its own class rule and never all the concepts of another's, so the class
follows from which concepts are present. Rendering is hard-edged (no antialiasing): a mask
pixel is exactly a drawn pixel.
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
_RENDER_CHUNK = 256  # images rendered at once; bounds the float temporaries


@dataclass(frozen=True)
class ToyWorld:
    """A generated toy data set with exact ground truth (K = len(CONCEPTS))."""

    images: np.ndarray  # uint8 (N, S, S, 3)
    labels: np.ndarray  # int64 (N,)
    concept_masks: np.ndarray  # bool (N, K, S, S)
    object_map: np.ndarray  # int8 (N, S, S): -1 background, j = object slot
    objects: np.ndarray  # int16 (N, MAX_OBJECTS, 3): concept ids (color, shape, pattern); -1 empty
    background: np.ndarray  # int16 (N,): concept id of the background


def _check_scenes(objects: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated scene arrays and which rules' background each scene has: bool (N, C)."""
    objects, background = np.asarray(objects), np.asarray(background)
    if objects.ndim != 3 or objects.shape[2] != len(_OBJECT_TYPES):
        raise ValueError(f"objects must have shape (N, M, 3), got {objects.shape}")
    if background.shape != objects.shape[:1]:
        raise ValueError(f"background must have shape ({objects.shape[0]},), got {background.shape}")
    return objects, background, (_RULE_BACKGROUND < 0) | (background[:, None] == _RULE_BACKGROUND)


def satisfied_rules(objects: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Which class rules each scene satisfies (a rule's object attributes all on one object):
    bool (N, len(CLASSES)).

    objects: (N, M, 3) concept ids (color, shape, pattern), -1 for empty slots;
    background: (N,) concept ids.
    """
    objects, background, background_ok = _check_scenes(objects, background)
    attribute_ok = (_RULE_ATTRIBUTES < 0) | (objects[:, :, None, :] == _RULE_ATTRIBUTES)  # (N, M, C, 3)
    object_ok = attribute_ok.all(axis=3) & (objects[:, :, None, 0] >= 0)  # (N, M, C)
    return background_ok & object_ok.any(axis=1)


def shown_rules(objects: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Which class rules' concepts each scene shows, possibly spread over several objects:
    bool (N, len(CLASSES)). A superset of satisfied_rules; same arguments."""
    objects, background, background_ok = _check_scenes(objects, background)
    shown = (objects[:, :, None, :] == _RULE_ATTRIBUTES).any(axis=1)  # (N, C, 3); -1 slots never match
    return background_ok & ((_RULE_ATTRIBUTES < 0) | shown).all(axis=2)


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


def _sample_valid_scenes(
    rng: np.random.Generator, labels: np.ndarray, max_objects: int
) -> tuple[np.ndarray, np.ndarray]:
    """Scenes that satisfy their own class rule and show no other rule's concepts, even spread
    over several objects: plant the rule, resample violators.

    So the label is a function of which concepts the image shows, and an image-level concept
    bottleneck (SALF-CBM's pooled concepts) can classify exactly; the object-level binding of
    a rule's attributes still decides where its evidence lies (ground-truth class masks).
    Object counts are drawn once and kept, so rejection does not skew them towards one object.
    """
    counts = rng.integers(1, max_objects + 1, len(labels))
    objects, background = _sample_scenes(rng, labels, counts)
    wanted = np.eye(len(CLASSES), dtype=bool)[labels]
    bad = (shown_rules(objects, background) != wanted).any(axis=1)
    while bad.any():  # each round accepts a fixed share of the redrawn scenes, so this ends fast
        objects[bad], background[bad] = _sample_scenes(rng, labels[bad], counts[bad])
        bad[bad] = (shown_rules(objects[bad], background[bad]) != wanted[bad]).any(axis=1)
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
_STAR_TIPS = np.array(  # unit vectors to the 5 tips (u, v), the first pointing up (v grows downwards)
    [(np.sin(a), -np.cos(a)) for a in 2 * np.pi * np.arange(5) / 5], np.float32
)


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Fold the point into one half-spike: px along the nearest tip (largest projection), py >= 0
    # across it. Then test the side of the edge from the tip T = (1, 0) to the inner vertex I.
    px = np.maximum.reduce([u * tu + v * tv for tu, tv in _STAR_TIPS])
    py = np.sqrt(np.maximum(u * u + v * v - px * px, 0))
    ix, iy = _STAR_INNER * np.cos(np.pi / 5), _STAR_INNER * np.sin(np.pi / 5)
    # Cross product (I - T) x (P - T) is >= 0 on the origin side of the edge T->I.
    return (ix - 1) * py - iy * (px - 1) >= 0


_SHAPE_FUNCTIONS = (_square, _triangle, _cross, _diamond, _star)  # vocabulary order


def _uniform(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform noise in [-1, 1), float32."""
    return rng.random(shape, dtype=np.float32) * 2 - 1


def _smooth_noise(rng: np.random.Generator, n: int, image_size: int, grid: int = 5) -> np.ndarray:
    """Smooth blobs in [-1, 1]: a coarse uniform grid bilinearly upsampled, (n, S, S) float32."""
    coarse = _uniform(rng, (n, grid, grid))
    # Separable linear interpolation as a matrix product: weights of the 2 nearest grid nodes.
    position = (np.arange(image_size) + 0.5) / image_size * (grid - 1)
    interp = np.maximum(0, 1 - np.abs(position[:, None] - np.arange(grid)[None, :])).astype(np.float32)
    return interp @ coarse @ interp.T


def _render_backgrounds(rng: np.random.Generator, background: np.ndarray, image_size: int) -> np.ndarray:
    """Textured backgrounds, uint8 (n, S, S, 3)."""
    n = len(background)
    kind = background - _OFFSET["background"]
    blobs = _smooth_noise(rng, n, image_size)
    grain = _uniform(rng, (n, image_size, image_size))
    blades = _uniform(rng, (n, 1, image_size))
    phase = rng.random((n, 1, 1), dtype=np.float32) * np.float32(2 * np.pi)
    structure = np.zeros_like(blobs)
    grass, water = kind == 0, kind == 2
    structure[grass] = blades[grass]
    rows = np.arange(image_size, dtype=np.float32)[None, :, None]
    wavelength = max(4.0, image_size / 10)
    structure[water] = np.sin(np.float32(2 * np.pi / wavelength) * rows + phase[water] + 1.5 * blobs[water])
    w = _TEXTURE_WEIGHTS[kind][:, :, None, None]
    texture = w[:, 0] * blobs + w[:, 1] * structure + w[:, 2] * grain
    amplitude = _BACKGROUND_AMPLITUDE[kind][:, None, None, None]
    rgb = _BACKGROUND_RGB[kind][:, None, None, :] + amplitude * texture[..., None]
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _at_pixels(values: np.ndarray, object_map: np.ndarray) -> np.ndarray:
    """Per-slot values (n, M, C) looked up at every pixel's object slot, (n, S, S, C).

    Background pixels get slot 0's values; callers mask them with `object_map >= 0`.
    """
    rows = np.arange(len(values))[:, None, None]
    return values[rows, np.maximum(object_map, 0)]


def _draw_shapes(shapes: np.ndarray, corners: np.ndarray, sides: np.ndarray, image_size: int) -> np.ndarray:
    """Object map int8 (n, S, S): the slot whose shape covers each pixel, -1 for background."""
    object_map = np.full((len(shapes), image_size, image_size), -1, np.int8)
    centre = np.arange(image_size, dtype=np.float32) + 0.5
    for slot in range(shapes.shape[1]):
        half = (sides[:, slot, None, None] / 2).astype(np.float32)
        # Object-local coordinates in [-1, 1] over the object's box, at pixel centres.
        v = (centre[None, :, None] - corners[:, slot, 0, None, None] - half) / half  # (n, S, 1)
        u = (centre[None, None, :] - corners[:, slot, 1, None, None] - half) / half  # (n, 1, S)
        for shape_id, shape_fn in enumerate(_SHAPE_FUNCTIONS):
            chosen = np.flatnonzero(shapes[:, slot] == shape_id + _OFFSET["shape"])  # empty slots: none
            inside = shape_fn(u[chosen], v[chosen])
            object_map[chosen] = np.where(inside, slot, object_map[chosen])
    return object_map


def _pattern_dark(pattern: np.ndarray, ly: np.ndarray, lx: np.ndarray, image_size: int) -> np.ndarray:
    """Where the darker shade goes, from per-pixel pattern ids and object-local pixel coordinates."""
    width = max(2, image_size // 24)  # diagonal stripe width
    period = max(5, image_size // 12)  # dot spacing
    dot = max(2, period // 2)
    stripes = ((lx + ly) // width) % 2 == 1
    dots = ((lx - 1) % period < dot) & ((ly - 1) % period < dot)
    kind = pattern - _OFFSET["pattern"]
    return np.where(kind == 1, stripes, (kind == 2) & dots)


def _render(
    rng: np.random.Generator,
    objects: np.ndarray,
    background: np.ndarray,
    corners: np.ndarray,
    sides: np.ndarray,
    image_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one chunk of scenes.

    Returns images uint8 (n, S, S, 3), object_map int8 (n, S, S) and the object attributes at
    every pixel int16 (n, S, S, 3) (only meaningful where object_map >= 0).
    """
    object_map = _draw_shapes(objects[:, :, 1], corners, sides, image_size)
    attributes = _at_pixels(objects, object_map)
    corner = _at_pixels(corners, object_map)
    pixel = np.arange(image_size)
    ly, lx = pixel[None, :, None] - corner[..., 0], pixel[None, None, :] - corner[..., 1]
    dark = _pattern_dark(attributes[..., 2], ly, lx, image_size)
    hue = np.maximum(attributes[..., 0] - _OFFSET["color"], 0)
    colour = np.where(dark[..., None], _DARK_RGB[hue], _MAIN_RGB[hue])
    scenery = _render_backgrounds(rng, background, image_size)
    return np.where((object_map >= 0)[..., None], colour, scenery), object_map, attributes


def _concept_masks(object_map: np.ndarray, attributes: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Exact concept masks bool (n, K, S, S) from the object map and per-pixel attributes."""
    on_object = object_map >= 0
    masks = np.empty((len(object_map), len(CONCEPTS)) + object_map.shape[1:], bool)
    for kind in CONCEPT_TYPES:
        if kind == "background":
            ids = np.where(on_object, -1, background[:, None, None])
        else:
            ids = np.where(on_object, attributes[..., _OBJECT_TYPES.index(kind)], -1)
        kind_ids = np.arange(_OFFSET[kind], _OFFSET[kind] + len(_VOCABULARY[kind]))
        masks[:, kind_ids] = ids[:, None] == kind_ids[None, :, None, None]
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
    masks = np.empty((n, len(CONCEPTS), image_size, image_size), bool)
    for start in range(0, n, _RENDER_CHUNK):
        part = slice(start, start + _RENDER_CHUNK)
        images[part], object_map[part], attributes = _render(
            rng, objects[part], background[part], corners[part], sides[part], image_size
        )
        masks[part] = _concept_masks(object_map[part], attributes, background[part])
    return ToyWorld(
        images=images,
        labels=labels,
        concept_masks=masks,
        object_map=object_map,
        objects=objects,
        background=background.astype(np.int16),
    )
