"""Latency of the backend as Label Studio sees it: HTTP round trip per click.

    python -m backend.bench [--images 5] [--clicks 5] [--prompt keypoint|box|brush] [--json]
                            [--checkpoint default] [--device cpu] [--runtimes torch,auto]

Serves the app on a free local port (threaded werkzeug server, as `python -m backend`) and the
Berkeley images over HTTP, then replays interactive /predict requests in the exact shape Label
Studio 1.23 sends them (tests/fixtures/labelstudio/012_POST_predict_interactive.json): for each
image, the standard robot user (training.evaluation.clicker) places click after click from the
ground truth and the previous answer, and every request carries *all* keypoints so far, as Label
Studio does. Reports p50/p95 ms per click: all clicks, first clicks (image download + decode +
model) and later clicks (cached session, one network run each), plus IoU after each click.

--prompt box: the first request is the object's tight ground-truth box as a smart rectangle (its
own request, as Label Studio sends it), then robot keypoints (without the rectangle, as Label
Studio sends them). --prompt brush: a smart-brush scribble along the object's longest horizontal
chord (8 px wide, inside the eroded object), then the same brush region with a vertical chord
added: "first_click_ms" is the first stroke (with the image download), "later_click_ms" the
second (image cached), the cost of a stroke.

--runtimes: the whole measurement once per inference runtime (INFERENCE_RUNTIME: torch, openvino,
onnxruntime, auto), back to back in this process, each with its own app; "speedup" is the first
runtime's p50 (p95) over this one's (the machine's speed varies from day to day: compare the ratio).
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import platform
import sys
import threading
import time
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, List, Optional

import cv2
import numpy as np
import requests
from werkzeug.serving import make_server

from model.images import load_mask
from training.evaluation.clicker import RobotClicker
from training.evaluation.datasets import default_data_root

from .app import create_app
from .config import Config
from .labelstudio.masks import mask_to_rle, rle_to_mask

LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Object" background="#FF0000"/>
  </BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true">
    <Label value="Object" smart="true" background="#000000" showInline="true"/>
  </KeyPointLabels>
  <RectangleLabels name="rect" toName="image" smart="true">
    <Label value="Object" smart="true" background="#000000" showInline="true"/>
  </RectangleLabels>
</View>"""


def predict_body(task_id: int, image_url: str, regions: list) -> dict:
    """An interactive /predict body shaped like the one Label Studio 1.23.2 sent (capture 012)."""
    return {
        "tasks": [{"id": task_id, "annotations": [], "drafts": [], "predictions": [],
                   "data": {"image": image_url}, "meta": {}, "project": 1, "inner_id": task_id,
                   "total_annotations": 0, "cancelled_annotations": 0, "total_predictions": 0}],
        "project": "1.1795584533",
        "label_config": LABEL_CONFIG,
        "params": {"login": None, "password": None, "context": {"result": regions}},
    }


def keypoint(x: float, y: float, w: int, h: int, positive: bool = True, i: int = 0,
             label: str = "Object") -> dict:
    """A smart keypoint region as Label Studio sends it, at pixel centre (x, y) of a w x h image."""
    return {"original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"x": (x + 0.5) / w * 100, "y": (y + 0.5) / h * 100, "width": 0.67,
                      "keypointlabels": [label]},
            "is_positive": positive, "id": f"kp{i}", "from_name": "kp", "to_name": "image",
            "type": "keypointlabels", "origin": "manual"}


def rectangle(box: tuple, w: int, h: int, label: str = "Object") -> dict:
    """A smart rectangle region as Label Studio sends it, for the pixel box (x0, y0, x1, y1), x1/y1
    exclusive."""
    x0, y0, x1, y1 = box
    return {"original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"x": x0 / w * 100, "y": y0 / h * 100, "width": (x1 - x0) / w * 100,
                      "height": (y1 - y0) / h * 100, "rotation": 0, "rectanglelabels": [label]},
            "id": "rect1", "from_name": "rect", "to_name": "image", "type": "rectanglelabels",
            "origin": "manual"}


def brush_region(stroke: np.ndarray, label: str = "Object") -> dict:
    """A smart brush region as Label Studio sends it (RLE of the painted pixels)."""
    h, w = stroke.shape
    return {"original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask_to_rle(stroke), "brushlabels": [label]},
            "id": "brush1", "from_name": "tag", "to_name": "image", "type": "brushlabels",
            "origin": "manual"}


