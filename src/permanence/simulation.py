"""The time-varying-model protocol: M0 trained on D0, then one drifted (and maybe poisoned) update after another.

`Simulation` exposes the steps (training set of version k, initial training, one update, evaluation) so an
orchestrator can run them one at a time and resume; `simulate` runs them all and returns a `Timeline`.
Every random draw comes from (seed, purpose, version), so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from permanence.attacks import build_attack
from permanence.config import Config
from permanence.data import Splits, load_splits
from permanence.dormancy import PROBES, ProbeInputs, ProbeModels, baseline_fields, run_probes
from permanence.drift import DRIFTS, drift_parameter
from permanence.errors import PermanenceError
from permanence.metrics import accuracy, attack_success_rate
from permanence.models import Classifier, build_model
from permanence.policies import POLICIES, TrainingSet, UpdateContext
from permanence.seeding import derive_seed, generator
from permanence.timeline import Timeline, VersionRecord
from permanence.training import Runtime, fit_from_scratch, predict


@dataclass(frozen=True)
class EpochEnd:
    version: int
    epoch: int
    epochs: int
    loss: float


@dataclass(frozen=True)
class VersionEnd:
    record: VersionRecord
    model: Classifier


Event = EpochEnd | VersionEnd
ProgressCallback = Callable[[Event], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PermanenceError(f"runtime.device: {name} requested but no CUDA device is available; allowed here: auto, cpu")
    return device


class Simulation:
    def __init__(self, config: Config, splits: Splits | None = None) -> None:
        self.config = config
        self.device = resolve_device(config.runtime.device)
        if config.runtime.threads:
            torch.set_num_threads(config.runtime.threads)
        self.splits = splits if splits is not None else load_splits(config, self.device)
        if config.attack.target >= self.splits.num_classes:
            raise PermanenceError(f"attack.target: {config.attack.target} is not a class of {config.data.name} "
                                  f"(0..{self.splits.num_classes - 1})")
        self.drift = DRIFTS.get(config.drift.kind, "drift.kind")
        if self.drift.needs_color and self.splits.is_grayscale:
            raise PermanenceError(
                f"drift.kind: {config.drift.kind} does nothing to grayscale images ({config.data.name}, even with "
                f"data.channels=3); use colour data or choose rotation, brightness, contrast or gaussian_noise"
            )
        self.attack = build_attack(
            config.attack.name, target=config.attack.target, strength=config.attack.strength,
            image_shape=(self.splits.channels, *self.splits.image_size), seed=config.seed,
            cross_ratio=config.attack.cross_ratio,
        )
        self.policy = POLICIES.get(config.update.policy, "update.policy")
        on_cuda = self.device.type == "cuda"
        # bf16 only on CUDA: the CPU's bf16 kernels are ~10x slower than fp32 here
        self.runtime = Runtime(
            self.device, self.splits.mean, self.splits.std, bf16=on_cuda,
            drop_ragged=config.runtime.compile and on_cuda,
        )
        # oneDNN runs a batch of 64 twice as fast per image as one of 1024 on this project's CPU (bench/cpu_step.py)
        self.eval_batch_size = config.eval.batch_size or (1024 if on_cuda else 64)
        self._non_target = self.splits.test_y != config.attack.target
        self._slices = self._update_slices() if config.data.update_data == "slice" else None

    # --- the schedule -------------------------------------------------------------------------
    @property
    def versions(self) -> int:
        return self.config.update.updates + 1

    def drift_parameter(self, version: int) -> float:
        d = self.config.drift
        return drift_parameter(d.schedule, version, d.delta, d.at_update, d.period)

    def is_poisoned(self, version: int) -> bool:
        p = self.config.poisoning
        if p.inject == "d0":
            return version == 0
        if p.inject == "update":
            return version == p.first
        if p.inject == "range":
            return p.first <= version <= p.last
        return False

    def _update_slices(self) -> list[torch.Tensor]:
        n_updates = max(1, self.config.update.updates)
        order = torch.randperm(len(self.splits.pool_y), generator=generator(self.config.seed, "pool-slices"))
        return [chunk.to(self.device) for chunk in order.chunk(n_updates)]

    def _drift(self, images: torch.Tensor, version: int, purpose: str) -> torch.Tensor:
        gen = generator(self.config.seed, purpose, version, device=self.device)
        return self.drift(images, self.drift_parameter(version), gen)

    def training_set(self, version: int) -> TrainingSet:
        """D0 for version 0; the (drifted, maybe poisoned) update data for version k >= 1."""
        s = self.splits
        if version == 0:
            x, y = s.d0_x, s.d0_y
        else:
            x, y = s.pool_x, s.pool_y
            if self._slices is not None:
                idx = self._slices[(version - 1) % len(self._slices)]
                x, y = x[idx], y[idx]
            x = self._drift(x, version, "train-drift")
        poisoned = torch.zeros(len(y), dtype=torch.bool, device=y.device)
        if self.is_poisoned(version):
            result = self.attack.poison(x, y, self.config.attack.ratio, generator(self.config.seed, "poison", version))
            x, y, poisoned = result.x, result.y, result.poisoned
        return TrainingSet(version, x, y, poisoned, self.drift_parameter(version))

    # --- the steps ----------------------------------------------------------------------------
    def new_model(self, version: int = 0) -> Classifier:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.config.seed, "init", version))
            model = build_model(self.config.model.name, self.splits.channels, self.splits.num_classes)
        return model.to(self.device, memory_format=self.runtime.memory_format)

    def load_model(self, state: dict[str, torch.Tensor]) -> Classifier:
        model = self.new_model()
        model.load_state_dict(state)
        return model

    def _forward(self, model: Classifier) -> Callable | None:
        return torch.compile(model) if self.runtime.drop_ragged else None

    def _epoch_callback(self, version: int, on_event: ProgressCallback | None):
        if on_event is None:
            return None
        return lambda epoch, epochs, loss: on_event(EpochEnd(version, epoch, epochs, loss))

    def train_initial(self, data: TrainingSet | None = None, on_event: ProgressCallback | None = None) -> Classifier:
        data = data if data is not None else self.training_set(0)
        model = self.new_model(0)
        fit_from_scratch(model, data.x, data.y, self.config.train, self.runtime, generator(self.config.seed, "train", 0),
                         self._epoch_callback(0, on_event), forward=self._forward(model))
        return model

    def update(self, model: Classifier, version: int, data: TrainingSet | None = None,
               on_event: ProgressCallback | None = None) -> Classifier:
        data = data if data is not None else self.training_set(version)
        ctx = UpdateContext(
            version=version, config=self.config, runtime=self.runtime,
            gen=generator(self.config.seed, "train", version),
            fresh_model=lambda: self.new_model(version),
            history=lambda: [self.training_set(v) for v in range(version)] + [data],
            on_epoch=self._epoch_callback(version, on_event), forward=self._forward(model),
        )
        policy = self.policy
        if self.config.poisoning.policy is not None and self.is_poisoned(version):
            policy = POLICIES.get(self.config.poisoning.policy, "poisoning.policy")
        return policy(model, data, ctx)

    def test_sets(self, version: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(clean drifted test images, labels, triggered non-target images, their true labels)."""
        x = self._drift(self.splits.test_x, version, "test-drift")
        victims = x[self._non_target]
        return x, self.splits.test_y, self.attack.apply(victims), self.splits.test_y[self._non_target]

    def evaluate(self, model: Classifier, version: int, probes: ProbeModels | None = None) -> dict[str, float]:
        """Clean accuracy, ASR and RA; plus the enabled dormancy probes' numbers when `probes` is given."""
        x, y, triggered, true_labels = self.test_sets(version)
        batch = self.eval_batch_size
        clean = predict(model, x, self.runtime, batch)
        backdoored = predict(model, triggered, self.runtime, batch)
        metrics = {
            "clean_acc": accuracy(clean, y),
            "asr": attack_success_rate(backdoored, self.config.attack.target),
            "ra": accuracy(backdoored, true_labels),
        }
        if probes is not None:
            metrics.update(self.run_probes(model, version, probes))
        return metrics

    # --- the dormancy probes ------------------------------------------------------------------
    @property
    def probes_enabled(self) -> list[str]:
        """The registered probes switched on in `eval` (a probe's name is its flag there)."""
        return [name for name in PROBES if getattr(self.config.eval, name, False)]

    def probe_due(self, version: int) -> bool:
        """Whether the dormancy probes run on this version: every `eval.probe_every`-th one, and the last."""
        return version in probed_versions(self.config)

    def baseline_config(self) -> Config:
        """This study never poisoned (same seed, data, model and recipes): its M0 is the probes' baseline."""
        raw = self.config.model_dump()
        raw["poisoning"] = {**raw["poisoning"], "inject": "none"}
        return Config.model_validate(raw)

    def train_baseline(self) -> Classifier:
        """The never-poisoned M0: the weights of the M0 of `baseline_config()`'s study (a sweep's clean control)."""
        s = self.splits
        unpoisoned = torch.zeros(len(s.d0_y), dtype=torch.bool, device=s.d0_y.device)
        return self.train_initial(TrainingSet(0, s.d0_x, s.d0_y, unpoisoned, 0.0))

    def probe_inputs(self, version: int, probes: ProbeModels) -> ProbeInputs:
        """Clean images: the whole update pool (even with `data.update_data=slice`) at the version's drift, drawn
        with its own purpose string, never the test set; evaluation images: the version's drifted test set."""
        s = self.splits
        return ProbeInputs(
            trigger=self.attack.apply, target=self.config.attack.target,
            clean_x=self._drift(s.pool_x, version, "probe-drift"), clean_y=s.pool_y,
            eval_x=self._drift(s.test_x, version, "test-drift"), eval_y=s.test_y,
            runtime=self.runtime, batch_size=self.config.update.batch_size,
            gen_seed=derive_seed(self.config.seed, "probe", version),
            baseline=probes.baseline, reference=probes.reference, settings=self.config.eval,
            eval_batch_size=self.eval_batch_size,
        )

    def run_probes(self, model: Classifier, version: int, probes: ProbeModels) -> dict[str, float]:
        """The enabled probes' numbers for this version (none if no probe is enabled); `model` is not modified.

        A poisoned version is its own reference; bec is left out while there is no reference (before any poisoning).
        The paired probes' baseline fields come from `probes.baseline_fields` where it has this version's.
        """
        names = self.probes_enabled
        if not names:
            return {}
        if self.is_poisoned(version):
            probes = replace(probes, reference=model)
        return run_probes(model, self.probe_inputs(version, probes), names, probes.baseline_fields.get(version))

    def baseline_fields(self, version: int, baseline: Classifier) -> dict[str, float]:
        """The enabled paired probes' baseline fields at this version: what `run_probes` would compute beside any
        probed model of any timeline whose `probe_context` is this one's."""
        return baseline_fields(self.probe_inputs(version, ProbeModels(baseline)), self.probes_enabled)

    def step(self, model: Classifier | None, version: int, on_event: ProgressCallback | None = None,
             data: TrainingSet | None = None, probes: ProbeModels | None = None) -> tuple[Classifier, VersionRecord]:
        """Produce version `version` (train M0, or update `model`) and evaluate it; `data` if already built.

        `probes`: the baseline and the reference (the model right after the last poisoning before this version)
        for the enabled dormancy probes (see `run_probes`).
        """
        data = data if data is not None else self.training_set(version)
        started = time.perf_counter()
        if version == 0:
            model = self.train_initial(data, on_event)
        else:
            assert model is not None, "an update needs the previous version"
            model = self.update(model, version, data, on_event)
        self._sync()
        record = self.measure(model, version, data, probes, train_seconds=time.perf_counter() - started)
        if on_event is not None:
            on_event(VersionEnd(record, model))
        return model, record

    def measure(self, model: Classifier, version: int, data: TrainingSet, probes: ProbeModels | None = None,
                train_seconds: float = 0.0, updated: bool = True) -> VersionRecord:
        """Evaluate `model` as version `version`, trained on `data` (or, with `updated=False`, a scheduled update
        that did not run: the previous weights facing this version's drift, trained on nothing new)."""
        started = time.perf_counter()
        metrics = self.evaluate(model, version)
        evaluated = time.perf_counter()
        probe_seconds = None
        if probes is not None and self.probes_enabled and self.probe_due(version):
            metrics.update(self.run_probes(model, version, probes))
            self._sync()
            probe_seconds = time.perf_counter() - evaluated
        return VersionRecord(
            version=version, drift=data.drift, poisoned=updated and data.is_poisoned,
            train_seconds=train_seconds, eval_seconds=evaluated - started,
            n_train=len(data.y) if updated else 0, n_poisoned=int(data.poisoned.sum()) if updated else 0,
            probe_seconds=probe_seconds, updated=updated, **metrics,
        )

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def probed_versions(config: Config) -> list[int]:
    """The versions the dormancy probes run on: every `eval.probe_every`-th one, and the last."""
    last = config.update.updates
    return [v for v in range(last + 1) if v % config.eval.probe_every == 0 or v == last]


