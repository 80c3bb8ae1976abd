"""Model loading, preprocessing, layer access and the toy backbones (lib/models)."""

import json
import logging
import math
import urllib.error
import urllib.parse

import open_clip
import pytest
import torch
from PIL import Image

from lib.kernels.preprocess import Preprocess
from lib.models import weights
from lib.models.backbones import BcosWithInverse, backbone_skeleton, load_backbone
from lib.models.clip import load_clip, resolve_clip
from lib.models.clip_format import save_clip_dir
from lib.models.layers import LayerNotFoundError, extract_layers, layer_names, resolve_layer, split_at
from lib.models.weights import WeightsUnavailableError, parse_weights, save_backbone
from lib.toy.models.cnn import ToyBcosCNN, build_toy, toy_preprocess
from lib.toy.train_classifier import augment_batch, evaluate_classifier, train_classifier

torch.set_num_threads(1)

TINY_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}
ODD_PREPROCESS = Preprocess(size=32, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), interpolation="bilinear")


def _images(n: int = 2, height: int = 64, width: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, height, width, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------- Preprocess


def test_preprocess_at_native_size_is_exact_normalisation_in_either_layout():
    images = _images(height=32, width=32)
    out = ODD_PREPROCESS(images)
    expected = (images.permute(0, 3, 1, 2).float() / 255 - torch.tensor([0.1, 0.2, 0.3])[:, None, None]) / torch.tensor(
        [0.4, 0.5, 0.6]
    )[:, None, None]
    assert out.dtype == torch.float32 and out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(ODD_PREPROCESS(images.permute(0, 3, 1, 2)), out)


def test_preprocess_matches_open_clip_pil_pipeline():
    # open_clip's own eval transform (PIL resize + centre crop + normalise) is the reference.
    cfg = open_clip.transform.PreprocessCfg(size=48, interpolation="bicubic", resize_mode="shortest")
    reference = open_clip.transform.image_transform_v2(cfg, is_train=False)
    ours = Preprocess(size=48, mean=cfg.mean, std=cfg.std, interpolation="bicubic")
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 10, 13) * 255, size=(80, 100), mode="bilinear")
    image = smooth.round().clamp(0, 255).to(torch.uint8)
    expected = reference(Image.fromarray(image[0].permute(1, 2, 0).numpy()))
    diff = (ours(image)[0] - expected).abs() * torch.tensor(cfg.std)[:, None, None]  # back to [0, 1] units
    assert diff.max() < 3 / 255 and diff.mean() < 0.5 / 255


def test_preprocess_longest_pads_with_black_and_squash_fills():
    image = torch.full((1, 20, 40, 3), 255, dtype=torch.uint8)  # wide white image
    plain = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear")
    padded = Preprocess(size=32, resize_mode="longest", **plain)(image)[0]
    assert padded.shape == (3, 32, 32)
    assert torch.all(padded[:, :8] == 0) and torch.all(padded[:, 24:] == 0) and torch.all(padded[:, 8:24] == 1)
    assert torch.all(Preprocess(size=32, resize_mode="squash", **plain)(image) == 1)


def test_normalise_color_equals_preprocessed_pixel():
    red = torch.tensor([255, 0, 0], dtype=torch.uint8).expand(1, 32, 32, 3)
    torch.testing.assert_close(ODD_PREPROCESS.normalise_color((255, 0, 0)), ODD_PREPROCESS(red)[0, :, 0, 0])


@pytest.mark.parametrize(
    "kwargs",
    [dict(size=0), dict(std=(1.0, 0.0, 1.0)), dict(mean=(0.5, 0.5)), dict(interpolation="lanczos"),
     dict(resize_mode="fit"), dict(resize_size=16)],
)
def test_preprocess_rejects_bad_fields(kwargs):
    fields = dict(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) | kwargs
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Preprocess(**fields)


