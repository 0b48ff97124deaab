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
from PIL import Image, ImageOps

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
    scaled to 8 bits by their type's range, grey is replicated to RGB and alpha is dropped.
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


def _pil_to_rgb8(pil: Image.Image) -> np.ndarray:
    pil = ImageOps.exif_transpose(pil)
    if pil.mode in ("RGB", "L", "RGBA", "LA", "P", "CMYK", "YCbCr", "1"):
        if pil.mode == "P" and "transparency" in pil.info:
            pil = pil.convert("RGBA")
        if pil.mode not in ("RGB", "L", "RGBA", "LA"):
            pil = pil.convert("RGB")
        return to_rgb8(np.asarray(pil))
    # 16-bit and float modes (I;16, I;16B, I, F): go through numpy to keep the full range.
    return to_rgb8(np.asarray(pil))


def to_rgb8(arr: np.ndarray) -> np.ndarray:
    """Convert an array of any common layout/dtype to contiguous H x W x 3 uint8."""
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        a = np.stack([a, a, a], axis=2)
    elif a.ndim == 3 and a.shape[2] == 2:  # grey + alpha
        a = np.repeat(a[:, :, :1], 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 4:  # RGBA: drop alpha (masks are drawn on the colour data)
        a = a[:, :, :3]
    elif not (a.ndim == 3 and a.shape[2] == 3):
        raise ImageError(f"unsupported image array shape {a.shape}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ImageError(f"empty image {a.shape}")
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if a.dtype == np.bool_:
        return np.ascontiguousarray(a.astype(np.uint8) * 255)
    if np.issubdtype(a.dtype, np.integer):
        info = np.iinfo(a.dtype)
        hi = info.max
        # Pillow returns 16-bit PNGs as int32 ('I' mode): scale by the data's real range when
        # it fits in 16 bits, so a 16-bit scan is not crushed to black by a 32-bit divisor.
        if hi > 65535 and a.max() <= 65535:
            hi = 65535 if a.max() > 255 else 255
        lo = min(0, int(info.min))
        scaled = (a.astype(np.float64) - lo) * (255.0 / (hi - lo))
        return np.ascontiguousarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
    if np.issubdtype(a.dtype, np.floating):
        a = np.nan_to_num(a.astype(np.float64))
        top = 1.0 if a.max() <= 1.0 else 255.0
        return np.ascontiguousarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8))
    raise ImageError(f"unsupported image dtype {a.dtype}")


def load_mask(source: Union[str, Path, np.ndarray], threshold: int = 127) -> np.ndarray:
    """Read a mask image (any mode) as bool H x W: a pixel is object when its value > threshold."""
    if isinstance(source, np.ndarray):
        a = source
    else:
        a = np.asarray(Image.open(Path(source)))
    if a.ndim == 3:
        a = a.max(axis=2)
    return a > threshold
