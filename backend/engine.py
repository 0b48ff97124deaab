"""Turn prompts into masks with the predictor, reusing work between successive requests.

Label Studio resends every smart region of a label on each click, so a request is a *sequence* of
steps, one prediction each: a keypoint (one click) or a brush stroke (its clicks together, one
network run, `session.add_clicks`). Each (image, image tag, label) keeps a predictor session; a
new request is compared with the steps that session has seen:
- same sequence: the cached answer, no network run;
- it extends the cached one: only the new steps run;
- it diverges (a keypoint deleted or moved): undo back to the shared prefix, then run the rest;
  a sequence that only drops steps at the end costs no network run at all (undo restores). The
  predictor keeps only its last `max_history` masks, so an undo deeper than that replays from
  the start instead (an undo past the history would restore an empty mask).

Several replicas (a load balancer that is not sticky): a request whose session is not in this
process replays its steps from the request (Label Studio sends every smart region of the label on
each click), which gives the mask the cached session gives. The one thing a request does not carry
is a smart rectangle drawn in an earlier request (Label Studio sends it once, then the keypoints
without it): with REDIS_URL set, that box is kept in Redis (`SharedPrompts`, one small key per
session, idle TTL = CACHE_TTL) and read on every request, so every replica applies it. With
SHARED_SESSION_KB > 0 the state a continuation needs (the steps, the mask at the predictor's
working resolution, the answer) is kept there too, compressed, after every request: a replica that
misses the session but finds it restores it (`Session.restore`, no network run) and runs only the
new clicks, which gives the mask the cached session gives. A request that is not a continuation of
the stored steps (a click deleted or moved), or a state over the size bound, replays.

Memory: the sessions of every model live in one cache bounded in bytes (SESSION_CACHE_MB), sized
by what each session holds (its working image, coarse view, mask and undo history, plus the
answer kept here as a packed bit mask); the least recently used go first. A request may run for
PREDICT_TIMEOUT seconds, for all its labels together (`Deadline`), checked before each network run:
past it, PredictTimeout is raised and the steps already run stay in the session, so the next
request continues from them.

Prompts other than keypoints:
- a smart rectangle is given to the session as a box (`session.set_box`, on the whole image): a
  model trained with box prompts reads it, a click-only model gets a GrabCut seed from it
  (model.box_seed). Later keypoints of the same label (sent without the box) refine it while
  they lie inside box + BOX_MARGIN; a keypoint outside starts over without the box;
- a smart brush stroke becomes positive clicks along the stroke, run as one step; a compact
  painted blob (not a thin scribble) is also given to the predictor as the prior mask to refine.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, cast

import cv2
import numpy as np

from model.clicks import Click
from model.interface import ClickPredictor, ClickSession

from .bytecache import ByteCache
from .payload import PayloadError, Prompt

log = logging.getLogger(__name__)

MAX_BRUSH_CLICKS = 5
MAX_CANDIDATES = 1 << 20      # pixels of a stroke considered for its clicks (see brush_clicks)
# A stroke whose inscribed radius is at least this fraction of sqrt(area) is a painted blob
# (a disk gives 0.56, a square 0.5); a scribble 4x longer than wide gives 0.25, longer ones less.
BLOB_COMPACTNESS = 0.25


def held_bytes(obj, skip: tuple = ("predictor",)) -> int:
    """Bytes of the arrays and tensors an object holds in its attributes, directly or inside lists,
    dicts and plain objects (a predictor session: working image, coarse view and its encoding, mask,
    undo history). The session's layout belongs to model/, so it is walked, not listed; the shared
    predictor (the weights) is skipped."""
    seen: set = set()

    def walk(v, depth: int) -> int:
        if id(v) in seen or depth > 4:
            return 0
        seen.add(id(v))
        if hasattr(v, "shape") and hasattr(v, "nbytes"):
            return int(v.nbytes)
        items: Iterable[Any]
        if isinstance(v, dict):
            items = v.values()
        elif isinstance(v, (list, tuple)):
            items = v
        elif hasattr(v, "__dict__") and not isinstance(v, type):
            items = vars(v).values()
        else:
            return 0
        return sum(walk(x, depth + 1) for x in items)

    return sum(walk(v, 0) for k, v in vars(obj).items() if k not in skip)


class PredictTimeout(Exception):
    """PREDICT_TIMEOUT ran out between two clicks; the clicks run so far stay in the session."""

    def __init__(self, done: int, total: int):
        super().__init__(f"{done} of {total} clicks run")
        self.done, self.total = done, total


class Deadline:
    """PREDICT_TIMEOUT of one request, over all its labels: once it has passed, no network run
    starts, except the request's first one (a request that timed out before its first run would
    never make progress; with it, each retry continues from the steps the last one kept)."""

    def __init__(self, seconds: float, clock=time.monotonic):
        self.clock = clock
        self.at = clock() + seconds
        self.runs = 0

    def check(self, done: int, total: int) -> None:
        """Before a network run: PredictTimeout(done, total) when it may not start."""
        if self.runs and self.clock() > self.at:
            raise PredictTimeout(done, total)

    def ran(self) -> None:
        self.runs += 1


@dataclass(frozen=True)
class Frame:
    """[x0, x1) x [y0, y1) in full-resolution pixels: a session's image (always the whole image,
    Frame(0, 0, width, height)), or a box grown by its margin (`Segmenter.box_frame`)."""
    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0

    def contains(self, c: Click) -> bool:
        return self.x0 - 0.5 <= c.x <= self.x1 - 0.5 and self.y0 - 0.5 <= c.y <= self.y1 - 0.5

    def clamp(self, c: Click) -> Click:
        """The click moved onto the frame's nearest pixel centre (scale_prompt's rounding may put
        one a hair outside the image)."""
        return Click(min(max(c.x, float(self.x0)), self.x1 - 1.0), min(max(c.y, float(self.y0)), self.y1 - 1.0),
                     c.positive)


Step = tuple      # the clicks of one prediction: a keypoint (one click) or a brush stroke (several)


@dataclass
class Plan:
    frame: Frame                      # the whole image
    steps: list[Step]
    prior: np.ndarray | None = None   # bool, image shape
    box: tuple | None = None          # the smart rectangle that applies, kept for later keypoints; session.set_box

    @property
    def prior_sig(self) -> str | None:
        if self.prior is None:
            return None
        return hashlib.sha1(np.packbits(self.prior).tobytes()).hexdigest()

    @property
    def identity(self) -> tuple:
        """What a session is opened with: a plan with another identity needs another session."""
        return (self.frame, self.prior_sig, self.box)


@dataclass
class Entry:
    session: ClickSession
    identity: tuple                         # Plan.identity of the plans it serves
    box: tuple | None                       # the box prompt (Plan.box)
    steps: list = field(default_factory=list)
    bits: np.ndarray | None = None          # the mask after `steps`, image-shaped, np.packbits
    score: float = 0.0                      # mean probability inside that mask
    depth: int = 0                          # how many steps the session can undo exactly
    boxed: bool = False                     # the box has been given to the session
    owner: int = 0                          # the id of the Segmenter (model) it belongs to
    lock: threading.Lock = field(default_factory=threading.Lock)

    def remember(self, prob: np.ndarray, threshold: float) -> None:
        mask = prob > threshold
        self.bits = np.packbits(mask)
        self.score = float(prob[mask].mean()) if mask.any() else 0.0

    def nbytes(self) -> int:
        return held_bytes(self.session) + (0 if self.bits is None else self.bits.nbytes)


@dataclass
class Outcome:
    bits: np.ndarray          # image-shaped bool mask, packed
    score: float
    ran: int                  # network runs (predictions) this request cost
    clicks: int               # clicks in the sequence
    box: bool = False         # the model was given the box as a prompt

    def full_mask(self, height: int, width: int) -> np.ndarray:
        """The mask, bool height x width (the image the session was opened on)."""
        return np.unpackbits(self.bits, count=height * width).reshape(height, width).astype(bool)


def _same_click(a: Click, b: Click) -> bool:
    return a.positive == b.positive and abs(a.x - b.x) < 1e-3 and abs(a.y - b.y) < 1e-3


def common_prefix(a: list, b: list) -> int:
    """How many leading steps two step sequences share."""
    n = 0
    for x, y in zip(a, b):
        if len(x) != len(y) or not all(_same_click(c, d) for c, d in zip(x, y)):
            break
        n += 1
    return n


def brush_clicks(stroke: np.ndarray) -> tuple[list[Click], bool]:
    """Positive clicks along a painted stroke, and whether the stroke is a compact blob.

    Clicks sit well inside the stroke (on pixels at least half as deep as the deepest one, so
    never on its ragged edge), spread by farthest-point sampling, at most MAX_BRUSH_CLICKS.
    """
    area = int(np.count_nonzero(stroke))
    if not area:
        return [], False
    padded = np.pad(stroke.astype(bool, copy=False), 1).view(np.uint8)       # one copy, 0/1 bytes
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    del padded
    peak = float(dist.max())
    blob = peak >= BLOB_COMPACTNESS * math.sqrt(area)
    inner = dist >= max(1.0, 0.5 * peak) if peak >= 2.0 else dist > 0
    # A stroke of millions of pixels (a whole 50 MP image painted) would make coordinate arrays of
    # 16 bytes per pixel and distance maps of 8: its candidates are taken on a grid of `step`
    # pixels instead, about MAX_CANDIDATES of them, far finer than the clicks' spacing (8 px at least).
    step = max(1, math.ceil(math.sqrt(np.count_nonzero(inner) / MAX_CANDIDATES)))
    ys, xs = np.nonzero(inner[::step, ::step])
    ys, xs = ys * step, xs * step
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


class SharedPrompts:
    """The smart rectangle that applies to each (image, image tag, label), in Redis, for replicas.

    One key per session (`simclick:prompt:<sha1>`, a JSON box, expiring after `ttl` idle seconds),
    written only when the box changes. Redis errors are logged and the process falls back to its
    own memory (what a single replica does) for `retry_after` seconds, so a Redis that is down
    costs one timeout a minute, not one per click."""

    PREFIX = "simclick:prompt:"

    SESSION_PREFIX = "simclick:session:"

    def __init__(self, client, ttl: float, retry_after: float = 60.0, max_session_bytes: int = 0):
        self.client, self.ttl, self.retry_after = client, max(1, int(ttl)), retry_after
        self.max_session_bytes = max_session_bytes      # 0: box prompts only, no session states
        self._down_until = 0.0

    @classmethod
    def key(cls, image_key: str, to_name: str, label: str | None) -> str:
        return cls.PREFIX + hashlib.sha1("\0".join((image_key, to_name, label or "")).encode()).hexdigest()

    def _failed(self, e: Exception) -> None:
        self._down_until = time.monotonic() + self.retry_after
        log.warning("Redis (shared box prompts) failed: %s; this replica uses its own memory for %.0f s",
                    e, self.retry_after)

    @property
    def up(self) -> bool:
        return time.monotonic() >= self._down_until

    def get(self, key: str):
        """(True, box or None) from Redis; (False, None) when Redis did not answer."""
        if not self.up:
            return False, None
        try:
            raw = self.client.get(key)
            if raw is not None:
                self.client.expire(key, self.ttl)
        except Exception as e:   # redis-py's errors, socket errors: the request goes on without it
            self._failed(e)
            return False, None
        return True, (tuple(json.loads(raw)) if raw is not None else None)

    @classmethod
    def session_key(cls, version: str, image_key: str, to_name: str, label: str | None) -> str:
        return cls.SESSION_PREFIX + hashlib.sha1("\0".join((version, image_key, to_name, label or "")).encode()).hexdigest()

    def get_session(self, key: str):
        """(meta dict, working mask bits, answer bits) or None."""
        if not self.up or not self.max_session_bytes:
            return None
        try:
            got = self.client.hgetall(key)
        except Exception as e:
            self._failed(e)
            return None
        if not got or not {b"meta", b"work", b"bits"} <= set(got):
            return None
        try:
            return (json.loads(got[b"meta"]), np.frombuffer(zlib.decompress(got[b"work"]), np.uint8),
                    np.frombuffer(zlib.decompress(got[b"bits"]), np.uint8).copy())
        except (ValueError, zlib.error):
            return None

    def put_session(self, key: str, meta: dict, work: np.ndarray, bits: np.ndarray) -> bool:
        """Store (compressed) unless over max_session_bytes; False when not stored."""
        if not self.up or not self.max_session_bytes:
            return False
        w, b = zlib.compress(work.tobytes(), 1), zlib.compress(bits.tobytes(), 1)
        if len(w) + len(b) > self.max_session_bytes:
            try:
                self.client.delete(key)      # an older, smaller state would be a prefix: still exact, but stale
            except Exception as e:
                self._failed(e)
            return False
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(key)
            pipe.hset(key, mapping={"meta": json.dumps(meta), "work": w, "bits": b})
            pipe.expire(key, self.ttl)
            pipe.execute()
        except Exception as e:
            self._failed(e)
            return False
        return True

    def put(self, key: str, box) -> None:
        if not self.up:
            return
        try:
            if box is None:
                self.client.delete(key)
            else:
                self.client.set(key, json.dumps([float(v) for v in box]), ex=self.ttl)
        except Exception as e:
            self._failed(e)


_CACHED = object()


class Segmenter:
    """One model's click sessions. `sessions` is shared by every model's Segmenter (keys start with
    the Segmenter's id), so one byte budget covers them all."""

    _ids = itertools.count(1)

    def __init__(self, predictor: ClickPredictor, sessions: ByteCache, box_margin: float = 0.15,
                 threshold: float = 0.5, shared: SharedPrompts | None = None):
        self.predictor = predictor
        self.sessions = sessions
        self.shared = shared
        self.box_margin = box_margin
        self.threshold = threshold
        self.id = next(self._ids)

    def forget(self) -> None:
        """Drop this model's sessions (it is no longer served)."""
        self.sessions.discard(lambda key: key[0] == self.id)

    # -- planning --------------------------------------------------------------------------------
    def box_frame(self, box: tuple, width: int, height: int) -> Frame:
        x0, y0, x1, y1 = box
        mx, my = self.box_margin * (x1 - x0), self.box_margin * (y1 - y0)
        return Frame(max(0, int(math.floor(x0 - mx))), max(0, int(math.floor(y0 - my))),
                     min(width, int(math.ceil(x1 + mx))), min(height, int(math.ceil(y1 + my))))

    def plan(self, prompt: Prompt, width: int, height: int, cached: Entry | None, remembered=_CACHED) -> Plan:
        """The session and the steps a prompt needs. A smart rectangle is a prompt of its own
        (session.set_box on the whole image: a model trained with boxes reads it, a click-only one
        gets a GrabCut seed). The box stays for later keypoints of the label (Label Studio sends
        them without it) while they fall inside box + margin; a keypoint outside it means the box
        no longer applies. `remembered`: the box that applies from earlier requests
        (SharedPrompts); by default the cached session's."""
        whole = Frame(0, 0, width, height)
        if remembered is _CACHED:
            remembered = cached.box if cached is not None else None
        box = prompt.box
        if box is None and remembered is not None and prompt.brush is None:
            box = remembered
        if box is not None and not all(self.box_frame(box, width, height).contains(c) for c in prompt.clicks):
            box = None
        steps: list[tuple[Click, ...]] = []
        prior = None
        if prompt.brush is not None:
            bclicks, blob = brush_clicks(prompt.brush)
            if bclicks:
                steps.append(tuple(Click(c.x, c.y, True) for c in bclicks))
            if blob:
                prior = prompt.brush.copy()
        steps += [(c,) for c in prompt.clicks]
        return Plan(frame=whole, steps=[tuple(whole.clamp(c) for c in st) for st in steps], prior=prior, box=box)

    # -- running ---------------------------------------------------------------------------------
    def segment(self, image_key: str, image: np.ndarray, prompt: Prompt,
                deadline: Deadline | None = None) -> Outcome:
        """Run the prompt's steps; past `deadline` (shared by every label of a request)
        PredictTimeout is raised before a network run, once the request has had one."""
        height, width = image.shape[:2]
        # A hash: the label and image tag names come from the request, and could be megabytes each.
        key = (self.id, hashlib.sha256(json.dumps([image_key, prompt.to_name, prompt.label]).encode()).hexdigest())
        cached = self.sessions.get(key)
        remembered, shared_key = _CACHED, None
        if self.shared is not None:
            shared_key = SharedPrompts.key(image_key, prompt.to_name, prompt.label)
            ok, box = self.shared.get(shared_key)
            if ok:
                remembered = box
        plan = self.plan(prompt, width, height, cached, remembered)
        if self.shared is not None and shared_key is not None and plan.box != (remembered if remembered is not _CACHED else None):
            self.shared.put(shared_key, plan.box)
        if not plan.steps and plan.box is None:
            raise PayloadError("the smart regions give no click (an empty brush stroke?)")
        session_key = None
        if self.shared is not None and self.shared.max_session_bytes:
            session_key = SharedPrompts.session_key(str(getattr(self.predictor, "version", "")), image_key,
                                                    prompt.to_name, prompt.label)
        if cached is None or cached.identity != plan.identity:
            cached = self._continue(session_key, plan, image) if session_key else None
        elif session_key and len(plan.steps) - common_prefix(cached.steps, plan.steps) > 1:
            # This replica's session is behind (the clicks in between went elsewhere): a stored
            # state further along saves running them here.
            cached = self._continue(session_key, plan, image, common_prefix(cached.steps, plan.steps)) or cached
        if cached is None:
            if deadline is not None:            # a new session costs the image's encoding: not past it
                deadline.check(0, len(plan.steps))
            session = self.predictor.open(image, prior_mask=plan.prior)
            cached = Entry(session=session, identity=plan.identity, box=plan.box, owner=self.id)
        with cached.lock:
            before = len(cached.steps)
            try:
                outcome = self._advance(cached, plan.steps, deadline)
            except PredictTimeout:
                self._keep(key, cached)      # the steps run so far are consistent: keep them
                self._share(session_key, cached)
                raise
            except BaseException:
                # A half-run step leaves the session in an unknown state: forget it.
                self.sessions.pop(key)
                raise
            self._keep(key, cached)          # (re)sized: the session grew by this request's steps
            if outcome.ran or len(cached.steps) != before:   # not a repeat: the state changed
                self._share(session_key, cached)
            return outcome

    # -- sessions shared through Redis (replicas) --------------------------------------------------
    @staticmethod
    def _identity_json(identity: tuple) -> list:
        frame, prior_sig, box = identity
        return [[frame.x0, frame.y0, frame.x1, frame.y1], prior_sig, list(box) if box is not None else None]

    def _share(self, session_key: str | None, e: Entry) -> None:
        if self.shared is None or session_key is None or e.bits is None or not getattr(e.session, "restorable", False):
            return
        state = e.session.state()
        meta = {"identity": self._identity_json(e.identity), "score": e.score, "boxed": e.boxed,
                "steps": [[[c.x, c.y, c.positive] for c in st] for st in e.steps],
                "session": {k: v for k, v in state.items() if k != "mask"}}
        self.shared.put_session(session_key, meta, state["mask"], e.bits)

    def _continue(self, session_key: str, plan: Plan, image: np.ndarray, have: int = -1) -> Entry | None:
        """A session restored from the state another replica stored, when the request continues
        its steps (and they are more than the `have` steps this replica could reuse); None
        otherwise (the caller replays, or extends its own session)."""
        got = self.shared.get_session(session_key) if self.shared is not None else None
        if got is None:
            return None
        meta, work, bits = got
        if meta.get("identity") != json.loads(json.dumps(self._identity_json(plan.identity))):
            return None
        steps = [tuple(Click(float(x), float(y), bool(pos)) for x, y, pos in st) for st in meta["steps"]]
        if common_prefix(steps, plan.steps) != len(steps) or len(steps) <= have:
            return None
        session = self.predictor.open(image, prior_mask=plan.prior)
        if not getattr(session, "restorable", False):
            return None
        try:
            session.restore({**meta["session"], "mask": work})
        except (ValueError, KeyError, TypeError) as err:
            log.info("a shared session state does not fit (%s): replaying", err)
            return None
        h, w = plan.frame.shape
        if bits.size != (h * w + 7) // 8:
            return None
        # depth -1: the first step run here cannot be undone exactly either (the session would go
        # back to the restored mask, where the original session goes back to its float16 history,
        # and the score would be that of a 0/1 map): such an undo replays.
        return Entry(session=session, identity=plan.identity, box=plan.box, steps=steps, bits=bits, score=float(meta["score"]), depth=-1, boxed=bool(meta["boxed"]),
                     owner=self.id)

    def _keep(self, key, entry: Entry) -> None:
        if not self.sessions.put(key, entry, entry.nbytes()):
            log.info("a click session of %.0f MB is over SESSION_CACHE_MB: not kept, the next click "
                     "replays", entry.nbytes() / 2**20)

    def _advance(self, e: Entry, steps: list, deadline: Deadline | None) -> Outcome:
        clicks = sum(len(st) for st in steps)
        boxed = e.box is not None
        k = common_prefix(e.steps, steps)
        if k == len(steps) == len(e.steps) and e.bits is not None:
            return Outcome(e.bits, e.score, 0, clicks, boxed)
        undo = len(e.steps) - k
        if undo > 0 and (k == 0 and not boxed or undo > e.depth):
            e.session.reset()       # back to the start: the history does not reach that far
            e.steps, e.bits, e.depth, e.boxed = [], None, 0, False
        elif undo > 0:
            for _ in range(undo):
                prob = e.session.undo()
            e.steps, e.depth = e.steps[:k], e.depth - undo
            e.remember(cast(np.ndarray, prob), self.threshold)   # undo <= depth: never None here
        ran = 0
        max_history = self.predictor.options.max_history
        if boxed and not e.boxed:
            if deadline is not None:
                deadline.check(len(e.steps), len(steps))
            x0, y0, x1, y1 = cast(tuple, e.box)      # boxed: a box prompt is there
            e.remember(e.session.set_box(x0, y0, x1, y1), self.threshold)
            e.boxed, ran = True, 1
            if deadline is not None:
                deadline.ran()
        for st in steps[len(e.steps):]:
            if deadline is not None:
                deadline.check(len(e.steps), len(steps))
            # One prediction per step: a brush stroke's clicks go in together (and undo together).
            prob = e.session.add_clicks([(c.x, c.y, c.positive) for c in st])
            e.steps.append(st)
            e.depth = min(e.depth + 1, max_history)
            e.remember(prob, self.threshold)
            ran += 1
            if deadline is not None:
                deadline.ran()
        return Outcome(cast(np.ndarray, e.bits), e.score, ran, clicks, boxed)
