"""OpenAI's TorchScript CLIP releases (ViT-B-16.pt) load through our CLIP loader as "openai@<file>".

The stand-in is a tiny random CLIP in OpenAI's release format: OpenAI's architecture conventions
(64-wide heads, QuickGELU), fp16 weights, the input_resolution entry of its state dict, saved
with torch.jit.save. open_clip's own reader of that format, `load_openai_model`, is the reference.
"""

import json
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.model import convert_weights_to_lp

from lib.models.clip import load_clip
from lib.models.weights import is_torchscript_archive, load_state_file

torch.set_num_threads(1)

NAME = "conceptrace-tiny-openai"
# 64-wide vision and text towers: OpenAI's state-dict reader infers one head per 64 channels
CFG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
}


@pytest.fixture()
def openai_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, torch.nn.Module]:
    """(TorchScript file, the fp32 model it holds); NAME registered with an "openai" tag like ViT-B-16's."""
    config = tmp_path / f"{NAME}.json"  # open_clip names a config by its file stem
    config.write_text(json.dumps(CFG))
    open_clip.add_model_config(config)
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, NAME, {"openai": open_clip.get_pretrained_cfg("ViT-B-16", "openai")})
    torch.manual_seed(0)
    model = open_clip.CLIP(**CFG).eval()
    convert_weights_to_lp(model)  # OpenAI ships fp16 weights
    model.register_buffer("input_resolution", torch.tensor(32))  # an entry of OpenAI's state dicts the readers drop
    # OpenAI keeps the causal mask as a plain attribute, out of the state dict (scripting would make
    # open_clip's non-persistent buffer persistent)
    mask = model._buffers.pop("attn_mask")
    model.attn_mask = mask
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    return path, model.float()


def test_torchscript_file_is_recognised_and_a_state_dict_is_not(openai_release, tmp_path: Path) -> None:
    path, model = openai_release
    assert is_torchscript_archive(path)
    state = tmp_path / "state.pt"
    torch.save(model.state_dict(), state)
    assert not is_torchscript_archive(state)
    # the strict reader of plain weights refuses the archive: the failure the profile's file used to hit
    with pytest.raises((RuntimeError, ValueError)):
        torch.load(path, map_location="cpu", weights_only=True)
    assert load_state_file(state)[0].keys() == model.state_dict().keys()


def test_openai_torchscript_release_loads_like_open_clips_reader(openai_release) -> None:
    path, model = openai_release
    loaded = load_clip(NAME, f"openai@{path}")
    reference = open_clip.load_openai_model(str(path), device="cpu").eval()
    # OpenAI's preprocessing (the tag's), at the tower's size
    assert loaded.preprocess.size == 32 and loaded.preprocess.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert loaded.model_id.startswith(f"open_clip:{NAME}|file=ViT-tiny.pt sha256=")
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = loaded.tokenizer(["a red circle", "stripes"])
    with torch.no_grad():
        for ours, expected in (
            (loaded.model.encode_image(images), reference.encode_image(images)),
            (loaded.model.encode_text(tokens), reference.encode_text(tokens)),
            (loaded.model.encode_image(images), model.encode_image(images)),  # the weights saved, fp16-rounded
        ):
            torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
