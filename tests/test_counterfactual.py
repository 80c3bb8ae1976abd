"""Counterfactual toy images: replaying `generate` and re-rendering with one concept replaced."""

import numpy as np
import pytest

from lib.core.params import DataParams, ToyWorldParams
from lib.core.stores import open_store
from lib.data.prepare import toy_split_draw
from lib.toy import counterfactual as cf
from lib.toy import world

N, SEED, SIZE = 300, 11, 48  # two render chunks, the second partial


@pytest.fixture(scope="module")
def scenes() -> cf.Scenes:
    return cf.replay(N, SEED, SIZE)


@pytest.fixture(scope="module")
def original() -> world.ToyWorld:
    return world.generate(N, SEED, SIZE)


@pytest.fixture(scope="module")
def edits(scenes) -> "cf.pd.DataFrame":
    return cf.concept_edits(scenes)


def test_replay_rerenders_every_image_byte_for_byte(scenes, original):
    assert len(scenes.chunk_states) == 2
    np.testing.assert_array_equal(scenes.labels, original.labels)
    np.testing.assert_array_equal(scenes.objects, original.objects)
    for chunk in range(len(scenes.chunk_states)):
        images, masks = cf.render_chunk(scenes, chunk)
        rows = scenes.chunk_rows(chunk)
        assert images.tobytes() == original.images[rows].tobytes()
        np.testing.assert_array_equal(masks, original.concept_masks[rows])


def test_rerender_equals_the_prepared_image_store(prepared_toy):
    """Every stored test image of a prepared toy world, re-rendered from its replayed scene."""
    data = DataParams(name="toy", image_size=40, rows_per_shard=64, toy=ToyWorldParams(n_train=16, n_val=16, n_test=270))
    stored = open_store(prepared_toy(data).images)
    n, seed = toy_split_draw(data, "test")
    scenes = cf.replay(n, seed, data.image_size, data.toy.max_objects)
    rendered = np.concatenate([cf.render_chunk(scenes, c)[0] for c in range(len(scenes.chunk_states))])
    assert rendered.tobytes() == np.asarray(stored["images"][32 : 32 + n]).tobytes()


def test_edits_cover_every_present_concept_and_other_value(scenes, edits):
    present = cf.present_concepts(scenes.objects, scenes.background)
    kinds = np.array([c.type for c in world.CONCEPTS])
    per_type = {t: int((kinds == t).sum()) - 1 for t in world.CONCEPT_TYPES}
    expected = sum(per_type[kinds[k]] for i, k in zip(*np.nonzero(present)))
    assert len(edits) == expected
    assert (kinds[edits["concept"]] == kinds[edits["replacement"]]).all()
    assert (edits["concept"] != edits["replacement"]).all()
    assert present[edits["image"], edits["concept"]].all()
    # ~23 counterfactuals per image: 3 backgrounds + per object (4 colours + 4 shapes + 2 patterns), shared values fewer
    assert 13 <= len(edits) / N <= 33


def test_edit_changes_pixels_only_inside_old_and_new_concept_masks(scenes, edits, original):
    edits = edits[edits["image"] >= 256].reset_index(drop=True)  # the partial chunk: cheap renders, every kind
    assert set(kind for kind in (cf.world.CONCEPTS[c].type for c in edits["concept"])) == set(cf.world.CONCEPT_TYPES)
    rendered = 0
    for positions, images, masks in cf.render_edits(scenes, edits):
        batch = edits.iloc[positions]
        image, concept, replacement = (batch[c].to_numpy() for c in ("image", "concept", "replacement"))
        allowed = original.concept_masks[image, concept] | masks[np.arange(len(batch)), replacement]
        changed = (images != original.images[image]).any(axis=-1)
        assert changed.reshape(len(batch), -1).any(axis=1).all()
        assert not (changed & ~allowed).any()
        rendered += len(batch)
    assert rendered == len(edits)


