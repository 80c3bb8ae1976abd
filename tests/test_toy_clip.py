"""The toy teacher CLIP: config registration, checkpoint round trip, captions, loss, training, evaluation."""

import numpy as np
import open_clip
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.loss import ClipLoss

from lib.kernels.preprocess import Preprocess
from lib.kernels.rings import grid_centers
from lib.models.clip import load_clip
from lib.toy.captions import global_captions, point_concepts, render_captions
from lib.toy.clip_eval import (
    centre_pixels,
    class_prompts,
    concept_prompts,
    evaluate_toy_clip_model,
)
from lib.toy.models.clip import (
    TOY_CLIP_NAME,
    create_toy_clip,
    register_toy_clip_config,
    save_open_clip_checkpoint,
    toy_clip_preprocess,
)
from lib.toy.train_clip import _Batch, _swap_one, caption_matches, multi_positive_clip_loss, train_toy_clip
from lib.toy.world import CONCEPT_TYPES, CONCEPTS, ToyWorld, concept_index, generate


@pytest.fixture(scope="module")
def world() -> ToyWorld:
    return generate(24, seed=5)


def ids(*names: str) -> list[int]:
    return [concept_index(n) if n else -1 for n in names]


def test_config_registers_once_and_builds_the_documented_model():
    register_toy_clip_config()
    register_toy_clip_config()
    assert open_clip.list_models().count(TOY_CLIP_NAME) == 1
    cfg = open_clip.get_model_config(TOY_CLIP_NAME)
    model = create_toy_clip(seed=0)
    assert toy_clip_preprocess(model).size == cfg["vision_cfg"]["image_size"]
    assert model.context_length == cfg["text_cfg"]["context_length"]
    # The shipping budget (~12 MB in fp16) is a property of the config, so check it here.
    assert 2 * sum(p.numel() for p in model.parameters()) < 12e6
    same = create_toy_clip(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))


def _outputs(model: torch.nn.Module, tokenizer, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.linspace(-2, 2, 2 * 3 * size * size).view(2, 3, size, size)
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokenizer(["a blue star on sand", "night"]))


@pytest.mark.parametrize("half", [False, True])
def test_checkpoint_reloads_through_load_clip_with_same_outputs_and_preprocessing(tmp_path, half):
    # Frozen like a LoadedClip, so both take the same (fused attention) inference path.
    model = create_toy_clip(seed=1).eval().requires_grad_(False)
    preprocess = toy_clip_preprocess(model)
    folder = save_open_clip_checkpoint(model, tmp_path / "clip", half=half)
    weights = next(folder.glob("*.bin"))
    tokenizer = open_clip.get_tokenizer(TOY_CLIP_NAME)
    want = _outputs(model, tokenizer, preprocess.size)
    for pretrained in (f"local-dir:{folder}", weights):  # the folder, and a plain file path
        loaded = load_clip(TOY_CLIP_NAME, pretrained)
        assert loaded.preprocess == preprocess
        assert loaded.preprocess.size == open_clip.get_model_config(TOY_CLIP_NAME)["vision_cfg"]["image_size"]
        assert loaded.preprocess.mean == OPENAI_DATASET_MEAN and loaded.preprocess.std == OPENAI_DATASET_STD
        got = _outputs(loaded.model, loaded.tokenizer, preprocess.size)
        for a, b in zip(got, want):
            if half:  # fp16 storage: equal to rounding of the weights
                torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
            else:
                assert torch.equal(a, b)


def test_render_captions_full_equals_global_captions_and_partial_wording(world):
    assert render_captions(world.objects, world.background) == global_captions(world)
    objects = np.array([
        [ids("blue", "", ""), ids("", "star", "striped"), ids("", "", "")],
        [ids("", "", ""), ids("", "", ""), ids("", "", "")],
        [ids("", "", ""), ids("white", "cross", "dotted"), ids("", "square", "")],
    ])
    background = np.array(ids("night", "sand", ""))
    assert render_captions(objects, background) == [
        "a blue object and a striped star at night",
        "sand",
        "a white dotted cross and a square",
    ]
    assert concept_prompts()[concept_index("star")] == "a star"
    assert concept_prompts()[concept_index("purple")] == "a purple object"
    assert class_prompts()[:2] == ["a star on sand", "a star on water"]


def test_caption_matches_hand_made_scene():
    # One image: a blue striped star and a white solid square on sand.
    content = torch.tensor([[ids("blue", "star", "striped"), ids("white", "square", "solid"), ids("", "", "")]])
    content_bg = torch.tensor(ids("sand"))
    none = ids("", "", "")
    captions = torch.tensor([
        [ids("", "star", ""), none],  # a star: yes
        [ids("green", "", ""), none],  # a green object: no
        [ids("blue", "square", ""), none],  # attributes split over two objects: no
        [ids("blue", "star", ""), ids("", "square", "")],  # both objects: yes
        [none, none],  # background only (checked below)
    ])
    caption_bg = torch.tensor(ids("", "", "", "sand", "water"))
    got = caption_matches(captions, caption_bg, content, content_bg)
    assert got.tolist() == [[True, False, False, True, False]]


