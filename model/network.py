"""The interactive segmentation network: DeepLabv3+ with click maps and the previous mask as input,
SPM on the decoder feature, a one-channel logit head. One network serves both the coarse view and
the focus view (the caller decides what it crops).

Two ways for the clicks to enter (``ModelConfig.fusion``):

- ``early`` (the paper's): the disks and the previous mask are input channels of the first conv, so
  every click runs the whole network.
- ``late`` (ours): the backbone sees the image alone; the clicks and the previous mask enter the
  head, at stride 16 (before ASPP, so the context branch knows which object is meant), at stride 4
  (the decoder) and at stride 2 (the boundary head). The image encoding is computed once per image
  (or per training crop) and every click costs only the head: several clicks are trained per
  backbone pass, and at inference a click on a cached image is a head pass.

The network is split into ``encode(image)`` (click-free, cacheable) and ``decode(code, clicks,
prev)``; ``forward`` is both. For early fusion ``encode`` only normalises the image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP

from .backbones import EXTRA_CHANNELS, FEATURE_CHANNELS, STRIDE2_CHANNELS, build_backbone
from .clicks import box_maps, disk_maps, proximity_maps, sample_at_clicks
from .config import ModelConfig
from .spm import SPM

LOW_LEVEL_CHANNELS = 48  # DeepLabv3+'s reduction of the stride-4 feature
GUIDE_CHANNELS = 5       # click guidance at a stride: pos/neg disks, pos/neg proximity, previous mask (+ box)
CONTEXT_CHANNELS = 256   # late fusion: stride-16 feature after the clicks are mixed in
FINE_CHANNELS = 32       # boundary head width at stride 2


def _conv_bn_relu(cin: int, cout: int, k: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _sep_conv(cin: int, cout: int) -> nn.Sequential:
    """Depthwise-separable 3x3 conv (DeepLabv3+ decoder style): a tenth of the FLOPs of a full 3x3."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


@dataclass
class NetOutput:
    logits: torch.Tensor            # (B, 1, H, W) at input resolution
    features: torch.Tensor | None = None      # decoder feature F before SPM (B, C, H/4, W/4)
    click_feats: torch.Tensor | None = None   # F sampled at the clicks (B, M, C)
    coarse_logits: torch.Tensor | None = None  # boundary head: the stride-4 logits it refined (B, 1, H/4, W/4)


@dataclass
class ImageCode:
    """What ``encode`` computed for an image: the normalised image (early fusion) or the backbone
    features (late fusion). Reusable for every click on that image."""
    size: tuple[int, int]
    image: torch.Tensor | None = None   # early fusion: normalised (B, 3, H, W)
    s2: torch.Tensor | None = None      # late fusion: backbone features at strides 2, 4, 16
    s4: torch.Tensor | None = None
    s16: torch.Tensor | None = None

    def detach(self) -> "ImageCode":
        return ImageCode(self.size, *(t.detach() if t is not None else None
                                      for t in (self.image, self.s2, self.s4, self.s16)))


def pool_to(x: torch.Tensor, size: tuple[int, int], stride: int, mode: str) -> torch.Tensor:
    """Max or average pooling of `x` down to `size`, `stride` times smaller. Where the sizes divide
    (always: inputs are multiples of 16) a fixed stride x stride window: the numbers of adaptive
    pooling, and a constant kernel that torch.onnx's tracer exports with dynamic sizes
    (model/runtime.py). Else adaptive pooling."""
    if x.shape[-2] == stride * size[0] and x.shape[-1] == stride * size[1]:
        return (F.max_pool2d if mode == "max" else F.avg_pool2d)(x, stride)
    return (F.adaptive_max_pool2d if mode == "max" else F.adaptive_avg_pool2d)(x, size)


