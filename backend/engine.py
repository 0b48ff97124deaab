"""Turn prompts into masks with the predictor, reusing work between successive requests.

Label Studio resends every smart region of a label on each click, so a request is a click
*sequence*. Each (image, image tag, label) keeps a predictor session; a new request is compared
with the clicks that session has seen:
- same sequence: the cached answer, no network run;
- it extends the cached one: only the new clicks run;
- it diverges (a keypoint deleted or moved): undo back to the shared prefix, then run the rest;
  a sequence that only drops clicks at the end costs no network run at all (undo restores).

Prompts other than keypoints become clicks too:
- a smart rectangle crops the image to the box plus BOX_MARGIN; its first click is the box centre,
  later keypoints of the same label inside the crop refine it, and the mask is pasted back (zero
  outside the crop). A keypoint outside the crop starts over on the whole image;
- a smart brush stroke becomes positive clicks along the stroke; a compact painted blob (not a thin
  scribble) is also given to the predictor as the prior mask to refine.
"""
from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import cv2
import numpy as np

from .payload import Click, PayloadError, Prompt

log = logging.getLogger(__name__)

MAX_BRUSH_CLICKS = 5
# A stroke whose inscribed radius is at least this fraction of sqrt(area) is a painted blob
# (a disk gives 0.56, a square 0.5); a scribble 4x longer than wide gives 0.25, longer ones less.
BLOB_COMPACTNESS = 0.25


class TTLCache:
    """A small LRU map with a time-to-live; thread-safe."""

    def __init__(self, maxsize: int, ttl: float, clock=time.monotonic):
        self.maxsize, self.ttl, self.clock = maxsize, ttl, clock
        self._d: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            item = self._d.get(key)
            if item is None:
                return None
            stamp, value = item
            if self.clock() - stamp > self.ttl:
                del self._d[key]
                return None
            self._d[key] = (self.clock(), value)
            self._d.move_to_end(key)
            return value

    def put(self, key, value) -> None:
        with self._lock:
            self._d[key] = (self.clock(), value)
            self._d.move_to_end(key)
            now = self.clock()
            for k in [k for k, (s, _) in self._d.items() if now - s > self.ttl]:
                del self._d[k]
            while len(self._d) > self.maxsize:
                self._d.popitem(last=False)

    def pop(self, key) -> None:
        with self._lock:
            self._d.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._d)


@dataclass(frozen=True)
class Frame:
    """The part of the image a session sees, [x0, x1) x [y0, y1) in full-resolution pixels."""
    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0

    def contains(self, c: Click) -> bool:
        return self.x0 - 0.5 <= c.x <= self.x1 - 0.5 and self.y0 - 0.5 <= c.y <= self.y1 - 0.5

    def local(self, c: Click) -> Click:
        h, w = self.shape
        return Click(min(max(c.x - self.x0, 0.0), w - 1.0), min(max(c.y - self.y0, 0.0), h - 1.0),
                     c.positive)


@dataclass
class Plan:
    frame: Frame
    clicks: list            # in frame coordinates
    prior: np.ndarray | None = None   # bool, frame shape
    box: tuple | None = None          # the smart rectangle this plan came from (full-res)

    @property
    def prior_sig(self) -> str | None:
        if self.prior is None:
            return None
        return hashlib.sha1(np.packbits(self.prior).tobytes()).hexdigest()


@dataclass
class Entry:
    session: object
    frame: Frame
    prior_sig: str | None
    box: tuple | None
    clicks: list = field(default_factory=list)
    prob: np.ndarray | None = None          # frame-shaped float32, after `clicks`
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Outcome:
    prob: np.ndarray          # frame-shaped float32 probability
    frame: Frame
    ran: int                  # network runs this request cost
    reused: int               # clicks reused from the cached session
    clicks: int               # clicks in the sequence

    def full_mask(self, height: int, width: int, threshold: float) -> np.ndarray:
        out = np.zeros((height, width), bool)
        f = self.frame
        out[f.y0:f.y1, f.x0:f.x1] = self.prob > threshold
        return out


def _same(a: Click, b: Click) -> bool:
    return a.positive == b.positive and abs(a.x - b.x) < 1e-3 and abs(a.y - b.y) < 1e-3


def common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if not _same(x, y):
            break
        n += 1
    return n