def test_a_to_b_to_a_restores_the_bytes(scenes, original):
    """Every image of a chunk edited at once (its first object's colour, shape or pattern to a value
    no object of the scene has), rendered, edited back and rendered again."""
    rows = scenes.chunk_rows(0)
    objects, background = scenes.objects[rows], scenes.background[rows]
    for kind, column in (("color", 0), ("shape", 1), ("pattern", 2)):
        a = objects[:, 0, column].astype(np.int64)
        unused = ~(cf._type_ids(kind)[None, :, None] == objects[:, None, :, column]).any(axis=2)  # (n, values)
        b = np.where(unused.any(axis=1), cf._type_ids(kind)[unused.argmax(axis=1)], a)  # no free value: no edit
        there = cf.pd.DataFrame({"concept": a, "replacement": b})
        back = cf.pd.DataFrame({"concept": b, "replacement": a})
        objects_b, background_b = cf.apply_edits(objects, background, there)
        images_b, _ = cf.render_chunk(scenes, 0, objects_b, background_b)
        edited = a != b
        assert edited.mean() > 0.5
        differs = (images_b != original.images[rows]).reshape(len(a), -1).any(axis=1)
        np.testing.assert_array_equal(differs, edited)
        objects_a, background_a = cf.apply_edits(objects_b, background_b, back)
        images_a, _ = cf.render_chunk(scenes, 0, objects_a, background_a)
        assert images_a.tobytes() == original.images[rows].tobytes(), kind


def test_tags_follow_the_class_rules():
    # one scene of class blue_stripes (4): a blue striped square on sand
    label = 4
    objects = np.full((1, world.MAX_OBJECTS, 3), -1, np.int16)
    objects[0, 0] = [world.concept_index("blue"), world.concept_index("square"), world.concept_index("striped")]
    background = np.array([world.concept_index("sand")], np.int16)
    cases = {
        ("blue", "green"): cf.EditTag.RULE_BREAKING,  # no rule shown any more
        ("square", "star"): cf.EditTag.RULE_CREATING,  # sand + star = desert_star
        ("sand", "water"): cf.EditTag.NEUTRAL,  # still blue stripes only
        ("striped", "dotted"): cf.EditTag.RULE_BREAKING,
    }
    for (old, new), tag in cases.items():
        edit = cf.pd.DataFrame({"concept": [world.concept_index(old)], "replacement": [world.concept_index(new)]})
        edited, bg = cf.apply_edits(objects, background, edit)
        assert cf.edit_tags(edited, bg, np.array([label]))[0] == tag, (old, new)


class _PixelModels:
    """Two stand-in models whose class scores are fixed functions of the mean colour: known effects."""

    names = ("a", "b")

    def scores(self, images):
        import torch

        mean = images.float().mean(dim=(1, 2)) / 255  # (B, 3)
        weights = torch.arange(24, dtype=torch.float32).reshape(3, 8) % 5 - 2
        first = mean @ weights
        return torch.stack([first, (mean**2) @ weights.flip(1)], dim=1)


def test_effects_are_the_logit_minus_the_mean_counterfactual_logit():
    import torch

    from lib.compare.counterfactual_stage import MAX_EDITS, effects_block

    scenes = cf.replay(20, 3, 40)
    original = world.generate(20, 3, 40)
    edits = cf.concept_edits(scenes)
    mine = edits[edits["image"] < 3]
    models = _PixelModels()
    block = effects_block(models, scenes, original.images[:3], 0, mine, torch.device("cpu"))
    assert MAX_EDITS == 33 and block["edit_logit"].shape == (3, MAX_EDITS, 2)
    k = len(world.CONCEPTS)
    for image in range(3):
        base = models.scores(torch.from_numpy(original.images[[image]]))[0]  # (models, classes)
        predicted = base.argmax(dim=1)
        np.testing.assert_array_equal(block["prediction"][image], predicted.numpy())
        for concept in range(k):
            rows = mine[(mine["image"] == image) & (mine["concept"] == concept)]
            if rows.empty:  # not in the image: no effect, NaN (never 0)
                assert np.isnan(block["effect"][image, concept]).all()
                continue
            logits = []
            for row in rows.itertuples():  # each counterfactual rendered on its own
                edit = cf.pd.DataFrame({"concept": [concept], "replacement": [row.replacement]})
                objects, background = scenes.objects[:20].copy(), scenes.background[:20].copy()
                objects[[image]], background[[image]] = cf.apply_edits(objects[[image]], background[[image]], edit)
                edited = cf.render_chunk(scenes, 0, objects, background)[0][[image]]
                scores = models.scores(torch.from_numpy(edited))[0]
                logits.append(scores[torch.arange(2), predicted].numpy())
            expected = base[torch.arange(2), predicted].numpy() - np.mean(logits, axis=0)
            np.testing.assert_allclose(block["effect"][image, concept], expected, rtol=1e-5, atol=1e-6)
            tags = block["edit_tag"][image][block["edit_concept"][image] == concept]
            np.testing.assert_array_equal(np.sort(tags), np.sort(rows["tag"].to_numpy()))
    padding = block["edit_concept"] < 0
    assert np.isnan(block["edit_logit"][padding]).all() and not np.isnan(block["edit_logit"][~padding]).any()


