"""Toy world: determinism, exact masks, rules, palette, captions and the preview grid."""

import numpy as np
import pytest
from PIL import Image

from lib.data.preview import save_preview
from lib.toy.captions import global_captions, point_concepts
from lib.toy.world import (
    _BACKGROUND_AMPLITUDE,
    _BACKGROUND_RGB,
    _DARK_RGB,
    _MAIN_RGB,
    CLASSES,
    CONCEPT_TYPES,
    CONCEPTS,
    MAX_OBJECTS,
    ToyWorld,
    concept_index,
    generate,
    rules_table,
    satisfied_rules,
    shown_rules,
)

N, SIZE = 400, 64
K = len(CONCEPTS)
TYPE_IDS = {t: np.array([i for i, c in enumerate(CONCEPTS) if c.type == t]) for t in CONCEPT_TYPES}

# The rules exactly as CONTRACTS.md states them, written out independently of lib.toy.world:
# (required background or None, attributes that one object must have all of).
CONTRACT_RULES = [
    ("sand", {"star"}),
    ("water", {"star"}),
    ("night", {"cross"}),
    ("grass", {"cross"}),
    (None, {"blue", "striped"}),
    (None, {"yellow", "dotted"}),
    (None, {"purple", "diamond"}),
    (None, {"white", "triangle"}),
]


@pytest.fixture(scope="module")
def world() -> ToyWorld:
    return generate(N, seed=7, image_size=SIZE)


def test_vocabulary_and_rules_table_follow_contracts():
    assert [c.name for c in CONCEPTS] == [
        "blue", "green", "yellow", "white", "purple", "square", "triangle", "cross", "diamond", "star",
        "solid", "striped", "dotted", "grass", "sand", "water", "night",
    ]
    assert [c.name for c in CLASSES] == [
        "desert_star", "sea_star", "night_cross", "field_cross",
        "blue_stripes", "yellow_dots", "purple_diamond", "white_triangle",
    ]
    table = rules_table()
    assert list(table.columns) == ["class_id", "class_name", "concept_id", "concept", "concept_type"]
    for class_id, (bg, attributes) in enumerate(CONTRACT_RULES):
        rows = table[table.class_id == class_id]
        assert set(rows.concept) == attributes | ({bg} if bg else set())
        assert (rows.concept_id == rows.concept.map(concept_index)).all()
    assert table.loc[table.concept == "striped", "concept_type"].item() == "pattern"
    assert concept_index("night") == 16
    with pytest.raises(ValueError, match="'circle'.*valid names: blue"):
        concept_index("circle")


def test_same_seed_same_bytes_and_different_seed_differs(world):
    again = generate(N, seed=7, image_size=SIZE)
    for field in ("images", "labels", "concept_masks", "object_map", "objects", "background"):
        a, b = getattr(world, field), getattr(again, field)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), field
    other = generate(N, seed=8, image_size=SIZE)
    assert not np.array_equal(world.images, other.images)
    assert not np.array_equal(world.labels, other.labels)


def test_shapes_and_dtypes(world):
    assert world.images.shape == (N, SIZE, SIZE, 3) and world.images.dtype == np.uint8
    assert world.labels.shape == (N,) and world.labels.dtype == np.int64
    assert world.concept_masks.shape == (N, K, SIZE, SIZE) and world.concept_masks.dtype == bool
    assert world.object_map.shape == (N, SIZE, SIZE) and world.object_map.dtype == np.int8
    assert world.objects.shape == (N, MAX_OBJECTS, 3) and world.objects.dtype == np.int16
    assert world.background.shape == (N,) and world.background.dtype == np.int16


