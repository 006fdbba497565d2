"""Re-activation (Zhu, Liang, Wu 2024): the trigger plus ONE universal perturbation, white-box PGD on the model.

delta (shape (1, C, H, W), L-infinity budget `eval.reactivate_eps` in [0, 1] pixel units) is optimised by
targeted PGD on `eval.probe_images` triggered clean non-target images to maximise the target class; then it is
rounded to whole pixel levels within floor(255 * eps), so the perturbed images are real uint8 images and the
budget holds exactly. `reactivated_asr`: the ASR of trigger + delta on the evaluation images;
`reactivated_asr_clean`: the same budget and PGD against the never-poisoned baseline, i.e. what a universal
adversarial perturbation reaches without any backdoor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from permanence.dormancy import PROBES, ProbeInputs, evaluating, paired_probe
from permanence.metrics import attack_success_rate
from permanence.seeding import generator
from permanence.training import Runtime, predict

STEP_FRACTION = 2.5  # PGD step = 2.5 * eps / steps (Madry et al. 2018): the walk can cross the box in 40% of the steps


def budget_levels(eps: float) -> int:
    """The largest whole pixel change (0..255) within an L-infinity budget `eps` in [0, 1] units."""
    return math.floor(255 * eps + 1e-9)


def universal_perturbation(model: nn.Module, triggered: Tensor, target: int, runtime: Runtime, *, eps: float,
                           steps: int, gen: torch.Generator, batch_size: int = 1024) -> Tensor:
    """One delta for all `triggered` uint8 images, in whole pixel levels (float, shape (1, C, H, W))."""
    base = triggered.float().div(255)
    delta = (torch.rand((1, *base.shape[1:]), generator=gen) * 2 - 1).mul_(eps).to(base.device)
    labels = torch.full((len(base),), target, dtype=torch.long, device=base.device)
    step = STEP_FRACTION * eps / steps
    with evaluating(model):
        for _ in range(steps):
            delta.requires_grad_(True)
            grad = torch.zeros_like(delta)
            for start in range(0, len(base), batch_size):
                pixels = (base[start : start + batch_size] + delta).clamp(0, 1)
                # prepare() works in place on a float input: give it a fresh tensor, never `delta` itself
                with runtime.autocast():
                    logits = model(runtime.prepare(pixels * 255))
                loss = F.cross_entropy(logits.float(), labels[start : start + batch_size], reduction="sum")
                grad += torch.autograd.grad(loss, delta)[0]
            delta = (delta.detach() - step * grad.sign()).clamp_(-eps, eps)
    levels = budget_levels(eps)
    return (delta * 255).round().clamp_(-levels, levels)


def perturb(images: Tensor, delta_levels: Tensor) -> Tensor:
    """uint8 images plus a whole-level perturbation, clipped to valid pixels."""
    return (images.float() + delta_levels).clamp_(0, 255).to(torch.uint8)


def reactivated_asr(model: nn.Module, inputs: ProbeInputs) -> float:
    s = inputs.settings
    delta = universal_perturbation(
        model, inputs.trigger(inputs.probe_images()), inputs.target, inputs.runtime, eps=s.reactivate_eps,
        steps=s.reactivate_steps, gen=generator(inputs.gen_seed, "reactivate-init"), batch_size=inputs.eval_batch_size,
    )
    attacked = perturb(inputs.trigger(inputs.victims), delta)
    with evaluating(model):
        predictions = predict(model, attacked, inputs.runtime, inputs.eval_batch_size)
    return attack_success_rate(predictions, inputs.target)


PROBES.register("reactivate")(paired_probe(reactivated_asr, "reactivated_asr", "reactivated_asr_clean"))
