"""Take the screenshots of docs/annotators.md from a real Label Studio and a real backend.

    .venv/bin/python tests/e2e/screenshots.py --ls-url http://127.0.0.1:8080 --ls-token TOKEN \\
        --user admin@example.com --password PASS --backend http://127.0.0.1:9090 [--out docs/annotators]

Creates two projects (docs/label-configs/one-object.xml and several-objects.xml), each with a
Berkeley image, connects the backend (interactive), and walks through the annotator's steps in
headless Chromium, saving a PNG after each. Not a test: tests/test_e2e_browser.py checks the
walkthrough; this only pictures it.
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


def shot(d, out: Path, name: str) -> None:
    """A palette PNG (a tenth of the size of the browser's)."""
    from PIL import Image

    raw = out / f".{name}.raw.png"
    d.save_screenshot(str(raw))
    Image.open(raw).convert("RGB").quantize(colors=256).save(out / f"{name}.png", optimize=True)
    raw.unlink()
    print("wrote", out / f"{name}.png")


def click_and_wait(d, box, x, y, negative=False):
    before = browser.suggestion_request(d)
    browser.click_image(d, box, x, y, negative)
    browser.wait_suggestions(d, before)
    time.sleep(0.5)                         # let the mask render


def one_object(ls, d, out, backend):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    pid, task = project(ls, "SimClick: one object", REPO / "docs/label-configs/one-object.xml", "376043", backend)
    box = browser.open_task(d, ls, pid, task)
    browser.set_auto_annotation(d, True)
    time.sleep(0.5)
    shot(d, out, "01-auto-annotation")
    group = [b for b in d.find_elements(By.CSS_SELECTOR, "button.lsf-tool_smart") if b.is_displayed()][0]
    ActionChains(d).move_to_element(group).perform()
    time.sleep(0.7)
    shot(d, out, "02-auto-detect-tools")
    browser.select_smart_tool(d, "key-point-tool")
    click_and_wait(d, box, 154, 243)
    shot(d, out, "03-first-click")
    click_and_wait(d, box, 231, 314, negative=True)
    click_and_wait(d, box, 38, 378)
    shot(d, out, "04-more-clicks")
    browser.accept_suggestions(d)
    time.sleep(0.5)
    shot(d, out, "05-accepted")
    browser.submit(d)
    time.sleep(2)

    pid, task = project(ls, "SimClick: a box", REPO / "docs/label-configs/one-object.xml", "69020", backend)
    box = browser.open_task(d, ls, pid, task)
    browser.select_smart_tool(d, "rectangle-tool")
    before = browser.suggestion_request(d)
    browser.drag_box(d, box, 60, 30, 290, 420)
    browser.wait_suggestions(d, before)
    time.sleep(0.5)
    shot(d, out, "06-box")


def several_objects(ls, d, out, backend):
    from selenium.webdriver.common.by import By

    pid, task = project(ls, "SimClick: several objects", REPO / "docs/label-configs/several-objects.xml",
                        "376043", backend)
    box = browser.open_task(d, ls, pid, task)
    browser.set_auto_annotation(d, True)
    browser.by_testid(d, "bottombar-settings-button").click()
    keep = browser.wait(lambda: [e for e in d.find_elements(By.XPATH, "//*[contains(text(), 'Keep label selected')]")
                                 if e.is_displayed()], 10, "the settings dialog")[0]
    if not d.execute_script("return window.Htx.settings.continuousLabeling"):
        keep.click()
    time.sleep(0.5)
    shot(d, out, "07-keep-label-selected")
    closers = d.execute_script("return Array.from(document.querySelectorAll('[class*=modal] [class*=close], "
                               "[class*=Modal] [class*=close]')).filter(e => e.offsetParent)")
    closers[0].click()
    browser.wait(lambda: not [e for e in d.find_elements(By.XPATH, "//*[contains(text(), 'Keep label selected')]")
                              if e.is_displayed()], 10, "the settings dialog to close")
    browser.select_smart_tool(d, "key-point-tool")
    [e for e in d.find_elements(By.CSS_SELECTOR, ".lsf-label") if e.text.startswith("Person: click")][0].click()
    click_and_wait(d, box, 154, 243)
    click_and_wait(d, box, 38, 378)
    shot(d, out, "08-several-objects")


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
    d = browser.start(1280, 860)
    try:
        browser.login(d, ls)
        one_object(ls, d, out, args.backend)
        several_objects(ls, d, out, args.backend)
    finally:
        browser.stop(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
