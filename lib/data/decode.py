"""Decode any image Pillow reads to faithful 8-bit RGB: ``decode_rgb(path_or_file) -> uint8 (H, W, 3)``.

Pillow's ``convert("RGB")`` is right for 8-bit images but not for high-depth ones: it clips
16-bit grayscale ('I;16', values 0..65535) to 0..255, so nearly every pixel comes out 255, and
it ignores transparency. Here each kind is mapped on purpose:

=====================  ==================================================================
kind (Pillow mode)     8-bit RGB
=====================  ==================================================================
1, L, RGB, RGBX        as Pillow converts them (1 -> 0/255 grey)
P                      its palette colours
CMYK                   Pillow's conversion, 255·(1-C)(1-K) etc. (no ICC profile applied)
LAB                    Pillow's conversion (LittleCMS, CIE L*a*b* D50 -> sRGB)
YCbCr, HSV             Pillow's conversion
I;16, I;16L/B/N        16-bit grey, full-range scaling: round(v / 257) (65535 -> 255)
I (int32), F (float)   per-image min-max stretch to 0..255 (see below); an 'I' PNG is 16-bit grey
16-bit RGB(A)/LA       Pillow opens these as 8-bit RGB(A) through the high byte, floor(v / 256),
                       which is within 1 of v / 257: no clipping, so they are used as they come
=====================  ==================================================================

Decisions:

- Alpha (LA, La, PA, RGBA, RGBa, and a 'transparency' key of P, L, RGB, I;16 images) is
  composited over WHITE. A transparent pixel's stored colour is arbitrary (often black or
  junk), so dropping alpha shows what the viewer never sees; white is what viewers and web
  pages show, and it is what img2dataset does when it builds LAION (the data CLIP models are
  trained on), so composited images look like the images those models saw.
- 'I' and 'F' are stretched per image from their min to their max (NaN -> 0; +-inf clip to the
  ends). Their dtype says nothing about the range of the data (an int32 depth map in mm, a float
  image in 0..1 or in kelvin): scaling by the dtype's range would turn them all black. A constant
  image has no range and comes out black. 16-bit images, by contrast, do use their full range,
  so 'I;16' keeps absolute brightness (a dark 16-bit photo stays dark).
- TIFF MinIsWhite (photometric 0) is inverted for I;16/I/F; Pillow already does it for 1 and L.
- EXIF orientation (or XMP tiff:Orientation, as Pillow's ``ImageOps.exif_transpose`` reads it)
  is applied, so the array is upright; ``exif_transpose=False`` keeps the stored pixel grid.
- Animated files (GIF, APNG, WebP, multi-page TIFF) give their first frame.
- ``max_pixels`` (default Pillow's ``Image.MAX_IMAGE_PIXELS`` default, about 89.5 M pixels)
  replaces Pillow's decompression-bomb guard: an image with more pixels raises
  `ImageTooLargeError` naming the file and ``max_pixels``; ``max_pixels=None`` means no limit.
- Embedded ICC profiles are not applied (values are taken as sRGB), as torchvision, timm and
  open_clip loaders do.

Every failure (missing, empty, truncated, not an image, too large, unsupported mode) raises a
`DecodeError` whose message starts with the file's name.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import warnings
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

__all__ = ["DEFAULT_MAX_PIXELS", "DecodeError", "ImageTooLargeError", "composite_on_white", "decode_rgb", "exif_orientation", "orient", "source_name", "to_rgb"]

# Pillow's default Image.MAX_IMAGE_PIXELS (0.25 GiB of 24-bit pixels). A literal rather than a read
# of Image.MAX_IMAGE_PIXELS, so that code which changed Pillow's global does not move our default.
DEFAULT_MAX_PIXELS: int = 1024 * 1024 * 1024 // 4 // 3
BACKGROUND = 255  # alpha is composited over white (see the module docstring)
ORIENTATION_TAG = 0x0112

Source = str | os.PathLike | IO[bytes]

# What Pillow raises for files it cannot read: UnidentifiedImageError and truncation are OSErrors;
# corrupt headers surface as SyntaxError, struct.error, EOFError, IndexError, KeyError or ValueError.
PILLOW_ERRORS: tuple[type[BaseException], ...] = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, struct.error)

# Pillow's bomb guard reads a module global; lifting it is serialised so concurrent retries restore it correctly.
_PILLOW_LIMIT_LOCK = threading.Lock()


class DecodeError(ValueError):
    """An image file that cannot be decoded (missing, empty, truncated, not an image, unsupported)."""


class ImageTooLargeError(DecodeError):
    """An image with more pixels than ``max_pixels`` (the decompression-bomb guard)."""


def decode_rgb(source: Source, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, exif_transpose: bool = True) -> np.ndarray:
    """Decode a path or binary file object to uint8 RGB (H, W, 3), upright, first frame.

    ``max_pixels``: more pixels raise `ImageTooLargeError` (None: no limit). ``exif_transpose``:
    apply the EXIF orientation. Any failure raises `DecodeError` naming the file.
    """
    name = source_name(source)
    if not isinstance(source, (str, os.PathLike)) and not source.seekable():
        source = io.BytesIO(source.read())  # Pillow needs to seek, and a too-large retry to reread
    _check_not_empty(source, name)
    try:
        image = _open_loaded(source, name, max_pixels)
    except DecodeError:
        raise
    except PILLOW_ERRORS as exc:
        raise DecodeError(f"{name}: cannot decode image ({exc})") from exc
    with image:
        try:
            rgb = to_rgb(image)
        except PILLOW_ERRORS as exc:  # a mode Pillow opens but cannot convert
            raise DecodeError(f"{name}: cannot convert {image.mode!r} image to RGB ({exc})") from exc
        orientation = exif_orientation(image) if exif_transpose else 1
    return orient(rgb, orientation)


def to_rgb(image: Image.Image) -> np.ndarray:
    """A loaded Pillow image of any mode -> uint8 RGB (H, W, 3), alpha composited on white."""
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        grey = _high_depth_grey(image)
        key = image.info.get("transparency")
        rgb = np.repeat(grey[..., None], 3, axis=2)
        if isinstance(key, (int, float)):  # a PNG tRNS grey key marks fully transparent pixels
            return composite_on_white(rgb, np.where(np.asarray(image) == key, 0, 255).astype(np.uint8))
        return rgb
    if _has_alpha(image):
        if mode == "La":  # premultiplied grey: Pillow converts it only to LA
            image = image.convert("LA")
        rgba = np.asarray(image.convert("RGBA"))  # un-premultiplies RGBa; applies palette alpha and colour keys
        return composite_on_white(rgba[..., :3], rgba[..., 3])
    # np.array, not np.asarray: Pillow's buffer is read-only and callers may write in place
    return np.array(image if mode == "RGB" else image.convert("RGB"), dtype=np.uint8)


def composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Straight (not premultiplied) uint8 RGB (H, W, 3) and alpha (H, W) -> uint8 RGB over white."""
    a = alpha.astype(np.uint16)[..., None]
    # rgb·a + 255·(255 - a) <= 65025, so uint16 holds it; +127 rounds the division by 255
    out = (rgb.astype(np.uint16) * a + BACKGROUND * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def orient(rgb: np.ndarray, orientation: int) -> np.ndarray:
    """Apply EXIF orientation 1..8 to an (H, W, C) array, as ``ImageOps.exif_transpose`` does."""
    # orientation -> the Pillow transpose exif_transpose uses, written as numpy views
    ops = {
        2: lambda a: a[:, ::-1],  # FLIP_LEFT_RIGHT
        3: lambda a: a[::-1, ::-1],  # ROTATE_180
        4: lambda a: a[::-1],  # FLIP_TOP_BOTTOM
        5: lambda a: a.swapaxes(0, 1),  # TRANSPOSE
        6: lambda a: np.rot90(a, -1),  # ROTATE_270 (90° clockwise)
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),  # TRANSVERSE
        8: lambda a: np.rot90(a, 1),  # ROTATE_90 (90° counter-clockwise)
    }
    op = ops.get(orientation)
    return rgb if op is None else np.ascontiguousarray(op(rgb))


