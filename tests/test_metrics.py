import math

import pytest
import torch

from permanence.metrics import accuracy, attack_success_rate, defense_effectiveness_rating, survivability
from permanence.policies.stlr import slanted_triangular


@pytest.mark.parametrize("asr,last,expected", [
    ([0.99, 0.9, 0.7, 0.4, 0.8], 0, 2),   # stops at the first drop below alpha, even if it rises later
    ([0.99, 0.3, 0.9], 0, 0),
    ([0.1, 0.99, 0.6, 0.5, 0.5], 1, 3),    # injected at D1; exactly alpha counts
    ([0.99, 0.99, 0.99], 0, 2),            # survives to the end of the timeline
    ([0.2, 0.9, 0.9], 0, 2),               # counts updates after poisoning regardless of M0's ASR
])
def test_survivability_on_hand_made_series(asr, last, expected):
    assert survivability(asr, last, alpha=0.5) == expected


def test_survivability_alpha_is_configurable():
    assert survivability([1.0, 0.8, 0.6, 0.3], 0, alpha=0.7) == 1
    assert survivability([1.0, 0.8, 0.6, 0.3], 0, alpha=0.2) == 3


def test_nan_asr_breaks_the_run():
    assert survivability([1.0, float("nan"), 0.9], 0) == 0


def test_accuracy_and_asr():
    pred = torch.tensor([0, 1, 0, 0])
    assert accuracy(pred, torch.tensor([0, 1, 1, 1])) == 0.5
    assert attack_success_rate(pred, target=0) == 0.75
    assert math.isnan(attack_success_rate(torch.tensor([], dtype=torch.long), 0))


def test_der():
    assert defense_effectiveness_rating(0.95, 0.05, 0.98, 0.96) == pytest.approx((0.9 - 0.02 + 1) / 2)
    assert defense_effectiveness_rating(0.5, 0.6, 0.9, 0.95) == 0.5  # no gain, no loss


def test_slanted_triangular_shape():
    f = slanted_triangular(100, cut_frac=0.1, ratio=32)
    assert f(0) == pytest.approx(1 / 32)
    assert f(10) == pytest.approx(1.0)
    assert f(5) == pytest.approx((1 + 0.5 * 31) / 32)
    assert f(100) == pytest.approx(1 / 32)
    assert all(f(t) >= f(t + 1) for t in range(10, 100))
