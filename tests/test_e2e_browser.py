"""The annotator's walkthrough (docs/annotators.md) in the real Label Studio 1.23 editor, in
headless Chromium at 1280x800: the shipped one-object label config, Auto-Annotation on, the smart
keypoint tools of the Auto-Detect group (the first adds, the second removes), three clicks (the
robot user's, one of them negative, made with the remove tool), the suggestion after each, accept,
submit; then the stored annotation's mask is checked against the model's own answer for the
keypoints as the editor placed them, and against the ground truth. Also: the two kinds of
keypoints are drawn in different colours, a click 3 px inside each edge of the image reaches the
backend, and the browser-side latency (pointer down to the suggestion drawn) is printed.

Skipped only when Chromium/chromedriver are not installed (.ci/run installs Debian's chromium and
chromium-driver when apt can reach its mirror) or Label Studio cannot be installed.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from backend.labelstudio.masks import rle_to_mask
from model.images import load_image, load_mask
from training.evaluation.clicker import RobotClicker

from .conftest import DATASETS
from .test_e2e_labelstudio import backend_log, backend_process

sys.path.insert(0, str(Path(__file__).parent / "e2e"))
import browser  # noqa: E402

pytestmark = pytest.mark.e2e          # a real Label Studio driven in headless Chromium

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "docs" / "label-configs" / "one-object.xml"
BERKELEY = DATASETS / "Berkeley"
STEM = "376043"
WIDE = "12003"                 # a landscape image: its right edge is next to the floating toolbar
CLICKS = 3
EDGE = 3                       # px inside each edge of the image


@pytest.fixture(scope="module")
def chromium():
    try:
        d = browser.start()
    except browser.BrowserMissing as e:
        pytest.skip(str(e))
    yield d
    browser.stop(d)


def predictor():
    from model.predictor import Predictor
    return Predictor.load("default")


def robot_clicks(n: int):
    """The standard robot user's first n clicks on the image, each from the model's previous answer."""
    image = load_image(BERKELEY / "images" / f"{STEM}.jpg")
    gt = load_mask(BERKELEY / "masks" / f"{STEM}.png")
    session = predictor().open(image)
    robot, pred, clicks = RobotClicker(gt), np.zeros_like(gt), []
    for _ in range(n):
        c = robot.next_click(pred)
        clicks.append(c)
        pred = session.add_click(c.x, c.y, c.positive) > 0.5
    return clicks, gt


def model_mask(keypoints) -> np.ndarray:
    """The model's mask for the keypoints exactly as the editor placed them (the backend's answer)."""
    session = predictor().open(load_image(BERKELEY / "images" / f"{STEM}.jpg"))
    prob = None
    for k in keypoints:
        prob = session.add_click(k["x"], k["y"], positive(k))
    return prob > 0.5


def iou(a, b) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def positive(k) -> bool:
    """The sign the backend reads: the remove tool's keypoints and Alt+clicks are negative."""
    return k["is_positive"] and k["from_name"] != "remove"


def new_project(ls, b, stem: str) -> tuple[int, int]:
    r = ls.api("POST", "/api/projects", json={"title": f"simclick-browser-{stem}", "label_config": CONFIG.read_text()})
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    with open(BERKELEY / "images" / f"{stem}.jpg", "rb") as f:
        assert ls.api("POST", f"/api/projects/{pid}/import",
                      files={"file": (f"{stem}.jpg", f, "image/jpeg")}).status_code == 201
    task = ls.api("GET", f"/api/tasks?project={pid}").json()["tasks"][0]["id"]
    r = ls.api("POST", "/api/ml", json={"url": b["url"], "project": pid, "title": "simclick", "is_interactive": True})
    assert r.status_code == 201 and r.json()["state"] == "CO", r.text
    return pid, task


def predict_lines(b) -> list[str]:
    return [line.split("predict task=")[1] for line in backend_log(b).splitlines() if "predict task=" in line]


