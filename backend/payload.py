"""Parse Label Studio's POST /predict body into per-object prompts.

Label Studio (1.23) sends `params.context.result`: the smart regions the annotator just placed.
All smart keypoints of one label arrive together, a smart rectangle in its own call, a smart brush
stroke as an RLE mask. Each region carries its label; every label is one object, and its mask goes
to the BrushLabels (or PolygonLabels) label of the same name.

Coordinates arrive in percent of the image; here they become full-resolution pixel coordinates of
the image as the annotator sees it (x = column, y = row, pixel centres at integers).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from model.clicks import Click

from .labelstudio.labelconfig import LabelConfig, parse_label_config
from .labelstudio.masks import MaskFormatError, check_rle, rle_bytes, rle_to_mask


class PayloadError(ValueError):
    """The request body is not what Label Studio sends; the message says what is wrong. `status`:
    400, or 413 for sizes over a limit."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# A keypoint that sits off by this much (editor rounding) still matches the image's size.
SIZE_TOLERANCE = 1
SMART_TYPES = ("keypointlabels", "keypoint", "rectanglelabels", "rectangle", "brushlabels", "brush")


@dataclass
class Prompt:
    """Everything the annotator gave for one object (one label on one image)."""
    label: str | None
    to_name: str
    clicks: list = field(default_factory=list)        # keypoints, in the order they were placed
    box: tuple | None = None                          # (x0, y0, x1, y1) continuous pixels
    brush: np.ndarray | None = None                   # bool H x W at (orig_h, orig_w), by decode_brushes
    size: tuple | None = None                         # (original_width, original_height) sent
    strokes: list = field(default_factory=list)       # brush RLEs (bytes, header checked), not decoded yet


@dataclass
class PredictRequest:
    tasks: list
    project: str
    label_config: LabelConfig
    context: list | None          # None = batch prediction ("Retrieve predictions", task opened)

    @property
    def interactive(self) -> bool:
        return self.context is not None


def _num(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PayloadError(f"{what} must be a number, got {value!r}")
    try:
        v = float(value)
    except OverflowError:                      # an integer of hundreds of digits
        raise PayloadError(f"{what} is out of range") from None
    if not np.isfinite(v):
        raise PayloadError(f"{what} must be finite, got {value!r}")
    return v


def parse_predict(body) -> PredictRequest:
    if not isinstance(body, dict):
        raise PayloadError("the body must be a JSON object with tasks, label_config and params")
    tasks = body.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, dict) for t in tasks):
        raise PayloadError("'tasks' must be a non-empty list of task objects")
    for t in tasks:
        if not isinstance(t.get("data"), dict):
            raise PayloadError(f"task {t.get('id')!r} has no 'data' object")
    xml = body.get("label_config")
    if not isinstance(xml, str) or not xml.strip():
        raise PayloadError("'label_config' (the project's <View> XML) is missing")
    try:
        lc = parse_label_config(xml)
    except ValueError as e:
        raise PayloadError(str(e)) from None
    params = body.get("params") or {}
    if not isinstance(params, dict):
        raise PayloadError("'params' must be an object")
    context = params.get("context")
    results = None
    if context is not None:
        if not isinstance(context, dict):
            raise PayloadError("'params.context' must be an object with a 'result' list, or null")
        results = context.get("result")
        if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
            raise PayloadError("'params.context.result' must be a list of region objects")
    return PredictRequest(tasks=tasks, project=str(body.get("project") or ""), label_config=lc, context=results)


def _label_of(region: dict, value: dict, rtype: str) -> str | None:
    labels = value.get(rtype)
    if labels is None:
        return None
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise PayloadError(f"value.{rtype} must be a list of label names, got {labels!r}")
    if len(labels) > 1:
        raise PayloadError(f"a smart region has several labels {labels}; give it one")
    return labels[0] if labels else None


def _size(region: dict, max_pixels: int | None) -> tuple[int, int]:
    w = _num(region.get("original_width"), "original_width")
    h = _num(region.get("original_height"), "original_height")
    if w < 1 or h < 1 or w != int(w) or h != int(h):
        raise PayloadError(f"original_width/original_height must be positive integers, got {w}x{h}")
    w, h = int(w), int(h)
    # Checked before anything of that size exists (a brush RLE decodes to w x h x 4 bytes).
    if max_pixels is not None and w * h > max_pixels:
        raise PayloadError(f"a region declares a {w}x{h} image = {w * h} pixels, over MAX_IMAGE_PIXELS="
                           f"{max_pixels}", 413)
    return w, h


