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

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field as dataclass_field
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
Measure = Callable[[nn.Module, ProbeInputs], float]


@dataclass(frozen=True)
class Probe:
    run: ProbeFn  # every field of the probe for the probed model (the baseline's side included)
    fields: tuple[str, ...]  # the keys `run` returns: VersionRecord fields
    needs_reference: bool = False  # bec compares with the backdoored model: nothing to say before any poisoning
    # a paired probe is one number measured on the probed model and, the same way, on the baseline: the baseline's
    # number then depends on the inputs alone, so timelines that share their inputs can share it (a sweep does)
    measure: Measure | None = None
    field: str | None = None
    baseline_field: str | None = None

    @property
    def paired(self) -> bool:
        return self.measure is not None

    def on_model(self, model: nn.Module, inputs: ProbeInputs) -> dict[str, float]:
        """The probed model's fields: for a paired probe without the baseline's side."""
        return {self.field: self.measure(model, inputs)} if self.paired else self.run(model, inputs)

    def on_baseline(self, inputs: ProbeInputs) -> dict[str, float]:
        """A paired probe's baseline field (nothing for one that is not paired)."""
        return {self.baseline_field: self.measure(inputs.baseline, inputs)} if self.paired else {}


def paired_probe(measure: Measure, field: str, baseline_field: str) -> Probe:
    """A probe reporting `measure` of the probed model as `field` and of the baseline as `baseline_field`."""
    return Probe(lambda model, inputs: {field: measure(model, inputs), baseline_field: measure(inputs.baseline, inputs)},
                 (field, baseline_field), measure=measure, field=field, baseline_field=baseline_field)


@dataclass(frozen=True)
class ProbeModels:
    """The models a version's probes compare with. `reference`: the model right after the last poisoning so far.
    `baseline_fields`: version -> the paired probes' baseline fields, where they were computed once for several
    timelines (see `baseline_fields`); a version missing there has them computed with the probed model's."""

    baseline: nn.Module
    reference: nn.Module | None = None
    baseline_fields: Mapping[int, Mapping[str, float]] = dataclass_field(default_factory=dict)


PROBES: Registry[Probe] = Registry("probe")


def run_probes(model: nn.Module, inputs: ProbeInputs, names: Iterable[str],
               baseline_fields: Mapping[str, float] | None = None) -> dict[str, float]:
    """The named probes' numbers; a probe that needs the reference is skipped while there is none. A paired probe's
    baseline field is taken from `baseline_fields` where it is there (computed before for the same inputs)."""
    known = baseline_fields or {}
    out: dict[str, float] = {}
    for name in names:
        probe = PROBES.get(name, "probe")
        if probe.needs_reference and inputs.reference is None:
            continue
        if probe.paired:
            out.update(probe.on_model(model, inputs))
            out.update({probe.baseline_field: known[probe.baseline_field]} if probe.baseline_field in known
                       else probe.on_baseline(inputs))
        else:
            out.update(probe.run(model, inputs))
    return out


def baseline_fields(inputs: ProbeInputs, names: Iterable[str]) -> dict[str, float]:
    """The baseline fields of the named paired probes (what `run_probes` can be given instead of computing them)."""
    out: dict[str, float] = {}
    for name in names:
        out.update(PROBES.get(name, "probe").on_baseline(inputs))
    return out


def paired(names: Iterable[str]) -> list[str]:
    """The named probes that are paired: those whose baseline side can be shared."""
    return [name for name in names if PROBES.get(name, "probe").paired]


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

__all__ = ["PROBES", "Measure", "Probe", "ProbeFn", "ProbeInputs", "ProbeModels", "baseline_fields", "evaluating", "paired",
           "paired_probe", "run_probes"]
