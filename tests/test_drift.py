import pytest
import torch

from permanence.drift import DRIFTS, drift_parameter

GEN = lambda: torch.Generator().manual_seed(0)  # noqa: E731


@pytest.mark.parametrize("name", DRIFTS.names())
def test_identity_at_zero(name):
    x = torch.randint(0, 255, (4, 3, 16, 16), dtype=torch.uint8, generator=GEN())
    assert torch.equal(DRIFTS.get(name)(x, 0.0, GEN()), x)


@pytest.mark.parametrize("name,small,large", [
    ("rotation", 5.0, 40.0), ("hue", 0.05, 0.3), ("brightness", 0.1, 0.8),
    ("saturation", 0.2, 2.0), ("contrast", 0.2, 2.0), ("gaussian_noise", 0.02, 0.2),
])
def test_effect_grows_with_the_parameter(name, small, large):
    x = torch.randint(30, 200, (8, 3, 16, 16), dtype=torch.uint8, generator=GEN())
    drift = DRIFTS.get(name)
    change = lambda p: (drift(x, p, GEN()).float() - x.float()).abs().mean()  # noqa: E731
    assert 0 < change(small) < change(large)


def test_drift_is_batched_and_keeps_dtype_and_shape():
    x = torch.randint(0, 255, (5, 1, 16, 16), dtype=torch.uint8, generator=GEN())
    out = DRIFTS.get("rotation")(x, 30.0, GEN())
    assert out.shape == x.shape and out.dtype == torch.uint8


def test_noise_is_reproducible_from_the_generator():
    x = torch.full((2, 1, 8, 8), 128, dtype=torch.uint8)
    noise = DRIFTS.get("gaussian_noise")
    assert torch.equal(noise(x, 0.1, GEN()), noise(x, 0.1, GEN()))


def test_linear_schedule_grows_with_k():
    values = [drift_parameter("linear", k, 3.0) for k in range(6)]
    assert values == [0, 3, 6, 9, 12, 15]


def test_sudden_schedule_jumps_once():
    values = [drift_parameter("sudden", k, 10.0, at_update=3) for k in range(6)]
    assert values == [0, 0, 0, 10, 10, 10]


def test_recurring_schedule_goes_back_and_forth():
    values = [drift_parameter("recurring", k, 1.0, period=2) for k in range(9)]
    assert values == [0, 1, 2, 1, 0, 1, 2, 1, 0]
