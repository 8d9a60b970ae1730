"""Batch augmentations on tensors (any device): random shifts/crops, flips, photometric jitter."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def affine(x: torch.Tensor, max_shift: float, min_scale: float, flip: bool) -> torch.Tensor:
    """Random translation (fraction of the image), zoom-in crop and horizontal flip per image.
    x: uint8 or float (B, C, H, W) in 0..255 -> float (B, C, H, W) in 0..255."""
    b = x.shape[0]
    scale = torch.empty(b, device=x.device).uniform_(min_scale, 1.0)
    sign = torch.where(torch.rand(b, device=x.device) < 0.5, -1.0, 1.0) if flip else torch.ones(b, device=x.device)
    return warp(x, scale, sign, (torch.rand(b, 2, device=x.device) * 2 - 1) * max_shift)


def warp(x: torch.Tensor, scale: torch.Tensor, sign: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Each image zoomed by scale (B,), mirrored where sign (B,) is -1, translated by shift (B, 2)."""
    theta = torch.zeros(x.shape[0], 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1] = scale * sign, scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x.float(), grid, padding_mode="zeros", align_corners=False)


MAX_SHIFT = 0.12  # the classifiers' shifts, as a fraction of the image


def shift(x: torch.Tensor) -> torch.Tensor:
    """The classifiers' augmentation: small shifts (+ flips for colour images)."""
    return affine(x, MAX_SHIFT, 1.0, flip=x.shape[1] == 3)


def shift_of(x: torch.Tensor, seeds: list[tuple[int, ...]]) -> torch.Tensor:
    """The classifiers' augmentation drawn from each image's own seed (B seeds): the same image and seed
    give the same view whatever batch it is in, so an extracted view is reproducible file by file."""
    u = torch.from_numpy(np.stack([np.random.default_rng(s).random(3) for s in seeds])).float().to(x.device)  # (B, 3)
    sign = torch.where(u[:, 0] < 0.5, -1.0, 1.0) if x.shape[1] == 3 else torch.ones(len(u), device=x.device)
    return warp(x, torch.ones(len(u), device=x.device), sign, (u[:, 1:] * 2 - 1) * MAX_SHIFT)


def view(x: torch.Tensor) -> torch.Tensor:
    """One SimCLR view: crop, shift, contrast/brightness jitter and noise."""
    y = affine(x, 0.25, 0.6, flip=x.shape[1] == 3)
    b = x.shape[0]
    contrast = torch.empty(b, 1, 1, 1, device=x.device).uniform_(0.6, 1.4)
    bright = torch.empty(b, 1, 1, 1, device=x.device).uniform_(-40, 40)
    y = (y - 128) * contrast + 128 + bright + torch.randn_like(y) * 12
    return y.clamp(0, 255)
