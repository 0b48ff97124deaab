"""Unit tests of the ML backend's parts: config, label config, payload parsing, RLE, polygons,
brush strokes, caches, webhooks, token handling. No model is loaded here."""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, encode_rle

from backend.config import Config
from backend.engine import ByteCache, Frame, Segmenter, brush_clicks, common_prefix
from backend.labelstudio.fetch import FetchError, ImageFetcher, LabelStudioAuth, SetupInfo, _jwt_payload, origin
from backend.labelstudio.labelconfig import LabelConfigError, parse_label_config
from backend.labelstudio.masks import mask_to_polygons, mask_to_rle, polygon_to_mask, rle_to_mask
from backend.payload import Click, PayloadError, decode_brushes, parse_predict, parse_prompts, scale_prompt
from backend.webhook import WebhookError, WebhookHandler, parse_event
from model.settings import SettingError, help_text

FIX = Path(__file__).parent / "fixtures" / "labelstudio"


def capture(name: str) -> dict:
    return json.loads((FIX / name).read_text())["body"]


def ls_response(name: str) -> tuple[dict, int]:
    """ls_*.json: Label Studio's JSON answer, then its HTTP status on the next line."""
    lines = (FIX / name).read_text().splitlines()
    return json.loads(lines[0]), int(lines[1])


# -- config ---------------------------------------------------------------------------------------
def test_config_defaults_and_parsing(caplog):
    cfg = Config.from_env({})
    assert cfg.checkpoint == "default" and cfg.session_cache_mb == 2048 and cfg.output_format == "auto"
    assert cfg.admin_token == "" and cfg.max_clicks == 100
    cfg = Config.from_env({"SESSION_CACHE_MB": "3", "OUTPUT_FORMAT": "Polygon",
                           "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": "/srv/data"})
    assert cfg.session_cache_mb == 3 and cfg.output_format == "polygon"
    assert cfg.local_files_root == "/srv/data"
    Config.from_env({"SESSION_CACHE_SIZE": "16"})       # the count setting of earlier versions
    assert "SESSION_CACHE_SIZE is no longer read" in caplog.text


@pytest.mark.parametrize("env, needle", [
    ({"SESSION_CACHE_MB": "zero"}, "SESSION_CACHE_MB"),
    ({"SESSION_CACHE_MB": "0"}, "SESSION_CACHE_MB"),
    ({"LABEL_STUDIO_URL": "http://u:p@ls:8080"}, "LABEL_STUDIO_URL"),
    ({"LABEL_STUDIO_URL": "http://ls:1:2"}, "LABEL_STUDIO_URL"),
    ({"ADMIN_TOKEN": "short"}, "ADMIN_TOKEN"),
    ({"MAX_CLICKS": "0"}, "MAX_CLICKS"),
    ({"OUTPUT_FORMAT": "mesh"}, "OUTPUT_FORMAT"),
    ({"BASIC_AUTH_USER": "u"}, "BASIC_AUTH_PASS"),
    ({"LABEL_STUDIO_URL": "localhost:8080"}, "LABEL_STUDIO_URL"),
    ({"MASK_THRESHOLD": "1.5"}, "MASK_THRESHOLD"),
    ({"TRAINING_ENQUEUE": "backend.jobs"}, "TRAINING_ENQUEUE"),
])
def test_config_rejects_bad_values(env, needle):
    with pytest.raises(SettingError, match=needle):
        Config.from_env(env)


def test_help_lists_every_variable():
    text = help_text()
    for var in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "MAX_CONTENT_LENGTH", "MAX_IMAGE_PIXELS",
                "BASIC_AUTH_USER", "TRAINING_ENQUEUE", "SESSION_CACHE_MB", "IMAGE_CACHE_MB", "CACHE_TTL",
                "ADMIN_TOKEN", "MAX_CLICKS", "PREDICT_TIMEOUT", "REDIS_TIMEOUT", "FETCH_TIMEOUT"):
        assert f"`{var}`" in text


# -- label config ---------------------------------------------------------------------------------
def test_label_config_from_capture():
    lc = parse_label_config(capture("007_POST_setup.json")["schema"])
    assert lc.images == {"image": "image"}
    ctrl, label = lc.output_for("Object", "image")
    assert (ctrl.name, ctrl.tag, label) == ("tag", "BrushLabels", "Object")
    assert ctrl.to_name == ("image",)
    smart = {c.name for c in lc.controls if c.smart}
    assert smart == {"kp", "rect"}
    with pytest.raises(LabelConfigError, match='add <Label value="Dog"/>'):
        lc.output_for("Dog", "image")
    with pytest.raises(LabelConfigError, match="no <Image"):
        lc.image_key("other")
    with pytest.raises(LabelConfigError):
        lc.output_for("Object", "image", "polygon")


