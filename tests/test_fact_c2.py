"""C²-Score (lib.methods.fact.c2) against the authors' definition (m-parchami/FaCT,
fact/analysis/dino_consistency.py) computed here by brute force, with double loops over image pairs:
the closed form, the per-concept image choice, the concept filter, the pooled random baseline and
Δ_rand on hand-made presences and maps; the gt featurizer on the toy world."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lib.methods.fact.c2 import (
    TopImages,
    authors_random_map,
    c2_from_tensors,
    c2_scores,
    encode_attribution,
    select_concept_images,
    selection_depth,
    weighted_mean_pairwise_cosine,
)
from lib.methods.fact.featurizers import timm_featurizer
from lib.toy.world import generate


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def brute_force(e: torch.Tensor, w: torch.Tensor) -> float:
    """sum_{i != j} w_i w_j cos(e_i, e_j) / sum_{i != j} w_i w_j, with an explicit double loop."""
    num = den = 0.0
    for i in range(len(e)):
        for j in range(len(e)):
            if i != j:
                cos = torch.nn.functional.cosine_similarity(e[i], e[j], dim=0).item()
                num += w[i].item() * w[j].item() * cos
                den += w[i].item() * w[j].item()
    return num / den


def test_closed_form_equals_brute_force_batched():
    e = torch.randn(5, 7, 4, generator=gen(0), dtype=torch.float64) + 0.3
    w = torch.rand(5, 7, generator=gen(1), dtype=torch.float64) * 10
    got = weighted_mean_pairwise_cosine(e, w)
    assert got.shape == (5,)
    for j in range(5):
        assert got[j].item() == pytest.approx(brute_force(e[j], w[j]), rel=1e-9, abs=1e-12)
    # float32 input, same answer to float32 precision; scaling e rows or w changes nothing.
    torch.testing.assert_close(weighted_mean_pairwise_cosine(e.float(), w.float()).double(), got, rtol=1e-4, atol=1e-5)
    scales = torch.rand(5, 7, 1, generator=gen(2), dtype=torch.float64) + 0.1
    torch.testing.assert_close(weighted_mean_pairwise_cosine(e * scales, 3 * w), got)


def test_known_values():
    v = torch.randn(8, generator=gen(3))
    assert weighted_mean_pairwise_cosine(v.expand(6, 8), torch.rand(6)).item() == pytest.approx(1.0, abs=1e-6)
    assert weighted_mean_pairwise_cosine(torch.eye(5) * 3, torch.rand(5) + 0.1).item() == pytest.approx(0.0, abs=1e-6)
    assert weighted_mean_pairwise_cosine(torch.stack([v, -2 * v]), torch.tensor([0.3, 5.0])).item() == pytest.approx(
        -1.0, abs=1e-6
    )
    # Two equal-weight pairs, cos 1 within, -1 across: (2 * 1 + 4 * -1) / 6 = -1/3
    e = torch.stack([v, v, -v, -v])
    assert weighted_mean_pairwise_cosine(e, torch.ones(4)).item() == pytest.approx(-1 / 3, abs=1e-6)


def test_zero_rows_are_ignored_and_undefined_is_nan():
    e = torch.randn(6, 5, generator=gen(4))
    w = torch.rand(6, generator=gen(5)) + 0.1
    base = weighted_mean_pairwise_cosine(e, w)
    padded = weighted_mean_pairwise_cosine(torch.cat([e, torch.zeros(3, 5)]), torch.cat([w, torch.ones(3)]))
    torch.testing.assert_close(padded, base)
    assert math.isnan(weighted_mean_pairwise_cosine(e[:1], w[:1]).item())
    with pytest.raises(ValueError):
        weighted_mean_pairwise_cosine(e, -w)
    with pytest.raises(ValueError):
        weighted_mean_pairwise_cosine(e, w[:5])


def test_encode_attribution_known_answers():
    feats = torch.randn(3, 4, 5, 6, generator=gen(6))
    a = torch.zeros(3, 5, 6)
    a[0, 2, 3] = 7.0  # one-hot -> the feature there
    a[1] = 1.0  # uniform -> the spatial mean
    a[2, 0, 0] = -5.0  # negative only -> clipped to nothing -> zero row
    e = encode_attribution(a, feats)
    torch.testing.assert_close(e[0], feats[0, :, 2, 3])
    torch.testing.assert_close(e[1], feats[1].mean(dim=(1, 2)))
    assert torch.equal(e[2], torch.zeros(4))
    rand = torch.rand(3, 5, 6, generator=gen(7))
    expected = (rand[:, None] * feats).sum(dim=(2, 3)) / rand.sum(dim=(1, 2))[:, None]
    torch.testing.assert_close(encode_attribution(rand, feats), expected)
    with pytest.raises(ValueError):
        encode_attribution(a, feats[:, :, :4])


def authors_images(presence: torch.Tensor, quantile: float = 0.95, min_cnt: int = 2, base_cnt: int = 10) -> dict[int, list[int]]:
    """The authors' get_indices_to_explain, per concept: torch.quantile over the present images."""
    chosen = {}
    for j in range(presence.shape[1]):
        acts = presence[:, j]
        positive = acts[acts > 0]
        if len(positive) == 0:
            continue
        if len(positive) <= base_cnt:
            threshold = 0.0
        else:
            threshold = min(torch.quantile(positive, quantile).item(), torch.sort(positive, descending=True).values[base_cnt].item())
        rows = (acts > threshold).nonzero(as_tuple=True)[0].tolist()
        if len(rows) >= min_cnt:
            chosen[j] = rows
    return chosen


