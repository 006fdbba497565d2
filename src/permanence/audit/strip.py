"""STRIP (Gao et al., ACSAC 2019): an input carrying a trigger stays classified as the target when other images are
superimposed on it, so its predictions have low entropy; a clean input's predictions scatter.

Each candidate input is superimposed (pixel sum, clipped to [0, 1], as in STRIP's reference code) with
`overlays` clean images and the mean entropy of the model's softmax over those copies is its score. The
threshold is the `frr` quantile of the same score on held-out clean images (so about `frr` of clean inputs are
flagged by mistake). The check is flagged when at least `min_share` of the candidates score below it.

STRIP judges inputs, not a model: it needs candidate inputs (e.g. what production received) and reports no
ASR (`asr` is NaN), so on its own it makes a version `inconclusive`, never `backdoor`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from permanence.audit import CHECKS
from permanence.audit.base import EVAL_BATCH, AuditData, CheckResult, as_float, model_device, predict_labels
from permanence.errors import PermanenceError
from permanence.seeding import generator


@torch.no_grad()
def superimposed_entropy(model: nn.Module, inputs: Tensor, clean: Tensor, overlays: int,
                         gen: torch.Generator) -> Tensor:
    """Mean prediction entropy (nats) of each input (uint8 or [0, 1] float) over `overlays` superimpositions."""
    was_training = model.training
    model.eval()
    x, background = as_float(inputs), as_float(clean)
    pick = torch.randint(0, len(background), (len(x), overlays), generator=gen).to(x.device)
    scores = []
    try:
        chunk = max(1, EVAL_BATCH // overlays)
        for start in range(0, len(x), chunk):
            part = x[start : start + chunk]
            mixed = (part.unsqueeze(1) + background[pick[start : start + chunk]]).clamp(0, 1)
            probs = model(mixed.flatten(0, 1)).float().softmax(1)
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1)
            scores.append(entropy.view(len(part), overlays).mean(1))
    finally:
        model.train(was_training)
    return torch.cat(scores) if scores else torch.empty(0)


@CHECKS.register("strip")
def strip(model: nn.Module, data: AuditData, *, candidates: Tensor | None = None, overlays: int = 10,
          frr: float = 0.01, min_share: float = 0.1, held_out: float = 0.5, seed: int = 0) -> CheckResult:
    """`candidates`: uint8 (or [0, 1] float) images (N, C, H, W) to judge. `numbers`: flagged, asr (NaN),
    target (the class most flagged candidates are predicted as, -1 if none), flagged_share, threshold,
    clean_entropy, candidate_entropy."""
    if overlays < 1 or not 0 < frr < 1 or not 0 <= min_share <= 1:
        raise PermanenceError("strip: overlays must be >= 1, frr in (0, 1) and min_share in [0, 1]")
    nothing = {"flagged": 0.0, "asr": math.nan, "target": -1.0}
    if candidates is None or len(candidates) == 0:
        return CheckResult("strip", False, nothing, "no candidate inputs given: STRIP judges inputs, not a model")
    device = model_device(model)
    background, calibration = data.to(device).split(held_out, generator(seed, "strip-split"))
    gen = generator(seed, "strip-overlays")
    clean_scores = superimposed_entropy(model, calibration.images, background.images, overlays, gen)
    threshold = torch.quantile(clean_scores, frr).item()
    candidates = candidates.to(device)
    scores = superimposed_entropy(model, candidates, background.images, overlays, gen)
    suspicious = scores < threshold
    share = suspicious.float().mean().item()
    target = int(predict_labels(model, candidates[suspicious]).mode().values) if bool(suspicious.any()) else -1
    flagged = share >= min_share
    numbers = {
        "flagged": float(flagged), "asr": math.nan, "target": float(target), "flagged_share": share,
        "threshold": threshold, "clean_entropy": clean_scores.mean().item(), "candidate_entropy": scores.mean().item(),
    }
    verb = "flags" if flagged else "does not flag"
    reason = (f"{share:.0%} of {len(candidates)} candidates score below the clean {frr:.0%} entropy quantile "
              f"{threshold:.3f}; {verb} at min_share {min_share}")
    return CheckResult("strip", flagged, numbers, reason)
