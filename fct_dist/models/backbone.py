"""ResNet backbones: the old, new and BCT models, and the side-info encoder."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ResNetConfig:
    in_channels: int = 1
    width: int = 16  # channels of the first stage
    blocks: list[int] = field(default_factory=lambda: [1, 1, 1])  # blocks per stage
    emb_dim: int = 128
    bottleneck: bool = False  # ResNet-50's 1x1-3x3-1x1 blocks (x4 channels)
    imagenet: bool = False  # the 224-px stem: 7x7/2 conv + max-pool


@dataclass
class ClassifierConfig:
    backbone: ResNetConfig
    num_classes: int


@dataclass
class SimCLRConfig:
    backbone: ResNetConfig
    proj_dim: int = 64


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


class Bottleneck(nn.Module):
    """ResNet-50's block: 1x1 reduce to mid, 3x3 (strided), 1x1 expand to cout = 4 * mid."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        mid = cout // 4
        self.body = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                                  nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                                  nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.short(x))


class ResNet(nn.Module):
    """uint8 images (B, C, H, W) -> embedding (B, emb_dim).

    As in FCT's backbones the last layer projects to emb_dim, then ReLU and global average pooling;
    the embedding is not normalised. Stage i has width * 2**i channels (x4 with bottleneck blocks);
    stages after the first halve the resolution. `imagenet=True` is the 224-px layout (7x7/2 stem +
    max-pool); with bottleneck blocks, width 64 and blocks [3, 4, 6, 3] it is ResNet-50."""

    def __init__(self, c: ResNetConfig):
        super().__init__()
        width = c.width
        stem = [nn.Conv2d(c.in_channels, width, 7, 2, 3, bias=False)] if c.imagenet else [
            nn.Conv2d(c.in_channels, width, 3, 1, 1, bias=False)]
        self.stem = nn.Sequential(*stem, nn.BatchNorm2d(width), nn.ReLU(), *([nn.MaxPool2d(3, 2, 1)] if c.imagenet else []))
        block, grow = (Bottleneck, 4) if c.bottleneck else (Block, 1)
        layers, cin = [], width
        for i, n in enumerate(c.blocks):
            cout = width * 2 ** i * grow
            layers += [block(cin if j == 0 else cout, cout, 2 if i > 0 and j == 0 else 1) for j in range(n)]
            cin = cout
        self.stages = nn.Sequential(*layers)
        self.proj = nn.Sequential(nn.Conv2d(cin, c.emb_dim, 1, bias=False), nn.BatchNorm2d(c.emb_dim), nn.ReLU())
        # channels-last weights make every conv run channels-last (the input follows them): oneDNN's kernels on
        # CPU (here 1.3x a training step, 1.5x inference) and tensor cores on GPU; outputs equal up to float rounding
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.to(self.stem[0].weight.dtype) / 255.0 - 0.5) / 0.25  # uint8 -> the weights' dtype (bf16 on GPU)
        return self.proj(self.stages(self.stem(x))).mean(dim=(2, 3))


class Classifier(nn.Module):
    """Backbone + bias-free linear classifier; forward returns (embedding, logits)."""

    def __init__(self, c: ClassifierConfig):
        super().__init__()
        self.backbone = ResNet(c.backbone)
        self.fc = nn.Linear(c.backbone.emb_dim, c.num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.backbone(x)
        return e, self.fc(e)


class SimCLR(nn.Module):
    """Backbone + projection head for the contrastive loss; the head is dropped after training."""

    def __init__(self, c: SimCLRConfig):
        super().__init__()
        self.backbone, d = ResNet(c.backbone), c.backbone.emb_dim
        self.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, c.proj_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