def guidance(maps: torch.Tensor, proximity: torch.Tensor, prev: torch.Tensor, size: tuple[int, int],
             stride: int, box: torch.Tensor | None = None) -> torch.Tensor:
    """The clicks and the previous mask at a feature stride: max-pooled disks (a 5-px disk stays
    visible), proximity maps (how near a click, beyond the disk; `proximity_maps` at that size), the
    average-pooled mask and, for a model with box input, the average-pooled box map."""
    parts = [pool_to(maps, size, stride, "max"), proximity, pool_to(prev, size, stride, "avg")]
    if box is not None:
        parts.append(pool_to(box, size, stride, "avg"))
    return torch.cat(parts, dim=1)


@dataclass
class PromptMaps:
    """The prompts of one decode as maps: what `decode` computes from the click list (Python loops
    over the clicks), so that the rest (`decode_maps`) is tensor operations only, with no loop whose
    length depends on the number of clicks: model.runtime exports it with dynamic shapes."""
    maps: torch.Tensor                   # (B, 2, H, W) positive / negative disks
    prev: torch.Tensor                   # (B, 1, H, W) previous mask
    box: torch.Tensor | None = None      # (B, 1, H, W) inside-the-box map (box_input models)
    prox4: torch.Tensor | None = None    # (B, 2, H/4, W/4) proximity maps for the decoder guidance
    prox16: torch.Tensor | None = None   # (B, 2, H/16, W/16) for the late-fusion context block


