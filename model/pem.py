"""PEM, the prototype extraction module (method.md, eq. 13-18): a TRAINING-ONLY loss.

It pulls positive click vectors towards a running foreground prototype and negative click vectors
towards their image's background prototype, making the click vectors SPM compares more cohesive.
It is never attached to the network: the trainer owns it, its EMA buffer lives in the training
state, and nothing of it is in the inference graph or the inference checkpoint.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def masked_average_pool(feat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 13: sum_hw(F * G) / sum_hw(G); feat (B, C, h, w), mask (B, 1, h, w) -> (B, C)."""
    return (feat * mask).sum((2, 3)) / mask.sum((2, 3)).clamp_min(1e-6)


class PrototypeLoss(nn.Module):
    pro_pos: torch.Tensor          # buffers (register_buffer), typed for mypy
    initialised: torch.Tensor

    def __init__(self, channels: int, beta: float = 0.01):
        super().__init__()
        self.beta = beta
        self.register_buffer("pro_pos", torch.zeros(channels))       # eq. 15/18, running prototype
        self.register_buffer("initialised", torch.tensor(False))

    def forward(self, feat: torch.Tensor, gt: torch.Tensor, click_feats: torch.Tensor,
                signs: torch.Tensor) -> torch.Tensor:
        """feat (B, C, h, w) decoder feature; gt (B, 1, H, W) in {0, 1}; click_feats (B, M, C);
        signs (B, M) in {+1, -1, 0}. Returns the scalar loss (0 when there are no clicks)."""
        g = F.interpolate(gt.float(), size=feat.shape[-2:], mode="area")
        feat = feat.float()
        click_feats = click_feats.float()
        fg = masked_average_pool(feat, g)            # eq. 13, per image
        has_fg = g.sum((1, 2, 3)) > 0
        if has_fg.any():
            batch_pro = fg[has_fg].mean(0).detach()  # eq. 14
            with torch.no_grad():                    # eq. 15: EMA(A, B) = beta * A + (1 - beta) * B
                if bool(self.initialised):
                    self.pro_pos.mul_(1 - self.beta).add_(self.beta * batch_pro)
                else:
                    self.pro_pos.copy_(batch_pro)
                    self.initialised.fill_(True)
        pro_neg = masked_average_pool(feat, 1 - g).detach()  # eq. 17, per image

        losses = []
        pos = signs > 0
        if pos.any() and bool(self.initialised):
            cos = F.cosine_similarity(click_feats[pos], self.pro_pos.unsqueeze(0).expand(int(pos.sum()), -1), dim=1)
            losses.append((1 - cos).mean())
        neg = signs < 0
        if neg.any():
            target = pro_neg.unsqueeze(1).expand(-1, signs.shape[1], -1)[neg]
            losses.append((1 - F.cosine_similarity(click_feats[neg], target, dim=1)).mean())
        if not losses:
            return feat.new_zeros(())
        return torch.stack(losses).mean()
