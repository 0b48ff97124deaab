"""The interactive segmentation network: DeepLabv3+ with click maps and the previous mask as input,
SPM on the decoder feature, a one-channel logit head. One network serves both the coarse view and
the focus view (the caller decides what it crops)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP

from .backbones import FEATURE_CHANNELS, build_backbone
from .clicks import disk_maps, proximity_maps, sample_at_clicks
from .config import ModelConfig
from .spm import SPM

LOW_LEVEL_CHANNELS = 48  # DeepLabv3+'s reduction of the stride-4 feature
LATE_CHANNELS = 5        # late fusion at stride 4: pos/neg disks, pos/neg proximity, previous mask


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


class InteractiveSegNet(nn.Module):
    def __init__(self, config: ModelConfig, pretrained=False):
        super().__init__()
        self.config = config
        low_ch, high_ch = FEATURE_CHANNELS[config.backbone]
        self.backbone = build_backbone(config.backbone, pretrained)
        self.aspp = ASPP(high_ch, list(config.aspp_rates), config.aspp_channels)
        self.low_proj = nn.Sequential(
            nn.Conv2d(low_ch, LOW_LEVEL_CHANNELS, 1, bias=False), nn.BatchNorm2d(LOW_LEVEL_CHANNELS), nn.ReLU(inplace=True))
        extra = LATE_CHANNELS if config.late_fusion else 0
        self.decoder = nn.Sequential(
            _sep_conv(config.aspp_channels + LOW_LEVEL_CHANNELS + extra, config.decoder_channels),
            _sep_conv(config.decoder_channels, config.decoder_channels))
        self.spm = SPM(config.decoder_channels, config.spm_mode) if config.spm else None
        self.head = nn.Conv2d(config.decoder_channels, 1, 1)
        mean, std = config.normalisation
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor, clicks: torch.Tensor, prev_mask: torch.Tensor,
                return_features: bool = False) -> NetOutput:
        """image (B, 3, H, W) RGB in [0, 1]; clicks (B, M, 3) (y, x, sign) in input pixels;
        prev_mask (B, 1, H, W) in {0, 1}. H and W must be multiples of 16."""
        h, w = image.shape[-2:]
        if h % 16 or w % 16:
            raise ValueError(f"input size must be a multiple of 16, got {h}x{w}")
        maps = disk_maps(clicks, h, w, self.config.click_radius).to(image.dtype)
        x = torch.cat([(image - self.mean) / self.std, maps, prev_mask.to(image.dtype)], dim=1)
        low, high = self.backbone(x)
        high = F.interpolate(self.aspp(high), size=low.shape[-2:], mode="bilinear", align_corners=False)
        parts = [high, self.low_proj(low)]
        if self.config.late_fusion:
            # max-pool keeps a 5-px disk visible at stride 4; the mask is averaged (soft edges)
            size = low.shape[-2:]
            parts += [F.adaptive_max_pool2d(maps, size), proximity_maps(clicks, (h, w), tuple(size)).to(x.dtype),
                      F.adaptive_avg_pool2d(x[:, 5:6], size)]
        feat = self.decoder(torch.cat(parts, dim=1))
        click_feats = sample_at_clicks(feat, clicks, (h, w))
        out = self.spm(feat, click_feats, clicks[..., 2]) if self.spm is not None else feat
        logits = F.interpolate(self.head(out), size=(h, w), mode="bilinear", align_corners=False)
        if return_features:
            return NetOutput(logits, feat, click_feats)
        return NetOutput(logits)
