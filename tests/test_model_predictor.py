"""Predictor, IAM focus view, checkpoints and odd images."""
import io
import pickle
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from model import focus
from model.checkpoint import CheckpointError, load_checkpoint, read_info, save_checkpoint
from model.config import ModelConfig
from model.images import ImageError, load_image
from model.network import InteractiveSegNet
from model.predictor import Predictor


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    net = InteractiveSegNet(ModelConfig(input_size=128))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(path, net.state_dict(), net.config, {"version": "tiny-1"})
    return path


@pytest.fixture(scope="module")
def predictor(tiny_ckpt):
    return Predictor.load(tiny_ckpt, device="cpu", coarse_size=128)


# -- IAM focus view --------------------------------------------------------------------------
def test_changed_region_is_the_flood_fill_from_the_click():
    prev = np.zeros((50, 50), bool)
    new = prev.copy()
    new[5:15, 5:15] = True      # a change under the click
    new[30:40, 30:40] = True    # an unrelated change elsewhere
    region = focus.changed_region(prev, new, 10, 10)
    assert region.sum() == 100 and region[10, 10] and not region[35, 35]
    assert not focus.changed_region(prev, new, 25, 25).any()  # click on an unchanged pixel


def test_focus_radius_rules():
    prev = np.zeros((60, 60), bool)
    region = np.zeros_like(prev)
    region[20:31, 25:28] = True
    assert focus.focus_radius(prev, region, 25, 26) == 5.0              # extent 5 rows away
    region[20:51, 25:28] = True
    assert focus.focus_radius(prev, region, 25, 26) == 25.0             # Chebyshev extent
    prev[10:50, 10:50] = True
    empty = np.zeros_like(prev)
    assert focus.focus_radius(prev, empty, 30, 20) == 11.0  # to the nearest background pixel (col 9)
    assert focus.focus_radius(prev, empty, 30, 12) == 5.0               # never below the minimum
    assert focus.focus_radius(np.zeros_like(prev), empty, 30, 30) == 5.0