def test_side_by_side_figure_and_an_index_whose_links_resolve(tmp_path):
    from html.parser import HTMLParser

    from lib.compare.figures import MethodPanel, comparison_figure, index_html
    from lib.core.outputs import write_figure, write_text

    scenes_world = world.generate(2, 5, 40)
    k = len(world.CONCEPTS)
    effects = np.where(scenes_world.concept_masks[0].any(axis=(1, 2)), np.linspace(-1, 2, k), np.nan)
    rng = np.random.default_rng(0)
    panels = [
        MethodPanel("salf", rng.normal(size=k), rng.random((k, 40, 40)), None),
        MethodPanel("gradcam", np.where(np.isfinite(effects), rng.random(k), 0.0), None, rng.random((40, 40))),
        MethodPanel("fact", np.full(k, np.nan), rng.random((k, 40, 40)), None),  # nothing scored: an empty row
    ]
    names = [c.name for c in world.CONCEPTS]
    write_figure(tmp_path / "image_00001.png", comparison_figure(scenes_world.images[0], names, effects, "image 1", panels))
    page = index_html("side by side", "| method | ρ |\n|---|---:|\n| salf | 0.500 |\n| fact | N/A |", {"Images": ["image_00001.png"]})
    write_text(tmp_path / "index.html", page)

    class Links(HTMLParser):
        def __init__(self):
            super().__init__()
            self.links, self.cells = [], []

        def handle_starttag(self, tag, attrs):
            self.links += [value for name, value in attrs if name in ("href", "src")]

        def handle_data(self, data):
            self.cells.append(data)

    parser = Links()
    parser.feed((tmp_path / "index.html").read_text())
    assert parser.links and all((tmp_path / link).is_file() for link in parser.links)
    assert {"salf", "0.500", "N/A"} <= set(parser.cells)


def test_counterfactual_stages_write_stubs_on_data_without_a_renderer(tmp_path):
    import json

    import torch

    from lib.compare.counterfactual_stage import run_counterfactuals
    from lib.compare.stage import run_compare
    from lib.core.layout import Layout
    from lib.core.params import Params

    config = Params.model_validate({"data": {"kind": "imagefolder", "imagefolder": {"root": str(tmp_path)}}})
    layout = Layout(tmp_path / "data" / "photos", tmp_path / "metrics")
    report = run_counterfactuals(config, layout, torch.device("cpu"))
    assert report.summary().startswith("skipped: data.kind imagefolder has no scene renderer")
    assert [p.name for p in layout.counterfactuals.iterdir()] == ["SKIPPED"]
    report = run_compare(config, layout, torch.device("cpu"))
    assert "no scene renderer" in json.loads(layout.compare_metrics.read_text())["skipped"]
    assert layout.compare_scatter.read_text().strip() == "method,contribution,true_effect"
    assert layout.compare_table.read_text().startswith("skipped:") and report.details() == ""


def test_failure_images_pick_each_methods_lowest_rho_image():
    from lib.compare.stage import failure_images

    effects = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    tracks = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [1.0, 3.0, 2.0]])  # ρ 1, -1, 0.5
    unscored = np.full((3, 3), np.nan)
    scored = {"a": (tracks, effects), "b": (np.roll(tracks, 1, axis=0), effects), "none": (unscored, effects)}
    assert failure_images(scored) == {"a": 1, "b": 2}
