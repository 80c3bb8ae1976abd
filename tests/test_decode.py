"""decode_rgb: every image kind Pillow reads, to faithful 8-bit RGB, against hand-made expectations."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from lib.data.decode import DecodeError, ImageTooLargeError, composite_on_white, decode_rgb, to_rgb
from lib.data.imagefolder import BadImageError, load_rgb

# --------------------------------------------------------------------------------------------
# Writers for what Pillow cannot save: 16-bit RGB(A) PNG and 16-bit / MinIsWhite TIFF.


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(values: np.ndarray, bit_depth: int = 16, width: int | None = None, height: int | None = None) -> bytes:
    """A PNG of uint16 (H, W[, C]) values (C: 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA), filter 0.
    width/height override the header (a header-only 'huge' image)."""
    channels = 1 if values.ndim == 2 else values.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    h, w = values.shape[:2]
    rows = values.reshape(h, -1).astype(">u2" if bit_depth == 16 else np.uint8)
    raw = b"".join(b"\0" + row.tobytes() for row in rows)
    header = struct.pack(">IIBBBBB", width or w, height or h, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def tiff_bytes(values: np.ndarray, photometric: int, big_endian: bool = False) -> bytes:
    """An uncompressed one-strip TIFF of unsigned integer (H, W[, C]) values."""
    order = ">" if big_endian else "<"
    h, w = values.shape[:2]
    spp = 1 if values.ndim == 2 else values.shape[2]
    bits = values.dtype.itemsize * 8
    data = values.astype(values.dtype.newbyteorder(order)).tobytes()
    n_tags = 10
    extra_at = 8 + 2 + n_tags * 12 + 4  # where values longer than 4 bytes go
    bits_value = struct.pack(order + "H" * spp, *[bits] * spp)
    extra = bits_value if len(bits_value) > 4 else b""
    data_at = extra_at + len(extra)
    short, long_ = 3, 4
    tags = [
        (256, long_, 1, struct.pack(order + "I", w)),
        (257, long_, 1, struct.pack(order + "I", h)),
        (258, short, spp, bits_value if not extra else struct.pack(order + "I", extra_at)),
        (259, short, 1, struct.pack(order + "H", 1)),  # no compression
        (262, short, 1, struct.pack(order + "H", photometric)),
        (273, long_, 1, struct.pack(order + "I", data_at)),
        (277, short, 1, struct.pack(order + "H", spp)),
        (278, long_, 1, struct.pack(order + "I", h)),
        (279, long_, 1, struct.pack(order + "I", len(data))),
        (284, short, 1, struct.pack(order + "H", 1)),  # chunky
    ]
    ifd = struct.pack(order + "H", n_tags) + b"".join(struct.pack(order + "HHI", *t[:3]) + t[3].ljust(4, b"\0") for t in tags)
    head = (b"MM\0*" if big_endian else b"II*\0") + struct.pack(order + "I", 8)
    return head + ifd + b"\0\0\0\0" + extra + data


def save(tmp_path: Path, name: str, image: Image.Image, **options: object) -> Path:
    path = tmp_path / name
    image.save(path, **options)
    return path


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def grey3(values: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(values, np.uint8)[..., None], 3, axis=2)


# --------------------------------------------------------------------------------------------
# 8-bit kinds


def test_8bit_rgb_grey_and_1bit_pass_through(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = decode_rgb(save(tmp_path, "rgb.png", Image.fromarray(rgb)))
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3) and np.array_equal(out, rgb)
    assert out.flags.writeable and out.flags.c_contiguous
    grey = rgb[..., 0]
    assert np.array_equal(decode_rgb(save(tmp_path, "l.png", Image.fromarray(grey))), grey3(grey))
    bits = np.array([[True, False, True]])
    assert np.array_equal(decode_rgb(save(tmp_path, "one.png", Image.fromarray(bits))), grey3([[255, 0, 255]]))


def test_alpha_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.array([[[200, 100, 0, 255], [200, 100, 0, 0], [200, 100, 0, 128], [0, 0, 0, 51]]], np.uint8)
    expected = np.array([[[200, 100, 0], [255, 255, 255], [227, 177, 127], [204, 204, 204]]], np.uint8)
    assert np.array_equal(decode_rgb(save(tmp_path, "rgba.png", Image.fromarray(rgba))), expected)
    la = np.array([[[0, 255], [0, 0], [100, 128]]], np.uint8)
    assert np.array_equal(decode_rgb(save(tmp_path, "la.png", Image.fromarray(la, "LA"))), grey3([[0, 255, 177]]))
    # the formula itself: 255 -> unchanged colour, 0 -> white, always round(c·a/255 + 255·(1 - a/255))
    colour, alpha = np.array([[[10, 20, 30]] * 3], np.uint8), np.array([[255, 0, 77]], np.uint8)
    assert composite_on_white(colour, alpha).tolist() == [[[10, 20, 30], [255, 255, 255], [181, 184, 187]]]


def test_palette_with_transparency_becomes_white(tmp_path: Path) -> None:
    image = Image.new("P", (3, 1))
    image.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0])
    image.putdata([0, 1, 2])
    expected = np.array([[[255, 0, 0], [255, 255, 255], [0, 255, 0]]], np.uint8)  # index 1 is transparent
    assert np.array_equal(decode_rgb(save(tmp_path, "p.png", image, transparency=1)), expected)
    assert np.array_equal(decode_rgb(save(tmp_path, "p.gif", image, transparency=1)), expected)
    # without transparency the palette colour shows
    assert decode_rgb(save(tmp_path, "opaque.png", image))[0, 1].tolist() == [0, 0, 255]


def test_colour_keys_of_grey_and_rgb_png(tmp_path: Path) -> None:
    grey = Image.fromarray(np.array([[0, 100]], np.uint8))
    assert np.array_equal(decode_rgb(save(tmp_path, "lkey.png", grey, transparency=100)), grey3([[0, 255]]))
    rgb = Image.fromarray(np.array([[[1, 2, 3], [4, 5, 6]]], np.uint8))
    assert decode_rgb(save(tmp_path, "rgbkey.png", rgb, transparency=(4, 5, 6))).tolist() == [[[1, 2, 3], [255, 255, 255]]]


def test_cmyk(tmp_path: Path) -> None:
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255], [100, 50, 0, 100]]], np.uint8)
    out = decode_rgb(save(tmp_path, "cmyk.tif", Image.fromarray(cmyk, "CMYK")))
    c, k = cmyk[..., :3].astype(float), cmyk[..., 3:].astype(float)
    expected = (255 - c) * (255 - k) / 255  # R = 255·(1-C)(1-K), G from M, B from Y
    assert np.abs(out - expected).max() <= 1
    assert out[0, :3].tolist() == [[255, 255, 255], [0, 255, 255], [0, 0, 0]]


def test_cmyk_jpeg(tmp_path: Path) -> None:
    cmyk = np.zeros((16, 16, 4), np.uint8)
    cmyk[..., 1] = 255  # magenta ink only -> (255, 0, 255)
    out = decode_rgb(save(tmp_path, "cmyk.jpg", Image.fromarray(cmyk, "CMYK"), quality=100))
    assert np.abs(out.astype(int) - [255, 0, 255]).max() <= 3


def test_lab(tmp_path: Path) -> None:
    # Pillow's LAB: L* 0..100 as 0..255, a* and b* as signed bytes (D50)
    def lab(l_star: float, a: int, b: int) -> list[int]:
        return [round(l_star * 255 / 100), a & 0xFF, b & 0xFF]

    pixels = np.array([[lab(100, 0, 0), lab(0, 0, 0), lab(50, 0, 0), lab(54.29, 81, 70)]], np.uint8)
    path = save(tmp_path, "lab.tif", Image.frombytes("LAB", (4, 1), pixels.tobytes()))
    assert Image.open(path).mode == "LAB"
    out = decode_rgb(path).astype(int)
    l_star = round(50 * 255 / 100) * 100 / 255  # the stored L*, as a neutral grey in sRGB:
    y = ((l_star + 16) / 116) ** 3
    grey = round(255 * (1.055 * y ** (1 / 2.4) - 0.055))
    assert np.abs(out[0, 0] - 255).max() <= 2 and out[0, 1].max() <= 2
    assert np.abs(out[0, 2] - grey).max() <= 2
    assert np.abs(out[0, 3] - [255, 0, 0]).max() <= 8  # sRGB red is L*a*b* (54.29, 80.8, 69.9) under D50


# --------------------------------------------------------------------------------------------
# high bit depths


def test_16bit_grey_png_scales_by_257_not_clips(tmp_path: Path) -> None:
    ramp = (np.arange(0, 65536, 65535 // 255 * 3, dtype=np.uint32) + np.arange(86) % 7 * 19).clip(0, 65535).astype(np.uint16)[None, :]
    path = save(tmp_path, "grey16.png", Image.fromarray(ramp))
    assert Image.open(path).mode == "I;16"
    out = decode_rgb(path)
    assert np.array_equal(out, grey3(np.rint(ramp / 257)))
    assert (np.asarray(Image.open(path).convert("RGB")) == 255).mean() > 0.9  # what convert("RGB") did
    # exact multiples of 257 map to their quotient
    exact = np.arange(256, dtype=np.uint16)[None, :] * 257
    assert np.array_equal(decode_rgb(save(tmp_path, "exact.png", Image.fromarray(exact))), grey3(np.arange(256)[None, :]))


def test_16bit_png_opened_as_int32_is_still_16bit() -> None:
    # Pillow < 10.3 (pyproject allows >= 10) opens 16-bit grey PNG as 'I'; PNG has no 32-bit grey, so it is scaled as 16-bit
    image = Image.fromarray(np.array([[0, 257 * 40, 65535]], np.int32))
    image.format = "PNG"
    assert np.array_equal(to_rgb(image), grey3([[0, 40, 255]]))


@pytest.mark.parametrize("big_endian", [False, True])
def test_16bit_grey_tiff(tmp_path: Path, big_endian: bool) -> None:
    values = np.array([[0, 1000, 32768, 65535]], np.uint16)
    path = write(tmp_path, "grey16.tif", tiff_bytes(values, photometric=1, big_endian=big_endian))
    assert Image.open(path).mode == ("I;16B" if big_endian else "I;16")
    assert np.array_equal(decode_rgb(path), grey3(np.rint(values / 257)))


def test_16bit_min_is_white_tiff_is_inverted(tmp_path: Path) -> None:
    values = np.array([[0, 1000, 65535]], np.uint16)
    path = write(tmp_path, "white16.tif", tiff_bytes(values, photometric=0))
    assert np.array_equal(decode_rgb(path), grey3(255 - np.rint(values / 257)))


def test_16bit_grey_with_transparency_key(tmp_path: Path) -> None:
    values = np.array([[0, 1000, 65535]], np.uint16)
    path = save(tmp_path, "key16.png", Image.fromarray(values), transparency=1000)
    assert np.array_equal(decode_rgb(path), grey3([[0, 255, 255]]))


def test_16bit_rgb_png_and_tiff(tmp_path: Path) -> None:
    rgb = np.array([[[0, 32768, 65535], [2698, 300, 65000]], [[128, 65407, 40000], [1, 2, 3]]], np.uint16)
    # Pillow has no 16-bit RGB mode: it keeps the high byte, floor(v / 256), within 1 of v / 257
    for path in (write(tmp_path, "rgb16.png", png_bytes(rgb)), write(tmp_path, "rgb16.tif", tiff_bytes(rgb, photometric=2))):
        out = decode_rgb(path)
        assert out.shape == (2, 2, 3) and np.abs(out - rgb / 257).max() <= 1, path
    rgba = np.concatenate([rgb, np.full((2, 2, 1), 65535, np.uint16)], axis=2)
    rgba[0, 0, 3] = 0
    out = decode_rgb(write(tmp_path, "rgba16.png", png_bytes(rgba)))
    assert out[0, 0].tolist() == [255, 255, 255] and np.abs(out[1] - rgb[1] / 257).max() <= 1


def test_int32_is_stretched_min_to_max(tmp_path: Path) -> None:
    values = np.array([[-5, 0, 1000, 500]], np.int32)
    path = save(tmp_path, "int.tif", Image.fromarray(values))
    assert Image.open(path).mode == "I"
    assert np.array_equal(decode_rgb(path), grey3(np.rint((values + 5) * 255 / 1005)))


def test_float_is_stretched_over_its_finite_range(tmp_path: Path) -> None:
    values = np.array([[-1.5, 0.0, 2.5, np.nan, np.inf, -np.inf]], np.float32)
    path = save(tmp_path, "float.tif", Image.fromarray(values))
    assert Image.open(path).mode == "F"
    assert np.array_equal(decode_rgb(path), grey3([[0, round(1.5 * 255 / 4), 255, 0, 255, 0]]))
    constant = save(tmp_path, "constant.tif", Image.fromarray(np.full((2, 2), 7.0, np.float32)))
    assert not decode_rgb(constant).any()


@pytest.mark.parametrize(
    ("mode", "colour", "expected"),
    [
        ("RGBa", (50, 50, 50, 128), (177, 177, 177)),  # premultiplied: 50 + 255·(1 - 128/255)
        ("La", (50, 128), (177, 177, 177)),
        ("RGBX", (1, 2, 3, 0), (1, 2, 3)),
        ("HSV", (0, 255, 255), (255, 0, 0)),
    ],
)
def test_other_modes_of_loaded_images(mode: str, colour: tuple[int, ...], expected: tuple[int, int, int]) -> None:
    out = to_rgb(Image.new(mode, (2, 1), colour))
    assert np.abs(out.astype(int) - expected).max() <= 1


def test_palette_with_alpha_band() -> None:
    image = Image.new("PA", (2, 1))
    image.putpalette([0, 0, 0, 200, 100, 0])
    image.putdata([(1, 255), (1, 0)])
    assert to_rgb(image).tolist() == [[[200, 100, 0], [255, 255, 255]]]


# --------------------------------------------------------------------------------------------
# orientation, frames, sources


def test_exif_orientation_6_comes_out_upright(tmp_path: Path) -> None:
    # stored 3 wide x 2 high, red at the top-left and green at the bottom-left; orientation 6 means
    # "rotate 90° clockwise to display": upright it is 2 wide x 3 high, red top-right, green top-left
    stored = np.zeros((2, 3, 3), np.uint8)
    stored[0, 0], stored[1, 0] = (255, 0, 0), (0, 255, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(tmp_path, "rotated.png", Image.fromarray(stored), exif=exif.tobytes())
    out = decode_rgb(path)
    assert out.shape == (3, 2, 3)
    assert out[0, 1].tolist() == [255, 0, 0] and out[0, 0].tolist() == [0, 255, 0] and not out[1:].any()
    assert np.array_equal(decode_rgb(path, exif_transpose=False), stored)


def test_exif_orientation_jpeg(tmp_path: Path) -> None:
    stored = np.zeros((32, 48, 3), np.uint8)
    stored[:16, :16] = 255  # a white block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90° counter-clockwise to display: the block goes to the bottom-left
    out = decode_rgb(save(tmp_path, "rotated.jpg", Image.fromarray(stored), exif=exif.tobytes(), quality=95))
    assert out.shape == (48, 32, 3)
    assert out[-12:, :12].min() > 200 and out[:30].max() < 50


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_pillow_exif_transpose(tmp_path: Path, orientation: int) -> None:
    stored = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(tmp_path, "o.png", Image.fromarray(stored), exif=exif.tobytes())
    with Image.open(path) as image:
        expected = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    assert np.array_equal(decode_rgb(path), expected)


def test_tiff_orientation_tag(tmp_path: Path) -> None:
    stored = np.zeros((2, 3, 3), np.uint8)
    stored[0, 0] = 255
    out = decode_rgb(save(tmp_path, "o.tif", Image.fromarray(stored), tiffinfo={274: 6}))
    assert out.shape == (3, 2, 3) and out[0, 1].tolist() == [255, 255, 255]


def test_animated_files_give_their_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (4, 4), colour) for colour in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    for name in ("anim.gif", "anim.png"):
        path = save(tmp_path, name, frames[0], save_all=True, append_images=frames[1:], duration=40, loop=0)
        assert Image.open(path).n_frames == 3
        assert np.array_equal(decode_rgb(path), np.full((4, 4, 3), [255, 0, 0], np.uint8)), name


def test_file_objects_and_paths_agree(tmp_path: Path) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    path = save(tmp_path, "a.png", Image.fromarray(rgb))
    with path.open("rb") as file:
        assert np.array_equal(decode_rgb(file), rgb)
    assert np.array_equal(decode_rgb(io.BytesIO(path.read_bytes())), rgb)
    assert np.array_equal(decode_rgb(str(path)), rgb)


# --------------------------------------------------------------------------------------------
# size limit and bad files


def test_image_beyond_max_pixels_is_a_clear_error(tmp_path: Path) -> None:
    path = save(tmp_path, "big.png", Image.new("RGB", (100, 80), (1, 2, 3)))
    message = r"big\.png: 100x80 image \(8,000 pixels\) exceeds max_pixels=7,999.*raise the max_pixels parameter"
    with pytest.raises(ImageTooLargeError, match=message):
        decode_rgb(path, max_pixels=7999)
    assert decode_rgb(path, max_pixels=8000).shape == (80, 100, 3)
    assert decode_rgb(path, max_pixels=None).shape == (80, 100, 3)
    assert issubclass(ImageTooLargeError, DecodeError) and issubclass(DecodeError, ValueError)
    with pytest.raises(BadImageError, match="max_pixels"):  # imagefolder's error is the same class
        load_rgb(str(path), 16, max_pixels=100)


def test_huge_header_fails_before_decoding(tmp_path: Path) -> None:
    # a 100000 x 100000 header over a few bytes of data: refused from the header, nothing allocated
    path = write(tmp_path, "bomb.png", png_bytes(np.zeros((1, 1), np.uint16), bit_depth=8, width=100_000, height=100_000))
    with pytest.raises(ImageTooLargeError, match=r"bomb\.png: 100000x100000 image .* exceeds max_pixels=89,478,485"):
        decode_rgb(path)


def test_max_pixels_overrides_pillows_global_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save(tmp_path, "big.png", Image.new("L", (100, 80), 9))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow alone would raise above 2000 pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no DecompressionBombWarning either
        assert np.array_equal(decode_rgb(path, max_pixels=10_000), np.full((80, 100, 3), 9, np.uint8))
        with pytest.raises(ImageTooLargeError, match="100x80"):
            decode_rgb(path, max_pixels=5000)
        small = save(tmp_path, "between.png", Image.new("L", (40, 40)))  # 1600: Pillow would only warn
        assert decode_rgb(small).shape == (40, 40, 3)
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored after the retry


def test_bad_files_raise_decode_error_naming_them(tmp_path: Path) -> None:
    empty = write(tmp_path, "empty.png", b"")
    with pytest.raises(DecodeError, match=r"empty\.png: empty file"):
        decode_rgb(empty)
    encoded = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(encoded, "PNG")
    truncated = write(tmp_path, "truncated.png", encoded.getvalue()[: len(encoded.getvalue()) // 2])
    with pytest.raises(DecodeError, match=r"truncated\.png: cannot decode image \(image file is truncated"):
        decode_rgb(truncated)
    text = write(tmp_path, "text.png", b"this is not a PNG at all\n" * 20)
    with pytest.raises(DecodeError, match=r"text\.png: cannot decode image \(cannot identify image file"):
        decode_rgb(text)
    with pytest.raises(DecodeError, match=r"missing\.png: file not found"):
        decode_rgb(tmp_path / "missing.png")
    with pytest.raises(DecodeError, match=r"<stream>: empty file"):
        decode_rgb(io.BytesIO(b""))
    with truncated.open("rb") as file, pytest.raises(DecodeError, match=r"truncated\.png: cannot decode"):
        decode_rgb(file)


def test_load_rgb_decodes_16bit_faithfully(tmp_path: Path) -> None:
    path = save(tmp_path, "dark16.png", Image.fromarray(np.full((20, 30), 257 * 40, np.uint16)))
    assert np.array_equal(load_rgb(str(path), 8), np.full((8, 8, 3), 40, np.uint8))