def test_distance_to_other_label_equals_the_euclidean_distance_transform():
    """The windowed search answers what scipy's whole-image transform answers at the click, for
    blobs of every size (the answer inside, at or beyond the first window), thin shapes, masks
    touching the border and clicks on either label."""
    from scipy import ndimage
    rng = np.random.default_rng(7)
    checked = 0
    for case in range(60):
        h, w = (int(v) for v in rng.integers(20, 400, 2))
        mask = np.zeros((h, w), bool)
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = rng.integers(0, h), rng.integers(0, w)
            ry, rx = rng.integers(1, max(2, h // 2)), rng.integers(1, max(2, w // 2))
            yy, xx = np.ogrid[:h, :w]
            mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        if case % 5 == 0:
            mask = ~mask                        # mostly foreground, holes
        if not mask.any() or mask.all():
            continue
        for _ in range(5):
            y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
            ref = ndimage.distance_transform_edt(mask if mask[y, x] else ~mask)[y, x]
            assert focus.distance_to_other_label(mask, y, x) == ref, (case, y, x)
            checked += 1
    assert checked > 200
    assert focus.distance_to_other_label(np.ones((5, 5), bool), 2, 2) == float("inf")


def test_focus_box_is_square_centred_and_inside():
    assert focus.focus_box(50, 50, 10, 200, 200) == (40, 40, 61, 61)
    y0, x0, y1, x1 = focus.focus_box(2, 198, 10, 200, 200)
    assert (y0, x1) == (0, 200) and y1 - y0 == 21 and x1 - x0 == 21
    assert focus.focus_box(5, 5, 500, 40, 80) == (0, 0, 40, 80)


def test_paste_back_with_intention_rule():
    prob = np.full((20, 20), 0.8, np.float32)
    prob[:, 10:] = 0.1
    crop = np.full((10, 10), 0.3, np.float32)
    box = (5, 5, 15, 15)
    region = np.zeros((20, 20), bool)
    region[5:10, 5:10] = True
    out = focus.paste(prob, crop, box, positive=True, region=region, intention=True)
    assert out[6, 6] == pytest.approx(0.3)    # inside the changed region: free
    assert out[12, 6] == pytest.approx(0.8)   # positive click may not erase foreground
    assert out[12, 12] == pytest.approx(0.3)  # ... but may add it
    assert out[0, 0] == pytest.approx(0.8) and np.array_equal(prob[:5], out[:5])  # outside the box untouched
    free = focus.paste(prob, crop, box, positive=True, region=None, intention=False)
    assert np.all(free[5:15, 5:15] == pytest.approx(0.3))


def test_object_view_frames_the_mask_and_the_positive_clicks():
    mask = np.zeros((400, 600), bool)
    mask[100:150, 200:300] = True                      # 50 x 100 object
    # 100 px wide grown 1.4x -> 140; 50 px tall -> 70, raised to the 120-px minimum
    assert focus.object_view(mask, [], expand=1.4, min_side=120) == (64, 180, 185, 321)
    # a positive click outside the mask widens the frame to include it
    y0, x0, y1, x1 = focus.object_view(mask, [(125, 400)], expand=1.0, min_side=10)
    assert (y0, x1) == (100, 401) and x0 <= 200
    # clipped at the border; nothing known -> None; a frame covering most of the image -> None
    edge = np.zeros((400, 600), bool)
    edge[100:150, 550:600] = True
    assert focus.object_view(edge, [], expand=3.0, min_side=10) == (50, 500, 201, 600)
    assert focus.object_view(np.zeros((40, 40), bool), []) is None
    big = np.zeros((100, 100), bool)
    big[5:95, 5:95] = True
    assert focus.object_view(big, [], expand=1.0, min_side=10) is None


def test_zoom_in_predicts_the_object_view_and_keeps_the_rest(predictor):
    image = np.random.default_rng(3).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    zoomed = predictor.with_options(zoom_in=True, zoom_min_side=60, refine=False)
    seen = []
    real_encode = zoomed.encode

    def spy(t):
        seen.append(tuple(t.shape[-2:]))
        return real_encode(t)

    zoomed.encode = spy                              # instance attribute: this predictor only
    s = zoomed.open(image)
    first = s.add_click(200, 150, True)
    assert seen == [s.coarse_hw]                     # click 1: the whole image
    second = s.add_click(210, 160, True)
    assert len(seen) == 2 and seen[1] != s.coarse_hw  # click 2: a crop around the object
    view = focus.object_view(first > 0.5, [(150, 200), (160, 210)], 1.4, 60)
    if view is not None:                             # outside the view the first answer stays
        y0, x0, y1, x1 = view
        outside = np.ones(first.shape, bool)
        outside[y0:y1, x0:x1] = False
        assert np.array_equal(first[outside], second[outside])
    # a box frames the object from the start: the box's own prediction is already zoomed in
    seen.clear()
    boxed = zoomed.open(image)
    boxed.set_box(180, 120, 210, 200)                # a tall box: its view is taller than wide
    assert len(seen) == 1 and seen[0] != boxed.coarse_hw


# -- checkpoints -----------------------------------------------------------------------------
def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(1)
    net = InteractiveSegNet(ModelConfig(backbone="resnet50", spm_mode="split"))
    info = {"version": "rt-1", "metrics": {"GrabCut": {"noc90": 1.5}}, "training": {"data": ["BSDS500"]}}
    path = save_checkpoint(tmp_path / "a.safetensors", net.state_dict(), net.config, info)
    state, config, got = load_checkpoint(path)
    assert config == net.config
    assert got["metrics"] == info["metrics"] and got["version"] == "rt-1"
    ref = net.state_dict()
    assert set(state) == set(ref)
    for k, v in ref.items():
        assert torch.equal(state[k], v), k
    assert not list(tmp_path.glob(".*tmp"))  # the temp file was renamed, not left behind


def test_half_checkpoint_is_close(tmp_path):
    net = InteractiveSegNet(ModelConfig())
    path = save_checkpoint(tmp_path / "h.safetensors", net.state_dict(), net.config, {}, half=True)
    state, _, _ = load_checkpoint(path)
    w = net.state_dict()["head.weight"]
    assert state["head.weight"].dtype == torch.float32
    assert torch.allclose(state["head.weight"], w, atol=1e-3)


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickle_payload_is_refused_and_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = tmp_path / "evil.safetensors"
    raw.write_bytes(pickle.dumps({"w": _Evil()}))
    with pytest.raises(CheckpointError, match="pickle"):
        read_info(raw)
    zipped = tmp_path / "evil2.safetensors"
    torch.save({"w": torch.zeros(1)}, zipped)
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(zipped)
    with pytest.raises(CheckpointError):
        Predictor.load(str(zipped))
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.e2e  # slow (3.1 s of CPU): the unit tier stays within a minute (issue 24)
def test_checkpoint_whose_header_length_starts_with_the_pickle_byte_loads(tmp_path, tiny_ckpt):
    """A safetensors header length is a little-endian u64: its first byte is 0x80 for one file in
    256, the byte a pickle starts with. Such a file is a good checkpoint and must load (a CI run
    once failed on exactly this)."""
    state, config, _ = load_checkpoint(tiny_ckpt)
    for pad in range(256):
        path = save_checkpoint(tmp_path / "x.safetensors", state, config, {"version": "v", "note": "p" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("no padding gave a header length with low byte 0x80")
    assert read_info(path)["note"] == "p" * pad
    assert load_checkpoint(path)[0].keys() == state.keys()


def test_truncated_checkpoint_is_a_clear_error(tmp_path, tiny_ckpt):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(tiny_ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError):
        load_checkpoint(bad)


# -- predictor -------------------------------------------------------------------------------
def test_session_clicks_undo_reset(predictor):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (90, 140, 3), dtype=np.uint8)
    s = predictor.open(image)
    p1 = s.add_click(70, 40, True)
    assert p1.shape == (90, 140) and p1.dtype == np.float32 and 0 <= p1.min() <= p1.max() <= 1
    p2 = s.add_click(10, 10, False)
    assert len(s.clicks) == 2 and s.last_timing["coarse_ms"] > 0
    back = s.undo()
    assert len(s.clicks) == 1
    assert np.allclose(back, p1, atol=1e-3)   # undo restores the previous map (fp16 history)
    s.reset()
    assert s.clicks == [] and s.undo() is None
    assert np.array_equal(s.add_click(70, 40, True), p1)  # deterministic from a clean state
    del p2


def test_click_outside_the_image_is_a_value_error(predictor):
    s = predictor.open(np.zeros((30, 40, 3), np.uint8))
    for x, y in [(-1, 5), (41, 5), (5, 31), (float("nan"), 1)]:
        with pytest.raises(ValueError, match="outside"):
            s.add_click(x, y, True)
    assert s.clicks == []


def test_stages_switchable(predictor):
    image = np.random.default_rng(1).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    coarse_only = predictor.with_options(refine=False).open(image)
    coarse_only.add_click(40, 30, True)
    assert coarse_only.last_timing["refine_passes"] == 0
    refine_only = predictor.with_options(coarse=False).open(image)
    refine_only.add_click(40, 30, True)
    assert refine_only.last_timing["coarse_ms"] < 1 and refine_only.last_timing["refine_passes"] >= 1
    with pytest.raises(ValueError):
        predictor.with_options(coarse=False, refine=False)


def test_prior_mask_is_the_starting_state(predictor):
    image = np.zeros((50, 60, 3), np.uint8)
    prior = np.zeros((50, 60), bool)
    prior[10:30, 10:30] = True
    s = predictor.open(image, prior_mask=prior)
    assert np.array_equal(s.mask(), prior)
    with pytest.raises(ValueError, match="prior mask"):
        predictor.open(image, prior_mask=np.zeros((10, 10), bool))


@pytest.mark.e2e  # slow (1.2 s of CPU): the unit tier stays within a minute (issue 24)
def test_huge_image_works_at_bounded_resolution(predictor):
    image = np.zeros((6000, 8000, 3), np.uint8)
    image[2000:4000, 3000:5000] = 200
    s = predictor.open(image)
    assert max(s.wh, s.ww) == predictor.options.max_work_side
    prob = s.add_click(4000, 3000, True)
    assert prob.shape == (6000, 8000)
    assert s.add_click(7999.5, 5999.5, False).shape == (6000, 8000)


def test_concurrent_sessions_match_sequential(predictor):
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 255, (80, 80, 3), dtype=np.uint8) for _ in range(4)]
    expected = [predictor.open(im).add_click(40, 40, True) for im in images]
    got = [None] * 4

    def work(i):
        got[i] = predictor.open(images[i]).add_click(40, 40, True)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e, g in zip(expected, got):
        assert np.allclose(e, g, atol=1e-5)


# -- odd images --------------------------------------------------------------------------------
def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_sixteen_bit_png():
    a = (np.arange(40 * 30).reshape(30, 40) * 50).astype(np.uint16)
    rgb = load_image(_encode(Image.fromarray(a), "PNG"))
    assert rgb.shape == (30, 40, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 0] == 0 and rgb.max() > 200  # full 16-bit range mapped, not clipped


def test_rgba_grey_and_palette():
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 10
    assert load_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))[0, 0].tolist() == [200, 0, 0]
    grey = load_image(_encode(Image.fromarray(np.full((10, 12), 77, np.uint8)), "PNG"))
    assert grey.shape == (10, 12, 3) and (grey == 77).all()
    pal = Image.fromarray(np.full((10, 12), 3, np.uint8)).convert("P")
    assert load_image(_encode(pal, "PNG")).shape == (10, 12, 3)


