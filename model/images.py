"""Turn whatever image a user has into an 8-bit RGB array.

Annotators upload JPEGs from phones (EXIF-rotated), 16-bit TIFF/PNG scans, greyscale and RGBA PNGs.
Everything downstream (network, RLE encoder, evaluation) works on an H x W x 3 uint8 RGB array in
the orientation the user sees, so all the conversions live here and nowhere else.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Union

import numpy as np
from PIL import ExifTags, Image, ImageOps

ImageSource = Union[str, Path, bytes, np.ndarray, Image.Image]

# Decompression-bomb guard: Pillow's default (89 MP) would reject big but legitimate scans; a
# 16-bit 200 MP image is still refused before it allocates gigabytes.
MAX_PIXELS = 200_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class ImageError(ValueError):
    """The input cannot be read as an image (corrupt, unsupported, or too large)."""


def load_image(source: ImageSource) -> np.ndarray:
    """Return an H x W x 3 uint8 RGB array from a path, encoded bytes, PIL image or array.

    EXIF orientation is applied (the image is returned as displayed), 16-bit and float data are
    scaled to 8 bits by their type's range (a band of rows at a time: the memory a pixel costs does
    not grow with its bit depth beyond the decoded image itself), grey is replicated to RGB and
    alpha is dropped.
    """
    if isinstance(source, np.ndarray):
        return to_rgb8(source)
    if isinstance(source, Image.Image):
        return _pil_to_rgb8(source)
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            pil = Image.open(io.BytesIO(bytes(source)))
        else:
            pil = Image.open(Path(source))
        pil.load()
    except FileNotFoundError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large (limit {MAX_PIXELS} pixels): {e}") from e
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError)
        raise ImageError(f"cannot decode image: {e}") from e
    return _pil_to_rgb8(pil)


# Modes with more than 8 bits a channel (Pillow keeps 16-bit RGB as 8-bit RGB already).
HIGH_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")
# Rows converted at a time: the float64 arithmetic runs on a band of about this many values, never on
# the whole image (a float64 copy of a 50 MP image is 400 MB, and the arithmetic made several).
BAND_VALUES = 1 << 18


def _displayed(pil: Image.Image) -> Image.Image:
    """The image as the user sees it: EXIF orientation applied. Pillow's exif_transpose returns a
    copy of the whole image even when there is nothing to turn (+4 bytes a pixel for nothing)."""
    if pil.getexif().get(ExifTags.Base.Orientation, 1) not in range(2, 9):
        return pil
    return ImageOps.exif_transpose(pil)


def _pil_to_rgb8(pil: Image.Image) -> np.ndarray:
    pil = _displayed(pil)
    if pil.mode in HIGH_BIT_MODES:
        return _high_bit_to_rgb8(pil)
    if pil.mode in ("RGB", "L", "RGBA", "LA", "P", "CMYK", "YCbCr", "1"):
        if pil.mode == "P" and "transparency" in pil.info:
            pil = pil.convert("RGBA")
        if pil.mode not in ("RGB", "L", "RGBA", "LA"):
            pil = pil.convert("RGB")
    return to_rgb8(np.asarray(pil))


def _high_bit_to_rgb8(pil: Image.Image) -> np.ndarray:
    """A 16/32-bit or float grey image to RGB at 8 bits, a band of rows at a time read from the
    Pillow image itself: the memory is the image at its own depth plus the 8-bit result."""
    w, h = pil.size
    rows = max(1, BAND_VALUES // w)
    bands = [(y, min(h, y + rows)) for y in range(0, h, rows)]

    def band(y0: int, y1: int) -> np.ndarray:
        return np.asarray(pil.crop((0, y0, w, y1)))

    scale = _Scale.of(band(y0, y1) for y0, y1 in bands)
    out = np.empty((h, w, 3), np.uint8)
    for y0, y1 in bands:
        out[y0:y1] = scale(band(y0, y1))[:, :, None]
    return out


class _Scale:
    """How values of one image map to 0..255: integers by their type's range (narrowed to 16 or 8
    bits when the data fit: Pillow gives 16-bit PNGs and TIFFs as 32-bit 'I'), floats by 1 or 255.
    Built from the whole image's range, applied band by band."""

    def __init__(self, kind: str, lo: float, hi: float):
        self.kind, self.lo, self.hi = kind, lo, hi

    @classmethod
    def of(cls, bands) -> "_Scale":
        first, lo_seen, hi_seen, kind = None, None, None, ""
        for b in bands:
            if first is None:
                first = b
                kind = "bool" if b.dtype == np.bool_ else "int" if np.issubdtype(b.dtype, np.integer) \
                    else "float" if np.issubdtype(b.dtype, np.floating) else ""
                if not kind:
                    raise ImageError(f"unsupported image dtype {b.dtype}")
            if kind == "float":
                b = np.nan_to_num(b.astype(np.float64), copy=False)
            if kind in ("int", "float") and b.size:
                lo_b, hi_b = b.min(), b.max()
                lo_seen = lo_b if lo_seen is None else min(lo_seen, lo_b)
                hi_seen = hi_b if hi_seen is None else max(hi_seen, hi_b)
        if kind == "bool" or first is None:
            return cls("bool", 0, 1)
        if kind == "float":
            return cls("float", 0.0, 1.0 if hi_seen is None or hi_seen <= 1.0 else 255.0)
        info = np.iinfo(first.dtype)
        hi, lo = int(info.max), min(0, int(info.min))
        if hi > 65535 and hi_seen is not None and hi_seen <= 65535:
            hi = 65535 if hi_seen > 255 else 255
            lo = 0 if lo_seen is not None and lo_seen >= 0 else lo    # unsigned data in a signed container
        return cls("int", lo, hi)

    def __call__(self, b: np.ndarray) -> np.ndarray:
        if self.kind == "bool":
            return b.astype(np.uint8) * np.uint8(255)
        f = b.astype(np.float64)                  # one float64 copy of the band, worked in place
        if self.kind == "float":
            np.nan_to_num(f, copy=False)
            f *= 255.0 / self.hi
        else:
            f -= self.lo
            f *= 255.0 / (self.hi - self.lo)
        np.rint(f, out=f)
        np.clip(f, 0, 255, out=f)
        return f.astype(np.uint8)


