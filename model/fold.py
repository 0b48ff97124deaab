"""Inference-time BatchNorm folding: conv -> BN pairs become one conv with a bias.

On CPU a separate BatchNorm is a full memory pass per layer (about a fifth of the forward time of
the lite2 network); folded into the preceding conv it costs nothing. A BN is folded when it is the
child registered right after a Conv2d in the same parent and has the conv's output width: in the
torchvision/timm blocks used here registration order is execution order (a test checks the folded
network's output against the original's).
"""
from __future__ import annotations

import copy
from typing import cast

import torch
from torch import nn


def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    # Typed Optional (track_running_stats=False has none); a network's BatchNorms track them.
    mean, var = cast(torch.Tensor, bn.running_mean), cast(torch.Tensor, bn.running_var)
    scale = bn.weight.detach() / torch.sqrt(var + bn.eps)
    w = conv.weight.detach() * scale.view(-1, 1, 1, 1)
    b = conv.bias.detach() if conv.bias is not None else torch.zeros_like(mean)
    conv.weight = nn.Parameter(w)
    conv.bias = nn.Parameter((b - mean) * scale + bn.bias.detach())


def _after_bn(bn: nn.BatchNorm2d) -> nn.Module:
    """What remains of a BN after folding: nothing, or timm BatchNormAct2d's dropout + activation."""
    drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
    if drop is None and act is None:
        return nn.Identity()
    return nn.Sequential(drop or nn.Identity(), act or nn.Identity())


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """A folded deep copy of `net` in eval mode (the original is untouched); returns the copy."""
    net = copy.deepcopy(net).eval()
    for parent in list(net.modules()):
        children = list(parent.named_children())
        for (_, a), (name_b, b) in zip(children, children[1:]):
            if (isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d) and b.track_running_stats
                    and b.num_features == a.out_channels and b.affine):
                _fold_into(a, b)
                setattr(parent, name_b, _after_bn(b))
    return net