def gt_box(gt: np.ndarray) -> tuple:
    ys, xs = np.nonzero(gt)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def scribbles(gt: np.ndarray, width: int = 8) -> list:
    """Two strokes an annotator might paint: the longest horizontal run of the eroded object, then
    the longest vertical one (each `width` px wide, kept inside the object)."""
    inner = cv2.erode(gt.astype(np.uint8), np.ones((width + 1, width + 1), np.uint8)) > 0
    if not inner.any():
        inner = gt

    def longest_run(m: np.ndarray) -> tuple:
        best = (0, 0, 0, 0)          # length, row, start, end
        for r in np.flatnonzero(m.any(axis=1)):
            d = np.diff(np.concatenate([[0], m[r].astype(np.int8), [0]]))
            starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
            k = int(np.argmax(ends - starts))
            if ends[k] - starts[k] > best[0]:
                best = (int(ends[k] - starts[k]), int(r), int(starts[k]), int(ends[k]))
        return best

    strokes = []
    for transpose in (False, True):
        m = inner.T if transpose else inner
        _, r, a, b = longest_run(m)
        s = np.zeros(m.shape, bool)
        s[max(0, r - width // 2):r + width // 2, a:b] = True
        strokes.append((s.T if transpose else s) & gt)
    return strokes


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    return float((pred & gt).sum() / max(1, (pred | gt).sum()))


def pct(values, q) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _serve(httpd) -> str:
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    host, port = httpd.server_address[:2]
    return f"http://{host}:{port}"


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


@dataclass
class BenchServer:
    """The app on a free local port (threaded werkzeug server, as `python -m backend`) and a data
    set's images over HTTP, warmed up: what backend.bench and backend.replaybench measure."""
    app: Any
    masks: List[Path]             # the ground truths of the images measured
    images_url: str               # <images_url>/<mask stem>.jpg is the image
    backend_url: str
    load_s: float                 # seconds the app took to build (the model load)
    server: Any
    http: requests.Session
    timeout: float

    @property
    def backend(self):
        return self.app.extensions["simclick"]

    def post(self, body) -> tuple[dict, float]:
        """POST /predict: (the answer, ms)."""
        t = time.perf_counter()
        r = self.http.post(self.backend_url + "/predict", json=body, timeout=self.timeout)
        ms = (time.perf_counter() - t) * 1000
        r.raise_for_status()
        return r.json(), ms

    def close(self) -> None:
        self.server.shutdown()


def start_bench(data: Path, images: int, checkpoint: Optional[str] = None, device: Optional[str] = None,
                timeout: float = 300, runtime: Optional[str] = None) -> Optional[BenchServer]:
    """Serve the app (MODEL_CHECKPOINT, DEVICE... from the environment; `checkpoint`, `device` and
    `runtime` win) and the first `images` images of `data` (Berkeley layout: images/, masks/), and send one
    warm-up click (the first torch call is slow) on a copy of the first image under another URL.
    None, after saying why on stderr, when `data` has no masks."""
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    masks = sorted((data / "masks").glob("*.png"))[:images]
    if not masks:
        print(f"no masks under {data / 'masks'}", file=sys.stderr)
        return None
    overrides: dict[str, Any] = {k: v for k, v in (("checkpoint", checkpoint), ("device", device),
                                                   ("inference_runtime", runtime)) if v}
    t0 = time.perf_counter()
    app = create_app(Config.from_env(**overrides))
    load_s = time.perf_counter() - t0
    images_url = _serve(ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(data / "images"))))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    bench = BenchServer(app, masks, images_url, f"http://127.0.0.1:{server.server_port}", load_s, server,
                        requests.Session(), timeout)
    gt0 = load_mask(masks[0])
    bench.post(predict_body(0, f"{images_url}/{masks[0].stem}.jpg?warmup",
                            [keypoint(gt0.shape[1] // 2, gt0.shape[0] // 2, gt0.shape[1], gt0.shape[0])]))
    return bench


def answer_mask(answer: dict, h: int, w: int) -> np.ndarray:
    """The union of the brush regions of a /predict answer."""
    pred = np.zeros((h, w), bool)
    for item in answer["results"][0]["result"]:
        pred |= rle_to_mask(item["value"]["rle"], h, w)
    return pred


def measure(args, runtime: Optional[str]) -> Optional[dict]:
    """One run of the benchmark (see the module doc) with `runtime` (None: INFERENCE_RUNTIME)."""
    bench = start_bench(Path(args.data), args.images, args.checkpoint, args.device, runtime=runtime)
    if bench is None:
        return None
    predictor = bench.backend.predictor
    masks, images_url, post = bench.masks, bench.images_url, bench.post

    first: list[float] = []
    later: list[float] = []
    ious: list[list[float]] = [[] for _ in range(args.clicks)]
    for n, mpath in enumerate(masks, start=1):
        gt = load_mask(mpath)
        h, w = gt.shape
        url = f"{images_url}/{mpath.stem}.jpg"
        requests_ = []                   # the bodies' regions, one list per request
        if args.prompt == "box":
            requests_.append([rectangle(gt_box(gt), w, h)])
        elif args.prompt == "brush":
            s1, s2 = scribbles(gt)
            requests_ += [[brush_region(s1)], [brush_region(s1 | s2)]]
        robot = RobotClicker(gt)
        pred = np.zeros_like(gt)
        keypoints = []
        for k in range(args.clicks):
            if k < len(requests_):
                regions = requests_[k]
            else:
                c = robot.next_click(pred)
                keypoints.append(keypoint(c.x, c.y, w, h, c.positive, k))
                # Keypoints come alone (Label Studio sends a rectangle in its own call); a brush
                # region of the same label is sent with them.
                regions = (requests_[-1] if args.prompt == "brush" else []) + keypoints
            answer, ms = post(predict_body(n, url, regions))
            (first if k == 0 else later).append(ms)
            pred = answer_mask(answer, h, w)
            ious[k].append(iou(pred, gt))
    bench.close()

    every = first + later
    return {
        "device": str(predictor.device),
        "runtime": str(getattr(predictor, "runtime", "torch")),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": __import__("torch").get_num_threads(),
        "model_version": predictor.version,
        "model_load_s": round(bench.load_s, 2),
        "images": len(masks), "clicks_per_image": args.clicks, "prompt": args.prompt,
        "ms_per_click": {"p50": round(pct(every, 50), 1), "p95": round(pct(every, 95), 1), "n": len(every)},
        "first_click_ms": {"p50": round(pct(first, 50), 1), "p95": round(pct(first, 95), 1), "n": len(first)},
        "later_click_ms": {"p50": round(pct(later, 50), 1), "p95": round(pct(later, 95), 1), "n": len(later)},
        "mean_iou_per_click": [round(float(np.mean(v)), 3) for v in ious],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m backend.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(default_data_root() / "Berkeley"),
                    help="Berkeley folder (images/, masks/); default $SIMCLICK_DATA_ROOT/Berkeley or ../shared/datasets")
    ap.add_argument("--images", type=int, default=5)
    ap.add_argument("--clicks", type=int, default=5,
                    help="requests per image: the box or the strokes count as requests, then robot clicks")
    ap.add_argument("--prompt", choices=("keypoint", "box", "brush"), default="keypoint",
                    help="what the first request(s) of each image carry (see above)")
    ap.add_argument("--checkpoint", default=None, help="default: MODEL_CHECKPOINT or 'default'")
    ap.add_argument("--device", default=None)
    ap.add_argument("--runtimes", default=None,
                    help="comma-separated INFERENCE_RUNTIME values measured one after the other, e.g. torch,auto "
                         "(default: INFERENCE_RUNTIME alone)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = ap.parse_args(argv)

    reports: list[dict] = []
    for runtime in (args.runtimes.split(",") if args.runtimes else [None]):
        report = measure(args, runtime)
        if report is None:
            return 2
        if reports:
            for name in ("ms_per_click", "first_click_ms", "later_click_ms"):
                report[name]["speedup"] = {q: round(reports[0][name][q] / report[name][q], 2) for q in ("p50", "p95")}
        reports.append(report)
    if args.json:
        print(json.dumps(reports[0] if len(reports) == 1 else reports))
        return 0
    for report in reports:
        print(f"backend HTTP latency per click ({report['device']}, runtime {report['runtime']}, "
              f"{report['torch_threads']} torch threads, model {report['model_version']}, {report['images']} images x "
              f"{args.clicks} requests, prompt {args.prompt})")
        for name in ("ms_per_click", "first_click_ms", "later_click_ms"):
            v = report[name]
            ratio = (f"   {v['speedup']['p50']}x / {v['speedup']['p95']}x faster than {reports[0]['runtime']}"
                     if "speedup" in v else "")
            print(f"  {name:15s} p50 {v['p50']:8.1f} ms   p95 {v['p95']:8.1f} ms   (n={v['n']}){ratio}")
        print(f"  mean IoU after each click: {report['mean_iou_per_click']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