def test_swap_one_changes_exactly_one_asserted_id_within_its_type():
    rng = np.random.default_rng(0)
    objects = np.array([[ids("blue", "", ""), ids("", "", "")], [ids("", "", ""), ids("", "", "")]] * 50)
    background = np.array(ids("", "grass") * 50)
    new_objects, new_background = _swap_one(rng, objects, background)
    before = np.concatenate([objects.reshape(100, -1), background[:, None]], 1)
    after = np.concatenate([new_objects.reshape(100, -1), new_background[:, None]], 1)
    assert ((before != after).sum(1) == 1).all()
    kind = np.array([c.type for c in CONCEPTS])
    changed = before != after
    assert (kind[before[changed]] == kind[after[changed]]).all()
    assert set(after[:, 0][::2]) == set(ids("green", "yellow", "white", "purple"))


def test_batch_captions_describe_their_images_and_rings_aim_at_objects(world):
    rng = np.random.default_rng(0)
    grid = grid_centers(64, 7).numpy()
    batch = _Batch(world, rng, 64, 0.75, 64, grid, object_fraction=1.0, n_swaps=2)
    matches = caption_matches(*(torch.from_numpy(a).long() for a in (
        batch.caption_objects, batch.caption_background, batch.content_objects, batch.content_background)))
    assert matches.shape == (64, 64 + 48 + 2 * 64) and bool(matches[:, :64].diagonal().all())
    # Ringed images show what is under the ring centre, exactly as point_concepts says.
    ys, xs = centre_pixels(batch.centres, 64, 64)
    at_centre = point_concepts(world, batch.index[:48], ys, xs)
    assert (batch.content_objects[:48, 0] == at_centre[:, :3]).all()
    # object_fraction=1: mostly on an object (objects cover ~10% of an image; a ring on the grid
    # misses them when no grid point touches an object).
    assert (at_centre[:, 0] >= 0).mean() > 0.75
    # A distractor names something in the same image (true of the plain image) ...
    distractor = (torch.from_numpy(a[64:112]).long() for a in (batch.caption_objects, batch.caption_background))
    plain = (torch.from_numpy(a[batch.index[:48]]).long() for a in (world.objects, world.background))
    assert bool(caption_matches(*distractor, *plain).diagonal().all())
    # ... that is not under the ring, unless it reads the same as the positive (two blue objects).
    same = matches[:48, 64:112].diagonal().numpy()
    assert (batch.caption_objects[64:112][same] == batch.caption_objects[:48][same]).all()
    assert same.mean() < 0.2
    # Swapped negatives never describe their own ringed image (it shows one thing only).
    for copy in range(2):
        start = 64 + 48 + 64 * copy
        assert not matches[:48, start : start + 48].diagonal().any()


def test_multi_positive_loss_equals_clip_loss_with_one_positive_and_spreads_duplicates():
    torch.manual_seed(0)
    image, text = (torch.nn.functional.normalize(torch.randn(6, 8), dim=1) for _ in range(2))
    want = ClipLoss()(image, text, logit_scale=10.0)
    got = multi_positive_clip_loss(10.0 * image @ text.T, torch.eye(6, dtype=torch.bool))
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="matches"):  # the second image has no caption
        multi_positive_clip_loss(torch.zeros(2, 2), torch.tensor([[True, True], [False, False]]))
    # Two identical captions for image 0: its target splits 1/2 - 1/2 between them.
    logits = torch.tensor([[1.0, 1.0, -1.0], [0.0, 0.0, 2.0]])
    matches = torch.tensor([[True, True, False], [False, False, True]])
    by_row, by_column = torch.log_softmax(logits, 1), torch.log_softmax(logits, 0)
    image_to_text = -(0.5 * (by_row[0, 0] + by_row[0, 1]) + by_row[1, 2]) / 2
    text_to_image = -(by_column[0, 0] + by_column[0, 1] + by_column[1, 2]) / 3
    torch.testing.assert_close(multi_positive_clip_loss(logits, matches), (image_to_text + text_to_image) / 2)


def test_training_lowers_the_loss(world):
    val = generate(2, seed=9)
    model, history = train_toy_clip(
        world, val, steps=24, batch_size=16, lr=2e-3, seed=0, device="cpu", ring_radius=8.0, ring_width=1.0,
        warmup=2, eval_every=24,
    )
    losses = history["loss"]
    assert len(losses) == 24 and np.mean(losses[-6:]) < np.mean(losses[:6]) - 0.3
    assert history["eval"][-1]["step"] == 24 and set(history["eval"][-1]["clip_local_acc"]) == set(CONCEPT_TYPES)
    assert not model.training