def test_exif_orientation_is_applied():
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :10] = 255  # white band on the left of the stored pixels
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rgb = load_image(_encode(img, "JPEG", exif=exif, quality=95))
    assert rgb.shape == (40, 20, 3)          # displayed portrait
    assert rgb[:10].mean() > 200 and rgb[-10:].mean() < 50  # band now on top


def test_corrupt_image_is_an_image_error():
    with pytest.raises(ImageError):
        load_image(b"\x89PNG\r\n\x1a\nnot really")


def test_predictor_on_odd_images(predictor):
    a16 = (np.random.default_rng(3).integers(0, 65535, (50, 70))).astype(np.uint16)
    for src in (_encode(Image.fromarray(a16), "PNG"),
                _encode(Image.fromarray(np.zeros((50, 70, 4), np.uint8), "RGBA"), "PNG")):
        s = predictor.open(load_image(src))
        assert s.add_click(35, 25, True).shape == (50, 70)


@pytest.mark.e2e  # slow (1.5 s of CPU): the unit tier stays within a minute (issue 24)
def test_box_prompt_session(tmp_path):
    """A box-capable model: set_box gives a mask before any click, clicks keep the box, undo removes
    the clicks then the box; models without box input refuse it clearly."""
    import numpy as np
    import pytest
    import torch
    from model.checkpoint import save_checkpoint
    from model.config import ModelConfig
    from model.network import InteractiveSegNet
    from model.predictor import Predictor

    torch.manual_seed(0)
    cfg = ModelConfig(fusion="late", box_input=True, input_size=128, aspp_channels=32, decoder_channels=32)
    path = save_checkpoint(tmp_path / "box.safetensors", InteractiveSegNet(cfg).state_dict(), cfg, {"version": "box"})
    image = np.random.default_rng(0).integers(0, 255, (120, 200, 3), dtype=np.uint8)
    session = Predictor.load(path).open(image)
    first = session.set_box(20, 10, 90, 70)
    assert first.shape == (120, 200) and np.isfinite(first).all()
    with pytest.raises(ValueError, match="before any click"):
        session.set_box(0, 0, 10, 10)
    session.add_click(50, 40, True)
    assert session.box is not None
    assert np.array_equal(session.undo(), first.astype(np.float16).astype(np.float32))
    assert session.undo() is not None and session.box is None and not session.mask().any()
    with pytest.raises(ValueError, match="covers no pixel"):
        session.set_box(250, 10, 300, 20)
    plain = Predictor.load(save_checkpoint(tmp_path / "plain.safetensors", InteractiveSegNet(
        ModelConfig(fusion="late", input_size=128, aspp_channels=32, decoder_channels=32)).state_dict(),
        ModelConfig(fusion="late", input_size=128, aspp_channels=32, decoder_channels=32), {"version": "plain"}))
    # A click-only model: the box becomes a GrabCut seed, refined with an implicit click at its
    # deepest point; undo removes the box and that click, and a state round trip keeps them.
    s2 = plain.open(image)
    seeded = s2.set_box(20, 10, 90, 70)
    assert seeded.shape == (120, 200) and s2.box is not None and len(s2.seed) == 1 and not s2.clicks
    assert 20 <= s2.seed[0].x < 90 and 10 <= s2.seed[0].y < 70 and "seed_ms" in s2.last_timing
    after = s2.add_click(50, 40, True)
    s3 = plain.open(image)
    s3.set_box(20, 10, 90, 70)
    moved = s3.state()
    s4 = plain.open(image)
    s4.restore(moved)
    assert s4.seed == s3.seed and np.array_equal(s4.add_click(50, 40, True) > 0.5, after > 0.5)
    s2.undo()
    assert s2.undo() is not None and s2.box is None and not s2.seed and not s2.mask().any()


