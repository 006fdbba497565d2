"""The one validated configuration, built from `params.yaml` and `key.sub=value` overrides.

Everything that reads settings takes a `Config`; nothing re-parses the YAML. Names of attacks, drifts,
models, policies and datasets are checked against their registries, so a new entry needs no change here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from permanence.attacks import ATTACKS
from permanence.data import DATASETS
from permanence.drift import DRIFTS
from permanence.errors import PermanenceError
from permanence.models import MODELS
from permanence.policies import POLICIES

STUDY_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,63}")  # a study's name: an MLflow experiment and model name too
STUDY_RULE = "letters, digits, '_' or '-', starting with a letter or '_'"  # what STUDY_NAME accepts


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    name: str = "digits"
    root: Path | None = Field(None, description="folder holding the dataset (torchvision layout) or the .npz file")
    download: bool = Field(False, description="let torchvision download a missing dataset (needs internet)")
    channels: Literal[1, 3] | None = Field(None, description="force 1 or 3 channels; None keeps the dataset's")
    limit: int | None = Field(None, ge=100, description="use at most this many training images (a seeded subset)")
    test_limit: int | None = Field(None, ge=50, description="use at most this many test images")
    d0_fraction: float = Field(0.5, gt=0, lt=1, description="share of the training images that forms D0")
    update_data: Literal["pool", "slice"] = Field(
        "pool", description="pool: every update fine-tunes on the whole update pool; slice: a fresh disjoint slice each"
    )

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        DATASETS.get(name, "data.name")
        return name


class DriftConfig(Section):
    kind: str = "rotation"
    schedule: Literal["linear", "sudden", "recurring"] = "linear"
    delta: float = Field(3.0, ge=0, description="per-update step (linear, recurring) or jump size (sudden)")
    at_update: int = Field(5, ge=1, description="sudden: the update at which the drift jumps")
    period: int = Field(4, ge=1, description="recurring: updates from zero drift to the peak (then back)")

    @field_validator("kind")
    @classmethod
    def _known_drift(cls, kind: str) -> str:
        DRIFTS.get(kind, "drift.kind")
        return kind


class AttackConfig(Section):
    name: str = "badnets"
    target: int = Field(0, ge=0, description="the all-to-one target label")
    ratio: float = Field(0.1, ge=0, le=1, description="poisoned share of each poisoned training set")
    strength: float | None = Field(
        None, gt=0, description="patch size (badnets), blend alpha (blended), warp s (wanet), amplitude (sig); None: the attack's default"
    )
    cross_ratio: float | None = Field(
        None, ge=0, description="wanet: noise-mode samples per poisoned sample, which keep their labels (None: 2, "
        "BackdoorBench's; 0: no noise mode)")

    @field_validator("name")
    @classmethod
    def _known_attack(cls, name: str) -> str:
        ATTACKS.get(name, "attack.name")
        return name


class PoisoningConfig(Section):
    inject: Literal["none", "d0", "update", "range"] = Field(
        "d0", description="none: clean control; d0: poison D0; update: poison update `first`; range: updates first..last"
    )
    first: int = Field(1, ge=1)
    last: int = Field(1, ge=1)
    policy: str | None = Field(
        None, description="the policy of the update(s) that ingest the poison; None: the study's update.policy (so an "
        "stlr study ingests it at STLR's peak lr); e.g. finetune: the attack lands through a plain update")

    @field_validator("policy")
    @classmethod
    def _known_injection_policy(cls, policy: str | None) -> str | None:
        if policy is not None:
            POLICIES.get(policy, "poisoning.policy")
        return policy

    @model_validator(mode="after")
    def _ordered(self) -> PoisoningConfig:
        if self.inject == "range" and self.last < self.first:
            raise ValueError(f"poisoning.last ({self.last}) must be >= poisoning.first ({self.first})")
        return self


class ModelConfig(Section):
    name: str = "small_cnn"

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        MODELS.get(name, "model.name")
        return name


class TrainConfig(Section):
    """Initial training of M0 (and of every `retrain` update)."""

    epochs: int = Field(12, ge=1)
    lr: float = Field(0.25, gt=0, description="peak lr (onecycle) or the constant lr")
    schedule: Literal["constant", "onecycle"] = "onecycle"
    batch_size: int = Field(128, ge=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class FSTConfig(Section):
    """Feature shift tuning (Min et al. 2023): the head is re-initialised and pushed away from the old one."""

    alpha: float = Field(0.2, ge=0, description="weight of the inner product <W, W_previous> of the logit-scaled heads (Min et al.: 0.2)")
    lr: float = Field(0.01, gt=0, description="peak lr of FST's cosine schedule")
    # measured on digits defaults: 5 epochs after the re-initialisation leave clean accuracy at 0.75-0.95, 10 at 0.95-0.98
    epochs: int | None = Field(None, ge=1, description="None: update.epochs (Min et al. tune for 10)")


class FTSAMConfig(Section):
    """Fine-tuning with sharpness-aware minimisation (Zhu et al. 2023)."""

    rho: float = Field(2.0, gt=0, description="radius of the weight perturbation (BackdoorBench's ft-sam: 2)")
    adaptive: bool = Field(True, description="adaptive SAM (ASAM: the perturbation scales with |w|), the setting in which rho ~ 2 makes sense")
    lr: float = Field(0.01, gt=0, description="peak lr of FT-SAM's cosine schedule (BackdoorBench's ft-sam: 0.01)")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="BackdoorBench's ft-sam: 0.1")


class FinePruningConfig(Section):
    """Fine-pruning (Liu et al. 2018): prune the last convolutional block's least active channels, then fine-tune."""

    ratio: float = Field(0.2, ge=0, lt=1, description="share of the last block's channels pruned by each update (cumulative)")
    max_acc_drop: float = Field(0.05, ge=0, le=1, description="stop pruning before accuracy on the update data falls more than this below its value at the start of the update's pruning")