def brush_clicks(stroke: np.ndarray) -> tuple[list[Click], bool]:
    """Positive clicks along a painted stroke, and whether the stroke is a compact blob.

    Clicks sit well inside the stroke (on pixels at least half as deep as the deepest one, so
    never on its ragged edge), spread by farthest-point sampling, at most MAX_BRUSH_CLICKS.
    """
    m = stroke.astype(np.uint8)
    if not m.any():
        return [], False
    dist = cv2.distanceTransform(np.pad(m, 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
    peak = float(dist.max())
    area = int(m.sum())
    blob = peak >= BLOB_COMPACTNESS * math.sqrt(area)
    ys, xs = np.nonzero(dist >= max(1.0, 0.5 * peak) if peak >= 2.0 else dist > 0)
    first = int(np.argmax(dist[ys, xs]))
    chosen = [first]
    mind = np.hypot(xs - xs[first], ys - ys[first])
    # Spacing: clicks closer than a tenth of the stroke's extent add nothing.
    extent = math.hypot(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
    while len(chosen) < (1 if blob else MAX_BRUSH_CLICKS):
        nxt = int(np.argmax(mind))
        if mind[nxt] < max(8.0, 0.1 * extent):
            break
        chosen.append(nxt)
        mind = np.minimum(mind, np.hypot(xs - xs[nxt], ys - ys[nxt]))
    return [Click(float(xs[i]), float(ys[i]), True) for i in chosen], blob


class Segmenter:
    def __init__(self, predictor, session_cache_size: int = 16, image_cache_size: int = 8,
                 ttl: float = 1800.0, box_margin: float = 0.15):
        self.predictor = predictor
        self.box_margin = box_margin
        self.sessions = TTLCache(session_cache_size, ttl)
        self.images = TTLCache(image_cache_size, ttl)

    # -- planning --------------------------------------------------------------------------------
    def box_frame(self, box: tuple, width: int, height: int) -> Frame:
        x0, y0, x1, y1 = box
        mx, my = self.box_margin * (x1 - x0), self.box_margin * (y1 - y0)
        return Frame(max(0, int(math.floor(x0 - mx))), max(0, int(math.floor(y0 - my))),
                     min(width, int(math.ceil(x1 + mx))), min(height, int(math.ceil(y1 + my))))

    def plan(self, prompt: Prompt, width: int, height: int, cached: Entry | None) -> Plan:
        box = prompt.box
        if box is None and cached is not None and cached.box is not None and prompt.brush is None:
            box = cached.box  # corrective keypoints after a smart rectangle refine inside it
        frame = Frame(0, 0, width, height)
        if box is not None:
            bf = self.box_frame(box, width, height)
            if all(bf.contains(c) for c in prompt.clicks):
                frame = bf
            elif prompt.box is None:
                box = None    # a keypoint outside the old box: the box no longer applies
        seq: list[Click] = []
        if box is not None:
            seq.append(Click((box[0] + box[2]) / 2 - 0.5, (box[1] + box[3]) / 2 - 0.5, True))
        prior = None
        if prompt.brush is not None:
            bclicks, blob = brush_clicks(prompt.brush[frame.y0:frame.y1, frame.x0:frame.x1])
            seq += [Click(c.x + frame.x0, c.y + frame.y0, True) for c in bclicks]
            if blob:
                prior = prompt.brush[frame.y0:frame.y1, frame.x0:frame.x1].copy()
        seq += prompt.clicks
        return Plan(frame=frame, clicks=[frame.local(c) for c in seq], prior=prior,
                    box=box if frame != Frame(0, 0, width, height) else None)

    # -- running ---------------------------------------------------------------------------------
    def segment(self, image_key: str, image: np.ndarray, prompt: Prompt) -> Outcome:
        height, width = image.shape[:2]
        key = (image_key, prompt.to_name, prompt.label)
        cached = self.sessions.get(key)
        plan = self.plan(prompt, width, height, cached)
        if not plan.clicks:
            raise PayloadError("the smart regions give no click (an empty brush stroke?)")
        if cached is None or cached.frame != plan.frame or cached.prior_sig != plan.prior_sig:
            f = plan.frame
            session = self.predictor.open(image[f.y0:f.y1, f.x0:f.x1], prior_mask=plan.prior)
            cached = Entry(session=session, frame=f, prior_sig=plan.prior_sig, box=plan.box)
            self.sessions.put(key, cached)
        with cached.lock:
            try:
                return self._advance(cached, plan.clicks)
            except BaseException:
                # A half-run sequence leaves the session in an unknown state: forget it.
                self.sessions.pop(key)
                raise

    def _advance(self, e: Entry, clicks: list) -> Outcome:
        k = common_prefix(e.clicks, clicks)
        ran = 0
        if k == len(clicks) == len(e.clicks) and e.prob is not None:
            return Outcome(e.prob, e.frame, 0, k, len(clicks))
        if k < len(e.clicks):
            if k == 0:
                e.session.reset()
                e.prob = None
            else:
                for _ in range(len(e.clicks) - k):
                    e.prob = e.session.undo()
            e.clicks = e.clicks[:k]
        for c in clicks[k:]:
            e.prob = e.session.add_click(c.x, c.y, c.positive)
            e.clicks.append(c)
            ran += 1
        return Outcome(e.prob, e.frame, ran, k, len(clicks))