class InteractiveSegNet(nn.Module):
    # optional parts and buffers, declared for the type checker (nn.Module's attributes are untyped)
    context: nn.Sequential | None
    fine: nn.Sequential | None
    fine_reduce: nn.Sequential | None
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, config: ModelConfig, pretrained=False):
        super().__init__()
        self.config = config
        late = config.fusion == "late"
        guide_ch = GUIDE_CHANNELS + int(config.box_input)
        low_ch, high_ch = FEATURE_CHANNELS[config.backbone]
        self.backbone = build_backbone(config.backbone, pretrained,
                                       0 if late else EXTRA_CHANNELS + int(config.box_input))
        if late:
            # stride 16: the clicks meet the semantic feature before ASPP's wide context
            self.context = nn.Sequential(_conv_bn_relu(high_ch + guide_ch, CONTEXT_CHANNELS),
                                         _conv_bn_relu(CONTEXT_CHANNELS, CONTEXT_CHANNELS, 3))
            aspp_in = CONTEXT_CHANNELS
        else:
            self.context = None
            aspp_in = high_ch
        self.aspp = ASPP(aspp_in, list(config.aspp_rates), config.aspp_channels)
        self.low_proj = _conv_bn_relu(low_ch, LOW_LEVEL_CHANNELS)
        extra = guide_ch if (config.late_fusion or late) else 0
        self.decoder = nn.Sequential(
            _sep_conv(config.aspp_channels + LOW_LEVEL_CHANNELS + extra, config.decoder_channels),
            _sep_conv(config.decoder_channels, config.decoder_channels))
        self.spm = SPM(config.decoder_channels, config.spm_mode) if config.spm else None
        self.head = nn.Conv2d(config.decoder_channels, 1, 1)
        if config.boundary_head:
            # stride 2: the stride-4 answer, upsampled, corrected with the image's finest feature
            s2_ch = STRIDE2_CHANNELS[config.backbone]
            out = nn.Conv2d(FINE_CHANNELS, 1, 1)
            # starts as the identity on the upsampled stride-4 logits: it can only learn corrections
            for p in out.parameters():
                nn.init.zeros_(p)
            self.fine = nn.Sequential(
                _sep_conv(FINE_CHANNELS + s2_ch + 1 + 3, FINE_CHANNELS),
                _sep_conv(FINE_CHANNELS, FINE_CHANNELS),
                out)
            self.fine_reduce = _conv_bn_relu(config.decoder_channels, FINE_CHANNELS)
        else:
            self.fine = self.fine_reduce = None
        mean, std = config.normalisation
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    # -- the two halves --------------------------------------------------------------------------
    def encode(self, image: torch.Tensor) -> ImageCode:
        """image (B, 3, H, W) RGB in [0, 1]; H and W multiples of 16. Click-free: cache it per image."""
        h, w = image.shape[-2:]
        if h % 16 or w % 16:
            raise ValueError(f"input size must be a multiple of 16, got {h}x{w}")
        x = (image - self.mean) / self.std
        if self.config.fusion == "early":
            return ImageCode((h, w), image=x)
        s2, s4, s16 = self.backbone(x)
        return ImageCode((h, w), s2=s2, s4=s4, s16=s16)

    def decode(self, code: ImageCode, clicks: torch.Tensor, prev_mask: torch.Tensor,
               boxes: torch.Tensor | None = None, return_features: bool = False) -> NetOutput:
        """clicks (B, M, 3) (y, x, sign) in input pixels; prev_mask (B, 1, H, W) in {0, 1}; boxes
        (B, 4) (y0, x0, y1, x1) or None, only for a model with `box_input` (a row of -1: no box). A
        code of batch 1 serves a batch of click sets (several candidates on one image)."""
        return self.decode_maps(code, clicks, self.prompt_maps(code, clicks, prev_mask, boxes), return_features)

    def prompt_maps(self, code: ImageCode, clicks: torch.Tensor, prev_mask: torch.Tensor,
                    boxes: torch.Tensor | None = None) -> PromptMaps:
        """The prompts of `decode` as maps (see PromptMaps)."""
        h, w = code.size
        ref = code.image if code.image is not None else code.s4
        assert ref is not None, "an ImageCode holds the image (early) or the features (late)"
        if boxes is not None and not self.config.box_input:
            raise ValueError("this model takes no box prompt (box_input is off in its config)")
        box = box_maps(boxes, clicks.shape[0], h, w, ref.device).to(ref.dtype) if self.config.box_input else None
        # input sizes are multiples of 16 (encode), so the features are exactly H/4 and H/16
        prox4 = (proximity_maps(clicks, (h, w), (h // 4, w // 4)).to(ref.dtype)
                 if self.config.late_fusion or self.context is not None else None)
        prox16 = proximity_maps(clicks, (h, w), (h // 16, w // 16)).to(ref.dtype) if self.context is not None else None
        return PromptMaps(disk_maps(clicks, h, w, self.config.click_radius).to(ref.dtype), prev_mask.to(ref.dtype),
                          box, prox4, prox16)

    def decode_maps(self, code: ImageCode, clicks: torch.Tensor, prompts: PromptMaps,
                    return_features: bool = False) -> NetOutput:
        """`decode` from the prompts as maps: tensor operations only (the clicks are read by SPM,
        which samples the decoder feature at them)."""
        h, w = code.size
        maps, prev, box = prompts.maps, prompts.prev, prompts.box
        if code.image is not None:   # early fusion: the whole network sees the clicks
            img = code.image.expand(clicks.shape[0], -1, -1, -1) if code.image.shape[0] != clicks.shape[0] else code.image
            s2, low, high = self.backbone(torch.cat([img, maps, prev] + ([box] if box is not None else []), dim=1))
        else:
            assert code.s2 is not None and code.s4 is not None and code.s16 is not None
            s2, low, high = (self._batch(t, clicks.shape[0]) for t in (code.s2, code.s4, code.s16))
        if self.context is not None:
            assert prompts.prox16 is not None
            high = self.context(torch.cat([high, guidance(maps, prompts.prox16, prev, tuple(high.shape[-2:]), 16, box)], 1))
        size = low.shape[-2:]
        high = F.interpolate(self.aspp(high), size=size, mode="bilinear", align_corners=False)
        parts = [high, self.low_proj(low)]
        if prompts.prox4 is not None:
            parts.append(guidance(maps, prompts.prox4, prev, tuple(size), 4, box))
        feat = self.decoder(torch.cat(parts, dim=1))
        click_feats = sample_at_clicks(feat, clicks, (h, w))
        out = self.spm(feat, click_feats, clicks[..., 2]) if self.spm is not None else feat
        logits4 = self.head(out)
        coarse = None
        if self.fine is not None and self.fine_reduce is not None:
            s2_size = s2.shape[-2:]
            up = F.interpolate(logits4, size=s2_size, mode="bilinear", align_corners=False)
            fine_in = torch.cat([
                F.interpolate(self.fine_reduce(out), size=s2_size, mode="bilinear", align_corners=False),
                s2, up, pool_to(maps, s2_size, 2, "max"), pool_to(prev, s2_size, 2, "avg")], dim=1)
            coarse, logits4 = logits4, up + self.fine(fine_in)
        logits = F.interpolate(logits4, size=(h, w), mode="bilinear", align_corners=False)
        if return_features:
            return NetOutput(logits, feat, click_feats, coarse)
        return NetOutput(logits, coarse_logits=coarse)

    def forward(self, image: torch.Tensor, clicks: torch.Tensor, prev_mask: torch.Tensor,
                return_features: bool = False, boxes: torch.Tensor | None = None) -> NetOutput:
        """image (B, 3, H, W) RGB in [0, 1]; clicks (B, M, 3) (y, x, sign) in input pixels;
        prev_mask (B, 1, H, W) in {0, 1}. H and W must be multiples of 16."""
        return self.decode(self.encode(image), clicks, prev_mask, boxes, return_features)

    @staticmethod
    def _batch(t: torch.Tensor, b: int) -> torch.Tensor:
        return t.expand(b, -1, -1, -1) if t.shape[0] == 1 and b > 1 else t


# Config switches that only add input channels (model.network.grow).
GROWABLE = frozenset({"box_input", "late_fusion"})


def grow(net: InteractiveSegNet, config: ModelConfig) -> InteractiveSegNet:
    """The trained `net` in a config with more input channels (`box_input` or `late_fusion` turned
    on). Every tensor is copied into the leading part of its grown counterpart. New inputs start
    at zero, so without them the grown network answers exactly as `net` did, except a new box
    channel: it sits right after the previous-mask channel (first conv, decoder guidance) and
    starts as a copy of it (its weights, and its depthwise filter and BatchNorm in the decoder), so
    the grown network first reads a box alone as `net` reads a previous mask of the box's shape
    (a zero channel would start it from nothing: the model card's "Box prompts" table), and
    training starts from there."""
    before, after = net.config.to_dict(), config.to_dict()
    changed = {k for k in before if before[k] != after[k]}
    if changed - GROWABLE or any(before[k] for k in changed):
        raise ValueError(f"cannot grow a network by changing {sorted(changed)}: only turning on "
                         f"{', '.join(sorted(GROWABLE))} adds inputs and keeps what it learned")
    grown = InteractiveSegNet(config, pretrained=False)
    old = net.state_dict()
    box_added = "box_input" in changed
    for key, target in grown.state_dict().items():
        src = old[key]
        if src.shape == target.shape:
            target.copy_(src)
            continue
        grew = [d for d, (a, b) in enumerate(zip(src.shape, target.shape)) if a != b]
        if src.dim() != target.dim() or len(grew) != 1 or src.shape[grew[0]] > target.shape[grew[0]]:
            raise ValueError(f"cannot grow {key} from {tuple(src.shape)} to {tuple(target.shape)}")
        d, n = grew[0], src.shape[grew[0]]
        target.narrow(d, 0, n).copy_(src)
        if box_added and target.shape[d] == n + 1:    # the box channel: a copy of the previous mask's
            target.narrow(d, n, 1).copy_(src.narrow(d, n - 1, 1))
        elif d == 1:                                  # other new inputs: silent
            target.narrow(d, n, target.shape[d] - n).zero_()
    return grown