def test_preprocess_rejects_bad_images_and_round_trips_dict():
    with pytest.raises(ValueError, match="uint8"):
        ODD_PREPROCESS(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="3 channels"):
        ODD_PREPROCESS(torch.zeros(1, 4, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="rgb"):
        ODD_PREPROCESS.normalise_color((256, 0, 0))
    assert Preprocess.from_dict(ODD_PREPROCESS.to_dict()) == ODD_PREPROCESS


# --------------------------------------------------------------------------------- backbones


def test_torchvision_state_dict_round_trip(tmp_path, caplog):
    torch.manual_seed(0)
    original = load_backbone("torchvision:resnet18", None, num_classes=10)
    path = tmp_path / "resnet18.pth"
    torch.save(original.model.state_dict(), path)
    x = original.preprocess(_images(1))
    with caplog.at_level(logging.WARNING):
        loaded = load_backbone("torchvision:resnet18", str(path), num_classes=10)
    assert "no preprocessing record" in caplog.text  # a plain state dict: defaults are announced
    torch.testing.assert_close(loaded.model(x), original.model(x), rtol=0, atol=0)
    assert loaded.num_classes == 10 and loaded.model_id.startswith("torchvision:resnet18|file=resnet18.pth sha256=")
    assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())
    with pytest.raises(ValueError, match="does not fit"):
        load_backbone("torchvision:resnet18", str(path))  # 1000-class head vs a 10-class file


