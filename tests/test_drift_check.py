"""Evidently's drift check of an update's images: the per-column tests agree with Evidently's own report."""

import pytest
import torch

from permanence.drift import DRIFTS

pytestmark = pytest.mark.pipeline


def _digits(n: int, seed: int) -> torch.Tensor:
    from permanence import build_config
    from permanence.simulation import Simulation

    images = Simulation(build_config({}, ["data.name=digits"])).splits.d0_x
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]]


@pytest.mark.parametrize("drift,strength", [("rotation", 0.0), ("rotation", 10.0), ("rotation", 40.0),
                                            ("brightness", 0.3), ("gaussian_noise", 0.1), ("contrast", 0.5)])
def test_drifted_share_is_what_evidentlys_report_counts(drift, strength):
    from evidently import Report
    from evidently.metrics import DriftedColumnsCount

    from permanence.adapters.drift_check import drifted_share, image_statistics

    reference = image_statistics(_digits(300, 0))
    current_images = DRIFTS.get(drift)(_digits(300, 1), strength, torch.Generator().manual_seed(2))
    current = image_statistics(current_images)
    report = Report([DriftedColumnsCount(drift_share=0.5)]).run(reference_data=reference, current_data=current)
    assert drifted_share(reference, current) == pytest.approx(report.dict()["metrics"][0]["value"]["share"])


def test_a_strong_rotation_drifts_columns_and_none_drift_without_one():
    from permanence.adapters.drift_check import drifted_share, image_statistics

    reference = image_statistics(_digits(300, 0))
    rotated = DRIFTS.get("rotation")(_digits(300, 1), 40.0, torch.Generator().manual_seed(2))
    assert drifted_share(reference, image_statistics(rotated)) >= 0.3
    assert drifted_share(reference, image_statistics(_digits(300, 1))) <= 1 / 6
