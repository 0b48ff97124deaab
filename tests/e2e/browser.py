"""Drive the real Label Studio editor in headless Chromium (selenium; Debian's chromium and
chromium-driver). Used by tests/test_e2e_browser.py and by tests/e2e/screenshots.py, which takes
the screenshots of docs/annotators.md.

What the helpers rely on is Label Studio 1.23's own markup: the Auto-Annotation toggle and the
suggestion buttons have data-testid attributes, tools have aria-labels, the smart tools sit in the
"Auto-Detect" group, the task image is the editor's blob: <img> over a Konva stage (window.Konva:
keypoints are Circle nodes, a brush suggestion an Image node in a layer named by its region), and
the editor's store is window.Htx (awaitingSuggestions, suggestionsRequest).
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

CHROMIUM = ("chromium", "chromium-browser")
DRIVER = ("chromedriver",)


class BrowserMissing(RuntimeError):
    """Chromium or its driver is not installed: the only reason a browser test may skip."""


def find(names) -> str | None:
    for n in names:
        p = shutil.which(n) or (f"/usr/bin/{n}" if Path(f"/usr/bin/{n}").exists() else None)
        if p:
            return p
    return None


def start(width: int = 1280, height: int = 800):
    """A headless Chromium with a fresh profile (and no background traffic), its page (viewport)
    exactly width x height: --window-size alone gives a headless page about 140 px shorter."""
    chromium, driver = find(CHROMIUM), find(DRIVER)
    if not chromium or not driver:
        raise BrowserMissing("Chromium and chromedriver are not installed (Debian: apt-get install chromium "
                             "chromium-driver; .ci/run installs them when apt can reach its mirror)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="simclick-chromium-")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        opts.add_argument(arg)
    d = webdriver.Chrome(service=Service(driver), options=opts)
    d.profile_dir = profile
    d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    return d


def stop(d) -> None:
    try:
        d.quit()
    finally:
        shutil.rmtree(getattr(d, "profile_dir", ""), ignore_errors=True)


def wait(pred, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = pred()
        except Exception:          # the page is still rendering
            v = None
        if v:
            return v
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def login(d, ls) -> None:
    from selenium.webdriver.common.by import By

    d.get(ls.url + "/user/login")
    wait(lambda: d.find_element(By.NAME, "email"), 30, "the login form")
    d.find_element(By.NAME, "email").send_keys(ls.username)
    d.find_element(By.NAME, "password").send_keys(ls.password)
    d.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait(lambda: "/user/login" not in d.current_url, 30, "the login")


def open_task(d, ls, project: int, task: int) -> dict:
    """Open a task in the editor; returns the task image's box on screen (left, top, width,
    height) and its natural size."""
    d.get(f"{ls.url}/projects/{project}/data?tab=1&task={task}")
    return wait(lambda: image_box(d), 60, "the task image in the editor")


def open_stream(d, ls, project: int) -> dict:
    """The project's labeling stream (Label All Tasks): the editor without the task list, the
    layout docs/annotators.md assumes at 1280 px; returns the first task's image box."""
    d.get(f"{ls.url}/projects/{project}/data?labeling=1")
    return wait(lambda: image_box(d), 60, "the task image in the labeling stream")


def image_box(d) -> dict | None:
    return d.execute_script(
        "const i = Array.from(document.querySelectorAll('img')).find(i => i.src.startsWith('blob:') && "
        "i.naturalWidth > 0 && i.getBoundingClientRect().width > 100);"
        "if (!i) return null; const r = i.getBoundingClientRect();"
        "return {left: r.left, top: r.top, width: r.width, height: r.height, w: i.naturalWidth, h: i.naturalHeight};")


def stage_box(d) -> dict:
    """The editor's drawing area (the Konva stage) on screen: a click outside it makes no keypoint,
    whatever the image under it."""
    return d.execute_script("const r = document.querySelector('.konvajs-content').getBoundingClientRect();"
                            "return {left: r.left, top: r.top, width: r.width, height: r.height};")


def by_testid(d, testid: str):
    from selenium.webdriver.common.by import By

    return d.find_element(By.CSS_SELECTOR, f"[data-testid={testid}]")


def set_auto_annotation(d, on: bool = True) -> None:
    """The editor's Auto-Annotation toggle (bottom bar): smart tools and the suggestion buttons
    exist only while it is on."""
    toggle = wait(lambda: by_testid(d, "bottombar-auto-annotation-toggle"), 30, "the Auto-Annotation toggle")
    if toggle.is_selected() != on:
        d.execute_script("arguments[0].click()", toggle)       # the input is visually hidden
    wait(lambda: by_testid(d, "bottombar-auto-annotation-toggle").is_selected() == on, 10, "the toggle")


def smart_tools(d) -> list[str]:
    """aria-labels of the tools in the Auto-Detect group."""
    return d.execute_script("return Array.from(document.querySelectorAll('.lsf-toolbar__smart button'))"
                            ".map(b => b.getAttribute('aria-label'))")


