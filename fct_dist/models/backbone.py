"""ResNet backbones: the old, new and BCT models, and the side-info encoder."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    """Basic residual block: two 3x3 convs, 1x1 projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.short(x))


class ResNet(nn.Module):
    """uint8 images (B, C, H, W) -> embedding (B, emb_dim).

    As in FCT's backbones the last layer projects to emb_dim, then ReLU and global average pooling;
    the embedding is not normalised. Stage i has width * 2**i channels; stages after the first
    halve the resolution."""

    def __init__(self, in_channels: int, width: int, blocks: list[int], emb_dim: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2 ** i
            layers += [Block(cin if j == 0 else cout, cout, 2 if i > 0 and j == 0 else 1) for j in range(n)]
            cin = cout
        self.stages = nn.Sequential(*layers)
        self.proj = nn.Sequential(nn.Conv2d(cin, emb_dim, 1, bias=False), nn.BatchNorm2d(emb_dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() / 255.0 - 0.5) / 0.25
        return self.proj(self.stages(self.stem(x))).mean(dim=(2, 3))


class Classifier(nn.Module):
    """Backbone + bias-free linear classifier; forward returns (embedding, logits)."""

    def __init__(self, backbone: ResNet, emb_dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(emb_dim, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.backbone(x)
        return e, self.fc(e)


class SimCLR(nn.Module):
    """Backbone + projection head for the contrastive loss; the head is dropped after training."""

    def __init__(self, backbone: ResNet, emb_dim: int, proj_dim: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.ReLU(), nn.Linear(emb_dim, proj_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
