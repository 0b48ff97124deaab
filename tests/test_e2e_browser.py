"""The annotator's walkthrough (docs/annotators.md) in the real Label Studio 1.23 editor, in
headless Chromium: the shipped one-object label config, Auto-Annotation on, the smart keypoint
tool of the Auto-Detect group, three clicks (the robot user's, one of them an Alt+click
negative), the suggestion after each, accept, submit; then the stored annotation's mask is
checked against the model's own answer for the keypoints as the editor placed them, and against
the ground truth.

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
CLICKS = 3


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
        prob = session.add_click(k["x"], k["y"], k["is_positive"])
    return prob > 0.5


def iou(a, b) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_smart_keypoints_in_the_real_editor(label_studio_server, label_studio_pat, chromium, tmp_path):
    ls, d = label_studio_server, chromium
    clicks, gt = robot_clicks(CLICKS)
    assert any(not c.positive for c in clicks), "the walkthrough should include a negative (Alt) click"
    with backend_process(tmp_path, LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=label_studio_pat) as b:
        r = ls.api("POST", "/api/projects", json={"title": "simclick-browser", "label_config": CONFIG.read_text()})
        assert r.status_code == 201, r.text
        pid = r.json()["id"]
        with open(BERKELEY / "images" / f"{STEM}.jpg", "rb") as f:
            assert ls.api("POST", f"/api/projects/{pid}/import",
                          files={"file": (f"{STEM}.jpg", f, "image/jpeg")}).status_code == 201
        task = ls.api("GET", f"/api/tasks?project={pid}").json()["tasks"][0]["id"]
        r = ls.api("POST", "/api/ml", json={"url": b["url"], "project": pid, "title": "simclick", "is_interactive": True})
        assert r.status_code == 201 and r.json()["state"] == "CO", r.text

        browser.login(d, ls)
        box = browser.open_task(d, ls, pid, task)
        assert (box["w"], box["h"]) == gt.shape[::-1]
        browser.set_auto_annotation(d, True)
        # The config hides the brush from the Auto-Detect group: a smart brush sends nothing in 1.23.
        assert sorted(browser.smart_tools(d)) == ["key-point-tool", "rectangle-3-point-tool", "rectangle-tool"]
        browser.select_smart_tool(d, "key-point-tool")
        for k, c in enumerate(clicks, start=1):
            before = browser.suggestion_request(d)
            browser.click_image(d, box, c.x, c.y, negative=not c.positive)
            assert browser.wait_suggestions(d, before) == 1, f"no suggestion after click {k}"
        runs = [line.split("predict task=")[1] for line in backend_log(b).splitlines() if "predict task=" in line]
        assert [r.split()[1] for r in runs] == [f"Object:{k}c/1run" for k in range(1, CLICKS + 1)], runs
        sent = browser.keypoints(d)            # where the editor put them (screen pixels, rounded)
        assert [k["is_positive"] for k in sent] == [c.positive for c in clicks]
        assert all(abs(k["x"] - c.x) <= 1 and abs(k["y"] - c.y) <= 1 for k, c in zip(sent, clicks)), sent
        browser.accept_suggestions(d)
        browser.submit(d)
        anns = browser.wait(lambda: ls.api("GET", f"/api/tasks/{task}/annotations").json(), 30, "the annotation")

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