def exif_orientation(image: Image.Image) -> int:
    """The EXIF (or XMP) orientation 1..8 of an image; 1 when absent, invalid or unreadable."""
    try:
        value = image.getexif().get(ORIENTATION_TAG, 1)
    except PILLOW_ERRORS:  # a corrupt EXIF block: the pixels are still good, use them as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def source_name(source: Source) -> str:
    """How errors name the source: the path, a file object's name, or '<stream>'."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    name = getattr(source, "name", None)
    return name if isinstance(name, str) else "<stream>"


def _check_not_empty(source: Source, name: str) -> None:
    """Missing and zero-byte files get their own messages (Pillow says only 'cannot identify')."""
    if isinstance(source, (str, os.PathLike)):
        file = Path(source)
        if not file.exists():
            raise DecodeError(f"{name}: file not found")
        if file.is_file() and file.stat().st_size == 0:
            raise DecodeError(f"{name}: empty file")
    else:  # Image.open reads a stream from its start, whatever its position
        start = source.tell()
        end = source.seek(0, os.SEEK_END)
        source.seek(start)
        if end == 0:
            raise DecodeError(f"{name}: empty file")


def _open_loaded(source: Source, name: str, max_pixels: int | None) -> Image.Image:
    """Open and fully decode (first frame), enforcing ``max_pixels`` instead of Pillow's guard.

    Pillow warns above Image.MAX_IMAGE_PIXELS and raises above twice it, before the size is known
    to us. The warning is silenced (our check is the one that counts); when Pillow's error fires,
    the file is reopened with Pillow's global limit lifted, so that ``max_pixels`` decides alone.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return _open_within(source, name, max_pixels)
        except Image.DecompressionBombError:
            pass  # over 2 x Image.MAX_IMAGE_PIXELS: retry below with Pillow's guard lifted (Image.open rewinds)
        # Lifting a module global: other threads' Pillow calls see no limit meanwhile; this path is
        # taken only for images above Pillow's limit, and DataLoader workers are processes anyway.
        with _PILLOW_LIMIT_LOCK:
            saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                return _open_within(source, name, max_pixels)
            finally:
                Image.MAX_IMAGE_PIXELS = saved