def test_tag_at_file_uses_the_tags_preprocessing(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(load_backbone("torchvision:resnet18", None).model.state_dict(), path)
    loaded = load_backbone("resnet18", f"IMAGENET1K_V1@{path}", source="torchvision")
    assert (loaded.preprocess.size, loaded.preprocess.resize_size, loaded.preprocess.interpolation) == (224, 256, "bilinear")
    assert loaded.num_classes == 1000


def test_offline_tag_raises_with_local_file_hint(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty cache
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsUnavailableError, match=r"network.*weights='IMAGENET1K_V1@/path/to/resnet18-"):
        load_backbone("torchvision:resnet18", "IMAGENET1K_V1")


def test_toy_checkpoint_round_trip_in_fp16(tmp_path):
    torch.manual_seed(0)
    model = build_toy("bcos", 8).eval()
    preprocess = toy_preprocess("bcos")
    path = save_backbone(tmp_path / "bcos.pt", model, "toy:bcos", 8, preprocess)
    loaded = load_backbone("toy:bcos", str(path))
    x = preprocess(_images())
    torch.testing.assert_close(loaded.model(x), model(x), rtol=1e-3, atol=1e-3)  # fp16 storage
    assert loaded.preprocess == preprocess and loaded.num_classes == 8
    with pytest.raises(ValueError, match="holds a toy:bcos checkpoint"):
        load_backbone("toy:cnn", str(path))


def test_bcos_package_model_takes_rgb_and_loads_release_style_state(tmp_path):
    loaded = load_backbone("bcos:resnet18", None, num_classes=4)
    assert isinstance(loaded.model, BcosWithInverse) and loaded.preprocess.mean == (0.0, 0.0, 0.0)
    path = tmp_path / "release.pth"
    torch.save(loaded.model.net.state_dict(), path)  # release files hold the bare network
    again = load_backbone("bcos:resnet18", f"DEFAULT@{path}", num_classes=4)
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(again.model(x), loaded.model(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("arch", "weights", "source", "match"),
    [
        ("resnet18", None, "auto", "needs a source prefix"),
        ("torchvision:resnet18", None, "timm", "conflicts"),
        ("keras:resnet18", None, "auto", "<source>:<name>"),
        ("torchvision:resnet81", None, "auto", "close matches: resnet18"),
        ("torchvision:resnet18", "IMAGENET9K", "auto", "valid: IMAGENET1K_V1"),
        ("torchvision:resnet18", "missing/file.pt", "auto", "not found"),
        ("toy:cnn", "DEFAULT", "auto", "no named weights"),
    ],
)
def test_load_backbone_rejects_bad_arguments(arch, weights, source, match):
    with pytest.raises(ValueError, match=match):
        load_backbone(arch, weights, source=source)


def test_pickled_module_checkpoint_is_refused(tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save(build_toy("cnn", 8), path)  # a pickled module, not a state dict
    with pytest.raises(ValueError, match="weights_only"):
        load_backbone("toy:cnn", str(path))


def test_parse_weights_forms(tmp_path):
    path = tmp_path / "w.pt"
    path.touch()
    assert parse_weights(None) == parse_weights("none") == parse_weights("") and parse_weights(None).tag is None
    assert (parse_weights("DEFAULT").tag, parse_weights("DEFAULT").path) == ("DEFAULT", None)
    assert (parse_weights(str(path)).tag, parse_weights(str(path)).path) == (None, path)
    assert (parse_weights(f"openai@{path}").tag, parse_weights(f"openai@{path}").path) == ("openai", path)


# --------------------------------------------------------------------------------- CLIP


@pytest.fixture()
def tiny_clip_dir(tmp_path):
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP_CFG)
    return save_clip_dir(tmp_path / "tiny_clip", model, TINY_CLIP_CFG, ODD_PREPROCESS), model.eval()


def test_clip_local_dir_round_trip_keeps_its_preprocessing(tiny_clip_dir):
    folder, model = tiny_clip_dir
    loaded = load_clip("tiny", f"local-dir:{folder}")
    assert loaded.preprocess == ODD_PREPROCESS  # from the folder's config, not OpenAI's mean/std
    assert loaded.embed_dim == 16 and loaded.model_id.startswith(f"open_clip:local-dir:{folder}|file=")
    x = loaded.preprocess(_images(height=40, width=50))
    tokens = loaded.tokenizer(["a blue star", "night"])
    assert tokens.shape == (2, 8)
    torch.testing.assert_close(loaded.model.encode_image(x), model.encode_image(x))
    torch.testing.assert_close(loaded.model.encode_text(tokens), model.encode_text(tokens))


def test_clip_file_uses_sibling_config_and_bare_file_is_refused(tiny_clip_dir, tmp_path):
    folder, model = tiny_clip_dir
    registered = tmp_path / "conceptrace-tiny-test.json"  # open_clip registers configs by file stem
    registered.write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(registered)
    loaded = load_clip("conceptrace-tiny-test", str(folder / "open_clip_pytorch_model.bin"))
    assert loaded.preprocess == ODD_PREPROCESS
    x = loaded.preprocess(_images(height=32, width=32))
    torch.testing.assert_close(loaded.model.encode_image(x), model.encode_image(x))
    bare = tmp_path / "bare.bin"
    bare.write_bytes((folder / "open_clip_pytorch_model.bin").read_bytes())
    with pytest.raises(ValueError, match=r"open_clip_config.json.*'<tag>@"):
        load_clip("conceptrace-tiny-test", str(bare))


def test_clip_input_size_without_weights_is_the_loaded_preprocessing_size(tmp_path):
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP_CFG)  # a 32 px vision tower, saved with a 48 px preprocessing config
    folder = save_clip_dir(tmp_path / "clip", model, TINY_CLIP_CFG, Preprocess(48, ODD_PREPROCESS.mean, ODD_PREPROCESS.std))
    registered = tmp_path / "conceptrace-tiny-size.json"
    registered.write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(registered)
    # open_clip takes a local-dir's size from the tower, a file's from the config beside it
    weights = str(folder / "open_clip_pytorch_model.bin")
    for name, pretrained, size in (("tiny", f"local-dir:{folder}", 32), ("conceptrace-tiny-size", weights, 48)):
        assert resolve_clip(name, pretrained).input_size == load_clip(name, pretrained).preprocess.size == size
    assert resolve_clip("ViT-L-14-336", "openai").input_size == 336  # a tag: nothing downloaded
    assert resolve_clip("ViT-B-16", None).input_size == 224


def test_unreachable_hub_is_asked_offline_at_once(monkeypatch):
    """Without a connection to the Hub, huggingface_hub's offline mode is on while a download runs
    (its cache or an error at once, not a minute of retries); behind a proxy the probe is skipped."""
    import huggingface_hub

    def refused(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    for name in weights._PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(weights.socket, "create_connection", refused)
    weights.hub_unreachable.cache_clear()
    try:
        host = urllib.parse.urlsplit(huggingface_hub.constants.ENDPOINT).hostname
        assert weights.hub_unreachable() == host
        with pytest.raises(WeightsUnavailableError, match=f"{host} cannot be reached and the file is not in the local cache"):
            with weights.fetching("test weights", "weights='x@/path'"):
                assert huggingface_hub.constants.HF_HUB_OFFLINE
                huggingface_hub.hf_hub_download("org/no-such-repo", "model.safetensors", cache_dir=None)
        monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
        weights.hub_unreachable.cache_clear()
        assert weights.hub_unreachable() is None
    finally:
        weights.hub_unreachable.cache_clear()


def test_clip_offline_tag_and_bad_names(monkeypatch):
    def offline(cfg, **kwargs):
        raise OSError("cannot find the requested files in the local cache")

    monkeypatch.setattr(open_clip, "download_pretrained", offline)
    with pytest.raises(WeightsUnavailableError, match="pretrained='openai@/path/to/"):
        load_clip("ViT-B-32", "openai")
    with pytest.raises(ValueError, match="valid: .*openai"):
        load_clip("ViT-B-32", "no-such-tag")
    with pytest.raises(ValueError, match="close matches: ViT-B-32"):
        load_clip("ViT-B-23", None)


# --------------------------------------------------------------------------------- layers


@pytest.mark.parametrize("arch", ["toy:cnn", "toy:bcos", "torchvision:resnet18", "timm:resnet18", "bcos:resnet18"])
def test_backbone_skeleton_has_the_models_layers_on_the_meta_device(arch):
    skeleton = backbone_skeleton(arch)
    assert all(p.is_meta for p in skeleton.parameters())
    assert layer_names(skeleton) == layer_names(load_backbone(arch, None).model)


def test_resolve_layer_lists_close_matches_first():
    model = build_toy("cnn", 8)
    assert resolve_layer(model, "layer2.0.conv1") is model.layer2[0].conv1
    # one short line whatever the model's size: the closest names and the top-level layers
    top = r"top-level layers: conv1, bn1, relu, layer1, layer2, layer3, avgpool, fc \(and the dotted paths below them, 35 names in all\)$"
    with pytest.raises(LayerNotFoundError, match=r"^layer 'layer4' not found in ToyCNN; closest: layer3, .*; " + top):
        resolve_layer(model, "layer4")


def test_extract_layers_returns_the_layers_outputs():
    model = build_toy("cnn", 8).eval()
    x = toy_preprocess("cnn")(_images())
    with torch.no_grad():
        stem = model.relu(model.bn1(model.conv1(x)))
        layer1 = model.layer1(stem)
        layer3 = model.layer3(model.layer2(layer1))
        features = extract_layers(model, x, ["layer3", "layer1", "bn1", "fc"])
        logits = model(x)
    torch.testing.assert_close(features["fc"], logits[:, :, None, None])  # vectors become 1 x 1 maps
    torch.testing.assert_close(features["layer1"], layer1)
    torch.testing.assert_close(features["layer3"], layer3)
    # bn1's output is later overwritten by ReLU(inplace=True); the copy keeps the pre-ReLU values.
    assert features["bn1"].min() < 0 and set(features) == {"layer1", "layer3", "bn1", "fc"}


def test_extract_layers_turns_vit_tokens_into_maps_and_cls():
    model = load_backbone("torchvision:vit_b_16", None, num_classes=2).model
    captured = {}
    layer = model.encoder.layers.encoder_layer_0
    handle = layer.register_forward_hook(lambda m, a, out: captured.setdefault("tokens", out))
    x = torch.rand(1, 3, 224, 224)
    features = extract_layers(model, x, ["encoder.layers.encoder_layer_0"])
    model(x)
    handle.remove()
    tokens = captured["tokens"]  # (1, 197, 768): class token + 14 x 14 patches, row-major
    grid = features["encoder.layers.encoder_layer_0"]
    assert grid.shape == (1, 768, 14, 14)
    torch.testing.assert_close(grid[0, :, 2, 5], tokens[0, 1 + 2 * 14 + 5])
    torch.testing.assert_close(features["encoder.layers.encoder_layer_0.cls"], tokens[:, 0])


@pytest.mark.parametrize(
    ("arch", "layer"),
    [("torchvision:resnet18", "layer3"), ("torchvision:resnet18", "layer2.1"), ("toy:cnn", "layer2"),
     ("toy:bcos", "layer3"), ("bcos:resnet18", "net.layer2")],
)
def test_split_at_reproduces_the_full_forward(arch, layer):
    torch.manual_seed(0)
    loaded = load_backbone(arch, None)
    x = loaded.preprocess(_images(height=72, width=64))
    head, tail = split_at(loaded.model, layer)
    features = head(x)
    torch.testing.assert_close(features, extract_layers(loaded.model, x, [layer])[layer], rtol=0, atol=0)
    torch.testing.assert_close(tail(features), loaded.model(x), rtol=0, atol=0)


def test_split_inside_a_residual_block_is_refused():
    with pytest.raises(ValueError, match="bypasses it"):
        split_at(build_toy("cnn", 8), "layer2.0.conv1")


# --------------------------------------------------------------------------------- toy backbones


def test_toy_backbones_shapes_and_shippable_size():
    x = torch.rand(2, 3, 64, 64)
    for arch in ("cnn", "bcos"):
        model = build_toy(arch, 8).eval()
        assert model(x).shape == (2, 8)
        assert sum(p.numel() for p in model.parameters()) * 2 < 2_000_000  # fp16 bytes
    with pytest.raises(ValueError, match="toy arch"):
        build_toy("vit", 8)


def test_toy_bcos_is_dynamic_linear():
    # In explanation mode the logits are exactly W(x) [x, 1-x] + logit_bias: no other biases.
    torch.manual_seed(0)
    model = ToyBcosCNN(8).eval()
    model.bn1.running_var.uniform_(0.5, 2.0)  # non-trivial norm statistics
    head, tail = split_at(model, "add_inverse")
    six = head(torch.rand(2, 3, 64, 64)).requires_grad_(True)
    with model.explanation_mode():
        logits = tail(six)
        (grad,) = torch.autograd.grad(logits[:, 3].sum(), six)
    contributions = (six * grad).sum(dim=(1, 2, 3))
    torch.testing.assert_close(contributions, logits[:, 3] + math.log(7), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------- training


def _colour_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class = which colour channel is bright: a 3-class task any CNN learns at once."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.randint(0, 60, (n, 16, 16, 3), dtype=torch.uint8, generator=generator)
    images[torch.arange(n), :, :, labels] += 180
    return images, labels


def test_train_classifier_learns_and_is_reproducible():
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_toy("cnn", 3)
        history = train_classifier(model, _colour_task(48, 0), _colour_task(24, 1), toy_preprocess("cnn", 16),
                                   epochs=3, batch_size=16, lr=3e-3, weight_decay=0.0, seed=0, device="cpu",
                                   augment=True)
        runs.append(history)
    assert runs[0]["val_acc"][-1] == 1.0
    assert runs[0]["train_loss"][-1] < runs[0]["train_loss"][0]
    assert runs[0]["val_loss"] == runs[1]["val_loss"]


def test_evaluate_classifier_hand_computed():
    class Fixed(torch.nn.Module):  # logits = mean of each channel: predicts the brightest channel
        def forward(self, x):
            return x.mean(dim=(2, 3))

    images, labels = _colour_task(6, 0)
    labels = labels.clone()
    labels[0] = 1  # one wrong label -> accuracy 5/6
    preprocess = Preprocess(size=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    accuracy, loss = evaluate_classifier(Fixed(), images, labels, preprocess, batch_size=4, device="cpu")
    logits = images.permute(0, 3, 1, 2).float().div(255).mean(dim=(2, 3))
    assert accuracy == pytest.approx(5 / 6)
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)


def test_augment_batch_is_an_integer_shift_and_flip():
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    out = augment_batch(x, torch.Generator().manual_seed(3))
    for image, moved in zip(x, out):
        centre = moved[:, 4:12, 4:12]
        matches = [
            (flip, dy, dx)
            for flip in (False, True)
            for dy in range(-4, 5)
            for dx in range(-4, 5)
            if torch.equal(centre, (image.flip(-1) if flip else image)[:, 4 + dy : 12 + dy, 4 + dx : 12 + dx])
        ]
        assert len(matches) == 1


def test_train_classifier_rejects_bad_inputs():
    images, labels = _colour_task(8, 0)
    common = dict(preprocess=toy_preprocess("cnn", 16), epochs=1, batch_size=4, lr=1e-3, weight_decay=0.0,
                  seed=0, device="cpu", augment=False)
    with pytest.raises(ValueError, match="train images must be uint8"):
        train_classifier(build_toy("cnn", 3), (images.float(), labels), (images, labels), **common)
    with pytest.raises(ValueError, match="loss must be one of"):
        train_classifier(build_toy("cnn", 3), (images, labels), (images, labels), loss="mse", **common)
    with pytest.raises(ValueError, match="epochs"):
        train_classifier(build_toy("cnn", 3), (images, labels), (images, labels), **(common | {"epochs": 0}))