class ReplayConfig(Section):
    """Experience replay: fine-tune on the update data plus a reservoir sample of everything ingested before."""

    buffer: int = Field(500, ge=1, description="most images the replay buffer holds")


class EWCConfig(Section):
    """Elastic weight consolidation (Kirkpatrick et al. 2017) against the previous version."""

    # SGD with momentum m stays stable while update.lr * weight * max(Fisher) < 2 (1 + m)
    weight: float = Field(100.0, ge=0, description="lambda: strength of the Fisher-weighted pull towards the previous version")
    samples: int = Field(512, ge=1, description="images of the previous version's training set used to estimate the Fisher")


class UpdateConfig(Section):
    policy: str = "finetune"
    trigger: Literal["always", "drift"] = Field(
        "always", description="always: every scheduled update runs; drift: only when the incoming data drifted from the "
        "data the production version was last trained on (a pipeline feature: needs tracking.drift_check)")
    updates: int = Field(15, ge=0, description="number of scheduled updates after M0")
    epochs: int = Field(5, ge=1)
    lr: float = Field(0.01, gt=0, description="finetune's constant lr")
    max_lr: float = Field(0.5, gt=0, description="stlr's peak lr")
    cut_frac: float = Field(0.1, gt=0, lt=1, description="stlr: share of steps spent warming up")
    ratio: float = Field(32.0, ge=1, description="stlr: max_lr / min_lr")
    batch_size: int = Field(128, ge=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    fst: FSTConfig = FSTConfig()
    ft_sam: FTSAMConfig = FTSAMConfig()
    fine_pruning: FinePruningConfig = FinePruningConfig()
    replay: ReplayConfig = ReplayConfig()
    ewc: EWCConfig = EWCConfig()

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, policy: str) -> str:
        POLICIES.get(policy, "update.policy")
        return policy


class EvalConfig(Section):
    alpha: float = Field(0.5, gt=0, le=1, description="ASR threshold of alpha-survivability")
    batch_size: int | None = Field(
        None, ge=1, description="None: 64 on the CPU (its caches favour small batches), 1024 on CUDA")
    # dormancy probes, per version, each beside the same probe on a never-poisoned baseline
    retune: bool = Field(False, description="re-tuning probe (Min et al. 2024): P-ASR after fine-tuning on clean + a few poisoned images")
    retune_clean: int = Field(1000, ge=10, description="clean images of the re-tuning set (capped at the update pool)")
    retune_poisoned: int = Field(5, ge=1, description="poisoned images per 1,000 clean ones in the re-tuning set (at least 1)")
    retune_epochs: int = Field(5, ge=1, description="re-tuning epochs (the paper's 5)")
    retune_lr: float = Field(0.01, gt=0, description="re-tuning SGD lr (the paper's 0.01; momentum 0.9, weight decay 5e-4)")
    reactivate: bool = Field(False, description="re-activation probe (Zhu et al. 2024): the trigger plus one universal PGD perturbation")
    # 0.05 (12 of 255 levels): on digits the baseline's trigger + perturbation stays <= 0.04 ASR at versions 0, 5, 10 and 15 of the
    # default timeline, while version 15 (ASR 0.48) goes back to 0.86; at 0.15 the baseline alone reaches 0.30
    reactivate_eps: float = Field(0.05, ge=1 / 255, le=1, description="L-infinity budget of the universal perturbation, in [0, 1] pixel units (at least one level, 1/255)")
    # 20: on digits 10, 20 and 30 steps gave the same re-activated ASR within 0.01, at 1/3, 2/3 and all of the cost
    reactivate_steps: int = Field(20, ge=1, description="PGD steps (step size 2.5 * eps / steps)")
    bec: bool = Field(False, description="backdoor existence coefficient: 1 = represents clean and triggered images like the backdoored model, 0 = like the baseline")
    probe_images: int = Field(500, ge=10, description="images the re-activation and BEC probes optimise or compare on")
    probe_every: int = Field(1, ge=1, description="run the probes on every k-th version (and always on the last one)")