def probe_context(config: Config) -> dict:
    """Everything `Simulation.probe_inputs` reads from a config: two timelines with equal contexts (and the same
    baseline model) give a paired probe's baseline the same inputs at every version, so its number is the same."""
    return {"seed": config.seed, **{section: getattr(config, section).model_dump(mode="json")
                                    for section in ("data", "drift", "attack", "eval", "runtime")},
            "update.batch_size": config.update.batch_size}


def state_on_cpu(model: Classifier) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def simulate(config: Config, on_event: ProgressCallback | None = None, keep_states: bool = True,
             splits: Splits | None = None, baseline: Classifier | None = None) -> Timeline:
    """Run the whole timeline: M0 and `config.update.updates` updates.

    With a dormancy probe enabled, the never-poisoned baseline is `baseline` or, if None, trained here once;
    the reference is the model right after the last poisoning so far.
    """
    if config.update.trigger == "drift":
        raise PermanenceError("update.trigger: drift needs the pipeline's drift check (permanence simulate); "
                              "simulate() in the core runs every update: allowed here: always")
    sim = Simulation(config, splits)
    timeline = Timeline(alpha=config.eval.alpha)
    probes = None
    if sim.probes_enabled:
        probes = ProbeModels(baseline if baseline is not None else sim.train_baseline())
    model = None
    for version in range(sim.versions):
        model, record = sim.step(model, version, on_event, probes=probes)
        if probes is not None and sim.is_poisoned(version):
            probes = replace(probes, reference=copy.deepcopy(model))  # the next updates change `model` in place
        timeline.records.append(record)
        if keep_states:
            timeline.states.append(state_on_cpu(model))
    return timeline
