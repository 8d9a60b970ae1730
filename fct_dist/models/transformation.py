"""FCT's transformation h(old, side) -> new (reference layout of apple/ml-fct)."""
from __future__ import annotations

import torch
import torch.nn as nn


def layer(i: int, o: int) -> list[nn.Module]:
    return [nn.Linear(i, o), nn.BatchNorm1d(o), nn.ReLU()]


class Transformation(nn.Module):
    """Old branch old->b->b, side branch side->b->b, concat (2b), mixer 2b->h->h->new (last layer plain
    linear). The "no side-info" variant feeds the old vector into both branches, as in the paper.
    Reference sizes (128, 128 -> 128, b=256, h=2048): ~5.7 M parameters and multiply-adds per item."""

    def __init__(self, old_dim: int, side_dim: int, new_dim: int, branch: int = 256, hidden: int = 2048,
                 use_side: bool = True):
        super().__init__()
        self.use_side = use_side
        self.old = nn.Sequential(*layer(old_dim, branch), *layer(branch, branch))
        self.side = nn.Sequential(*layer(side_dim if use_side else old_dim, branch), *layer(branch, branch))
        self.mix = nn.Sequential(*layer(2 * branch, hidden), *layer(hidden, hidden), nn.Linear(hidden, new_dim))

    def forward(self, old: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        # old (B, old_dim), side (B, side_dim) -> (B, new_dim)
        s = side if self.use_side else old
        return self.mix(torch.cat([self.old(old), self.side(s)], dim=1))
