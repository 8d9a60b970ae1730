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

    def __init__(self, in_channels: int, width: int, blocks: list[int], emb_dim: int, bottleneck: bool = False,
                 imagenet: bool = False):
        super().__init__()
        stem = [nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)] if imagenet else [
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)]
        self.stem = nn.Sequential(*stem, nn.BatchNorm2d(width), nn.ReLU(), *([nn.MaxPool2d(3, 2, 1)] if imagenet else []))
        block, grow = (Bottleneck, 4) if bottleneck else (Block, 1)
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2 ** i * grow
            layers += [block(cin if j == 0 else cout, cout, 2 if i > 0 and j == 0 else 1) for j in range(n)]
            cin = cout
        self.stages = nn.Sequential(*layers)
        self.proj = nn.Sequential(nn.Conv2d(cin, emb_dim, 1, bias=False), nn.BatchNorm2d(emb_dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.to(self.stem[0].weight.dtype) / 255.0 - 0.5) / 0.25  # uint8 -> the weights' dtype (bf16 on GPU)
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
