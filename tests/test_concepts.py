"""Concept list reading, text embeddings and LF-CBM filters."""

import pytest
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer

from lib.core.errors import UserError
from lib.kernels.text import encode_texts
from lib.pipeline.concept_list import concept_prompts, filter_concepts, read_concept_list


def write(tmp_path, text: str):
    path = tmp_path / "concepts.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_read_concept_list_parses_types_and_skips_blank_and_comment_lines(tmp_path):
    path = write(tmp_path, "# concepts\nblue\tcolor\n\n  # shapes\nstar\tshape\nstriped \n")
    assert read_concept_list(path, allowed_types={"color", "shape"}) == [
        ("blue", "color"),
        ("star", "shape"),
        ("striped", None),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"concepts\.txt' — concept list is empty"),
        ("\n  \n# only a comment\n", "concept list is empty"),
        ("blue\ngreen\nBlue \n", r"line 3: duplicate concept 'Blue' \(first on line 1\)"),
        ("blue\tcolor\nstar\tshape kind\n", r"line 2: concept type 'shape kind'"),
        ("blue\tcolor\tx\n", r"line 1: expected 'concept' or 'concept<TAB>type', got 3"),
        ("\tcolor\n", r"line 1: empty concept"),
        ("blue\tcolour\n", r"line 1: unknown concept type 'colour'"),
    ],
)
def test_read_concept_list_rejects(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        read_concept_list(write(tmp_path, text), allowed_types={"color"})


def test_concept_prompts_use_the_type_template():
    concepts = [("blue", "color"), ("star", "shape"), ("night", None), ("{odd}", None)]
    templates = {"color": "a {} thing", "shape": "a photo of a {} object"}
    assert concept_prompts(concepts, templates, "a photo of a {}") == [
        "a blue thing",
        "a photo of a star object",
        "a photo of a night",
        "a photo of a {odd}",
    ]


def test_encode_texts_equals_one_batch_encoding(tiny_clip):
    tokenizer = SimpleTokenizer(context_length=16)
    prompts = ["a blue thing", "a photo of a star object", "night"]
    emb = encode_texts(tiny_clip, tokenizer, prompts, batch_size=2)
    assert emb.shape == (3, 32) and emb.dtype == torch.float32
    with torch.no_grad():
        expected = F.normalize(tiny_clip.encode_text(tokenizer(prompts)), dim=-1)
    torch.testing.assert_close(emb, expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="prompts is empty"):
        encode_texts(tiny_clip, tokenizer, [])


@pytest.mark.parametrize(
    ("concepts", "templates", "message"),
    [
        ([("blue", "colour")], {"color": "a {}"}, "type 'colour' with no template"),
        ([("blue", None)], {"color": "a photo"}, "exactly one"),
    ],
)
def test_concept_prompts_rejects(concepts, templates, message):
    with pytest.raises(ValueError, match=message):
        concept_prompts(concepts, templates, "a {}")


def unit(*values: float) -> torch.Tensor:
    return F.normalize(torch.tensor(values, dtype=torch.float32), dim=0)


def test_filter_concepts_applies_each_lf_cbm_filter():
    names = ["blue", "a very long concept name over 30 chars", "bluish", "star", "dotted", "night"]
    text = torch.stack(
        [
            unit(1, 0, 0, 0),
            unit(0, 1, 0, 0),
            unit(1, 0.2, 0, 0),  # cos 0.98 with "blue"
            unit(0, 0, 0, 1),  # same direction as the class "sea_star"
            unit(0, 0, 1, 0),  # never seen in the images
            unit(0, 1, 0, 1),
        ]
    )
    images = [torch.stack([unit(1, 1, 0, 1)] * 3), torch.stack([unit(1, 0, 0, 1)] * 4)]
    kept, reasons = filter_concepts(
        names, text, iter(images), class_names=["sea_star"], class_emb=unit(0, 0, 0, 1)[None]
    )
    assert kept.tolist() == [True, False, False, False, False, True]
    assert reasons[0] is None and reasons[5] is None
    assert reasons[1] == "too long: 38 > 30 characters"
    assert reasons[2].startswith("near-duplicate: of 'blue' cos 0.981")
    assert reasons[3] == "similar to class: 'sea_star' cos 1.000 > 0.85"
    assert reasons[4] == "low activation: top-5 mean image cos 0.000 < 0.25"
    # Without images the activation filter is skipped: "dotted" survives.
    kept, reasons = filter_concepts(names, text, None, class_names=["sea_star"], class_emb=unit(0, 0, 0, 1)[None])
    assert kept.tolist() == [True, False, False, False, True, True] and reasons[4] is None


def test_filter_concepts_near_duplicates_are_greedy_in_list_order():
    # a~b and b~c but not a~c: b goes, c stays because its only close neighbour b is gone.
    text = torch.stack([unit(1, 0), unit(1, 0.4), unit(1, 0.85)])
    assert (text[0] @ text[1]) > 0.9 and (text[1] @ text[2]) > 0.9 and (text[0] @ text[2]) < 0.9
    kept, _ = filter_concepts(["a", "b", "c"], text, [text.repeat(2, 1)])
    assert kept.tolist() == [True, False, True]


def test_filter_concepts_streamed_top5_equals_dense():
    gen = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(40, 8, generator=gen), dim=-1)
    images = F.normalize(torch.randn(23, 8, generator=gen), dim=-1)
    dense = (images @ text.T).topk(5, dim=0).values.mean(dim=0)
    cutoff = dense.median().item()
    kept, _ = filter_concepts(
        [f"c{i}" for i in range(40)], text, images.split(4), duplicate_threshold=1.0, min_top5_similarity=cutoff
    )
    assert torch.equal(kept, dense >= cutoff)


def test_filter_concepts_rejects():
    text = torch.eye(3)
    with pytest.raises(UserError, match=r"all 3 concepts were filtered out: \{'low activation': 3\}.*range from 0.000 to 0.000"):
        filter_concepts(["a", "b", "c"], text, [torch.zeros(6, 3)])
    with pytest.raises(ValueError, match="gave 4 images; the top-5 filter needs >= 5"):
        filter_concepts(["a", "b", "c"], text, [torch.eye(3), torch.eye(3)[:1]])
    with pytest.raises(ValueError, match=r"image_batches must yield \(n, 3\)"):
        filter_concepts(["a", "b", "c"], text, [torch.ones(6, 4)])
    with pytest.raises(ValueError, match="concepts is empty"):
        filter_concepts([], torch.zeros(0, 3), [])
    with pytest.raises(ValueError, match=r"text_emb must have shape \(2, D\)"):
        filter_concepts(["a", "b"], text, [])