def to_rgb8(arr: np.ndarray) -> np.ndarray:
    """Convert an array of any common layout/dtype to contiguous H x W x 3 uint8 (band by band:
    no full-size copy at more than 8 bits)."""
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    elif a.ndim == 3 and a.shape[2] == 2:  # grey + alpha
        a = a[:, :, 0]
    elif a.ndim == 3 and a.shape[2] == 4:  # RGBA: drop alpha (masks are drawn on the colour data)
        a = a[:, :, :3]
    elif not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        raise ImageError(f"unsupported image array shape {a.shape}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ImageError(f"empty image {a.shape}")
    if a.dtype == np.uint8 and a.ndim == 3:
        return np.ascontiguousarray(a)
    out = np.empty((a.shape[0], a.shape[1], 3), np.uint8)
    if a.dtype == np.uint8:
        out[:] = a[:, :, None]
        return out
    rows = max(1, BAND_VALUES // (a.shape[1] * (a.shape[2] if a.ndim == 3 else 1)))
    bands = range(0, a.shape[0], rows)
    scale = _Scale.of(a[y:y + rows] for y in bands)
    for y in bands:
        b = scale(a[y:y + rows])
        out[y:y + rows] = b if b.ndim == 3 else b[:, :, None]
    return out


def load_mask(source: Union[str, Path, np.ndarray], threshold: int = 127) -> np.ndarray:
    """Read a mask image (any mode) as bool H x W: a pixel is object when its value > threshold."""
    if isinstance(source, np.ndarray):
        a = source
    else:
        a = np.asarray(Image.open(Path(source)))
    if a.ndim == 3:
        a = a.max(axis=2)
    return a > threshold
