"""CE-FAM's augmented translator epochs: RandomResizedCrop boxes, the batched crop-resize-flip,
and the epoch source (fresh crops every epoch, each row once, the same crop for backbone and CLIP)."""

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from lib.core.stores import ArraySpec, ShardedWriter, open_store
from lib.methods.cefam.translator_augment import augmented_source, crop_boxes, resized_crops


def test_crop_boxes_fit_the_image_and_follow_scale_and_ratio():
    rng = np.random.default_rng(0)
    boxes = crop_boxes(rng, 2000, 64, 48, (0.08, 1.0))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 64).all() and (left + w <= 48).all()
    drawn = (h > 0) & ~((h == 64) & (w == 48))  # the centre-crop fallback aside
    area = h * w / (64 * 48)
    assert area[drawn].min() >= 0.07 and area.max() <= 1.0  # 0.08 up to rounding of the sides
    ratio = w[drawn] / h[drawn]
    assert ratio.min() >= 0.7 and ratio.max() <= 1.4  # [3/4, 4/3] up to rounding
    assert len(np.unique(top)) > 10 and len(np.unique(left)) > 10  # positions vary
    # the whole area never fits at a non-square ratio on a square image unless the ratio is ~1: full image
    full = crop_boxes(np.random.default_rng(1), 50, 32, 32, (1.0, 1.0))
    assert (full == [0, 0, 32, 32]).all()


def _images(n=4, size=16, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def test_resized_crops_are_identity_flip_and_torchvision_resized_crop():
    images = _images()
    whole = torch.tensor([[0, 0, 16, 16]] * 4)
    assert torch.equal(resized_crops(images, whole, torch.zeros(4, dtype=torch.bool), (16, 16)), images)
    flips = torch.tensor([True, False, True, False])
    flipped = resized_crops(images, whole, flips, (16, 16))
    assert torch.equal(flipped[flips], images[flips].flip(2)) and torch.equal(flipped[~flips], images[~flips])
    # a different box per image, upsampled to 16 x 16: torchvision's bilinear resized_crop (no antialias needed upwards)
    boxes = torch.tensor([[0, 0, 8, 8], [4, 6, 10, 7], [8, 8, 8, 8], [2, 1, 12, 14]])
    ours = resized_crops(images, boxes, torch.zeros(4, dtype=torch.bool), (16, 16)).int()
    for image, (top, left, h, w), crop in zip(images, boxes.tolist(), ours, strict=True):
        expected = TF.resized_crop(
            image.permute(2, 0, 1).float(), top, left, h, w, [16, 16], interpolation=TF.InterpolationMode.BILINEAR, antialias=False
        ).round().int().permute(1, 2, 0)
        assert (crop - expected).abs().max() <= 1  # uint8 rounding


@pytest.fixture
def image_store(tmp_path):
    images = _images(n=10, size=8, seed=2).numpy()
    spec = ArraySpec("images", images.shape, "uint8", ("item", "y", "x", "channel"))
    writer = ShardedWriter(tmp_path / "images.zarr", [spec], 4, {}, fingerprint="test")
    for shard in writer.pending():
        writer.write(shard, {"images": images[writer.rows(shard)]})
    writer.finalize()
    return open_store(tmp_path / "images.zarr")["images"], images


@pytest.mark.parametrize("in_memory_mb", [1024.0, 0.0])
def test_augmented_source_sees_every_row_once_with_fresh_crops_per_epoch(image_store, in_memory_mb):
    array, images = image_store
    rows = np.array([1, 2, 4, 5, 7, 9])
    seen: list[torch.Tensor] = []

    def encode(crops):  # z: the crop's mean colour (identifies nothing); target: the crop itself
        seen.append(crops)
        return crops.float().mean(dim=(1, 2)), crops.flatten(1).float()

    source = augmented_source(array, rows, 4, encode, scale=(1.0, 1.0), seed=5, in_memory_mb=in_memory_mb)
    batches = list(source(0))
    assert [len(z) for z, _ in batches] == [4, 2]
    crops = torch.cat(seen)
    # scale (1, 1): whole images, some flipped; each training row exactly once, no other row
    originals = torch.from_numpy(images)
    matched = []
    for crop in crops:
        hits = [r for r in range(10) if torch.equal(crop, originals[r]) or torch.equal(crop, originals[r].flip(1))]
        matched.extend(hits)
    assert sorted(matched) == sorted(rows.tolist())
    seen.clear()
    again = torch.cat([t for _, t in source(0)])
    assert torch.equal(again, torch.cat([t for _, t in batches]))  # an epoch depends on (seed, epoch) alone
    assert not torch.equal(torch.cat([t for _, t in source(1)]), again)

    # random crops: the crop is what both models see, and a new epoch crops anew
    source = augmented_source(array, rows, 6, encode, scale=(0.08, 0.5), seed=5, in_memory_mb=in_memory_mb)
    first, second = (torch.cat([t for _, t in source(epoch)]) for epoch in (0, 1))
    assert first.shape == (6, 8 * 8 * 3) and not torch.equal(first, second)