def test_label_config_polygon_and_multi_label():
    lc = parse_label_config("""<View><Image name="img" value="$url"/>
      <PolygonLabels name="poly" toName="img"><Label value="Cat"/><Label value="Dog"/></PolygonLabels>
      <BrushLabels name="brush" toName="img"><Label value="Dog"/></BrushLabels>
      <KeyPointLabels name="kp" toName="img" smart="true"><Label value="Cat"/><Label value="Dog"/></KeyPointLabels>
    </View>""")
    assert lc.image_key("img") == "url"
    assert lc.output_for("Dog", "img")[0].name == "brush"           # auto: brush first
    assert lc.output_for("Cat", "img")[0].name == "poly"            # only a polygon label exists
    assert lc.output_for("Dog", "img", "polygon")[0].name == "poly"
    with pytest.raises(LabelConfigError, match="without a label"):
        lc.output_for(None, "img", "polygon")                        # two polygon labels: ambiguous
    assert lc.output_for(None, "img", "brush") == (lc.output_for("Dog", "img")[0], "Dog")


def test_negative_keypoint_controls_make_negative_clicks():
    """docs/label-configs/one-object.xml: a second smart KeyPoint, negative="true", is the remove
    tool; its keypoints are negative whatever is_positive says, the other tool's follow is_positive."""
    xml = (Path(__file__).resolve().parents[1] / "docs" / "label-configs" / "one-object.xml").read_text()
    lc = parse_label_config(xml)
    assert lc.negative_controls == {"remove"}
    kp = [dict(_region("keypoint", {"x": x, "y": 50}, None, from_name=name), **extra)
          for x, name, extra in ((10, "click", {}), (20, "remove", {}), (30, "click", {"is_positive": False}),
                                 (40, "remove", {"is_positive": False}))]
    (p,) = parse_prompts(kp, negative_controls=lc.negative_controls)
    assert [c.positive for c in p.clicks] == [True, False, False, False]
    assert [c.positive for c in parse_prompts(kp)[0].clicks] == [True, True, False, False]
    kp[0]["from_name"] = ["click"]                 # not a name: not a negative control, no crash
    assert parse_prompts(kp, negative_controls=lc.negative_controls)[0].clicks[0].positive
    # only keypoint controls can be negative
    lc = parse_label_config('<View><Image name="i" value="$i"/><Rectangle name="r" toName="i" negative="true"/>'
                            '<KeyPointLabels name="k" toName="i" negative="TRUE"><Label value="A"/></KeyPointLabels>'
                            '<BrushLabels name="b" toName="i"><Label value="A"/></BrushLabels></View>')
    assert lc.negative_controls == {"k"}


def test_mask_alpha_is_the_rle_value_and_decodes_the_same():
    from training.brush import decode_ls_brush        # fine-tuning's reading of an annotation

    m = np.zeros((30, 40), bool)
    m[5:20, 3:33] = True
    for value in (1, 127, 128, 255):
        rle = mask_to_rle(m, value)
        rgba = np.asarray(decode_rle(rle)).reshape(30, 40, 4)          # label-studio-sdk's reading
        assert set(np.unique(rgba[..., 3]).tolist()) == {0, value}
        # One rule, /predict and fine-tuning alike: a pixel is in the mask when its alpha is > 127.
        want = m if value > 127 else np.zeros_like(m)
        assert np.array_equal(rle_to_mask(rle, 30, 40), want)
        result = {"value": {"rle": rle}, "original_height": 30, "original_width": 40}
        assert np.array_equal(decode_ls_brush(result), want)
    assert mask_to_rle(m) == mask_to_rle(m, 255)
    with pytest.raises(SettingError, match="MASK_ALPHA"):
        Config.from_env({"MASK_ALPHA": "127"})        # readers threshold the alpha at > 127
    assert Config.from_env({"MASK_ALPHA": "255"}).mask_alpha == 255


@pytest.mark.parametrize("xml", ["", "<View><Image", "<View><Text name='t' value='$t'/></View>"])
def test_label_config_errors(xml):
    with pytest.raises(LabelConfigError):
        parse_label_config(xml)