class RuntimeConfig(Section):
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch; None keeps torch's default")
    compile: bool = Field(False, description="torch.compile the model on CUDA (fixed batch shapes)")

    @field_validator("device")
    @classmethod
    def _device_name(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            raise ValueError("allowed: auto, cpu, cuda, cuda:N")
        return device


class TrackingConfig(Section):
    """Settings of the pipeline around the core (flow, MLflow, Evidently); the core ignores them."""

    drift_check: bool = True
    drift_reports: bool = Field(False, description="keep an Evidently HTML report per update (several MB each)")
    drift_threshold: float = Field(0.62, gt=0.5, lt=1, description="embedding drift score (domain-classifier ROC AUC) above which drift is flagged; calibrated on zero-drift controls")
    stat_drift_share: float = Field(0.5, gt=0, le=1, description="share of drifted image statistics that flags drift")


class Config(Section):
    study: str = "digits_badnets"
    seed: int = Field(0, ge=0)
    data: DataConfig = DataConfig()
    drift: DriftConfig = DriftConfig()
    attack: AttackConfig = AttackConfig()
    poisoning: PoisoningConfig = PoisoningConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    update: UpdateConfig = UpdateConfig()
    eval: EvalConfig = EvalConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("study")
    @classmethod
    def _study_identifier(cls, study: str) -> str:
        if not STUDY_NAME.fullmatch(study):
            raise ValueError(f"must be an identifier: {STUDY_RULE}")
        return study

    @model_validator(mode="after")
    def _drift_trigger_needs_drift_check(self) -> Config:
        if self.update.trigger == "drift" and not self.tracking.drift_check:
            raise ValueError("update.trigger: drift needs tracking.drift_check=true (the check decides each update); "
                             "allowed with drift_check=false: always")
        return self

    @model_validator(mode="after")
    def _poisoning_within_timeline(self) -> Config:
        p = self.poisoning
        last = p.last if p.inject == "range" else p.first
        if p.inject in ("update", "range") and last > self.update.updates:
            raise ValueError(
                f"poisoning: update {last} is beyond the timeline (update.updates = {self.update.updates})"
            )
        return self

    def flat(self) -> dict[str, Any]:
        """The config as `section.key -> value`, for MLflow params and tables."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for key, sub in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, sub)
            else:
                out[prefix] = None if value is None else str(value) if isinstance(value, Path) else value

        walk("", self.model_dump(mode="json"))
        return out


def _one_line(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "config"
    if first["type"] == "extra_forbidden":
        section = ".".join(str(p) for p in first["loc"][:-1])
        allowed = _allowed_keys(section)
        return f"{source}: unknown key '{field}'; allowed keys here: {', '.join(allowed)}"
    message = first["msg"].removeprefix("Value error, ")
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{source}: {field}: {message}{shown}"


def _allowed_keys(section: str) -> list[str]:
    model: type[BaseModel] = Config
    for part in filter(None, section.split(".")):
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key.strip()):
        raise PermanenceError(f"override {text!r}: expected key.sub=value, e.g. attack.ratio=0.05")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def build_config(raw: dict[str, Any] | None = None, overrides: list[str] | tuple[str, ...] = (), source: str = "config") -> Config:
    """Validate a plain mapping plus overrides into a Config; raise PermanenceError with one line."""
    merged: dict[str, Any] = dict(raw or {})
    for text in overrides:
        path, value = _parse_override(text)
        node = merged
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise PermanenceError(f"override {text!r}: '{part}' is not a section")
            else:
                child = node[part] = dict(child)
            node = child
        node[path[-1]] = value
    try:
        return Config.model_validate(merged)
    except ValidationError as err:
        raise PermanenceError(_one_line(err, source)) from None
    except PermanenceError as err:  # a registry look-up inside a validator
        raise PermanenceError(f"{source}: {err}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read `params.yaml` (or defaults when path is None) and apply `key.sub=value` overrides."""
    raw: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise PermanenceError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise PermanenceError(f"{path}: not valid YAML{where}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise PermanenceError(f"{path}: expected a mapping of sections at the top level")
        raw = loaded or {}
    return build_config(raw, overrides, source)
