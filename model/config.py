"""Architecture settings of the network; stored inside every checkpoint so a file is self-describing."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

BACKBONES = ("efficientnet-lite2", "resnet50", "resnet101")

# Input normalisation each backbone's pretrained weights expect.
NORMALISATION = {
    "efficientnet-lite2": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "resnet50": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "resnet101": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "efficientnet-lite2"
    input_size: int = 384          # side the network sees for the coarse view and the focus crop
    aspp_channels: int = 128
    decoder_channels: int = 96
    aspp_rates: tuple = (6, 12, 18)
    spm: bool = True               # similarity-constraint propagation on the decoder feature
    spm_mode: str = "all"          # "all": one similarity over all clicks (+ sign embedding); "split": pos/neg apart
    click_radius: int = 5          # disk radius in pixels at network resolution
    # Late click fusion (ours, not the paper's): the click disks and the previous mask are also given
    # to the decoder at stride 4. The early (first-conv) path alone learned too slowly on the CPU
    # budget we have: the click signal must cross the whole pretrained backbone. See the model card.
    late_fusion: bool = False
    # Where the clicks enter: "early" = the first conv (the paper's), "late" = only the head, after a
    # click-free backbone whose features are computed once per image (model/network.py).
    fusion: str = "early"
    # A stride-2 head that corrects the upsampled stride-4 logits with the finest image feature.
    boundary_head: bool = False
    # A box prompt (inside-the-box map) beside the clicks: a box alone gives a mask. Early fusion:
    # one more first-conv channel (and decoder guidance channel with late_fusion); late: head only.
    box_input: bool = False

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        if self.spm_mode not in ("all", "split"):
            raise ValueError(f"spm_mode must be 'all' or 'split', not {self.spm_mode!r}")
        if self.fusion not in ("early", "late"):
            raise ValueError(f"fusion must be 'early' or 'late', not {self.fusion!r}")
        if self.input_size % 32:
            raise ValueError(f"input_size must be a multiple of 32, not {self.input_size}")

    @property
    def normalisation(self):
        return NORMALISATION[self.backbone]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["aspp_rates"] = list(self.aspp_rates)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ValueError(f"the model config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        check_types(cls, d, "model config")
        d = dict(d)
        if "aspp_rates" in d:
            d["aspp_rates"] = tuple(d["aspp_rates"])
        return cls(**d)


def check_types(cls, values: dict, what: str) -> None:
    """Each value has the type of its field's default (an int passes for a float, a list of ints for
    a tuple): a card read from a file is checked before anything is built from it ("384" as an
    input size failed deep inside the network's constructor)."""
    for f in fields(cls):
        if f.name not in values:
            continue
        v, want = values[f.name], type(f.default)
        if want is tuple:
            ok = isinstance(v, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
        elif want is bool:
            ok = isinstance(v, bool)
        elif want in (int, float):
            ok = isinstance(v, (int, float) if want is float else int) and not isinstance(v, bool)
        else:
            ok = isinstance(v, want)
        if not ok:
            raise ValueError(f"{what} {f.name!r} must be {want.__name__}, got {v!r}")
