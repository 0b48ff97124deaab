"""Label Studio's brush RLE: the one encoder and the one decoder of SimClick. The backend reads
brush strokes (/predict) and writes its answers with it (backend/labelstudio/masks.py re-exports
it); fine-tuning reads annotations with it (training/data/labelstudio.py). A pixel is in the mask
when its alpha is over ALPHA_THRESHOLD (127): the editor's anti-aliased stroke edges (alpha
1..127) are not, and the backend writes its masks with MASK_ALPHA >= 128, so they read back whole.

Brush RLE is the editor's rle-pack format: a 32-bit count of RGBA values, the word size, four run
length sizes, then runs. label-studio-sdk has a codec for it, which the tests use as the reference;
the backend does not run it on requests, for what it costs:
- its decoder first turns every bit of the RLE into a Python string (about 590 bytes of memory and
  2.4 us per byte of RLE: a 1 MB tail after a valid stroke cost 590 MB), and reads whatever word
  size the header names into uint8 (a 16-bit word was a 500). `rle_to_mask` takes the bits a byte
  at a time, stops at the last value the header counts, accepts words of at most 8 bits, and writes
  only the alpha channel, the one a mask needs: its memory is the mask;
- its encoder expands the mask to its 4 channels and compares them pairwise (9 bytes a pixel, 440
  MB for a 49 MP answer). `mask_to_rle` writes the same bytes from the mask's pixel runs.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

ALPHA_THRESHOLD = 127


class MaskFormatError(ValueError):
    pass


# The run length sizes every Label Studio RLE declares, and their 2-bit codes.
RLE_SIZES = (3, 4, 8, 16)


def mask_to_rle(mask: np.ndarray, value: int = 255) -> list[int]:
    """bool H x W -> Label Studio brush RLE (RGBA, `value` in all four channels where the mask is
    set), byte for byte what label-studio-sdk's mask2rle writes for a mask of 0 and `value`: each
    run of n equal pixels is a series of 4n equal values, in the shortest of the four sizes, series
    of 65536 values at most. Label Studio 1.23 draws a brush region in its label's colour with this
    alpha (times the layer's fixed 0.6): `value` < 255 lets the image show through."""
    if mask.ndim != 2:
        raise MaskFormatError(f"mask must be 2-D, got shape {mask.shape}")
    if not 1 <= value <= 255:
        raise MaskFormatError(f"mask value must be in 1..255, got {value}")
    flat = np.ascontiguousarray(mask, dtype=bool).reshape(-1)
    ends = np.append(np.flatnonzero(flat[1:] != flat[:-1]), flat.size - 1)     # last pixel of each run
    bits = [f"{4 * flat.size:032b}{8 - 1:05b}", "".join(f"{s - 1:04b}" for s in RLE_SIZES)]
    on_word = f"{value:08b}"
    for values, on in zip((np.diff(ends, prepend=-1) * 4).tolist(), flat[ends].tolist()):
        word = on_word if on else "00000000"
        if values <= 8:
            bits.append(f"100{values - 1:03b}{word}")
        elif values <= 16:
            bits.append(f"101{values - 1:04b}{word}")
        elif values <= 256:
            bits.append(f"110{values - 1:08b}{word}")
        else:
            while values > 65536:
                bits.append(f"111{65535:016b}{word}")
                values -= 65536
            bits.append(f"111{values - 1:016b}{word}")
    text = "".join(bits)
    text += "0" * (8 - len(text) % 8)          # the SDK pads a whole byte when none is needed
    return [int(text[i:i + 8], 2) for i in range(0, len(text), 8)]


class _Bits:
    """The RLE's fields, most significant bit first, read a byte at a time."""

    def __init__(self, data: bytes):
        self.data, self.pos, self.buf, self.nbits = data, 0, 0, 0

    def read(self, n: int) -> int:
        while self.nbits < n:
            if self.pos >= len(self.data):
                raise MaskFormatError("the rle ends before its last value")
            self.buf = (self.buf << 8) | self.data[self.pos]
            self.pos += 1
            self.nbits += 8
        self.nbits -= n
        value = self.buf >> self.nbits
        self.buf &= (1 << self.nbits) - 1
        return value


def rle_bytes(rle) -> bytes:
    """A brush's `rle` (a JSON list of byte values) as bytes; MaskFormatError if it is not one."""
    if not isinstance(rle, (list, tuple, bytes)) or not rle:
        raise MaskFormatError("rle must be a non-empty list of byte values")
    try:
        data = bytes(int(v) for v in rle)
    except (TypeError, ValueError, OverflowError) as e:    # OverflowError: int(Infinity)
        raise MaskFormatError(f"rle must be a list of integers 0..255: {e}") from None
    if len(data) < 7:
        raise MaskFormatError("rle too short for its header")
    return data


def _header(bits: _Bits, height: int, width: int) -> tuple[int, int, list[int]]:
    """(values, word size, the four run length sizes), checked against the declared size."""
    n = bits.read(32)
    if n != height * width * 4:
        raise MaskFormatError(
            f"rle holds {n} values but original_width x original_height x 4 = {height * width * 4}")
    word = bits.read(5) + 1
    if word > 8:
        raise MaskFormatError(f"rle words of {word} bits: a brush mask's values are bytes (8 bits at most)")
    return n, word, [bits.read(4) + 1 for _ in range(4)]


def check_rle(data: bytes, height: int, width: int) -> None:
    """The header alone: the value count matches height x width x 4, words of at most 8 bits."""
    _header(_Bits(data), height, width)


def rle_to_mask(rle, height: int, width: int, out: np.ndarray | None = None) -> np.ndarray:
    """Label Studio brush RLE -> bool H x W: the pixels whose alpha is over ALPHA_THRESHOLD. With
    `out` (bool H x W, contiguous), the stroke's pixels are set in it (strokes of one object add
    up) and it is returned."""
    data = rle if isinstance(rle, bytes) else rle_bytes(rle)
    bits = _Bits(data)
    n, word, sizes = _header(bits, height, width)
    mask = np.zeros((height, width), bool) if out is None else out
    if mask.shape != (height, width) or mask.dtype != np.bool_ or not mask.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous bool array of {height}x{width}")
    flat = mask.reshape(-1)                 # a view: values 4p+3 are pixel p's alpha
    i = 0
    while i < n:
        series = bits.read(1)
        j = min(n, i + 1 + bits.read(sizes[bits.read(2)]))
        if series:
            if bits.read(word) > ALPHA_THRESHOLD:
                flat[i // 4:j // 4] = True  # the alpha values among i..j-1 are pixels i//4..j//4-1
        else:
            for k in range(i, j):
                if bits.read(word) > ALPHA_THRESHOLD and k % 4 == 3:
                    flat[k // 4] = True
        i = j
    return mask


def decode_ls_brush(result: Mapping[str, Any]) -> np.ndarray:
    """A Label Studio brush result (export ``value.rle`` or backend ``rle``, with
    ``original_height`` and ``original_width``) -> H x W bool (rle_to_mask)."""
    value = result.get("value") or {}
    rle = value.get("rle", result.get("rle"))
    return rle_to_mask(rle, int(result["original_height"]), int(result["original_width"]))
