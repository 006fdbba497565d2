"""Dormancy probes: is a backdoor whose ASR has fallen dormant (recoverable) or erased? One module each.

A probe is `run(model, inputs) -> {field: value}`. It needs no study: a model taking
`inputs.runtime.prepare(uint8 images)` (every `Classifier` here), a trigger (uint8 (N, C, H, W) -> uint8, e.g.
`attack.apply`), the target class, clean images to work with, evaluation images, and a never-poisoned
baseline model (plus, for `bec`, the backdoored reference model). Every number of the probed model comes
beside the same probe on the baseline: that control tells a dormant backdoor from what the probe reaches alone.

Each probe's name is also its on/off flag in `EvalConfig` (`eval.retune`, `eval.reactivate`, `eval.bec`) and
its `fields` are `VersionRecord` fields. Probes never modify the model they are given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from permanence.registry import Registry
from permanence.seeding import generator
from permanence.training import Runtime

if TYPE_CHECKING:  # config validates names against the registries, so the registries never import it
    from permanence.config import EvalConfig


@dataclass(frozen=True)
class ProbeInputs:
    trigger: Callable[[Tensor], Tensor]  # uint8 (N, C, H, W) -> triggered uint8
    target: int
    clean_x: Tensor  # uint8 clean images to re-tune / optimise / compare on: never test images
    clean_y: Tensor
    eval_x: Tensor  # uint8 images to measure ASR on: those not of the target class, after the trigger
    eval_y: Tensor
    runtime: Runtime
    batch_size: int  # re-tuning batch size
    gen_seed: int  # every draw of every probe derives from it
    baseline: nn.Module  # never poisoned
    reference: nn.Module | None  # the backdoored model (bec); None before any poisoning
    settings: EvalConfig
    eval_batch_size: int = 1024  # forward passes only

    @property
    def victims(self) -> Tensor:
        """The evaluation images not of the target class, untriggered."""
        return self.eval_x[self.eval_y != self.target]

    def probe_images(self) -> Tensor:
        """`settings.probe_images` clean non-target images (a seeded draw): what reactivate and bec work on."""
        candidates = (self.clean_y != self.target).nonzero().squeeze(1).cpu()
        order = torch.randperm(len(candidates), generator=generator(self.gen_seed, "probe-images"))
        return self.clean_x[candidates[order[: self.settings.probe_images]].to(self.clean_x.device)]


ProbeFn = Callable[[nn.Module, ProbeInputs], dict[str, float]]


@dataclass(frozen=True)
class Probe:
    run: ProbeFn
    fields: tuple[str, ...]  # the keys `run` returns: VersionRecord fields
    needs_reference: bool = False  # bec compares with the backdoored model: nothing to say before any poisoning


@dataclass(frozen=True)
class ProbeModels:
    """The models a version's probes compare with. `reference`: the model right after the last poisoning so far."""

    baseline: nn.Module
    reference: nn.Module | None = None


PROBES: Registry[Probe] = Registry("probe")


def run_probes(model: nn.Module, inputs: ProbeInputs, names: Iterable[str]) -> dict[str, float]:
    """The named probes' numbers; a probe that needs the reference is skipped while there is none."""
    out: dict[str, float] = {}
    for name in names:
        probe = PROBES.get(name, "probe")
        if probe.needs_reference and inputs.reference is None:
            continue
        out.update(probe.run(model, inputs))
    return out


@contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm's running statistics, no dropout) for the block, then each model's own mode back."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)


from permanence.dormancy import retune, reactivate, bec  # noqa: E402,F401

__all__ = ["PROBES", "Probe", "ProbeFn", "ProbeInputs", "ProbeModels", "evaluating", "run_probes"]
