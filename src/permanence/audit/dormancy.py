"""Dormancy: does a backdoor whose trigger no longer works on a model come back (dormant) or is it gone?

The check is fed a trigger and its target class: one that an inversion recovered on another version of the same
model (the audit's lineage: typically Neural Cleanse on the oldest version, where the backdoor was live) or one the
user passed. It measures, on this model:

- `asr`: the trigger's success rate on the held-out clean images (Neural Cleanse's split, `held_out_split`, so
  no image any check optimised on is measured on), and `asr_clean`, the same on the never-poisoned baseline when
  one is given;
- the core's dormancy probes (`permanence.dormancy`): re-tuning (`p_asr`, Min et al. 2024) and re-activation
  (`reactivated_asr`, Zhu et al. 2024), each beside the same probe on a never-poisoned baseline (`p_asr_clean`,
  `reactivated_asr_clean`); `bec` too when a backdoored reference model is given and every model exposes its
  penultimate features (a project `Classifier` behind `InputNormalized`; foreign models do not).

Flagged when the trigger is live here (`asr` >= alpha and, with a baseline, at least `margin` above
`asr_clean`) or every measured probe brings it back (>= alpha and at least `margin` above the baseline's, the rule
of `verdict.decide`).

The probes take models fed `runtime.prepare(uint8 images)`. With mean 0 and std 1 (`audit_runtime`) that is
float [0, 1], channels_last: exactly the audit's model interface, so every audited model goes in as it is.
The baseline's half of each probe does not depend on the probed model: `baseline_numbers` runs it once per
audit and the check takes it precomputed (else it runs it itself).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from permanence.audit import CHECKS
from permanence.audit.base import AuditData, CheckResult, model_device, predict_labels, success_rate
from permanence.audit.model import InputNormalized
from permanence.audit.neural_cleanse import held_out_split
from permanence.audit.verdict import probe_outcomes
from permanence.config import EvalConfig, TrainConfig, UpdateConfig
from permanence.dormancy import PROBES, ProbeInputs
from permanence.errors import PermanenceError
from permanence.models import build_model
from permanence.seeding import derive_seed, generator
from permanence.training import Runtime, fit_from_scratch

Trigger = Callable[[Tensor], Tensor]  # uint8 (N, C, H, W) -> triggered uint8
DEFAULT_PROBES = ("retune", "reactivate")
HELD_OUT = 0.3  # NeuralCleanseSettings.held_out: the audit's one split of the clean data

# paired probe -> (its number on one model, the probed model's key, the baseline's key), from the probe registry
MODEL_SIDE: dict[str, tuple[Callable[[nn.Module, ProbeInputs], float], str, str]] = {
    name: (probe.measure, probe.field, probe.baseline_field) for name in PROBES if (probe := PROBES.get(name)).paired
}


def audit_runtime(channels: int, device: torch.device | str = "cpu") -> Runtime:
    """prepare() maps uint8 to float [0, 1] (mean 0, std 1): the probes then feed audit-interface models as they are."""
    device = torch.device(device)
    return Runtime(device, torch.zeros(channels, device=device), torch.ones(channels, device=device), bf16=False)


def as_trigger(trigger: Any) -> Trigger:
    """A `RecoveredTrigger` (neural_cleanse) or any uint8 -> uint8 callable (e.g. an attack's `apply`)."""
    if hasattr(trigger, "as_trigger"):
        return trigger.as_trigger()
    if not callable(trigger):
        raise PermanenceError("dormancy: trigger must map uint8 images (N, C, H, W) to triggered uint8 images")
    return trigger


def _probe_names(probes: Sequence[str]) -> list[str]:
    names = list(probes)
    for name in names:
        PROBES.get(name, "dormancy.probes")
    return names


def probe_inputs(data: AuditData, trigger: Trigger, target: int, baseline: nn.Module, *, seed: int = 0,
                 held_out: float = HELD_OUT, settings: EvalConfig | None = None,
                 reference: nn.Module | None = None) -> ProbeInputs:
    """The probes' inputs: clean images to re-tune / optimise on = the work split, evaluation = the held-out split.
    One `gen_seed` for every model of an audit, so every version (and the baseline) sees the same draws."""
    device = model_device(baseline)
    work, evaluation = held_out_split(data.to(device), held_out, seed)
    return ProbeInputs(
        trigger=trigger, target=target, clean_x=work.images, clean_y=work.labels,
        eval_x=evaluation.images, eval_y=evaluation.labels, runtime=audit_runtime(data.image_shape[0], device),
        batch_size=UpdateConfig().batch_size, gen_seed=derive_seed(seed, "audit-probes"), baseline=baseline,
        reference=reference, settings=settings or EvalConfig(), eval_batch_size=1024 if device.type == "cuda" else 64,
    )


class _Features(nn.Module):
    def __init__(self, wrapped: InputNormalized) -> None:
        super().__init__()
        self.wrapped = wrapped

    def forward(self, x: Tensor) -> Tensor:
        w = self.wrapped
        return w.classifier.features(((x - w.mean) / w.std).contiguous(memory_format=torch.channels_last))


class _FeatureView(nn.Module):
    """`features` on [0, 1] input for bec, which reads a model's penultimate layer as `model.features`."""

    def __init__(self, wrapped: InputNormalized) -> None:
        super().__init__()
        self.features = _Features(wrapped)


def has_features(model: nn.Module | None) -> bool:
    return isinstance(model, InputNormalized) and isinstance(getattr(model.classifier, "features", None), nn.Module)


def trigger_asr(model: nn.Module, data: AuditData, trigger: Any, target: int, *, seed: int = 0,
                held_out: float = HELD_OUT) -> float:
    """The trigger's success rate on the held-out split of the clean data (images not of the target class)."""
    _, evaluation = held_out_split(data.to(model_device(model)), held_out, seed)
    return success_rate(predict_labels(model, as_trigger(trigger)(evaluation.images)), evaluation.labels, target)


def baseline_numbers(baseline: nn.Module, data: AuditData, trigger: Any, target: int, *,
                     probes: Sequence[str] = DEFAULT_PROBES, seed: int = 0, held_out: float = HELD_OUT,
                     settings: EvalConfig | None = None) -> dict[str, float]:
    """The never-poisoned baseline's side, once per audit: `asr_clean` and each probe's (`p_asr_clean`,
    `reactivated_asr_clean`)."""
    inputs = probe_inputs(data, as_trigger(trigger), target, baseline, seed=seed, held_out=held_out, settings=settings)
    out: dict[str, float] = {"asr_clean": trigger_asr(baseline, data, trigger, target, seed=seed, held_out=held_out)}
    for name in _probe_names(probes):
        if name in MODEL_SIDE:
            run, _, baseline_key = MODEL_SIDE[name]
            out[baseline_key] = run(baseline, inputs)
    return out


def train_clean_baseline(model_name: str, data: AuditData, mean: Sequence[float], std: Sequence[float], *,
                         seed: int = 0, held_out: float = HELD_OUT, train: TrainConfig | None = None,
                         device: torch.device | str = "cpu") -> InputNormalized:
    """A never-poisoned model of the audited architecture, trained with the project's initial recipe (`train`, by
    default TrainConfig's) on the work split of the clean data only, behind the audit interface."""
    device = torch.device(device)
    work, _ = held_out_split(data.to(device), held_out, seed)
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=device)
    runtime = Runtime(device, mean_t, std_t, bf16=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "audit-baseline-init"))
        classifier = build_model(model_name, data.image_shape[0], data.num_classes)
    classifier = classifier.to(device, memory_format=runtime.memory_format)
    fit_from_scratch(classifier, work.images, work.labels, train or TrainConfig(), runtime,
                     generator(seed, "audit-baseline-train"))
    return InputNormalized(classifier, mean_t, std_t).eval()


