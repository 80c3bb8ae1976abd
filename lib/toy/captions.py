"""Text for toy scenes: whole-image captions and what lies at given pixels (CLIP training text)."""

import numpy as np

from lib.toy.world import CONCEPTS, ToyWorld

# Concept names indexable by concept id, with id -1 (empty slot / no object) mapping to "".
_NAMES = np.array([c.name for c in CONCEPTS] + [""])
# How a caption places the objects on each background: "on sand", but "at night".
_SETTING = np.array([f" at {c.name}" if c.name == "night" else f" on {c.name}" for c in CONCEPTS] + [""])


def _object_phrases(objects: np.ndarray) -> np.ndarray:
    """'a <color> <pattern> <shape>' for each (color, shape, pattern) id row; "" where empty."""
    color, shape, pattern = (_NAMES[objects[..., a]] for a in range(3))
    return np.where(objects[..., 0] >= 0, "a " + color + " " + pattern + " " + shape, "")


def global_captions(world: ToyWorld) -> list[str]:
    """One caption per image, e.g. 'a yellow striped triangle and a blue solid cross on sand'.

    Three objects read 'a ..., a ... and a ... on water'; the night background reads 'at night'.
    """
    phrases = _object_phrases(world.objects)  # (N, M)
    counts = (world.objects[:, :, 0] >= 0).sum(axis=1)
    caption = phrases[:, 0]
    # Join slot by slot (objects fill the first `count` slots): ", " between, " and " before the last.
    for slot in range(1, phrases.shape[1]):
        separator = np.where(slot == counts - 1, " and ", np.where(slot < counts, ", ", ""))
        caption = caption + separator + phrases[:, slot]
    return (caption + _SETTING[world.background]).tolist()


def point_concepts(world: ToyWorld, index: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Concept ids [color, shape, pattern, background] of what lies at each point, int16 (P, 4).

    A point on an object gets the object's three attributes and -1 as background; a point on the
    background gets -1 attributes and the background id, matching the concept masks exactly.
    """
    index, ys, xs = (np.asarray(a) for a in (index, ys, xs))
    n, height, width = world.object_map.shape
    if not (index.ndim == 1 and index.shape == ys.shape == xs.shape):
        raise ValueError(f"index, ys, xs must be 1-D of equal length, got shapes {index.shape}, {ys.shape}, {xs.shape}")
    for name, values, size in (("index", index, n), ("ys", ys, height), ("xs", xs, width)):
        if not np.issubdtype(values.dtype, np.integer) or (values.size and (values.min() < 0 or values.max() >= size)):
            raise ValueError(f"{name} must hold integers in [0, {size}), got dtype {values.dtype}"
                             f"{f', range [{values.min()}, {values.max()}]' if values.size else ''}")
    slot = world.object_map[index, ys, xs].astype(np.int64)
    on_object = slot >= 0
    attributes = world.objects[index, np.maximum(slot, 0)]  # (P, 3), masked below where on background
    out = np.empty((len(index), 4), np.int16)
    out[:, :3] = np.where(on_object[:, None], attributes, -1)
    out[:, 3] = np.where(on_object, -1, world.background[index])
    return out


def point_captions(world: ToyWorld, index: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> list[str]:
    """What lies at each point in words: 'a yellow striped triangle' on an object, else e.g. 'sand'."""
    concepts = point_concepts(world, index, ys, xs)
    objects = concepts[:, :3]
    return np.where(objects[:, 0] >= 0, _object_phrases(objects), _NAMES[concepts[:, 3]]).tolist()
