"""Brush strokes: what an RLE in a /predict body can cost (issue 22, items 1 and 9), and the RLE
codec that replaced label-studio-sdk's on requests (checked against it here).

The attacks as they were sent: many brush regions of a big declared size, an RLE whose header
asks for words wider than a byte, an RLE with a long tail. The real app with a small real model;
the memory is this process's peak RSS while the request runs (conftest.peak_growth_mb).
"""
from __future__ import annotations

import time

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, mask2rle

from backend.app import create_app
from backend.bench import predict_body
from backend.config import Config
from backend.labelstudio.masks import MaskFormatError, mask_to_rle, rle_to_mask
from backend.membench import brush, data_uri, disk_rle, photo, rle_runs

from .conftest import peak_growth_mb

pytestmark = pytest.mark.usefixtures("one_torch_thread")

W, H = 128, 96
URI = data_uri(photo(W, H, 1), "image/jpeg")


def client(predictor, **env):
    return create_app(Config.from_env({k.upper(): str(v) for k, v in env.items()}), predictor).test_client()


def timed(c, regions):
    """(response, seconds, peak RSS growth MB) of one /predict on the 128x96 image."""
    def send():
        t0 = time.monotonic()
        r = c.post("/predict", json=predict_body(1, URI, regions))
        return r, time.monotonic() - t0
    (r, took), grew = peak_growth_mb(send)
    return r, took, grew


# -- 1: brush regions add up -------------------------------------------------------------------------
def test_sixteen_big_brush_regions_cost_nothing_before_the_answer(tiny_predictor):
    """The attack: 16 brush regions, 16 labels the config does not have, each declaring 7000x7000
    (under MAX_IMAGE_PIXELS) with an empty RLE of ~10 KB. It cost 3.4 s and +934 MB before the 400."""
    c = client(tiny_predictor)
    empty = rle_runs(7000 * 7000, [])
    assert len(empty) < 11_000
    regions = [brush(7000, 7000, empty, f"L{i}") for i in range(16)]
    r, took, grew = timed(c, regions)
    assert r.status_code in (400, 413), r.get_json()
    assert grew < 60 and took < 1.0, f"+{grew:.0f} MB, {took:.1f} s before the {r.status_code}"


def test_total_declared_brush_pixels_are_bounded(tiny_predictor):
    """The same regions with a label the config has: refused for their total (MAX_BRUSH_PIXELS)
    before any of them is decoded."""
    c = client(tiny_predictor)
    regions = [brush(7000, 7000, rle_runs(7000 * 7000, [])) for _ in range(16)]
    r, took, grew = timed(c, regions)
    assert r.status_code == 413 and "MAX_BRUSH_PIXELS" in r.get_json()["error"], r.get_json()
    assert grew < 60 and took < 1.0, f"+{grew:.0f} MB, {took:.1f} s before the 413"
    # Within the bound, several strokes of a label still make one mask.
    small = client(tiny_predictor, max_brush_pixels=3 * W * H)
    strokes = [brush(W, H, disk_rle(W, H, 40, 48, 12)), brush(W, H, disk_rle(W, H, 88, 48, 12))]
    assert small.post("/predict", json=predict_body(1, URI, strokes)).status_code == 200
    r = small.post("/predict", json=predict_body(1, URI, strokes * 2))
    assert r.status_code == 413 and "MAX_BRUSH_PIXELS" in r.get_json()["error"], r.get_json()


def test_a_long_rle_tail_costs_nothing(tiny_predictor):
    """A stroke whose RLE goes on for 1 MB after its last value: the SDK's decoder turned every bit
    of it into a Python string first (+590 MB, 8 s). Only the values the mask needs are read."""
    c = client(tiny_predictor)
    r, took, grew = timed(c, [brush(W, H, disk_rle(W, H, 64, 48, 20) + [170] * 2**20)])
    assert r.status_code == 200, r.get_json()
    # Sending and parsing a JSON list of a million numbers costs ~60 MB by itself (client and server).
    assert grew < 150 and took < 3.0, f"+{grew:.0f} MB, {took:.1f} s"


# -- 9: RLE word sizes ----------------------------------------------------------------------------------
def _wide_rle(num_pixels: int, word_bits: int) -> list[int]:
    """An RLE whose header says `word_bits`-bit words: one series of all-ones words."""
    bits = f"{num_pixels * 4:032b}{word_bits - 1:05b}" + "".join(f"{s - 1:04b}" for s in (3, 4, 8, 16))
    left = num_pixels * 4
    while left:
        n = min(left, 65536)
        bits += f"111{n - 1:016b}" + "1" * word_bits
        left -= n
    bits += "0" * (-len(bits) % 8)
    return [int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)]


@pytest.mark.parametrize("word_bits", [9, 16, 32])
def test_rle_words_over_8_bits_are_400(tiny_predictor, word_bits):
    c = client(tiny_predictor)
    r = c.post("/predict", json=predict_body(1, URI, [brush(W, H, _wide_rle(W * H, word_bits))]))
    assert r.status_code == 400, (r.status_code, r.get_data(as_text=True)[:300])
    assert "bits" in r.get_json()["error"]


# -- the decoder reads what Label Studio's encoder writes ---------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_rle_decoding_matches_label_studio_sdk(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 60, 2)
    mask = rng.random((h, w)) < [0.02, 0.5, 0.98, 0.3][seed]       # noise: runs of every length
    mask[: h // 2, : w // 2] = seed % 2 == 0                        # and one long run
    rle = mask2rle(np.where(mask, 255, 0).astype(np.uint8))
    reference = decode_rle(bytes(rle)).reshape(h, w, 4)[:, :, 3] > 0
    assert np.array_equal(rle_to_mask(rle, h, w), reference)
    assert np.array_equal(reference, mask)
    assert mask_to_rle(mask) == rle                 # and the encoder writes the SDK's bytes


def test_rle_encoding_of_long_runs_matches_label_studio_sdk():
    """Series of more than 65536 values (a 49 MP answer is made of them), and an all-set mask."""
    mask = np.zeros((300, 700), bool)
    mask[10:290, 5:690] = True
    for m in (mask, np.ones((300, 700), bool), ~mask):
        assert mask_to_rle(m) == mask2rle(np.where(m, 255, 0).astype(np.uint8))


def test_rle_decoding_refuses_what_it_cannot_read():
    good = disk_rle(W, H, 64, 48, 20)
    for bad, why in [(good[:5], "short"), (good[:40], "ends"), ([0, 0, 0, 9] + good[4:], "values"),
                     (_wide_rle(W * H, 12), "bits"), ([256] + good[1:], "0..255")]:
        with pytest.raises(MaskFormatError, match=why):
            rle_to_mask(bad, H, W)
    y, x = np.ogrid[:H, :W]
    assert np.array_equal(rle_to_mask(good, H, W), (x - 64) ** 2 + (y - 48) ** 2 <= 20 * 20)
