import math

import pytest
import torch

from fct_dist import losses
from fct_dist.models import (Classifier, ClassifierConfig, ResNet, ResNetConfig, Transformation,
                              TransformationConfig)


def test_nt_xent_of_identical_views_has_the_closed_form_value():
    """Two identical views of B orthogonal unit vectors: positive similarity 1, negatives 0."""
    b, t = 4, 0.5
    z = torch.eye(b)
    # each row: one positive at exp(1/t), 2B-2 negatives at exp(0)
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2 * b - 2))
    assert losses.nt_xent(z, z.clone(), t).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_prefers_matching_views():
    torch.manual_seed(0)
    z = torch.randn(8, 16)
    assert losses.nt_xent(z, z + 0.01 * torch.randn_like(z), 0.2) < losses.nt_xent(z, torch.randn(8, 16), 0.2)


def test_bct_influence_uses_only_classes_the_old_model_knew():
    old_fc = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # old classes: labels 3 and 5
    old_index = torch.full((6,), -1, dtype=torch.long)
    old_index[3], old_index[5] = 0, 1
    emb = torch.tensor([[2.0, 0.0], [0.0, 2.0], [9.0, 9.0]])
    labels = torch.tensor([3, 5, 1])  # the last sample's class is new: ignored
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert losses.bct_influence(emb, labels, old_fc, old_index).item() == pytest.approx(expected, rel=1e-6)
    unknown = losses.bct_influence(emb[2:], labels[2:], old_fc, old_index)
    assert unknown.item() == 0.0 and unknown.requires_grad is False


def test_mse_of_an_exact_transformation_is_zero():
    x = torch.randn(5, 3)
    assert losses.transformation(x * 2, x * 2).item() == 0.0
    assert losses.transformation(x, x + 1).item() == pytest.approx(1.0)


def test_transformation_reference_size():
    """FCT.md: ~5.7 M parameters for 128/128 -> 128 with branch 256, hidden 2048."""
    h = Transformation(TransformationConfig(128, 128, 128, branch=256, hidden=2048))
    n = sum(p.numel() for p in h.parameters())
    assert 5.5e6 < n < 5.9e6
    assert h(torch.randn(4, 128), torch.randn(4, 128)).shape == (4, 128)


def test_resnet_shapes_and_nonnegative_embedding():
    m = Classifier(ClassifierConfig(ResNetConfig(1, 8, [1, 1, 1], 32), 10))
    emb, logits = m(torch.randint(0, 255, (3, 1, 28, 28), dtype=torch.uint8))
    assert emb.shape == (3, 32) and logits.shape == (3, 10)
    assert (emb >= 0).all()  # ReLU then average pooling, as in FCT's backbones
    assert m.fc.bias is None


def fit_h(use_side: bool, data: dict, epochs=300) -> float:
    """Train h on data["train"]; relative MSE (1.0 = predicting the mean) on held-out data["test"]."""
    old, side, new = data["train"]
    torch.manual_seed(0)
    h = Transformation(TransformationConfig(old.shape[1], side.shape[1], new.shape[1], branch=32, hidden=64,
                                            use_side=use_side))
    opt = torch.optim.Adam(h.parameters(), lr=3e-3)
    for _ in range(epochs):
        loss = losses.transformation(h(old, side), new)
        opt.zero_grad()
        loss.backward()
        opt.step()
    h.eval()
    old, side, new = data["test"]
    with torch.no_grad():
        return float(((h(old, side) - new) ** 2).mean() / new.var(0).mean())


def test_transformation_learns_and_side_info_carries_what_old_lacks():
    """new = a fixed nonlinear function of (old, side): h learns it; without side it cannot."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 6, generator=g)
    data = {}
    for split, n in (("train", 2048), ("test", 512)):
        old, side = torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g)
        data[split] = (old, side, torch.tanh(torch.cat([old, side], 1) @ w))
    with_side, without = fit_h(True, data), fit_h(False, data)
    assert with_side < 0.05
    assert without > 0.2 and without > 4 * with_side


def test_resnet50_layout_has_torchvisions_parameter_count():
    """torchvision's resnet50 without its fc has 23,508,032 parameters; the 128-d projection (1x1 conv
    2048->128 + BatchNorm) adds 262,144 + 256."""
    m = ResNet(ResNetConfig(3, 64, [3, 4, 6, 3], 128, bottleneck=True, imagenet=True)).eval()
    assert sum(p.numel() for p in m.parameters()) == 23_508_032 + 262_144 + 256
    with torch.no_grad():
        assert m(torch.zeros(2, 3, 64, 64, dtype=torch.uint8)).shape == (2, 128)
