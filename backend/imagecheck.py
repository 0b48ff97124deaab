"""Task images from the network: refused by their real frame size before anything is decoded.

MAX_IMAGE_PIXELS must hold before an image of that size exists, for every format the backend
reads. `Image.open` reads only headers for most formats, and `size` is then the frame that
`load()` decodes. Not for all: an ICO decodes its largest icon inside `Image.open` (an ICO whose
directory said 256x256 around a 19000x19000 PNG cost +1.3 GB before the size check), an ICNS
decodes an embedded PNG or JPEG 2000 and only then learns its size, and so on. So:
- only formats whose decoded frame is the size their header gives are read (FORMATS); the rest
  are refused (415) without being decoded;
- an ICO's icons are measured from the bytes first (each PNG's IHDR, each bitmap's header), and
  the ICO refused when any is over the limit;
- an animated or multi-page image is read by its first frame (`load()` decodes that one only).
"""
from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image

from model.images import ImageError, load_image

# Read by `Image.open(formats=...)`: formats whose header gives the size of the frame decoded.
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "ICO")     # JPEG opens MPO (multi-picture) too
ICO_MAGIC = b"\0\0\1\0"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ImageRefused(Exception):
    """The image is not decoded; `status`: 413 (too big), 415 (format not read), 422 (unreadable)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def ico_frames(data: bytes) -> list[tuple[int, int]]:
    """The real size of each image in an ICO, from its bytes: a PNG's IHDR, a bitmap's header
    (its height counts the AND mask too, so it is an upper bound)."""
    count = struct.unpack_from("<H", data, 4)[0] if len(data) >= 6 else 0
    sizes = []
    for i in range(count):
        at = 6 + 16 * i
        if at + 16 > len(data):
            raise ImageRefused("the ICO's directory is cut short", 422)
        size, offset = struct.unpack_from("<II", data, at + 8)
        image = data[offset:offset + min(size, 64)]
        if image.startswith(PNG_MAGIC) and len(image) >= 24:
            sizes.append(struct.unpack_from(">II", image, 16))
        elif len(image) >= 12 and struct.unpack_from("<I", image)[0] == 12:      # BITMAPCOREHEADER
            sizes.append(struct.unpack_from("<HH", image, 4))
        elif len(image) >= 12:                                                   # BITMAPINFOHEADER and later
            w, h = struct.unpack_from("<ii", image, 4)
            sizes.append((abs(w), abs(h)))
        else:
            raise ImageRefused(f"the ICO's image {i} is cut short", 422)
    return sizes


def other_format(data: bytes) -> str | None:
    """The Pillow format outside FORMATS whose signature `data` starts with, if any (only the
    plugins' signature tests run: nothing is opened)."""
    Image.init()
    prefix = data[:16]
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        if name not in FORMATS and accept is not None and accept(prefix):
            return name
    return None


def _check_size(width: int, height: int, limit: int) -> None:
    if width * height > limit:
        raise ImageRefused(f"is {width}x{height} = {width * height} pixels, over MAX_IMAGE_PIXELS={limit}; "
                           f"downscale it or raise the limit", 413)


def decode(data: bytes, limit: int) -> np.ndarray:
    """The image in `data` as H x W x 3 uint8 RGB, if it is in one of FORMATS and its frame has at
    most `limit` pixels; ImageRefused (nothing decoded) otherwise."""
    if data.startswith(ICO_MAGIC):
        for w, h in ico_frames(data):
            _check_size(w, h, limit)
    Image.init()             # every plugin registered (Image.open with formats= looks them up)
    try:
        pil = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:
        raise ImageRefused(f"is over MAX_IMAGE_PIXELS={limit} pixels (its header claims hundreds of "
                           f"millions); downscale it", 413) from None
    except Image.UnidentifiedImageError:
        other = other_format(data)
        if other is None:
            raise ImageRefused("is not an image Pillow can read; check that the URL points at the image "
                               "file, not a web page", 422) from None
        raise ImageRefused(f"is a {other} image: only {', '.join(FORMATS[:-1])} and {FORMATS[-1]} images are read "
                           f"(other formats can hide the size of what they decode); convert it to PNG or JPEG",
                           415) from None
    except Exception as e:  # Pillow raises many types on broken headers
        raise ImageRefused(f"is not an image Pillow can read ({type(e).__name__}: {e}); check that the URL "
                           f"points at the image file, not a web page", 422) from None
    with pil:
        _check_size(*pil.size, limit)
        try:
            pil.load()
            return load_image(pil)
        except (ImageError, OSError, ValueError, SyntaxError, struct.error, EOFError) as e:
            raise ImageRefused(f"cannot be decoded ({type(e).__name__}: {e})", 422) from None
