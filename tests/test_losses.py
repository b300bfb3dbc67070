"""Class weights, the loss for either head, and probabilities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight

from cellcls.scoring.heads import probabilities
from cellcls.scoring.losses import ClassificationLoss, balanced_class_weights


def test_balanced_weights_equal_sklearns_and_the_s4_tutorials_figures():
    labels = [0] * 1082 + [1] * 3110  # the revamped pneumonia train split
    weights = balanced_class_weights(labels, 2)
    expected = compute_class_weight("balanced", classes=np.array([0, 1]), y=np.array(labels))
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float32))
    assert weights.tolist() == pytest.approx([1.937, 0.674], abs=1e-3)


def test_weighted_cross_entropy_averages_over_samples_as_keras_class_weight_does():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    targets = torch.tensor([0, 1, 1])
    weights = torch.tensor([3.0, 0.5])
    loss = ClassificationLoss(2, weights)(logits, targets)
    ce = [-math.log(math.exp(2) / (math.exp(2) + 1)), -math.log(math.e / (1 + math.e)), math.log(2)]
    assert float(loss) == pytest.approx((3.0 * ce[0] + 0.5 * ce[1] + 0.5 * ce[2]) / 3)


def test_single_logit_uses_binary_cross_entropy():
    logits = torch.tensor([[0.0], [2.0]])
    targets = torch.tensor([1, 0])
    expected = (math.log(2) + math.log(1 + math.exp(2))) / 2
    assert float(ClassificationLoss(1)(logits, targets)) == pytest.approx(expected)


def test_probabilities_of_one_logit_are_two_columns_summing_to_one():
    probs = probabilities(torch.tensor([[0.0], [100.0]]))
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    softmax = probabilities(torch.tensor([[1.0, 1.0, 1.0]]))
    torch.testing.assert_close(softmax, torch.full((1, 3), 1 / 3))