# -- payload parsing -------------------------------------------------------------------------------
def test_parse_captured_interactive_predict():
    req = parse_predict(capture("012_POST_predict_interactive.json"))
    assert req.interactive and req.project == "1.1795584533"
    assert req.tasks[0]["data"]["image"] == "/data/upload/1/8edb2332-test.png"
    prompts = parse_prompts(req.context)
    assert len(prompts) == 1
    p = prompts[0]
    assert (p.label, p.to_name, p.size) == ("Object", "image", (48, 32))
    # 50% of 48 px is the border between pixels 23 and 24: centre coordinates put it at 23.5.
    assert p.clicks == [Click(23.5, 15.5, True), Click(26.5, 15.5, False)]
    assert p.box is None and p.brush is None


def test_keypoint_on_a_pixel_parses_to_exactly_that_pixel():
    """Percent -> pixel is a float round trip; its noise (59.99999999) once made a replayed click
    sequence differ from a fresh session. Whole pixels must come back whole."""
    for w, h in ((321, 481), (640, 427), (4000, 3000), (97, 13)):
        regions = [_region("keypoint", {"x": (x + 0.5) / w * 100, "y": (y + 0.5) / h * 100}, w=w, h=h)
                   for x, y in ((0, 0), (w - 1, h - 1), (w // 3, h // 7), (w // 2 + 1, h // 2 - 1))]
        got = [(c.x, c.y) for c in parse_prompts(regions)[0].clicks]
        assert got == [(0, 0), (w - 1, h - 1), (w // 3, h // 7), (w // 2 + 1, h // 2 - 1)]
        assert all(float(v).is_integer() for xy in got for v in xy)


def test_parse_captured_batch_predict():
    req = parse_predict(capture("015_POST_predict_batch.json"))
    assert not req.interactive and len(req.tasks) == 1


def _region(rtype, value, label="Object", w=200, h=100, **extra):
    value = dict(value)
    value[rtype if rtype.endswith("labels") else rtype + "labels"] = [label] if label else []
    return dict({"type": rtype, "value": value, "original_width": w, "original_height": h,
                 "image_rotation": 0, "from_name": "x", "to_name": "image"}, **extra)


def test_parse_rectangle_brush_and_grouping():
    stroke = np.zeros((100, 200), bool)
    stroke[40:60, 50:70] = True
    results = [
        _region("keypointlabels", {"x": 10, "y": 20}, "Cat", is_positive=False),
        _region("rectanglelabels", {"x": 25, "y": 10, "width": 50, "height": 40}, "Dog"),
        _region("brushlabels", {"format": "rle", "rle": mask_to_rle(stroke)}, "Cat"),
        _region("keypointlabels", {"x": 50, "y": 50}, "Cat"),
        {"type": "choices", "value": {"choices": ["a"]}, "to_name": "image", "from_name": "c"},
    ]
    prompts = {p.label: p for p in parse_prompts(results)}
    assert set(prompts) == {"Cat", "Dog"}
    cat = prompts["Cat"]
    assert cat.brush is None and len(cat.strokes) == 1           # decoded once the labels are checked
    decode_brushes(list(prompts.values()))
    assert cat.clicks == [Click(19.5, 19.5, False), Click(99.5, 49.5, True)]
    assert np.array_equal(cat.brush, stroke)
    assert prompts["Dog"].box == (50.0, 10.0, 150.0, 50.0)
    # A size off by rounding is mapped (pixel centres stay inside); another size is refused.
    near = scale_prompt(cat, 201, 100)
    assert near.clicks[1].x == pytest.approx(100.0) and near.clicks[1].y == 49.5
    assert near.brush.shape == (100, 201)
    with pytest.raises(PayloadError, match="drawn on a 200x100 image, but the task's image is 400x200"):
        scale_prompt(cat, 400, 200)


@pytest.mark.parametrize("mutate, needle", [
    (lambda b: b.pop("tasks"), "tasks"),
    (lambda b: b.update(label_config=""), "label_config"),
    (lambda b: b["params"].update(context=[1]), "context"),
    (lambda b: b["params"]["context"].update(result="x"), "result"),
    (lambda b: b["params"]["context"]["result"][0]["value"].update(x="50"), "number"),
    (lambda b: b["params"]["context"]["result"][0]["value"].update(x=150.0), "outside the image"),
    (lambda b: b["params"]["context"]["result"][0].update(original_width=0), "original_width"),
    (lambda b: b["params"]["context"]["result"][0].update(is_positive="yes"), "is_positive"),
    (lambda b: b["params"]["context"]["result"][0].update(image_rotation=90), "rotate"),
    (lambda b: b["params"]["context"]["result"][0]["value"].update(keypointlabels=["A", "B"]), "several labels"),
])
def test_bad_payloads_say_what_is_wrong(mutate, needle):
    body = copy.deepcopy(capture("012_POST_predict_interactive.json"))
    mutate(body)
    with pytest.raises(PayloadError, match=needle):
        parse_prompts(parse_predict(body).context)


def test_bad_brush_rle_is_a_payload_error():
    good = mask_to_rle(np.ones((100, 200), bool))
    for rle, needle in ((good[:3], "too short"), (mask_to_rle(np.ones((10, 10), bool)), "holds 400"),
                        (["a"], "integers"), (None, "non-empty list")):
        with pytest.raises(PayloadError, match=needle):
            parse_prompts([_region("brushlabels", {"format": "rle", "rle": rle})])


# -- RLE and polygons ------------------------------------------------------------------------------
def test_anti_aliased_brush_edges_read_the_same_in_predict_and_fine_tuning():
    """A stroke as the editor's canvas draws it: alpha 255 inside, a ramp 1..254 over its edge.
    The backend's /predict reading (rle_to_mask, through the payload) and fine-tuning's
    (decode_ls_brush, training/data/labelstudio.py and backend/labelstudio/pull.py) are one
    decoder: the pixels of alpha > 127, the half of the ramp nearer the stroke."""
    from training.brush import decode_ls_brush

    h, w = 40, 60
    y, x = np.mgrid[:h, :w]
    alpha = np.clip(255 * (12 - np.hypot(x - 30, y - 20)) / 6, 0, 255).astype(np.uint8)  # r 6 solid, to 12 faint
    assert len(np.unique(alpha)) > 20                      # a real ramp, both sides of 127
    rle = encode_rle(np.repeat(alpha.ravel(), 4))           # label-studio-sdk's encoder: RGBA = alpha
    want = alpha > 127
    assert np.array_equal(decode_rle(rle).reshape(h, w, 4)[..., 3] > 127, want)    # the SDK agrees
    assert np.array_equal(rle_to_mask(rle, h, w), want)
    result = {"type": "brushlabels", "value": {"format": "rle", "rle": list(rle), "brushlabels": ["Object"]},
              "original_height": h, "original_width": w}
    assert np.array_equal(decode_ls_brush(result), want)
    prompts = parse_prompts([{**result, "to_name": "image"}])    # /predict's reading of a smart brush stroke
    decode_brushes(prompts)
    assert np.array_equal(prompts[0].brush, want)
    assert want.sum() < (alpha > 0).sum()                   # the faint half of the edge is left out


def test_rle_round_trip_through_the_sdk():
    rng = np.random.default_rng(0)
    for h, w in ((1, 1), (32, 48), (97, 131)):
        m = rng.random((h, w)) > 0.6
        m[: h // 2, : w // 3] = True  # long runs too
        rle = mask_to_rle(m)
        assert all(isinstance(v, int) and 0 <= v <= 255 for v in rle)
        flat = decode_rle(rle)                   # the sdk's own decoder
        assert flat.shape == (h * w * 4,)
        rgba = flat.reshape(h, w, 4)
        assert np.array_equal(rgba[..., 3] == 255, m) and np.array_equal(rgba[..., 3] == 0, ~m)
        assert np.array_equal(rle_to_mask(rle, h, w), m)
    # and what the sdk's encoder makes, we decode
    m = rng.random((20, 30)) > 0.5
    assert np.array_equal(rle_to_mask(encode_rle(np.repeat(m.ravel().astype(np.uint8) * 255, 4)), 20, 30), m)


def test_rle_matches_label_studio_captures():
    """The annotation Label Studio stored and the answer it relayed decode and re-encode byte-exactly."""
    ann = capture("016_POST_webhook_ANNOTATION_CREATED.json")["annotation"]["result"][0]
    m = rle_to_mask(ann["value"]["rle"], ann["original_height"], ann["original_width"])
    assert m.sum() == 384 and mask_to_rle(m) == ann["value"]["rle"]
    data, status = ls_response("ls_interactive_annotating_response.json")
    item = data["data"]["result"][0]
    m = rle_to_mask(item["value"]["rle"], 32, 48)
    assert status == 200 and m.any() and mask_to_rle(m) == item["value"]["rle"]


def test_polygons_follow_the_mask():
    m = np.zeros((100, 200), bool)
    m[20:60, 30:90] = True               # a rectangle
    yy, xx = np.mgrid[:100, :200]
    m |= (yy - 50) ** 2 + (xx - 150) ** 2 < 25 ** 2   # a disk, separate component
    polys = mask_to_polygons(m, tolerance=1.0)
    assert len(polys) == 2
    back = np.zeros_like(m)
    for p in polys:
        assert all(0 <= x <= 100 and 0 <= y <= 100 for x, y in p)
        back |= polygon_to_mask(p, 100, 200)
    iou = (back & m).sum() / (back | m).sum()
    assert iou > 0.95
    rect = min(polys, key=len)
    assert len(rect) == 4                 # the rectangle simplifies to its 4 corners
    coarse = mask_to_polygons(m, tolerance=6.0)
    assert sum(map(len, coarse)) < sum(map(len, polys))


def test_label_aliases_name_the_object():
    """Label Studio stores a label's alias in results: tools with distinct button texts (value)
    and one alias write the same object."""
    lc = parse_label_config('<View><Image name="img" value="$image"/>'
                            '<KeyPointLabels name="kp" toName="img"><Label value="Cat: click" alias="Cat"/></KeyPointLabels>'
                            '<BrushLabels name="mask" toName="img"><Label value="Cat: paint" alias="Cat"/>'
                            '<Label value="Dog"/></BrushLabels></View>')
    assert lc.output_for("Cat", "img")[0].name == "mask" and lc.output_for("Dog", "img")[1] == "Dog"
    with pytest.raises(LabelConfigError):
        lc.output_for("Cat: paint", "img")


# -- brush strokes, caches, click sequences ---------------------------------------------------------
def test_brush_scribble_gives_spread_clicks_and_no_prior():
    s = np.zeros((200, 300), bool)
    s[95:105, 20:280] = True                      # a long thin scribble
    clicks, blob = brush_clicks(s)
    assert not blob and 3 <= len(clicks) <= 5
    assert all(s[int(c.y), int(c.x)] and 97 <= c.y <= 102 for c in clicks)
    xs = sorted(c.x for c in clicks)
    assert xs[0] < 80 and xs[-1] > 220           # spread along the stroke


def test_brush_blob_is_a_prior_with_one_central_click():
    s = np.zeros((200, 300), bool)
    yy, xx = np.mgrid[:200, :300]
    s[(yy - 100) ** 2 + (xx - 120) ** 2 < 40 ** 2] = True
    clicks, blob = brush_clicks(s)
    assert blob and len(clicks) == 1
    assert abs(clicks[0].x - 120) <= 1 and abs(clicks[0].y - 100) <= 1
    assert brush_clicks(np.zeros((5, 5), bool)) == ([], False)


def test_common_prefix():
    k1, k2, k3 = (Click(1, 2, True),), (Click(3, 4, False),), (Click(5, 6, True),)
    a = [k1, k2, k3]
    assert common_prefix(a, a) == 3
    assert common_prefix(a, a[:2]) == 2
    assert common_prefix(a, [k1, (Click(3, 4, True),)]) == 1      # sign changed
    assert common_prefix(a, [(Click(1.0004, 2, True),)]) == 1     # float noise is the same click
    assert common_prefix(a, [(Click(1.5, 2, True),)]) == 0
    stroke = (Click(1, 2, True), Click(7, 8, True))
    assert common_prefix([stroke, k2], [stroke, k3]) == 1         # a brush stroke is one step
    assert common_prefix([stroke], [stroke[:1]]) == 0             # ...compared as a whole


def test_byte_cache_lru_budget_and_expiry():
    now = [0.0]
    c = ByteCache(100, ttl=10, clock=lambda: now[0])
    c.put("a", 1, 40)
    c.put("b", 2, 40)
    assert c.get("a") == 1            # a is now the most recent
    c.put("c", 3, 40)                 # 120 bytes: evicts b, the least recently used
    assert c.get("b") is None and c.get("a") == 1 and c.get("c") == 3
    assert c.stats() == {"entries": 2, "bytes": 80, "max_bytes": 100}
    c.put("a", 1, 70)                 # a grew: c goes
    assert c.get("c") is None and c.stats()["bytes"] == 70
    assert c.put("big", 0, 101) is False and c.get("big") is None and c.get("a") == 1
    c.discard(lambda k: k == "a")
    assert len(c) == 0 and c.stats()["bytes"] == 0
    c.put("x", 1, 10)
    now[0] = 11
    assert c.get("x") is None and len(c) == 0
    c.put("y", 1, 10)
    now[0] = 22
    c.put("z", 1, 10)                 # expired entries are dropped on put
    assert len(c) == 1


def test_plan_box_is_a_prompt_on_the_whole_image_and_sticks_for_keypoints():
    """Every model gets a smart rectangle as session.set_box on the whole image (a click-only model
    turns it into a GrabCut seed inside the session): no crop, no centre click."""
    from backend.engine import Entry
    from backend.payload import Prompt

    seg = Segmenter(predictor=None, sessions=ByteCache(1 << 20, 60), box_margin=0.1)
    box = (100.0, 50.0, 200.0, 150.0)
    plan = seg.plan(Prompt(label="A", to_name="image", box=box, size=(400, 300)), 400, 300, None)
    assert (plan.frame, plan.steps, plan.box) == (Frame(0, 0, 400, 300), [], box)
    # Keypoints later (box not resent): inside box + margin they refine it...
    cached = Entry(session=None, identity=plan.identity, box=box)
    kp = Prompt(label="A", to_name="image", clicks=[Click(120, 60, False)], size=(400, 300))
    plan2 = seg.plan(kp, 400, 300, cached)
    assert plan2.identity == plan.identity and plan2.box == box
    assert plan2.steps == [(Click(120, 60, False),)]
    # ...outside it, the box is dropped.
    far = Prompt(label="A", to_name="image", clicks=[Click(390, 290, True)], size=(400, 300))
    plan3 = seg.plan(far, 400, 300, cached)
    assert plan3.box is None and plan3.steps == [(Click(390, 290, True),)]


def test_plan_keeps_a_box_whose_margin_covers_the_image():
    """Issue 14: a box that, with its margin, covers the whole image was forgotten, and the next
    keypoint started over without it."""
    from backend.engine import Entry
    from backend.payload import Prompt
    seg = Segmenter(predictor=None, sessions=ByteCache(1 << 20, 60), box_margin=0.15)
    box = (10.0, 10.0, 390.0, 290.0)
    plan = seg.plan(Prompt(label="A", to_name="image", box=box, size=(400, 300)), 400, 300, None)
    assert plan.frame == Frame(0, 0, 400, 300) and plan.box == box
    cached = Entry(session=None, identity=plan.identity, box=plan.box)
    kp = Prompt(label="A", to_name="image", clicks=[Click(50, 60, False)], size=(400, 300))
    plan2 = seg.plan(kp, 400, 300, cached)
    assert plan2.identity == plan.identity and plan2.box == box   # the same session goes on
    assert plan2.steps == [(Click(50, 60, False),)]


def test_plan_brush_stroke_is_one_step():
    from backend.payload import Prompt
    seg = Segmenter(predictor=None, sessions=ByteCache(1 << 20, 60))
    stroke = np.zeros((200, 300), bool)
    stroke[95:105, 20:280] = True
    plan = seg.plan(Prompt(label="A", to_name="image", brush=stroke, clicks=[Click(5, 5, False)],
                           size=(300, 200)), 300, 200, None)
    assert len(plan.steps) == 2 and 3 <= len(plan.steps[0]) <= 5 and plan.steps[1] == (Click(5, 5, False),)


# -- webhooks ---------------------------------------------------------------------------------------
def test_webhook_events_from_captures():
    ev = parse_event(capture("016_POST_webhook_ANNOTATION_CREATED.json"))
    assert (ev.action, ev.project_id, ev.task_id, ev.annotation_id) == ("ANNOTATION_CREATED", 1, 1, 1)
    ev = parse_event(capture("017_POST_webhook_START_TRAINING.json"))
    assert (ev.action, ev.project_id, ev.task_id) == ("START_TRAINING", 1, None)


def test_webhook_handler_enqueues_training_events_only():
    seen = []
    h = WebhookHandler(enqueue=lambda e: seen.append(e.action) or f"job-{len(seen)}", history=3)
    ans, st = h.handle(capture("017_POST_webhook_START_TRAINING.json"))
    assert st == 200 and ans["job"] == "job-1"
    ans, st = h.handle({"action": "TASKS_CREATED", "project": {"id": 1}, "tasks": []})
    assert st == 200 and ans["status"] == "ignored" and seen == ["START_TRAINING"]
    ans, st = h.handle({"action": "ANNOTATIONS_DELETED", "project": {"id": 1}, "annotations": [{"id": 3}]})
    assert ans["status"] == "ignored"
    assert [e["action"] for e in h.recent()] == ["START_TRAINING", "TASKS_CREATED", "ANNOTATIONS_DELETED"]


def test_webhook_queue_failure_is_503_not_a_crash():
    def broken(event):
        raise ConnectionError("redis down")
    ans, st = WebhookHandler(enqueue=broken).handle(capture("017_POST_webhook_START_TRAINING.json"))
    assert st == 503 and "redis down" in ans["error"]


@pytest.mark.parametrize("body, needle", [
    ([], "JSON object"),
    ({"project": {"id": 1}}, "action"),
    ({"action": "START_TRAINING"}, "project"),
    ({"action": "START_TRAINING", "project": {"title": "x"}}, "project id"),
    ({"action": "ANNOTATION_CREATED", "project": {"id": 1}, "task": {"id": 1}}, "annotation"),
    ({"action": "ANNOTATION_UPDATED", "project": {"id": 1}, "task": {"id": 1}, "annotation": {"id": 2}},
     "result list"),
])
def test_webhook_validation(body, needle):
    with pytest.raises(WebhookError, match=needle):
        parse_event(body)


# -- tokens and URL routing (no network) ------------------------------------------------------------
def test_token_kinds():
    import sys
    sys.path.insert(0, str(Path(__file__).parent / "e2e"))
    from image_server import make_jwt
    pat = make_jwt({"token_type": "refresh", "exp": int(time.time()) + 100})
    assert _jwt_payload(pat)["token_type"] == "refresh"
    assert LabelStudioAuth("http://x", pat).is_pat
    assert not LabelStudioAuth("http://x", "0123456789abcdef" * 2).is_pat
    assert LabelStudioAuth("http://x", "abc").header() == {"Authorization": "Token abc"}
    assert _jwt_payload("a.b.c") is None and _jwt_payload("nodots") is None


def test_origin():
    assert origin("http://LocalHost:8080/data/x") == origin("http://localhost:8080")
    assert origin("https://a.com/x") == "https://a.com:443"
    assert origin("http://a.com:8080") != origin("http://a.com:8081")


def test_urls_are_parsed_once_and_strictly():
    from backend.labelstudio.urls import UrlError, ls_file_path, parse_http_url
    t = parse_http_url("http://LS:8080/data/upload/1/my photo.png?x=1")
    assert t.origin == ("http", "ls", 8080) and t.path == "/data/upload/1/my photo.png"
    assert t.url == "http://ls:8080/data/upload/1/my%20photo.png?x=1"       # what requests sends
    for bad in ("http://a:1\\@b:2/", "http://u@b/", "http://h:1:2/", "ftp://h/x", "http://h\t/x", "http://[::1/"):
        with pytest.raises(UrlError):
            parse_http_url(bad)
    assert ls_file_path("/data/upload/1/a.png") and ls_file_path("/data/local-files/")
    for path in ("/data/../api/", "/data/upload/../x", "/api/projects/", "/data/upload/./a", "/tasks/1/presign/"):
        assert not ls_file_path(path), path


def test_local_paths_only_under_the_allowed_root(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "a.png").write_bytes(b"png")
    (tmp_path / "secret.txt").write_text("x")
    f = ImageFetcher(Config.from_env({"LOCAL_FILES_ROOT": str(root)}))
    assert f.fetch_bytes(str(root / "a.png")) == b"png"
    assert f.fetch_bytes("/data/local-files/?d=a.png") == b"png"
    assert f.fetch_bytes(f"file://{root}/a.png") == b"png"
    for bad in (str(tmp_path / "secret.txt"), "/data/local-files/?d=../secret.txt", "/etc/passwd"):
        with pytest.raises(FetchError, match="outside LOCAL_FILES_ROOT") as e:
            f.fetch_bytes(bad)
        assert e.value.status == 403
    with pytest.raises(FetchError, match="not found"):
        f.fetch_bytes(str(root / "b.png"))
    nolocal = ImageFetcher(Config.from_env({}))
    with pytest.raises(FetchError, match="set LOCAL_FILES_ROOT"):
        nolocal.fetch_bytes(str(root / "a.png"))
    with pytest.raises(FetchError, match="set LABEL_STUDIO_URL"):
        nolocal.fetch_bytes("/data/upload/1/a.png")
    with pytest.raises(FetchError, match="cloud storage"):
        nolocal.fetch_bytes("s3://bucket/a.png")
    with pytest.raises(FetchError, match="image URL"):
        nolocal.fetch_bytes(None)


def test_setup_hostname_is_a_fallback_server():
    setup = SetupInfo("http://ls:8080/", "tok123")
    f = ImageFetcher(Config.from_env({}))
    target = f._ls_target("/data/upload/1/a.png", setup)
    assert target.url == "http://ls:8080/data/upload/1/a.png"
    assert f._credential(target, setup).header() == {"Authorization": "Token tok123"}
    # The env URL wins over the /setup hostname, and the env key over the /setup token.
    f = ImageFetcher(Config.from_env({"LABEL_STUDIO_URL": "http://env:1", "LABEL_STUDIO_API_KEY": "envkey"}))
    target = f._ls_target("/data/upload/1/a.png", setup)
    assert target.url == "http://env:1/data/upload/1/a.png" and f._credential(target, setup).api_key == "envkey"
    # Keys never go to another server's plain URL, nor to a path of the server that is not a file.
    from backend.labelstudio.urls import parse_http_url
    assert f._credential(parse_http_url("http://elsewhere.com/a.png"), setup) is None
    assert f._credential(parse_http_url("http://env:1/api/projects/"), None) is None
    assert f._credential(parse_http_url("http://env:1/data/upload/x.png"), None).api_key == "envkey"
    # Without LABEL_STUDIO_URL the env key goes nowhere; the /setup hostname gets its own token.
    f = ImageFetcher(Config.from_env({"LABEL_STUDIO_API_KEY": "envkey"}))
    target = f._ls_target("/data/upload/1/a.png", setup)
    assert f._credential(target, setup).api_key == "tok123"
    assert f._credential(target, SetupInfo("http://ls:8080/", "")) is None


def test_refusal_messages_name_the_fix():
    """403 with a key (not reachable through the test image server)."""
    from backend.labelstudio.urls import parse_http_url
    f = ImageFetcher(Config.from_env({"LABEL_STUDIO_URL": "http://env:1", "LABEL_STUDIO_API_KEY": "envkey"}))
    target = parse_http_url("http://env:1/data/upload/x.png")
    auth = f._credential(target, None)
    with pytest.raises(FetchError, match="403 Forbidden.*member of the project") as e:
        f._raise_status(403, "/data/upload/x.png", auth, target)
    assert e.value.status == 502
    with pytest.raises(FetchError, match="only with /data/upload"):
        f._raise_status(401, "http://env:1/x.png", None, parse_http_url("http://env:1/x.png"))


def test_data_uri_and_decode_limits():
    import base64
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (30, 20), (200, 10, 10)).save(buf, "PNG")
    f = ImageFetcher(Config.from_env({"MAX_IMAGE_PIXELS": "500"}))
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    with pytest.raises(FetchError, match="MAX_IMAGE_PIXELS") as e:
        f.fetch(uri)
    assert e.value.status == 413
    img = ImageFetcher(Config.from_env({})).fetch(uri)
    assert img.shape == (20, 30, 3) and tuple(img[0, 0]) == (200, 10, 10)
    with pytest.raises(FetchError, match="not an image") as e:
        f.decode(b"<html>login</html>", "x")
    assert e.value.status == 422


# -- answer format ------------------------------------------------------------------------------------
def test_result_items_have_the_shape_label_studio_relayed():
    from backend.app import result_items
    lc = parse_label_config(capture("007_POST_setup.json")["schema"])
    control, label = lc.output_for("Object", "image")
    data, _ = ls_response("ls_interactive_annotating_response.json")
    want = data["data"]["result"][0]
    mask = rle_to_mask(want["value"]["rle"], want["original_height"], want["original_width"])
    (item,) = result_items(control, label, "image", mask, 0.9)
    assert set(item) == set(want) and set(item["value"]) == set(want["value"])
    for k in ("from_name", "to_name", "original_width", "original_height", "image_rotation", "type",
              "readonly", "score"):
        assert item[k] == want[k], k
    assert item["value"] == want["value"]          # byte-identical RLE, same label, same format
    assert item["id"] and item["id"] != want["id"]
    poly_lc = parse_label_config('<View><Image name="image" value="$image"/><PolygonLabels name="p" '
                                 'toName="image"><Label value="Object"/></PolygonLabels></View>')
    pc, _ = poly_lc.output_for("Object", "image")
    items = result_items(pc, "Object", "image", mask, 0.7, polygon_tolerance=1.0)
    assert len(items) == 1 and items[0]["type"] == "polygonlabels" and items[0]["from_name"] == "p"
    assert items[0]["value"]["polygonlabels"] == ["Object"] and len(items[0]["value"]["points"]) >= 3