@CHECKS.register("dormancy")
def dormancy(model: nn.Module, data: AuditData, *, trigger: Any, target: int, baseline: nn.Module | None = None,
             probes: Sequence[str] = DEFAULT_PROBES, baseline_numbers: dict[str, float] | None = None,
             reference: nn.Module | None = None, alpha: float = 0.5, margin: float = 0.25, seed: int = 0,
             held_out: float = HELD_OUT, settings: EvalConfig | None = None) -> CheckResult:
    """`probes`: registered probe names (retune, reactivate, bec); an empty list measures the trigger's ASR only.
    `baseline`: a never-poisoned model (required when a probe runs); `baseline_numbers`: its side of the probes,
    precomputed by `baseline_numbers()` with the same trigger, data, seed and settings. `reference`: the backdoored
    model bec compares with (bec is skipped without one, or when a model exposes no features).
    `numbers`: flagged, asr, target, the probes' numbers, seconds."""
    started = time.perf_counter()
    names = _probe_names(probes)
    if not 0 <= target < data.num_classes:
        raise PermanenceError(f"dormancy: target {target} is not a class (0..{data.num_classes - 1})")
    if names and baseline is None:
        raise PermanenceError("dormancy: the probes need a never-poisoned baseline model")
    apply = as_trigger(trigger)
    known = dict(baseline_numbers or {})
    asr = trigger_asr(model, data, apply, target, seed=seed, held_out=held_out)
    numbers: dict[str, float] = {"asr": asr, "target": float(target)}
    if baseline is not None:
        numbers["asr_clean"] = known["asr_clean"] if "asr_clean" in known else \
            trigger_asr(baseline, data, apply, target, seed=seed, held_out=held_out)
    skipped: dict[str, str] = {}
    if names:
        inputs = probe_inputs(data, apply, target, baseline, seed=seed, held_out=held_out, settings=settings,
                              reference=reference)
        for name in names:
            if name in MODEL_SIDE:
                run, key, baseline_key = MODEL_SIDE[name]
                numbers[key] = run(model, inputs)
                numbers[baseline_key] = known[baseline_key] if baseline_key in known else run(baseline, inputs)
            elif name == "bec":
                if reference is None or not all(has_features(m) for m in (model, baseline, reference)):
                    skipped[name] = "needs a backdoored reference and models that expose their features"
                    continue
                views = {id(m): _FeatureView(m) for m in (model, baseline, reference)}
                numbers.update(PROBES.get("bec").run(views[id(model)], replace(
                    inputs, baseline=views[id(baseline)], reference=views[id(reference)])))
            else:
                skipped[name] = "not a probe the audit knows how to feed"
    outcomes = probe_outcomes(numbers, alpha, margin)
    live = math.isfinite(asr) and asr >= alpha and (baseline is None or asr - numbers["asr_clean"] >= margin)
    comes_back = bool(outcomes) and all(outcomes.values())
    flagged = live or comes_back
    numbers["flagged"] = float(flagged)
    numbers["seconds"] = time.perf_counter() - started
    control = f", {numbers['asr_clean']:.2f} on the baseline" if "asr_clean" in numbers else ""
    parts = [f"the trigger -> class {target} reaches ASR {asr:.2f} on held-out images{control} "
             f"({'live' if live else 'not live'} at alpha {alpha})"]
    for name, (_, key, baseline_key) in MODEL_SIDE.items():
        if key in numbers:
            parts.append(f"{name}: {key} {numbers[key]:.2f} vs baseline {numbers[baseline_key]:.2f}")
    if "bec" in numbers:
        parts.append(f"bec {numbers['bec']:.2f}")
    if not names:
        parts.append("no probe run")
    return CheckResult("dormancy", flagged, numbers, "; ".join(parts), {"probes": outcomes, "skipped": skipped})
