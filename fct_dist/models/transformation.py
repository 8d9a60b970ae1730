"""FCT's transformation h(old, side) -> new (reference layout of apple/ml-fct), with FastFill's
uncertainty head: a log-variance s per item, predicted from h's output."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


def layer(i: int, o: int) -> list[nn.Module]:
    return [nn.Linear(i, o), nn.BatchNorm1d(o), nn.ReLU()]


@dataclass
class TransformationConfig:
    old_dim: int
    side_dim: int
    new_dim: int
    branch: int = 256  # width of each input branch
    hidden: int = 2048  # width of the mixer
    use_side: bool = True  # False: the ablation that feeds `old` into both branches
    uncertainty: bool = False  # FastFill: a linear head new -> 1 predicting each item's log-variance s


class Transformation(nn.Module):
    """Old branch old->b->b, side branch side->b->b, concat (2b), mixer 2b->h->h->new (last layer plain
    linear). The "no side-info" variant feeds the old vector into both branches, as in the paper.
    Reference sizes (128, 128 -> 128, b=256, h=2048): ~5.7 M parameters and multiply-adds per item."""

    def __init__(self, c: TransformationConfig):
        super().__init__()
        self.use_side, b = c.use_side, c.branch
        self.old = nn.Sequential(*layer(c.old_dim, b), *layer(b, b))
        self.side = nn.Sequential(*layer(c.side_dim if c.use_side else c.old_dim, b), *layer(b, b))
        self.mix = nn.Sequential(*layer(2 * b, c.hidden), *layer(c.hidden, c.hidden), nn.Linear(c.hidden, c.new_dim))
        self.log_var = nn.Linear(c.new_dim, 1) if c.uncertainty else None

    def forward(self, old: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        # old (B, old_dim), side (B, side_dim) -> (B, new_dim)
        s = side if self.use_side else old
        return self.mix(torch.cat([self.old(old), self.side(s)], dim=1))

    def log_variance(self, emb: torch.Tensor) -> torch.Tensor:
        """FastFill's uncertainty of each output (B, new_dim) -> (B,): high = re-extract it first. The
        output is detached: the mu*s term trains the head, never pulls h's output (with targets of small
        variance it outweighed the error term and h fit worse than the mean)."""
        return self.log_var(emb.detach()).squeeze(1)