def _open_within(source: Source, name: str, max_pixels: int | None) -> Image.Image:
    """Image.open, the ``max_pixels`` check on the header size, then load (truncation fails here)."""
    image = Image.open(source)
    try:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageTooLargeError(
                f"{name}: {width}x{height} image ({width * height:,} pixels) exceeds max_pixels={max_pixels:,} "
                "(the decompression-bomb guard); if the file is trusted, raise the max_pixels parameter "
                "(max_pixels=None: no limit)"
            )
        image.load()
    except BaseException:
        image.close()
        raise
    return image


def _has_alpha(image: Image.Image) -> bool:
    """An alpha band, a 'transparency' key, or a palette with alpha."""
    if image.mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in image.info:
        return True
    return image.mode == "P" and image.palette is not None and image.palette.mode == "RGBA"


def _high_depth_grey(image: Image.Image) -> np.ndarray:
    """16-bit: round(v / 257); 32-bit int and float: per-image min-max; uint8 (H, W)."""
    values = np.asarray(image)
    # PNG has no 32-bit grey: an 'I' PNG is 16-bit (Pillow before 10.3 opened those as 'I', not 'I;16')
    if image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG"):
        # round(v·255 / 65535) in integers; v / 257 is never exactly .5 off an integer, so no ties
        grey = ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    else:
        grey = _min_max(values)
    if getattr(image, "tag_v2", {}).get(262) == 0:  # TIFF MinIsWhite: Pillow inverts only 1 and L
        grey = 255 - grey
    return grey


def _min_max(values: np.ndarray) -> np.ndarray:
    """Stretch the finite range of ``values`` to 0..255 (NaN -> 0, +-inf -> the ends); uint8."""
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    if finite.size == 0:
        return np.zeros(values.shape, np.uint8)
    low, high = float(finite.min()), float(finite.max())
    if high <= low:
        return np.zeros(values.shape, np.uint8)  # constant: no range to stretch
    scaled = (values.astype(np.float64) - low) * (255.0 / (high - low))
    return np.rint(np.nan_to_num(np.clip(scaled, 0.0, 255.0), nan=0.0)).astype(np.uint8)
