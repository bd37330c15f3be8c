"""Each reconstruction loss against a value computed by hand; masked losses count masked positions only."""

import math

import pytest
import torch
from torch import nn

from umd_lightning import losses


def test_mim_loss_counts_masked_patches_only():
    pred = torch.tensor([[[1.0, 1.0], [0.0, 0.0], [5.0, 5.0]]])  # (1, 3 patches, 2 pixels)
    target = torch.tensor([[[0.0, 2.0], [0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])  # the third patch is visible: its error of 25 must not count
    # patch 1: ((1-0)^2 + (1-2)^2) / 2 = 1; patch 2: 0; mean over 2 masked patches = 0.5
    assert losses.mim_loss(pred, target, mask).item() == pytest.approx(0.5)


def test_mlm_loss_is_cross_entropy_over_masked_tokens():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 9.0], [0.0, 1.0, 0.0]]])  # (1, 3 tokens, vocab 3)
    labels = torch.tensor([[0, -100, 1]])
    expected = (-math.log(math.exp(2) / (math.exp(2) + 2)) - math.log(math.e / (math.e + 2))) / 2
    assert losses.mlm_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    assert losses.mlm_accuracy(logits, labels).item() == pytest.approx(1.0)
    assert losses.mlm_accuracy(logits, torch.tensor([[2, -100, 1]])).item() == pytest.approx(0.5)


def test_mlm_loss_without_masked_tokens_is_zero_and_differentiable():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss = losses.mlm_loss(logits, torch.full((2, 3), -100))
    loss.backward()
    assert loss.item() == 0.0
    assert logits.grad is not None


def test_itm_loss():
    logits = torch.tensor([[0.0, 0.0], [3.0, 1.0]])
    labels = torch.tensor([1, 0])
    expected = (math.log(2) - math.log(math.exp(3) / (math.exp(3) + math.e))) / 2
    assert losses.itm_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_feature_target_is_non_affine_layer_norm_and_detached():
    features = torch.tensor([[[1.0, 2.0, 3.0, 6.0]]], requires_grad=True)
    target = losses.feature_target(features)
    assert not target.requires_grad
    mean, var = 3.0, ((4 + 1 + 0 + 9) / 4)
    expected = (torch.tensor([1.0, 2.0, 3.0, 6.0]) - mean) / math.sqrt(var + 1e-5)
    torch.testing.assert_close(target[0, 0], expected)


def test_feature_mse_counts_masked_positions_only():
    pred = torch.zeros(1, 3, 2)
    target = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [10.0, 10.0]]])
    mask = torch.tensor([[True, True, False]])
    # (1 + 1) / 2 = 1 and (4 + 0) / 2 = 2 -> mean 1.5
    assert losses.feature_mse(pred, target, mask).item() == pytest.approx(1.5)


def test_reference_feamlm_averages_every_position_through_the_projection():
    projection = nn.Linear(2, 2)
    with torch.no_grad():
        projection.weight.copy_(torch.eye(2) * 2)
        projection.bias.zero_()
    student = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    teacher = torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])
    # projected difference: [[2, 0], [0, -2]] -> squared mean over 4 elements = 2
    assert losses.reference_feamlm(projection, student, teacher).item() == pytest.approx(2.0)
    losses.reference_feamlm(projection, student, teacher).backward()
    assert projection.weight.grad.abs().sum() > 0  # the target path trains the projection: the defect


def test_reference_feamim_compares_mask_tokens_with_embedded_teacher():
    embed = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        embed.weight.copy_(torch.eye(2))
    student_sequence = torch.tensor([[[9.0, 9.0], [0.5, 0.5], [7.0, 7.0]]])  # cls, patch 1 (masked), patch 2
    teacher_tokens = torch.tensor([[[0.0, 0.0], [1.5, 0.5], [0.0, 0.0]]])
    mask = torch.tensor([[True, False]])
    # only patch 1 counts: ((0.5-1.5)^2 + 0) / 2 = 0.5
    assert losses.reference_feamim(embed, student_sequence, teacher_tokens, mask).item() == pytest.approx(0.5)