def test_train_rejects_bad_arguments(world):
    with pytest.raises(ValueError, match="batch_size"):
        train_toy_clip(world, world, steps=1, batch_size=1, lr=1e-3, seed=0, device="cpu", ring_radius=8, ring_width=1)
    with pytest.raises(ValueError, match="ring_fraction"):
        train_toy_clip(world, world, steps=1, batch_size=4, lr=1e-3, seed=0, device="cpu", ring_radius=8,
                       ring_width=1, ring_fraction=1.5)
    with pytest.raises(ValueError, match="radius"):
        train_toy_clip(world, world, steps=1, batch_size=4, lr=1e-3, seed=0, device="cpu", ring_radius=0, ring_width=1)


def test_centre_pixels_half_pixel_convention():
    ys, xs = centre_pixels(np.array([[16.0, 1.0], [127.0, 2.0]]), input_size=128, image_size=64)
    assert ys.tolist() == [8, 63] and xs.tolist() == [0, 1]  # input pixels 0-1 cover toy pixel 0
    with pytest.raises(ValueError, match="centres"):
        centre_pixels(np.zeros(3), 128, 64)


class OracleClip(torch.nn.Module):
    """A fake CLIP that reads the truth: it finds its image in the world and the ring by the
    pixels the ring changed, and embeds the concepts at the ring centre (or the class for a
    plain image) as one-hot vectors. `wrong_shape`/`wrong_class` force a fixed answer."""

    def __init__(self, world: ToyWorld, preprocess: Preprocess, wrong_shape: int | None, wrong_class: int | None):
        super().__init__()
        self.world, self.wrong_shape, self.wrong_class = world, wrong_shape, wrong_class
        self.register_buffer("reference", preprocess(torch.from_numpy(world.images)))
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the encoder a device
        self.prompts = concept_prompts() + class_prompts()

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self.prompts.index(t) for t in texts])

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(tokens, len(self.prompts)).float()

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        index = ((x[:, None] - self.reference[None]) ** 2).flatten(2).sum(2).argmin(1)
        # The pixels the ring touched (binary: the ring is symmetric, the colours under it are not).
        changed = ((x - self.reference[index]).abs().sum(1) > 1e-4).float()
        coords = torch.arange(x.shape[-1], dtype=torch.float32)
        weight = changed.sum((1, 2)).clamp_min(1e-12)
        cy = (changed.sum(2) * coords).sum(1) / weight
        cx = (changed.sum(1) * coords).sum(1) / weight
        out = torch.zeros(len(x), len(self.prompts))
        ringed = changed.flatten(1).amax(1) > 0
        point = point_concepts(self.world, index.numpy(), cy.round().long().numpy(), cx.round().long().numpy())
        point = torch.from_numpy(point.astype(np.int64))
        if self.wrong_shape is not None:
            point[:, 1] = torch.where(point[:, 1] >= 0, self.wrong_shape, -1)
        for column in range(4):
            on = ringed & (point[:, column] >= 0)
            out[on, point[on, column]] = 1.0
        label = torch.from_numpy(self.world.labels)[index]
        if self.wrong_class is not None:
            label = torch.full_like(label, self.wrong_class)
        out[~ringed, len(CONCEPTS) + label[~ringed]] = 1.0
        return out


@pytest.mark.parametrize("wrong", [False, True])
def test_evaluation_gives_the_known_answer_on_an_oracle(world, wrong):
    preprocess = Preprocess(64, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    square, grid = concept_index("square"), 3  # rings at 16/32/48, radius 6: wholly inside the image
    oracle = OracleClip(world, preprocess, square if wrong else None, 0 if wrong else None)
    scores = evaluate_toy_clip_model(oracle, oracle.tokenize, preprocess, world, ring_radius=6.0, ring_width=2.0, grid=grid, batch_size=5)

    points = grid_centers(64, grid).long().numpy()
    n = len(world.images)
    index = np.repeat(np.arange(n), len(points))
    truth = point_concepts(world, index, np.tile(points[:, 0], n), np.tile(points[:, 1], n))
    on_object = truth[:, 0] >= 0
    assert scores["clip_local_points"] == {
        "color": on_object.sum(), "shape": on_object.sum(), "pattern": on_object.sum(), "background": (~on_object).sum()
    }
    expected_shape = (truth[on_object, 1] == square).mean() if wrong else 1.0
    assert scores["clip_local_acc"] == pytest.approx(
        {"color": 1.0, "shape": expected_shape, "pattern": 1.0, "background": 1.0}
    )
    assert scores["clip_global_acc"] == pytest.approx((world.labels == 0).mean() if wrong else 1.0)
