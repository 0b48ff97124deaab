"""Take the screenshots of docs/annotators.md from a real Label Studio and a real backend.

    .venv/bin/python tests/e2e/screenshots.py --ls-url http://127.0.0.1:8080 --ls-token TOKEN \\
        --user admin@example.com --password PASS --backend http://127.0.0.1:9090 [--out docs/annotators]

Creates projects (docs/label-configs/one-object.xml and several-objects.xml), each with a
Berkeley image, connects the backend (interactive), and walks through the annotator's steps in
headless Chromium on a 1280x800 page, in the labeling stream (Label All Tasks), saving a PNG after
each: the part of the page the step is about, in 256 colours, to keep them small. Not a test:
tests/test_e2e_browser.py checks the walkthrough; this only pictures it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).parent))
import browser  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BERKELEY = REPO.parent / "shared" / "datasets" / "Berkeley"


class Server:
    def __init__(self, url, token, user, password):
        self.url, self.token, self.username, self.password = url.rstrip("/"), token, user, password

    def api(self, method, path, **kw):
        r = requests.request(method, self.url + path, headers={"Authorization": f"Token {self.token}"},
                             timeout=60, **kw)
        r.raise_for_status()
        return r.json()


def project(ls, title, config, stem, backend) -> tuple[int, int]:
    pid = ls.api("POST", "/api/projects", json={"title": title, "label_config": config.read_text()})["id"]
    with open(BERKELEY / "images" / f"{stem}.jpg", "rb") as f:
        ls.api("POST", f"/api/projects/{pid}/import", files={"file": (f"{stem}.jpg", f, "image/jpeg")})
    task = ls.api("GET", f"/api/tasks?project={pid}")["tasks"][0]["id"]
    ls.api("POST", "/api/ml", json={"url": backend, "project": pid, "title": "SimClick", "is_interactive": True})
    return pid, task


def shot(d, out: Path, name: str, crop: tuple | None = None) -> None:
    """A 256-colour palette PNG of the page or of its part crop = (left, top, right, bottom)."""
    from PIL import Image

    raw = out / f".{name}.raw.png"
    d.save_screenshot(str(raw))
    im = Image.open(raw).convert("RGB")
    if crop:
        im = im.crop(crop)
    im.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(out / f"{name}.png", optimize=True)
    raw.unlink()
    print("wrote", out / f"{name}.png", im.size)


def around(box, right=None, bottom=None, pad=12) -> tuple:
    """The image on screen with a margin (to the right edge `right` to include the toolbar)."""
    return (max(0, int(box["left"]) - pad), max(0, int(box["top"]) - pad),
            int(right or box["left"] + box["width"] + pad), int(bottom or box["top"] + box["height"] + pad))


def click_and_wait(d, box, x, y, negative=False):
    before = browser.suggestion_request(d)
    browser.click_image(d, box, x, y, negative)
    browser.wait_suggestions(d, before)
    time.sleep(0.5)                         # let the mask render


def one_object(ls, d, out, backend):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    pid, task = project(ls, "SimClick: one object", REPO / "docs/label-configs/one-object.xml", "376043", backend)
    box = browser.open_stream(d, ls, pid)
    browser.set_auto_annotation(d, True)
    time.sleep(0.5)
    shot(d, out, "01-auto-annotation")                                   # the whole 1280x800 page
    group = [b for b in d.find_elements(By.CSS_SELECTOR, "button.lsf-tool_smart") if b.is_displayed()][0]
    ActionChains(d).move_to_element(group).perform()
    time.sleep(0.7)
    shot(d, out, "02-auto-detect-tools", (640, 80, 960, 480))
    browser.select_smart_tool(d, "key-point-tool", 0)
    click_and_wait(d, box, 154, 243)
    shot(d, out, "03-first-click", around(box))
    browser.select_smart_tool(d, "key-point-tool", 1)                   # remove
    click_and_wait(d, box, 231, 314)
    browser.select_smart_tool(d, "key-point-tool", 0)
    click_and_wait(d, box, 38, 378)
    d.execute_script("document.activeElement && document.activeElement.blur()")
    ActionChains(d).move_by_offset(0, 0).perform()
    shot(d, out, "04-more-clicks", (0, 48, 1280, 640))
    browser.accept_suggestions(d)
    time.sleep(0.5)
    shot(d, out, "05-accepted", (0, 48, 1280, 800))
    browser.submit(d)
    time.sleep(2)

    pid, task = project(ls, "SimClick: a box", REPO / "docs/label-configs/one-object.xml", "69020", backend)
    box = browser.open_stream(d, ls, pid)
    browser.select_smart_tool(d, "rectangle-tool")
    before = browser.suggestion_request(d)
    browser.drag_box(d, box, 8, 2, 433, 318)                              # the kangaroo, tightly
    browser.wait_suggestions(d, before)
    time.sleep(0.5)
    shot(d, out, "06-box", around(box))


def several_objects(ls, d, out, backend):
    from selenium.webdriver.common.by import By

    pid, task = project(ls, "SimClick: several objects", REPO / "docs/label-configs/several-objects.xml",
                        "376043", backend)
    box = browser.open_stream(d, ls, pid)
    browser.set_auto_annotation(d, True)
    browser.by_testid(d, "bottombar-settings-button").click()
    keep = browser.wait(lambda: [e for e in d.find_elements(By.XPATH, "//*[contains(text(), 'Keep label selected')]")
                                 if e.is_displayed()], 10, "the settings dialog")[0]
    if not d.execute_script("return window.Htx.settings.continuousLabeling"):
        keep.click()
    time.sleep(0.5)
    shot(d, out, "07-keep-label-selected", (200, 60, 1080, 700))
    closers = d.execute_script("return Array.from(document.querySelectorAll('[class*=modal] [class*=close], "
                               "[class*=Modal] [class*=close]')).filter(e => e.offsetParent)")
    closers[0].click()
    browser.wait(lambda: not [e for e in d.find_elements(By.XPATH, "//*[contains(text(), 'Keep label selected')]")
                              if e.is_displayed()], 10, "the settings dialog to close")
    browser.select_smart_tool(d, "key-point-tool")
    label = [e for e in d.find_elements(By.CSS_SELECTOR, ".lsf-label") if e.text.startswith("Person: click")][0]
    d.execute_script("arguments[0].click()", label)
    click_and_wait(d, box, 154, 243)
    click_and_wait(d, box, 231, 314, negative=True)
    click_and_wait(d, box, 38, 378)
    shot(d, out, "08-several-objects", (0, 48, 1280, 720))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ls-url", required=True)
    ap.add_argument("--ls-token", required=True, help="a legacy API token of the user")
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--backend", required=True, help="the backend's URL as Label Studio reaches it")
    ap.add_argument("--out", default=str(REPO / "docs" / "annotators"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ls = Server(args.ls_url, args.ls_token, args.user, args.password)
    d = browser.start(1280, 800)
    try:
        browser.login(d, ls)
        one_object(ls, d, out, args.backend)
        several_objects(ls, d, out, args.backend)
    finally:
        browser.stop(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
