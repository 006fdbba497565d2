"""Evidently drift checks of an update's incoming images against the reference (clean D0):
on the production model's penultimate-layer embeddings (a domain classifier's ROC AUC) and on
per-image statistics (per-column tests, share of drifted columns)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

# Imported with the module, not on the first check: Evidently's import costs seconds (a start-up cost).
from evidently import Report
from evidently.legacy.calculations.stattests import get_stattest
from evidently.legacy.core import ColumnType
from evidently.legacy.metrics.data_drift.embedding_drift_methods import model as domain_classifier
from evidently.metrics import DriftedColumnsCount
from evidently.presets import DataDriftPreset

SAMPLE = 300


@dataclass(frozen=True)
class DriftResult:
    drift_score: float  # embedding domain-classifier ROC AUC (0.5 = indistinguishable)
    embedding_drift: bool
    stat_drift_share: float
    stat_drift: bool

    @property
    def drift_detected(self) -> bool:
        return self.embedding_drift or self.stat_drift


def image_statistics(images: torch.Tensor) -> pd.DataFrame:
    """Per-image statistics a data team would monitor: brightness, contrast, ink, centre of mass, orientation."""
    x = images.float().mean(1) / 255  # (N, H, W), grayscale
    h, w = x.shape[1:]
    ys = torch.arange(h, dtype=torch.float32, device=x.device).view(1, h, 1)
    xs = torch.arange(w, dtype=torch.float32, device=x.device).view(1, 1, w)
    mass = x.sum((1, 2)).clamp_min(1e-6)
    cy, cx = (x * ys).sum((1, 2)) / mass, (x * xs).sum((1, 2)) / mass
    dy, dx = ys - cy.view(-1, 1, 1), xs - cx.view(-1, 1, 1)
    mu20, mu02, mu11 = (x * dx**2).sum((1, 2)) / mass, (x * dy**2).sum((1, 2)) / mass, (x * dx * dy).sum((1, 2)) / mass
    stats = {
        "brightness": x.mean((1, 2)), "contrast": x.flatten(1).std(1), "ink": (x > 0.5).float().mean((1, 2)),
        "center_x": cx / w, "center_y": cy / h, "orientation": 0.5 * torch.atan2(2 * mu11, mu20 - mu02),
    }
    return pd.DataFrame({k: v.cpu().numpy() for k, v in stats.items()})


def _sample(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:SAMPLE]


def check_drift(reference_images: torch.Tensor, images: torch.Tensor, embed: Callable[[torch.Tensor], torch.Tensor],
                threshold: float, stat_share: float, seed: int, report_path: Path | None = None) -> DriftResult:
    """Compare a sample of `images` with a sample of `reference_images`; `embed` maps images to features."""
    ref_idx = _sample(len(reference_images), seed).to(reference_images.device)
    cur_idx = _sample(len(images), seed + 1).to(images.device)
    reference, current = reference_images[ref_idx], images[cur_idx]
    ref_emb = pd.DataFrame(embed(reference).numpy())
    cur_emb = pd.DataFrame(embed(current).numpy())
    ref_emb.columns = cur_emb.columns = [f"e{i}" for i in range(ref_emb.shape[1])]
    np.random.seed(seed)  # the domain classifier's split uses the global numpy RNG
    score, embedding_drift, _ = domain_classifier(threshold=threshold)(cur_emb, ref_emb)

    ref_stats = image_statistics(reference)
    cur_stats = image_statistics(current)
    if report_path is None:
        share = drifted_share(ref_stats, cur_stats)
    else:
        snapshot = Report([DriftedColumnsCount(drift_share=stat_share), DataDriftPreset()]).run(
            reference_data=ref_stats, current_data=cur_stats)
        share = float(snapshot.dict()["metrics"][0]["value"]["share"])
        snapshot.save_html(str(report_path))
    return DriftResult(float(score), bool(embedding_drift), share, share >= stat_share)


def drifted_share(reference: pd.DataFrame, current: pd.DataFrame) -> float:
    """The share of columns that drifted by the test Evidently's reports choose for each (its default for numerical
    columns of this size, at its default threshold): what `DriftedColumnsCount` reports, without building a report.
    A report spent 75 ms an update on distributions and plots that no one sees when no HTML is written."""
    drifted = 0
    for column in reference.columns:
        test = get_stattest(reference[column], current[column], ColumnType.Numerical, None)
        drifted += bool(test(reference[column], current[column], ColumnType.Numerical, None).drifted)
    return drifted / len(reference.columns)
