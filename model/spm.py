"""SPM, the similarity-constraint propagation module (method.md, eq. 6-12).

Every pixel of the decoder feature F is paired with the click it resembles most (max_smi) and the
one it resembles least (min_smi) by cosine similarity; the chosen click vectors are fused back into
F. Cost is O(HW x M): a hard assignment instead of the HW x HW attention of a non-local block.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn_relu(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SPM(nn.Module):
    def __init__(self, channels: int, mode: str = "all"):
        super().__init__()
        self.mode = mode
        # The click's sign as a learned embedding added to its feature vector (the OCR does not say
        # whether A covers all clicks or each sign apart; "all" + sign embedding is our default).
        self.sign_embed = nn.Embedding(2, channels)
        # Large enough to tell a positive click from a negative one from the first step.
        nn.init.normal_(self.sign_embed.weight, std=0.5)
        self.fuse_pos = _conv_bn_relu(2 * channels, channels)   # eq. 9
        self.fuse_neg = _conv_bn_relu(2 * channels, channels)   # eq. 10
        self.ffn = nn.Sequential(                                # eq. 11
            nn.Conv2d(channels, channels, 1), nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 1))

    def forward(self, feat: torch.Tensor, click_feats: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
        """feat (B, C, H, W); click_feats (B, M, C) sampled from feat; signs (B, M) in {+1, -1, 0}."""
        b, c, h, w = feat.shape
        valid = signs != 0
        f = click_feats + self.sign_embed((signs > 0).long())
        sim = torch.einsum("bmc,bcn->bmn", F.normalize(f, dim=2), F.normalize(feat.flatten(2), dim=1))  # eq. 6/12
        neg_inf = torch.finfo(sim.dtype).min
        if self.mode == "all":
            any_click = valid.any(1)
            near = self._gather(f, sim.masked_fill(~valid[..., None], neg_inf), any_click)     # eq. 7: most similar
            far = self._gather(f, (-sim).masked_fill(~valid[..., None], neg_inf), any_click)   # eq. 8: least similar
        else:  # "split": most similar positive click and most similar negative click
            near = self._gather(f, sim.masked_fill(~(signs > 0)[..., None], neg_inf), (signs > 0).any(1))
            far = self._gather(f, sim.masked_fill(~(signs < 0)[..., None], neg_inf), (signs < 0).any(1))
        near = near.transpose(1, 2).reshape(b, c, h, w)
        far = far.transpose(1, 2).reshape(b, c, h, w)
        f_pos = self.fuse_pos(torch.cat([feat, near], 1))
        f_neg = self.fuse_neg(torch.cat([feat, far], 1))
        return self.ffn(f_pos + f_neg + feat)

    @staticmethod
    def _gather(f: torch.Tensor, score: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """One-hot(argmax over clicks) @ f: (B, M, C), (B, M, N) -> (B, N, C)."""
        idx = score.argmax(dim=1)  # (B, N)
        out = torch.gather(f, 1, idx.unsqueeze(-1).expand(-1, -1, f.shape[2]))
        if present is not None:  # a sample without clicks of that sign contributes nothing
            out = out * present.view(-1, 1, 1).to(out.dtype)
        return out
