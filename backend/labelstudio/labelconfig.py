"""Read what the backend needs from a project's label config (the `<View>` XML).

- the Image object tags (name -> task data key of `value="$key"`);
- the output controls: BrushLabels (and PolygonLabels) with their toName and label names, so a
  click for label "Cat" becomes a mask of the BrushLabels control that has `<Label value="Cat"/>`;
- the smart keypoint controls marked `negative="true"`: every keypoint they make is a negative
  click (the "remove" tool of docs/label-configs). Label Studio 1.23 draws an Alt+click negative
  keypoint exactly like a positive one; a control of its own gives negatives their own colours.

A label's name is its `alias` when it has one, else its `value`: Label Studio writes the alias in
results (`<Label value="Cat: click" alias="Cat"/>` shows "Cat: click" and stores "Cat"), so tools
can have distinct button texts and still name the same object.
"""
from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from ..bytecache import ByteCache

# Parsed configs, by the XML's hash (every /predict carries its project's config). Bounded in bytes:
# a parsed config holds at most ~4 bytes per byte of its XML (a label "a" is 18 characters of XML
# and a ~60-byte str in a tuple); one over the whole budget is parsed for each request, not kept.
PARSED_BYTES = 16 * 2**20
BYTES_PER_XML_CHAR = 4
_parsed = ByteCache(PARSED_BYTES)


class LabelConfigError(ValueError):
    """The label config cannot serve smart segmentation (message says what to add)."""


@dataclass(frozen=True)
class Control:
    name: str
    tag: str                 # e.g. "BrushLabels"
    to_name: tuple[str, ...]
    labels: tuple[str, ...]
    smart: bool
    negative: bool = False   # KeyPoint(Labels) negative="true": its keypoints are negative clicks


@dataclass(frozen=True)
class LabelConfig:
    images: dict = field(default_factory=dict)      # Image tag name -> task data key
    controls: tuple = ()                            # all labeling controls, document order

    @property
    def negative_controls(self) -> frozenset:
        """Names of the keypoint controls whose keypoints are negative clicks."""
        return frozenset(c.name for c in self.controls if c.negative)

    def image_key(self, to_name: str) -> str:
        if to_name not in self.images:
            raise LabelConfigError(
                f"the label config has no <Image name=\"{to_name}\" value=\"$...\"/> "
                f"(Image tags: {sorted(self.images) or 'none'})")
        return self.images[to_name]

    def output_for(self, label: str | None, to_name: str, output_format: str = "auto") -> tuple[Control, str]:
        """The control and label a mask for `label` on image `to_name` is written to.

        `label` None (an unlabeled smart region) is allowed when exactly one output label exists.
        output_format: auto (brush first, else polygon), brush or polygon.
        """
        tags = {"auto": ("BrushLabels", "PolygonLabels"), "brush": ("BrushLabels",),
                "polygon": ("PolygonLabels",)}[output_format]
        for tag in tags:
            candidates = [c for c in self.controls if c.tag == tag and to_name in c.to_name]
            if label is None:
                pairs = [(c, lab) for c in candidates for lab in c.labels]
                if len(pairs) == 1:
                    return pairs[0]
                continue
            for c in candidates:
                if label in c.labels:
                    return c, label
        wanted = " or ".join(f"<{t}>" for t in tags)
        if label is None:
            raise LabelConfigError(
                f"a smart region without a label needs exactly one label in {wanted} "
                f"toName=\"{to_name}\"; give the smart region a label")
        raise LabelConfigError(
            f"label \"{label}\" has no {wanted} label of the same name for image \"{to_name}\": "
            f"add <Label value=\"{label}\"/> to the {wanted} control with toName=\"{to_name}\"")


def _bool(v: str | None) -> bool:
    return (v or "").strip().lower() in ("true", "1", "yes")


def parse_label_config(xml: str) -> LabelConfig:
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError("empty label config")
    key = hashlib.sha256(xml.encode("utf-8", "surrogatepass")).hexdigest()
    config = _parsed.get(key)
    if config is None:
        config = _parse(xml)
        _parsed.put(key, config, BYTES_PER_XML_CHAR * len(xml))
    return config


def _parse(xml: str) -> LabelConfig:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise LabelConfigError(f"label config is not valid XML: {e}") from None
    images, controls = {}, []
    for el in root.iter():
        name = el.get("name")
        if el.tag == "Image" and name:
            value = el.get("value") or el.get("valueList") or ""
            images[name] = value[1:] if value.startswith("$") else value
        elif name and (to_names := el.get("toName")):
            labels = tuple(text for lab in el.iter("Label") if (text := lab.get("alias") or lab.get("value")))
            controls.append(Control(name=name, tag=el.tag,
                                    to_name=tuple(t.strip() for t in to_names.split(",")),
                                    labels=labels, smart=_bool(el.get("smart")) or any(
                                        _bool(lab.get("smart")) for lab in el.iter("Label")),
                                    negative=el.tag in ("KeyPoint", "KeyPointLabels") and _bool(el.get("negative"))))
    if not images:
        raise LabelConfigError("the label config has no <Image name=... value=\"$...\"/> tag")
    return LabelConfig(images=images, controls=tuple(controls))