def parse_prompts(results: list, max_pixels: int | None = None, max_regions: int | None = None,
                  max_brush_pixels: int | None = None, negative_controls: frozenset = frozenset()) -> list[Prompt]:
    """Group the context regions by (image, label) into prompts, in order of first appearance.

    Pixel coordinates here are relative to the (original_width, original_height) the region was
    drawn on; `scale_prompt` maps them onto the image actually downloaded. Brush strokes are kept
    as RLE, their headers checked: `decode_brushes` decodes them once the labels are known to be
    valid. Refused before any decoding: regions declaring more than `max_pixels` pixels (413),
    brush strokes declaring more than `max_brush_pixels` in all (413: each decodes to a mask of
    the size it declares), more than `max_regions` smart regions (each may cost a network run).
    A keypoint is negative when Label Studio says so (`is_positive: false`, an Alt+click) or when
    its control (`from_name`) is one of `negative_controls` (LabelConfig.negative_controls).
    """
    smart = sum(1 for r in results if str(r.get("type") or "").lower() in SMART_TYPES)
    if max_regions is not None and smart > max_regions:
        raise PayloadError(f"{smart} smart regions (keypoints, rectangles, brush strokes) in one request, "
                           f"over MAX_CLICKS={max_regions}: delete some keypoints, or raise MAX_CLICKS")
    prompts: dict[tuple, Prompt] = {}
    brush_pixels = 0
    for i, region in enumerate(results):
        rtype = str(region.get("type") or "").lower()
        value = region.get("value")
        if not isinstance(value, dict):
            raise PayloadError(f"context.result[{i}] has no 'value' object")
        if rtype not in SMART_TYPES:
            continue  # e.g. a Choices or TextArea result of the same annotation: not a prompt
        rot = region.get("image_rotation") or 0
        if _num(rot, "image_rotation") % 360 != 0:
            raise PayloadError("smart regions on a rotated image (image_rotation != 0) are not "
                               "supported: rotate the image back to 0 degrees")
        to_name = region.get("to_name")
        if not isinstance(to_name, str) or not to_name:
            raise PayloadError(f"context.result[{i}] has no 'to_name'")
        w, h = _size(region, max_pixels)
        label = _label_of(region, value, rtype if rtype.endswith("labels") else rtype + "labels")
        p = prompts.setdefault((to_name, label), Prompt(label=label, to_name=to_name, size=(w, h)))
        if p.size != (w, h):
            raise PayloadError(f"regions of label {label!r} disagree on the image size: "
                               f"{p.size} and {(w, h)}")
        if rtype.startswith("keypoint"):
            p.clicks.append(_keypoint(region, value, w, h, negative_controls))
        elif rtype.startswith("rectangle"):
            p.box = _rectangle(value, w, h)   # the latest box of a label wins
        else:
            if value.get("format", "rle") != "rle":
                raise PayloadError(f"brush value.format must be 'rle', got {value.get('format')!r}")
            brush_pixels += w * h
            if max_brush_pixels is not None and brush_pixels > max_brush_pixels:
                raise PayloadError(f"the brush strokes of this request declare over MAX_BRUSH_PIXELS="
                                   f"{max_brush_pixels} pixels in all (each decodes to a mask of its "
                                   f"original_width x original_height); send fewer strokes", 413)
            try:
                data = rle_bytes(value.get("rle"))
                check_rle(data, h, w)
            except MaskFormatError as e:
                raise PayloadError(f"brush stroke of label {label!r}: {e}") from None
            p.strokes.append(data)
    return list(prompts.values())


