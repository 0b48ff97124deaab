"""Segmentation losses for training; both ignore padded pixels (valid == 0)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def normalized_focal_loss(logits: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor | None = None,
                          gamma: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """RITM's normalised focal loss: focal weights (1 - p_t)^gamma rescaled per sample to sum to the
    pixel count (the scale is not differentiated), so easy pixels stop dominating as the mask
    improves without the loss shrinking towards zero."""
    logits, gt = logits.float(), gt.float()
    valid = torch.ones_like(gt) if valid is None else valid.float()
    log_pt = torch.where(gt > 0.5, F.logsigmoid(logits), F.logsigmoid(-logits))
    beta = (1 - log_pt.exp()) ** gamma
    with torch.no_grad():
        scale = (valid.sum((1, 2, 3), keepdim=True) / ((beta * valid).sum((1, 2, 3), keepdim=True) + eps))
    loss = -(scale * beta * log_pt * valid).sum((1, 2, 3)) / valid.sum((1, 2, 3)).clamp_min(1)
    return loss.mean()


def bce_loss(logits: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    valid = torch.ones_like(gt) if valid is None else valid.float()
    per = F.binary_cross_entropy_with_logits(logits.float(), gt.float(), reduction="none")
    return ((per * valid).sum((1, 2, 3)) / valid.sum((1, 2, 3)).clamp_min(1)).mean()


def distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel KL divergence of the student's foreground probability from the teacher's (a
    Bernoulli per pixel), mean over valid pixels: 0 when the student answers as the teacher does.
    Its gradient in the logits is sigmoid(student) - sigmoid(teacher), as for BCE with soft targets."""
    logits, target = logits.float(), torch.sigmoid(teacher_logits.float())
    valid = torch.ones_like(target) if valid is None else valid.float()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    entropy = F.binary_cross_entropy(target, target, reduction="none")
    per = (bce - entropy).clamp_min(0)
    return ((per * valid).sum((1, 2, 3)) / valid.sum((1, 2, 3)).clamp_min(1)).mean()


LOSSES = {"nfl": normalized_focal_loss, "bce": bce_loss}