def test_smart_keypoints_in_the_real_editor(label_studio_server, label_studio_pat, chromium, tmp_path):
    ls, d = label_studio_server, chromium
    clicks, gt = robot_clicks(CLICKS)
    assert any(not c.positive for c in clicks), "the walkthrough should include a negative click"
    with backend_process(tmp_path, LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=label_studio_pat) as b:
        pid, task = new_project(ls, b, STEM)
        browser.login(d, ls)
        box = browser.open_task(d, ls, pid, task)
        assert (box["w"], box["h"]) == gt.shape[::-1]
        browser.measure_latency(d)
        browser.set_auto_annotation(d, True)
        # The config hides the brush from the Auto-Detect group: a smart brush sends nothing in 1.23.
        assert sorted(browser.smart_tools(d)) == ["key-point-tool", "key-point-tool", "rectangle-3-point-tool",
                                                  "rectangle-tool"]
        tool = None
        for k, c in enumerate(clicks, start=1):
            if tool != c.positive:             # the first keypoint tool adds, the second removes
                browser.select_smart_tool(d, "key-point-tool", 0 if c.positive else 1)
                tool = c.positive
            before = browser.suggestion_request(d)
            browser.click_image(d, box, c.x, c.y)
            assert browser.wait_suggestions(d, before) == 1, f"no suggestion after click {k}"
        runs = predict_lines(b)
        assert [r.split()[1] for r in runs] == [f"Object:{k}c/1run" for k in range(1, CLICKS + 1)], runs
        sent = browser.keypoints(d)            # where the editor put them (screen pixels, rounded)
        assert [positive(k) for k in sent] == [c.positive for c in clicks]
        assert all(abs(k["x"] - c.x) <= 1 and abs(k["y"] - c.y) <= 1 for k, c in zip(sent, clicks)), sent
        # + and - are drawn differently: the remove tool's own colours (an Alt+click is drawn like a +)
        styles = browser.keypoint_styles(d)
        assert len(styles) == CLICKS, styles
        looks: dict = {}
        for k in sent:
            px, py = browser._screen(box, k["x"], k["y"])
            st = min(styles, key=lambda st: (st["x"] - px) ** 2 + (st["y"] - py) ** 2)
            assert abs(st["x"] - px) <= 2 and abs(st["y"] - py) <= 2, (k, st)
            looks.setdefault(positive(k), set()).add((st["fill"], st["stroke"]))
        assert len(looks[True]) == len(looks[False]) == 1 and looks[True] != looks[False], looks
        print(f"\nkeypoints drawn as (fill, stroke): + {looks[True]}, - {looks[False]}")
        times = browser.latencies(d)
        browser.accept_suggestions(d)
        browser.submit(d)
        anns = browser.wait(lambda: ls.api("GET", f"/api/tasks/{task}/annotations").json(), 30, "the annotation")

        # Clicks 3 px inside each edge of a landscape image (its right edge next to the toolbar).
        pid, task = new_project(ls, b, WIDE)
        wide = browser.open_task(d, ls, pid, task)
        browser.measure_latency(d)             # a new page
        stage = browser.stage_box(d)
        assert (wide["width"], wide["height"]) == (wide["w"], wide["h"])  # defaultZoom="auto": 1:1, no crop
        assert stage["left"] <= wide["left"] and wide["left"] + wide["width"] <= stage["left"] + stage["width"]
        assert stage["top"] <= wide["top"] and wide["top"] + wide["height"] <= stage["top"] + stage["height"]
        browser.select_smart_tool(d, "key-point-tool", 0)
        w, h = wide["w"], wide["h"]
        edges = {"top": (w // 2, EDGE), "right": (w - 1 - EDGE, h // 2), "bottom": (w // 2, h - 1 - EDGE),
                 "left": (EDGE, h // 2), "top-right": (w - 1 - EDGE, EDGE)}
        n = len(predict_lines(b))
        for k, (edge, (x, y)) in enumerate(edges.items(), start=1):
            before = browser.suggestion_request(d)
            browser.click_image(d, wide, x, y, negative=edge == "left")   # Alt+click: negative with the add tool
            browser.wait(lambda before=before: browser.suggestion_request(d) != before, 10,
                         f"a request for the click at the {edge}")
            browser.wait(lambda k=k: len(predict_lines(b)) == n + k, 30, f"the backend's answer to the {edge} click")
            got = browser.keypoints(d)[-1]
            assert abs(got["x"] - x) <= 1 and abs(got["y"] - y) <= 1, (edge, got)
            assert got["is_positive"] == (edge != "left"), (edge, got)
            browser.wait_suggestions(d, before)
        times += browser.latencies(d)

    drawn = [round(t["drawn"]) for t in times]
    sent_ms = [round(t["sent"]) for t in times]
    print(f"browser-side latency, pointer down to suggestion drawn (ms): {drawn}; to request sent: {sent_ms}; "
          f"backend's own: {[r.split()[-2] for r in predict_lines(b)]}")
    assert len(times) == CLICKS + len(edges), times

    (ann,) = anns
    regions = [res for res in ann["result"] if res["type"] == "brushlabels"]
    assert len(regions) == 1 and not [res for res in ann["result"] if res["type"] == "keypoint"], ann["result"]
    (res,) = regions
    assert (res["from_name"], res["to_name"], res["value"]["brushlabels"]) == ("mask", "image", ["Object"])
    mask = rle_to_mask(res["value"]["rle"], res["original_height"], res["original_width"])
    expected = model_mask(sent)
    print(f"\nstored mask after {CLICKS} clicks in the browser: IoU {iou(mask, gt):.3f} with the ground truth, "
          f"{iou(mask, expected):.3f} with the model's answer to the same clicks")
    assert iou(mask, expected) >= 0.99          # the backend's answer to the clicks made, stored
    assert iou(mask, gt) >= 0.85
