"""Text for toy scenes: whole-image captions and what lies at given pixels (CLIP training text)."""

import numpy as np

from lib.toy.world import CONCEPTS, ToyWorld

# Concept names indexable by concept id, with id -1 (empty slot / no object) mapping to "".
_NAMES = np.array([c.name for c in CONCEPTS] + [""])


def render_captions(objects: np.ndarray, background: np.ndarray) -> list[str]:
    """Text of structured captions: objects (P, M, 3) ids [color, shape, pattern], background (P,).

    -1 means "not said". An object reads "a [color] [pattern] <shape|object>"; objects are joined
    with ", " and " and "; the background follows as " on sand" / " at night", or stands alone
    ("sand") when no object is named.
    """
    objects, background = np.asarray(objects), np.asarray(background)
    if objects.ndim != 3 or objects.shape[2] != 3 or background.shape != objects.shape[:1]:
        raise ValueError(f"objects must be (P, M, 3) and background (P,), got {objects.shape} and {background.shape}")
    color, shape, pattern = (_NAMES[objects[..., a]] for a in range(3))
    named = (objects >= 0).any(axis=-1)  # (P, M)
    noun = np.where(shape != "", shape, "object")
    phrase = "a" + np.where(color != "", " " + color, "") + np.where(pattern != "", " " + pattern, "") + " " + noun
    # Named objects first (stable), so the separators depend on the count only.
    order = np.argsort(~named, axis=1, kind="stable")
    phrase = np.take_along_axis(np.where(named, phrase, ""), order, axis=1)
    counts = named.sum(axis=1)
    text = phrase[:, 0]
    for slot in range(1, phrase.shape[1]):
        separator = np.where(slot == counts - 1, " and ", np.where(slot < counts, ", ", ""))
        text = text + separator + phrase[:, slot]
    place = _NAMES[background]
    setting = np.where(place == "night", " at night", " on " + place)
    setting = np.where(background < 0, "", np.where(counts > 0, setting, place))
    return (text + setting).tolist()


def global_captions(world: ToyWorld) -> list[str]:
    """One caption per image, e.g. 'a yellow striped triangle and a blue solid cross on sand'.

    Three objects read 'a ..., a ... and a ... on water'; the night background reads 'at night'.
    """
    return render_captions(world.objects, world.background)


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