def select_smart_tool(d, label: str, index: int = 0) -> None:
    """Pick a tool of the Auto-Detect group: hover the group, click the tool in its flyout (the
    index-th of that name: one-object.xml has two keypoint tools, add then remove)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    group = wait(lambda: [b for b in d.find_elements(By.CSS_SELECTOR, "button.lsf-tool_smart") if b.is_displayed()],
                 30, "the Auto-Detect tool group")[0]
    ActionChains(d).move_to_element(group).perform()
    tools = wait(lambda: [b for b in d.find_elements(By.CSS_SELECTOR, f".lsf-toolbar__smart [aria-label={label}]")
                          if b.is_displayed()], 10, f"{label} in the Auto-Detect flyout")
    tools[index].click()
    wait(lambda: "lsf-tool_active" in d.find_elements(By.CSS_SELECTOR, f".lsf-toolbar__smart [aria-label={label}]")
         [index].get_attribute("class"), 10, f"{label} {index} to be selected")


def _screen(box: dict, x: float, y: float) -> tuple[int, int]:
    """Screen position of image pixel (x, y) (its centre)."""
    return (round(box["left"] + (x + 0.5) * box["width"] / box["w"]),
            round(box["top"] + (y + 0.5) * box["height"] / box["h"]))


def suggestion_request(d):
    return d.execute_script("return window.Htx && window.Htx.suggestionsRequest")


def wait_suggestions(d, before, timeout: float = 60.0) -> int:
    """Wait for the answer to a new interactive request (one started after `before`, the
    suggestionsRequest id seen before the action); returns the number of suggestions shown."""
    wait(lambda: d.execute_script("const s = window.Htx; return s.suggestionsRequest !== arguments[0] "
                                  "&& !s.awaitingSuggestions", before), timeout, "the backend's suggestion")
    return d.execute_script("return window.Htx.annotationStore.selected.suggestions.size")


def click_image(d, box: dict, x: float, y: float, negative: bool = False) -> None:
    """A click on image pixel (x, y); Alt+click is a negative keypoint. Key and pointer actions
    go tick by tick together, so Alt is held during the click."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.keys import Keys

    px, py = _screen(box, x, y)
    a = ActionBuilder(d)
    key, pointer = a.key_action, a.pointer_action
    if negative:
        key.key_down(Keys.ALT)
        pointer.pause(0)
    for step in (lambda: pointer.move_to_location(px, py), pointer.pointer_down, pointer.pointer_up):
        step()
        key.pause(0)
    if negative:
        key.key_up(Keys.ALT)
        pointer.pause(0)
    a.perform()


def drag_box(d, box: dict, x0: float, y0: float, x1: float, y1: float) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    (ax, ay), (bx, by) = _screen(box, x0, y0), _screen(box, x1, y1)
    a = ActionChains(d)
    p = a.w3c_actions.pointer_action
    p.move_to_location(ax, ay)
    p.pointer_down()
    for k in range(1, 6):
        p.move_to_location(ax + (bx - ax) * k // 5, ay + (by - ay) * k // 5)
    p.pointer_up()
    a.perform()


def keypoints(d) -> list[dict]:
    """The annotation's keypoints in image pixels (pixel centres at integers, as the backend reads
    them), in the order they were placed, with is_positive and their control (from_name)."""
    out = []
    for r in d.execute_script("return window.Htx.annotationStore.selected.serializeAnnotation()"):
        if r["type"] in ("keypoint", "keypointlabels"):
            v, w, h = r["value"], r["original_width"], r["original_height"]
            out.append({"x": v["x"] / 100 * w - 0.5, "y": v["y"] / 100 * h - 0.5,
                        "is_positive": r.get("is_positive", True), "from_name": r["from_name"]})
    return out


def keypoint_styles(d) -> list[dict]:
    """How the editor drew the keypoints: each Konva circle of radius > 0 that is not one of the
    suggestion's accept/reject buttons, with its fill and stroke (CSS colours) and page position."""
    return d.execute_script("""
        const c = document.querySelector('.konvajs-content').getBoundingClientRect();
        return Konva.stages.flatMap(s => s.find('Circle')).filter(n => n.isVisible() && n.draggable())
          .map(n => ({fill: n.fill(), stroke: n.stroke(), radius: n.radius(), strokeWidth: n.strokeWidth(),
                      x: c.left + n.absolutePosition().x, y: c.top + n.absolutePosition().y}));""")


LATENCY_JS = """
if (!window.__simclick) {
  window.__simclick = [];
  // Pointer down on the stage -> the first animation frame in which the answer's suggestion is
  // in the store and its mask image is loaded into a Konva Image of the suggestion's layer (it is
  // painted in that frame). Also the frame in which the request left (suggestionsRequest changed).
  document.addEventListener('pointerdown', (e) => {
    if (!e.target.closest || !e.target.closest('.konvajs-content')) return;
    const s = window.Htx, before = s.suggestionsRequest, t0 = e.timeStamp, m = {};
    const tick = () => {
      const now = performance.now(), a = s.annotationStore.selected;
      if (m.sent === undefined && s.suggestionsRequest !== before) m.sent = now - t0;
      const ids = a ? Array.from(a.suggestions.values()).map(r => r.cleanId) : [];
      const drawn = ids.length > 0 && Konva.stages.some(st => st.find('Image').some(
        n => n.getLayer() && ids.includes(n.getLayer().id()) && n.image() && n.image().complete));
      if (m.sent !== undefined && !s.awaitingSuggestions && drawn) {
        m.drawn = now - t0; window.__simclick.push(m); return;
      }
      if (now - t0 < 60000) requestAnimationFrame(tick);
    };
    requestAnimationFrame(tick);
  }, true);
}
"""


def measure_latency(d) -> None:
    """From now on record, for each pointer down on the stage, the milliseconds to the request
    (sent) and to the suggestion drawn (drawn); read them with latencies()."""
    d.execute_script(LATENCY_JS)


def latencies(d) -> list[dict]:
    return d.execute_script("return window.__simclick || []")


def accept_suggestions(d) -> None:
    btn = wait(lambda: by_testid(d, "bottombar-accept-suggestions-button"), 10, "the accept (check) button")
    btn.click()
    wait(lambda: d.execute_script("return window.Htx.annotationStore.selected.suggestions.size") == 0, 10,
         "the suggestion to be accepted")


def submit(d) -> None:
    by_testid(d, "bottombar-submit-button").click()