def _keypoint(region: dict, value: dict, w: int, h: int, negative_controls: frozenset) -> Click:
    """A keypoint region as a click in pixels of the (w, h) image it was drawn on."""
    x = _num(value.get("x"), "keypoint value.x") / 100.0 * w - 0.5
    y = _num(value.get("y"), "keypoint value.y") / 100.0 * h - 0.5
    if not (-0.5 <= x <= w - 0.5 and -0.5 <= y <= h - 0.5):
        raise PayloadError(f"keypoint at ({value.get('x')}%, {value.get('y')}%) is outside the image")
    positive = region.get("is_positive", True)
    if not isinstance(positive, bool):
        raise PayloadError(f"is_positive must be true or false, got {positive!r}")
    control = region.get("from_name")
    positive = positive and not (isinstance(control, str) and control in negative_controls)
    # Rounded to 1e-4 px: the percent round trip leaves float noise (59.99999999 for
    # pixel 60) that could move a disk edge or a focus crop and make a replayed sequence
    # differ from a fresh one; real sub-pixel positions (23.5) are kept.
    x, y = round(min(max(x, 0.0), w - 1.0), 4), round(min(max(y, 0.0), h - 1.0), 4)
    return Click(x, y, positive)


def _rectangle(value: dict, w: int, h: int) -> tuple:
    """A rectangle region as (x0, y0, x1, y1) continuous pixels, clipped to the (w, h) image."""
    x0 = _num(value.get("x"), "rectangle value.x") / 100.0 * w
    y0 = _num(value.get("y"), "rectangle value.y") / 100.0 * h
    bw = _num(value.get("width"), "rectangle value.width") / 100.0 * w
    bh = _num(value.get("height"), "rectangle value.height") / 100.0 * h
    if bw <= 0 or bh <= 0:
        raise PayloadError("rectangle width and height must be > 0")
    if value.get("rotation") and _num(value.get("rotation"), "rotation") % 360 != 0:
        th = np.deg2rad(_num(value["rotation"], "rotation"))
        # Label Studio rotates around the top-left corner: take the rotated box's bounds.
        xs = [x0 + dx * np.cos(th) - dy * np.sin(th) for dx, dy in ((0, 0), (bw, 0), (0, bh), (bw, bh))]
        ys = [y0 + dx * np.sin(th) + dy * np.cos(th) for dx, dy in ((0, 0), (bw, 0), (0, bh), (bw, bh))]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    else:
        x1, y1 = x0 + bw, y0 + bh
    x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(w)), min(y1, float(h))
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise PayloadError("the rectangle lies outside the image or is under one pixel")
    return (x0, y0, x1, y1)


def decode_brushes(prompts: list[Prompt]) -> None:
    """Decode each prompt's brush strokes into its one mask (`brush`, the strokes added up)."""
    for p in prompts:
        if not p.strokes:
            continue
        w, h = p.size or (0, 0)
        mask = np.zeros((h, w), bool)
        for data in p.strokes:
            try:
                rle_to_mask(data, h, w, out=mask)
            except MaskFormatError as e:
                raise PayloadError(f"brush stroke of label {p.label!r}: {e}") from None
        p.brush, p.strokes = mask, []


def _close(a: tuple, b: tuple) -> bool:
    return abs(a[0] - b[0]) <= SIZE_TOLERANCE and abs(a[1] - b[1]) <= SIZE_TOLERANCE


def scale_prompt(p: Prompt, width: int, height: int) -> Prompt:
    """Map a prompt drawn on p.size onto an image of width x height (no-op when equal). The sizes
    may differ by rounding, or be transposed (an editor that did not apply the EXIF rotation);
    anything else is refused before a mask of the declared size is made."""
    if p.size == (width, height) or p.size is None:
        return p
    if not (_close(p.size, (width, height)) or _close(p.size, (height, width))):
        raise PayloadError(f"the regions of label {p.label!r} were drawn on a {p.size[0]}x{p.size[1]} image, "
                           f"but the task's image is {width}x{height}: original_width/original_height "
                           f"must be the image's size")
    sw, sh = p.size
    fx, fy = width / sw, height / sh
    clicks = [Click(min((c.x + 0.5) * fx - 0.5, width - 1.0), min((c.y + 0.5) * fy - 0.5, height - 1.0),
                    c.positive) for c in p.clicks]
    box = None if p.box is None else (p.box[0] * fx, p.box[1] * fy, p.box[2] * fx, p.box[3] * fy)
    brush = None
    if p.brush is not None:
        brush = cv2.resize(p.brush.astype(np.uint8), (width, height),
                           interpolation=cv2.INTER_NEAREST).astype(bool)
    return Prompt(label=p.label, to_name=p.to_name, clicks=clicks, box=box, brush=brush,
                  size=(width, height))