def authors_c2(presence, maps, features, seed=0, min_cnt=5):
    """The authors' definition end to end, by brute force: upsampled features, dataset mean, random
    maps drawn image by image, pairwise cosines in double loops. Returns ({concept: C²}, c2, random)."""
    n, _, h, w = maps.shape
    hr = F.interpolate(features.double(), size=(h, w), mode="bilinear", align_corners=False)
    mean = hr.mean(dim=(2, 3)).mean(dim=0)

    def encoding(attr, feat):
        attr = attr.clamp_min(0)
        return (attr * feat).sum(dim=(1, 2)) / attr.sum() - mean

    generator = torch.Generator().manual_seed(seed)
    random_maps = [authors_random_map((h, w), generator) for _ in range(n)]
    random = brute_force(torch.stack([encoding(m, hr[i]) for i, m in enumerate(random_maps)]),
                         torch.stack([m.sum() for m in random_maps]))
    scores, counts = {}, {}
    for j, rows in authors_images(presence).items():
        e = torch.stack([encoding(maps[i, j].double(), hr[i]) for i in rows])
        scores[j], counts[j] = brute_force(e, presence[rows, j].double()), len(rows)
    averaged = [scores[j] for j in scores if counts[j] >= min_cnt]
    return scores, float(np.mean(averaged)), random


def test_the_whole_score_equals_the_authors_definition_by_brute_force():
    n, m = 60, 6
    presence = torch.rand(n, m, generator=gen(12), dtype=torch.float64) * 5
    presence[torch.rand(n, m, generator=gen(13)) < 0.4] = 0
    presence[:, 1] = 0
    presence[:3, 1] = torch.tensor([2.0, 1.0, 3.0])  # 3 images: scored, not in the mean
    presence[:, 2] = 0
    presence[7, 2] = 1.0  # one image: not scored
    presence[:, 3] = 0  # dead
    maps = torch.randn(n, m, 8, 12, generator=gen(14), dtype=torch.float64) + 0.5
    features = torch.randn(n, 3, 2, 3, generator=gen(15), dtype=torch.float64)
    result = c2_from_tensors(presence, maps, features, seed=4)
    scores, mean, random = authors_c2(presence, maps, features, seed=4)
    assert result.table["concept"].tolist() == sorted(scores) == [0, 1, 4, 5]
    np.testing.assert_allclose(result.table["c2"].to_numpy(), [scores[j] for j in sorted(scores)], rtol=1e-9, atol=1e-12)
    assert result.table["averaged"].tolist() == [True, False, True, True]
    assert result.c2 == pytest.approx(mean, rel=1e-9) and result.c2_random == pytest.approx(random, rel=1e-9)
    assert result.c2_delta == pytest.approx(mean - random, rel=1e-9)


def test_a_concepts_images_are_the_top_of_the_images_where_it_is_present():
    """1000 images; concept 0 present in 300 (presences 1..300): the 0.95 quantile of 1..300 is
    285 + 0.05 * 1 = 285.05 (position 0.95 * 299 = 284.05), below the 11th largest (290), so its
    images are those above 285.05: presences 286..300, 15 images (5 % of 300), not 5 % of all 1000.
    Concept 1 present in 7 (<= 10): all 7. Concept 2 present in 40 (1..40): the quantile 38.05 is
    above the 11th largest 30, so the top 10 (31..40). Concept 3 present in one image: not scored."""
    presence = torch.zeros(1000, 4, dtype=torch.float64)
    perm = torch.randperm(1000, generator=gen(16))
    presence[perm[:300], 0] = torch.arange(1, 301, dtype=torch.float64)
    presence[perm[300:307], 1] = torch.arange(1, 8, dtype=torch.float64)
    presence[perm[:40], 2] = torch.arange(1, 41, dtype=torch.float64)
    presence[5, 3] = 2.0
    top = TopImages(selection_depth(1000))
    for start in range(0, 1000, 128):
        top.add(presence[start : start + 128], torch.arange(start, min(start + 128, 1000)))
    chosen = {c.concept: c for c in select_concept_images(top.result(), top.n_positive)}
    assert sorted(chosen) == [0, 1, 2]
    assert sorted(chosen[0].presence.tolist()) == list(range(286, 301))
    assert sorted(chosen[1].presence.tolist()) == list(range(1, 8))
    assert sorted(chosen[2].presence.tolist()) == list(range(31, 41))
    for j, concept in chosen.items():
        assert torch.equal(presence[concept.rows, j], concept.presence)
        assert sorted(concept.rows.tolist()) == authors_images(presence)[j]