def test_labels_balanced_and_object_counts_spread(world):
    assert np.bincount(world.labels, minlength=len(CLASSES)).tolist() == [N // len(CLASSES)] * len(CLASSES)
    counts = (world.objects[:, :, 0] >= 0).sum(axis=1)
    assert set(counts.tolist()) == {1, 2, 3}
    # Rejection keeps the drawn object counts, so each count stays near a third of the images.
    assert np.bincount(counts, minlength=4)[1:].min() > N / 5
    # Filled slots come first and have all three attributes of the right types.
    filled = world.objects[:, :, 0] >= 0
    assert np.all(filled[:, :-1] >= filled[:, 1:])
    for a, kind in enumerate(("color", "shape", "pattern")):
        assert np.isin(world.objects[..., a][filled], TYPE_IDS[kind]).all()
        assert (world.objects[..., a][~filled] == -1).all()
    assert np.isin(world.background, TYPE_IDS["background"]).all()


def test_every_label_satisfies_its_rule_and_shows_no_other(world):
    for i in range(N):  # straightforward per-image check, independent of satisfied_rules
        objects = [{CONCEPTS[c].name for c in row} for row in world.objects[i] if row[0] >= 0]
        background = CONCEPTS[world.background[i]].name
        holds = [
            (bg is None or bg == background) and any(attributes <= obj for obj in objects)
            for bg, attributes in CONTRACT_RULES
        ]
        # no other rule's concepts anywhere, not even spread over several objects
        shows = [(bg is None or bg == background) and attributes <= set().union(*objects) for bg, attributes in CONTRACT_RULES]
        own = [c == world.labels[i] for c in range(len(CLASSES))]
        assert holds == own and shows == own, (i, objects, background)
    one_hot = np.eye(len(CLASSES), dtype=bool)[world.labels]
    assert np.array_equal(satisfied_rules(world.objects, world.background), one_hot)
    assert np.array_equal(shown_rules(world.objects, world.background), one_hot)


def test_satisfied_and_shown_rules_hand_examples_and_bad_input():
    ids = concept_index
    objects = np.full((3, 2, 3), -1, np.int16)
    objects[0, 0] = [ids("blue"), ids("star"), ids("striped")]  # on sand: desert_star + blue_stripes
    objects[1, 1] = [ids("white"), ids("triangle"), ids("solid")]  # on water: white_triangle
    objects[2, 0] = [ids("white"), ids("cross"), ids("solid")]  # rule attributes split over objects:
    objects[2, 1] = [ids("green"), ids("triangle"), ids("solid")]  # no white_triangle
    background = np.array([ids("sand"), ids("water"), ids("sand")], np.int16)
    expected = np.zeros((3, len(CLASSES)), bool)
    expected[0, [0, 4]] = True
    expected[1, 7] = True
    assert np.array_equal(satisfied_rules(objects, background), expected)
    expected[2, 7] = True  # split over two objects: shown, though not satisfied
    assert np.array_equal(shown_rules(objects, background), expected)
    for rules in (satisfied_rules, shown_rules):
        with pytest.raises(ValueError, match="objects must have shape"):
            rules(objects[..., :2], background)
        with pytest.raises(ValueError, match="background must have shape"):
            rules(objects, background[:2])


def test_masks_partition_pixels_by_type(world):
    masks = world.concept_masks
    per_type = {t: masks[:, TYPE_IDS[t]].sum(axis=1) for t in CONCEPT_TYPES}  # (N, S, S) counts
    on_object = world.object_map >= 0
    for t in ("color", "shape", "pattern"):
        assert np.array_equal(per_type[t], on_object.astype(per_type[t].dtype)), t  # disjoint, cover objects
    assert np.array_equal(per_type["background"], (~on_object).astype(int))  # disjoint from objects
    own_background = masks[np.arange(N), world.background]
    assert np.array_equal(own_background, ~on_object)
    assert per_type["background"].sum() == own_background.sum()  # other backgrounds are empty


def test_masks_match_object_attributes(world):
    masks = world.concept_masks
    for slot in range(MAX_OBJECTS):
        on_slot = world.object_map == slot
        has = world.objects[:, slot, 0] >= 0
        assert not on_slot[~has].any()
        for a in range(3):
            ids = world.objects[has, slot, a]
            assert masks[np.flatnonzero(has), ids][on_slot[has]].all()


def test_objects_inside_apart_and_sized(world):
    low, high = round(0.22 * SIZE), round(0.35 * SIZE)
    # Least extent of each shape as a fraction of its box side: square 0.85; star 0.9 tall, but its
    # thin tips can fall between pixel centres.
    least_fraction = {"square": 0.85, "triangle": 1.0, "cross": 1.0, "diamond": 1.0, "star": 0.8}
    for slot in range(MAX_OBJECTS):
        on_slot = world.object_map == slot
        has = world.objects[:, slot, 0] >= 0
        height, width = on_slot[has].any(axis=2).sum(axis=1), on_slot[has].any(axis=1).sum(axis=1)
        shape = world.objects[has, slot, 1]
        assert max(height.max(), width.max()) <= high
        for name, fraction in least_fraction.items():
            this = shape == concept_index(name)
            # A clipped object would be too small or, clipped on one side, lopsided.
            assert np.all(np.minimum(height, width)[this] >= fraction * low - 1), name
            assert np.all(np.abs(height - width)[this] <= (0 if name in ("square", "cross", "diamond") else 2)), name
        # Objects never touch: a 1-px dilation of one object stays on its own pixels or background.
        grown = on_slot.copy()
        grown[:, 1:] |= on_slot[:, :-1]
        grown[:, :-1] |= on_slot[:, 1:]
        grown[:, :, 1:] |= on_slot[:, :, :-1]
        grown[:, :, :-1] |= on_slot[:, :, 1:]
        assert np.isin(world.object_map[grown], [-1, slot]).all()


def test_object_pixels_have_their_palette_colours(world):
    obj = world.object_map >= 0
    n_idx, ys, xs = np.nonzero(obj)
    slot = world.object_map[n_idx, ys, xs]
    color, pattern = (world.objects[n_idx, slot, a] for a in (0, 2))
    pixel = world.images[n_idx, ys, xs]
    main = (pixel == _MAIN_RGB[color - TYPE_IDS["color"][0]]).all(axis=1)
    dark = (pixel == _DARK_RGB[color - TYPE_IDS["color"][0]]).all(axis=1)
    assert (main | dark).all()
    solid, striped, dotted = (pattern == concept_index(p) for p in ("solid", "striped", "dotted"))
    assert main[solid].all()
    # Per object: striped is roughly half dark, dotted a minority of dots; both show both shades.
    key = n_idx * MAX_OBJECTS + slot
    dark_fraction = np.bincount(key, weights=dark) / np.maximum(np.bincount(key), 1)
    object_pattern = np.zeros(key.max() + 1, int)
    object_pattern[key] = pattern
    assert np.all((dark_fraction[object_pattern == concept_index("striped")] > 0.3)
                  & (dark_fraction[object_pattern == concept_index("striped")] < 0.7))
    assert np.all((dark_fraction[object_pattern == concept_index("dotted")] > 0.05)
                  & (dark_fraction[object_pattern == concept_index("dotted")] < 0.35))
    assert striped.any() and dotted.any()


def test_background_pixels_textured_and_distinct_from_objects(world):
    n_idx, ys, xs = np.nonzero(world.object_map < 0)
    kind = world.background[n_idx] - TYPE_IDS["background"][0]
    pixel = world.images[n_idx, ys, xs].astype(np.float32)
    deviation = np.abs(pixel - _BACKGROUND_RGB[kind]).max(axis=1)
    assert (deviation <= _BACKGROUND_AMPLITUDE[kind] + 0.5).all()  # within its own texture range
    palette = np.concatenate([_MAIN_RGB, _DARK_RGB]).astype(np.float32)
    to_object = np.abs(pixel[:, None] - palette[None]).max(axis=2).min(axis=1)
    assert to_object.min() > 30  # no background pixel resembles any object colour (L-inf)
    for b in range(4):  # every background is noisy, not flat
        assert pixel[kind == b].std(axis=0).min() > 2


def test_no_red_anywhere(world):
    red = (world.images[..., 0] > 150) & (world.images[..., 1] < 80) & (world.images[..., 2] < 80)
    assert not red.any()


def test_generate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n must be a positive integer, got 0"):
        generate(0, seed=0)
    with pytest.raises(ValueError, match="image_size must be an integer >= 32, got 16"):
        generate(4, seed=0, image_size=16)
    with pytest.raises(ValueError, match=r"max_objects must be an integer in \[1, 3\], got 4"):
        generate(4, seed=0, max_objects=4)


def test_max_objects_and_image_size_are_honoured():
    small = generate(24, seed=1, image_size=48, max_objects=1)
    assert small.images.shape == (24, 48, 48, 3)
    assert ((small.objects[:, :, 0] >= 0).sum(axis=1) == 1).all()
    one_hot = np.eye(len(CLASSES), dtype=bool)[small.labels]
    assert np.array_equal(satisfied_rules(small.objects, small.background), one_hot)


def test_point_concepts_agree_with_masks(world):
    rng = np.random.default_rng(0)
    index, ys, xs = rng.integers(0, N, 3000), rng.integers(0, SIZE, 3000), rng.integers(0, SIZE, 3000)
    concepts = point_concepts(world, index, ys, xs)
    assert concepts.shape == (3000, 4)
    from_points = np.zeros((3000, K + 1), bool)
    from_points[np.arange(3000)[:, None], concepts] = True  # -1 lands in the spare last column
    assert np.array_equal(from_points[:, :K], world.concept_masks[index, :, ys, xs])
    assert np.array_equal(concepts[:, 3] >= 0, concepts[:, 0] < 0)  # either an object or background
    with pytest.raises(ValueError, match=r"ys must hold integers in \[0, 64\)"):
        point_concepts(world, index[:1], np.array([64]), xs[:1])
    with pytest.raises(ValueError, match="1-D of equal length"):
        point_concepts(world, index[:2], ys[:1], xs[:1])


def _hand_world(objects: list[list[str]], background: str) -> ToyWorld:
    """A one-image world with given objects; only the fields captions read are meaningful."""
    rows = np.full((1, MAX_OBJECTS, 3), -1, np.int16)
    for slot, names in enumerate(objects):
        rows[0, slot] = [concept_index(name) for name in names]
    empty = np.zeros((1, 1, 1), np.int8)
    return ToyWorld(np.zeros((1, 1, 1, 3), np.uint8), np.zeros(1, np.int64), np.zeros((1, K, 1, 1), bool),
                    empty, rows, np.array([concept_index(background)], np.int16))


def test_global_captions_read_as_specified():
    two = _hand_world([["yellow", "triangle", "striped"], ["blue", "cross", "solid"]], "sand")
    three = _hand_world(
        [["white", "star", "dotted"], ["green", "square", "solid"], ["purple", "diamond", "striped"]], "night"
    )
    one = _hand_world([["blue", "square", "solid"]], "water")
    assert global_captions(two) == ["a yellow striped triangle and a blue solid cross on sand"]
    assert global_captions(three) == ["a white dotted star, a green solid square and a purple striped diamond at night"]
    assert global_captions(one) == ["a blue solid square on water"]


def test_captions_name_the_concepts_at_points(world):
    captions = global_captions(world)
    assert len(captions) == N
    for i in (0, 1, 2):
        present = {CONCEPTS[k].name for k in np.flatnonzero(world.concept_masks[i].any(axis=(1, 2)))}
        assert set(captions[i].replace(",", "").split()) - {"a", "and", "on", "at"} == present
    rng = np.random.default_rng(1)
    index, ys, xs = rng.integers(0, N, 200), rng.integers(0, SIZE, 200), rng.integers(0, SIZE, 200)
    at_points = point_concepts(world, index, ys, xs)
    truth = world.concept_masks[index, :, ys, xs]
    for ids, row in zip(at_points, truth):
        assert sorted(k for k in ids.tolist() if k >= 0) == np.flatnonzero(row).tolist()


def test_save_preview_with_and_without_masks(world, tmp_path):
    class_names = [c.name for c in CLASSES]
    with_masks = tmp_path / "masks.png"
    save_preview(with_masks, world.images, world.labels, class_names, world.concept_masks,
                 [c.name for c in CONCEPTS], n=4)
    plain = tmp_path / "sub" / "plain.png"
    save_preview(plain, world.images[:3], world.labels[:3], class_names)
    for path in (with_masks, plain):
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 100
    with pytest.raises(ValueError, match="masks must have shape"):
        save_preview(plain, world.images, world.labels, class_names, world.concept_masks[:, :, :8])
    with pytest.raises(ValueError, match="images must be uint8"):
        save_preview(plain, world.images.astype(np.float32), world.labels, class_names)
