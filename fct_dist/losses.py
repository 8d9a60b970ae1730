"""Losses of FCT's models: label-smoothed CE, NT-Xent (SimCLR), BCT influence, the transformation's
(MSE, plus FastFill's classification term and uncertainty weighting)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def classification(logits: torch.Tensor, target: torch.Tensor, smoothing: float) -> torch.Tensor:
    return F.cross_entropy(logits, target, label_smoothing=smoothing)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR loss of two views (B, p): each view's positive is the other view of the same image,
    the 2B - 2 other views in the batch are negatives."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # (2B, p)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    b = z1.shape[0]
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
    return F.cross_entropy(sim, target)


def bct_influence(new_emb: torch.Tensor, labels: torch.Tensor, old_fc: torch.Tensor,
                  old_index: torch.Tensor) -> torch.Tensor:
    """BCT: the frozen old classifier (weight (k, d), no bias) applied to new embeddings (B, d), on
    the samples of classes it knows. old_index maps a label to the old classifier's output index, or
    -1 for classes it never saw."""
    idx = old_index[labels]
    known = idx >= 0
    if not known.any():
        return new_emb.sum() * 0.0  # keeps the graph (and DDP's gradient sync) intact
    return F.cross_entropy(new_emb[known] @ old_fc.T, idx[known])


def transformation(pred: torch.Tensor, target: torch.Tensor, log_var: torch.Tensor | None = None,
                   logits: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                   classification_weight: float = 0.0, smoothing: float = 0.1, mu: float = 0.5) -> torch.Tensor:
    """Per item L = squared error to the new embedding (mean over dims) + classification_weight x the
    label-smoothed CE of the frozen new classifier's `logits` on h's output; with FastFill's log-variance
    s per item, the loss is mean(0.5 exp(-s) L + mu s), else mean(L)."""
    per_item = ((pred - target) ** 2).mean(1)  # (B,)
    if classification_weight:
        per_item = per_item + classification_weight * F.cross_entropy(logits, labels, label_smoothing=smoothing,
                                                                       reduction="none")
    if log_var is None:
        return per_item.mean()
    return (0.5 * torch.exp(-log_var) * per_item + mu * log_var).mean()