def _two_pixel_world(n: int) -> torch.Tensor:
    """Every image 1 x 2 pixels with features [1, 0] left and [0, 1] right: the dataset mean is
    [.5, .5], so a map on the left encodes as v = [.5, -.5], one on the right as -v."""
    feats = torch.zeros(n, 2, 1, 2, dtype=torch.float64)
    feats[:, 0, 0, 0] = feats[:, 1, 0, 1] = 1.0
    return feats


def test_every_concept_with_two_images_is_scored_and_the_mean_is_over_those_with_five():
    """Concept 0: 2 images, both maps left -> C² 1, scored, not averaged. Concept 1: 4 images, all
    left -> 1, not averaged. Concept 2: 5 images, left with presences 2, 1, 1 and right with 1, 1:
    sum w = 6, sum w^2 = 8, all pairs 36 - 8 = 28, same side (16 - 6) + (4 - 2) = 12, across
    2 * 4 * 2 = 16 -> (12 - 16) / 28 = -1/7, the only one averaged."""
    n = 12
    presence = torch.zeros(n, 3, dtype=torch.float64)
    maps = torch.zeros(n, 3, 1, 2, dtype=torch.float64)
    presence[[0, 1], 0] = 1.0
    presence[[2, 3, 4, 5], 1] = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    presence[[6, 7, 8, 9, 10], 2] = torch.tensor([2.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    maps[..., 0, 0] = 1.0  # left
    maps[[9, 10], 2] = torch.tensor([[[0.0, 3.0]]], dtype=torch.float64)  # right
    result = c2_from_tensors(presence, maps, _two_pixel_world(n))
    table = result.table.set_index("concept")
    assert table["images"].tolist() == [2, 4, 5] and table["averaged"].tolist() == [False, False, True]
    assert table["c2"].tolist() == pytest.approx([1.0, 1.0, -1 / 7])
    assert result.c2 == pytest.approx(-1 / 7) and result.n_scored == 3 and result.n_averaged == 1
    assert table["extent_pixels"].tolist() == [1.0, 1.0, 1.0] and table["extent_fraction"].tolist() == [0.5, 0.5, 0.5]


def test_the_random_baseline_is_one_pooled_concept_over_all_images_weighted_by_map_mass():
    """Features constant over each image, one-hot of the image (D = N): every centred encoding is
    e_i - 1/N, and every pair's cosine is -1/(N - 1), whatever the random maps and their masses."""
    n = 7
    feats = torch.eye(n, dtype=torch.float64)[:, :, None, None].expand(n, n, 2, 3)
    presence = torch.ones(n, 1, dtype=torch.float64)
    result = c2_from_tensors(presence, torch.rand(n, 1, 4, 6, generator=gen(17)), feats)
    assert result.c2_random == pytest.approx(-1 / 6)
    # by mass: unequal masses change a baseline whose cosines differ (brute force, same draws)
    feats = torch.randn(n, 3, 2, 2, generator=gen(18), dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    drawn = [authors_random_map((4, 6), generator) for _ in range(n)]
    up = F.interpolate(feats, size=(4, 6), mode="bilinear", align_corners=False)
    mean = up.mean(dim=(0, 2, 3))
    e = torch.stack([(m * u).sum(dim=(1, 2)) / m.sum() - mean for m, u in zip(drawn, up, strict=True)])
    result = c2_from_tensors(presence, torch.rand(n, 1, 4, 6, generator=gen(19)), feats)
    assert result.c2_random == pytest.approx(brute_force(e, torch.stack([m.sum() for m in drawn])), rel=1e-9)
    assert result.c2_random != pytest.approx(brute_force(e, torch.ones(n)), rel=1e-6)


def test_delta_rand_is_the_mean_minus_the_random_baseline_worked_by_hand():
    """6 images, features constant per image: a = [1, 0] on images 0-2, b = [0, 1] on 3-5 (centred:
    +v and -v). Random maps of equal mass (injected): same-group pairs 12 of 30, across 18 ->
    c2_random = (12 - 18) / 30 = -1/5. The one concept, on images 0-4 with presences 3, 3, 3, 1, 1:
    sum w = 11, sum w^2 = 29, pairs 121 - 29 = 92, same (81 - 27) + (4 - 2) = 56, across 2 * 9 * 2 = 36
    -> c2 = 20/92 = 5/23; Δ_rand = 5/23 + 1/5 = 48/115."""
    n = 6
    feats = torch.zeros(n, 2, 2, 2, dtype=torch.float64)
    feats[:3, 0] = feats[3:, 1] = 1.0
    presence = torch.tensor([[3.0], [3.0], [3.0], [1.0], [1.0], [0.0]], dtype=torch.float64)
    maps = torch.rand(n, 1, 2, 2, generator=gen(20), dtype=torch.float64)
    result = c2_scores(
        select_concept_images(*_top(presence)), torch.arange(n), lambda r, c: maps[r, c], lambda r: feats[r], (2, 2),
        random_map=lambda size, generator: torch.ones(size, dtype=torch.float64),
    )
    assert result.c2_random == pytest.approx(-1 / 5)
    assert result.c2 == pytest.approx(5 / 23)
    assert result.c2_delta == pytest.approx(48 / 115)
    assert result.histogram()["kind"].tolist()[-2:] == ["c2", "c2_random"]
    assert result.histogram().loc[lambda f: f["kind"] == "concepts", "percent"].sum() == pytest.approx(100)


def _top(presence: torch.Tensor):
    top = TopImages(selection_depth(presence.shape[0]))
    top.add(presence, torch.arange(presence.shape[0]))
    return top.result(), top.n_positive


def test_with_ground_truth_features_a_concept_latent_beats_a_random_latent():
    """gt featurizer (one-hot concept masks) on toy images: a latent whose map is one ground-truth
    concept's mask scores high (0.72 here: the other concepts at the same pixels vary across images); a
    latent firing at random places scores about the random baseline (-0.07 and -0.005 here)."""
    masks = torch.from_numpy(generate(200, seed=3, image_size=32).concept_masks).double()  # (N, K, S, S)
    n, k = masks.shape[:2]
    area = masks.sum(dim=(2, 3))
    target = int(area.gt(0).sum(dim=0).argmax())  # the concept present in the most images
    noise = torch.rand(n, *masks.shape[2:], generator=gen(21), dtype=torch.float64)
    maps = torch.stack([masks[:, target] * (1 + noise), noise], dim=1)
    presence = torch.stack([area[:, target], torch.rand(n, generator=gen(22), dtype=torch.float64)], dim=1)
    result = c2_from_tensors(presence, maps, masks)
    table = result.table.set_index("concept")
    assert table.loc[0, "c2"] > 0.5
    assert table.loc[0, "c2"] > table.loc[1, "c2"] + 0.5
    assert abs(table.loc[1, "c2"] - result.c2_random) < 0.2


def test_timm_featurizer_loads_a_local_file_and_returns_the_patch_grid(tmp_path):
    """A tiny random DINOv2-shaped timm ViT saved to a file: the featurizer loads it from there (no
    download), resizes and normalises the images, drops the class token and returns (B, D, h, w)."""
    import timm
    import zarr

    kwargs = {"depth": 1, "embed_dim": 24, "num_heads": 2}
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=28, **kwargs).eval()
    torch.save(model.state_dict(), tmp_path / "vit.pth")
    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 16, 16, 3), dtype=np.uint8)
    featurizer = timm_featurizer("vit_small_patch14_dinov2", tmp_path / "vit.pth", 28, zarr.array(pixels), **kwargs)
    assert featurizer.name == "timm:vit_small_patch14_dinov2"
    got = featurizer(torch.tensor([3, 1, 3]))
    assert got.shape == (3, 24, 2, 2)
    x = torch.from_numpy(pixels[[3, 1, 3]]).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        tokens = model.forward_features(x)[:, 1:]
    torch.testing.assert_close(got, tokens.transpose(1, 2).reshape(3, 24, 2, 2))


def test_featurizer_settings_are_checked_before_any_work(tmp_path):
    from lib.core.errors import UserError
    from lib.core.params import Params
    from lib.methods.fact.featurizers import check_featurizer

    with pytest.raises(UserError, match="fact.c2.weights"):
        check_featurizer(Params())  # the authors' DINOv2-S needs a local file
    with pytest.raises(UserError, match="no such file"):
        check_featurizer(Params.model_validate({"fact": {"c2": {"weights": str(tmp_path / "missing.pth")}}}))
    with pytest.raises(UserError, match="fact.c2.layer"):
        check_featurizer(
            Params.model_validate({"features": {"layers": ["layer3"]}, "fact": {"c2": {"featurizer": "backbone", "layer": "layer2"}}})
        )
    check_featurizer(Params.model_validate({"features": {"layers": ["layer2"]}, "fact": {"c2": {"featurizer": "backbone"}}}))