def test_add_clicks_is_one_prediction_and_one_undo_step(tiny_checkpoint):
    import numpy as np
    from model.predictor import Predictor

    image = np.random.default_rng(1).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    predictor = Predictor.load(tiny_checkpoint)
    session = predictor.open(image)
    first = session.add_click(30, 40, True)
    stroke = session.add_clicks([(50, 40, True), (60, 42, True), (70, 45, True)])
    assert len(session.clicks) == 4 and stroke.shape == (90, 120)
    assert np.allclose(session.undo(), first, atol=1e-3)     # the whole stroke goes at once
    assert len(session.clicks) == 1
    with pytest.raises(ValueError, match="outside"):
        session.add_clicks([(10, 10, True), (500, 10, True)])
    assert len(session.clicks) == 1                          # a bad click adds none of them


def test_grabcut_seed_finds_a_distinct_object_in_its_box_and_repeats_itself():
    from model.box_seed import deepest_point, grabcut_seed

    rng = np.random.default_rng(0)
    image = (rng.normal(60, 20, (300, 500, 3))).clip(0, 255).astype(np.uint8)   # noisy dark background
    yy, xx = np.mgrid[:300, :500]
    obj = (yy - 150) ** 2 / 80 ** 2 + (xx - 230) ** 2 / 120 ** 2 < 1            # a bright ellipse
    image[obj] = (rng.normal(200, 20, (int(obj.sum()), 3))).clip(0, 255).astype(np.uint8)
    box = (60.0, 100.0, 240.0, 360.0)                                            # (y0, x0, y1, x1), loose
    seed = grabcut_seed(image, box)
    assert np.count_nonzero(seed & obj) / np.count_nonzero(seed | obj) > 0.9
    assert np.array_equal(seed, grabcut_seed(image, box))                        # deterministic
    y, x = deepest_point(seed)
    assert abs(y - 150) < 15 and abs(x - 230) < 15
    # No background outside the box to learn from: the box itself is the seed.
    assert grabcut_seed(image, (0.0, 0.0, 300.0, 500.0)).all()


@pytest.mark.e2e  # slow (1.2 s of CPU): the unit tier stays within a minute (issue 24)
def test_grabcut_seed_of_a_small_box_in_a_big_image_keeps_its_detail():
    from model.box_seed import grabcut_seed

    rng = np.random.default_rng(1)
    image = (rng.normal(60, 20, (2400, 3200, 3))).clip(0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:2400, :3200]
    obj = (yy - 1200) ** 2 / 20 ** 2 + (xx - 1600) ** 2 / 30 ** 2 < 1          # 40 x 60 px in 7.7 MP
    image[obj] = (rng.normal(200, 20, (int(obj.sum()), 3))).clip(0, 255).astype(np.uint8)
    seed = grabcut_seed(image, (1175.0, 1565.0, 1225.0, 1635.0))
    # GrabCut runs on the box's surroundings, not on the whole image shrunk to 400 px (where the
    # object would be 5 x 7 px)
    assert np.count_nonzero(seed & obj) / np.count_nonzero(seed | obj) > 0.85
