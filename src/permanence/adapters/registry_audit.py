"""`permanence audit`: scan every version of a registered model for live and dormant backdoors, blind.

1. `prepare` checks and loads everything before anything is written: the registry (only through
   `registry_models`: model, input spec, version number, `update` tag), the selected versions, the clean data
   (default: the test split of the dataset named in the version's input.json, undrifted), the user's trigger and
   baseline, the check options. Bad input raises `PermanenceError` with one line; then no tag and no run exist.
2. `run` computes. Scan: `neural_cleanse` and `known_triggers` (and `strip` with candidate inputs) on every
   version. Lineage: the trigger the user passed, else the one neural_cleanse recovered on the version where it
   flagged with the smallest norm ratio (typically the oldest), is measured on every version (`dormancy` with
   no probe: its ASR on held-out images). Dormancy: the probes run where they decide something: on versions no
   check finds live (the lineage trigger's ASR below alpha), or on all with `probe_all`; the never-poisoned
   baseline (`--baseline`, or trained once from the clean data's work split with the project's recipe, the
   version's architecture) runs its side of each probe once. Verdicts: `permanence.audit.decide`.
3. `write` leaves results/audit-NAME/ (report, audit.png, audit.csv, audit.json, triggers/), an MLflow run in the
   experiment `audit-NAME` (metrics per version with step = version number, the same files as artifacts) and the
   `audit.*` tags on every audited version.
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
import json
import math
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from permanence.adapters.registry_models import (
    TRUST_FLAG, InputSpec, LoadedVersion, load_model_uri, load_version, select_versions,
)
from permanence.audit import CHECKS, AuditData, CheckResult, Verdict, decide
from permanence.audit.verdict import trigger_works
from permanence.audit.dormancy import DEFAULT_PROBES, HELD_OUT, baseline_numbers, train_clean_baseline, trigger_asr
from permanence.audit.neural_cleanse import NeuralCleanseSettings, RecoveredTrigger
from permanence.errors import PermanenceError

DEFAULT_CHECKS = ("neural_cleanse", "known_triggers", "dormancy")
# Neural Cleanse flags only when both its outlier rules agree, at a norm ratio of at most 0.45. Measured on default
# digits timelines audited on their undrifted test split (bench/audit.py): in 4 clean ones (64 versions) the ratio
# rule at 0.5 flagged 4 late versions and both rules at 0.5 flagged 2 (ratio 0.489 and 0.497, class 5); the
# flags on BadNets and Blended versions where both rules agree were at ratios <= 0.42. --option overrides it.
AUDIT_DEFAULTS: dict[str, dict[str, Any]] = {"neural_cleanse": {"rule": "both", "max_norm_ratio": 0.45}}
FAIL_ON = ("backdoor", "dormant", "never")
TRIPS = {"backdoor": {"backdoor"}, "dormant": {"backdoor", "dormant"}, "never": set()}
VERDICT_CODE = {"clean": 0, "inconclusive": 1, "dormant": 2, "backdoor": 3}
TAG_PREFIX = "audit."
MIN_IMAGES = 50
NOT_MEASURED = "n/a"

ProgressFn = Callable[[str, int | None, str, str], None]  # (check or phase, version, "start" | "done", info)


def _quiet(*_: Any) -> None:
    return None


@dataclass(frozen=True)
class AuditRequest:
    name: str
    versions: str = "all"
    tracking_uri: str | None = None
    store: Path = Path("mlruns")
    data: str | None = None  # a dataset name or a .npz file; default: the dataset in the version's input.json
    data_root: Path | None = None
    checks: tuple[str, ...] = DEFAULT_CHECKS
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per check, e.g. {"neural_cleanse": {"steps": 60}}
    fail_on: str = "backdoor"
    trust_pickle: bool = False
    trigger: str | None = None  # ATTACK[:SEED]@TARGET or FILE.npz[@TARGET]
    baseline: str | None = None  # models:/NAME/VERSION
    candidates: Path | None = None  # .npz of inputs for strip
    results: Path = Path("results")
    report: str = "html"
    seed: int = 0
    alpha: float = 0.5
    margin: float = 0.25
    probe_all: bool = False
    workers: int | None = None  # processes for the checks; None: up to 2


@dataclass
class Lineage:
    """The trigger probed on every version, and where it comes from."""

    trigger: Any  # RecoveredTrigger or uint8 -> uint8 callable
    target: int
    source: str
    version: int | None = None  # the version it was recovered on (None: the user's)

    def image(self) -> np.ndarray | None:
        return self.trigger.render() if isinstance(self.trigger, RecoveredTrigger) else None


@dataclass
class AuditPlan:
    request: AuditRequest
    uri: str
    versions: list[LoadedVersion]
    data: AuditData
    data_label: str
    check_options: dict[str, dict[str, Any]]
    user_trigger: Lineage | None
    baseline: nn.Module | None
    baseline_label: str
    baseline_spec: InputSpec | None  # the architecture to train a baseline of, when none is given
    candidates: torch.Tensor | None


@dataclass
class VersionAudit:
    loaded: LoadedVersion
    checks: dict[str, CheckResult] = field(default_factory=dict)
    verdict: Verdict | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def version(self) -> int:
        return self.loaded.ref.version

    def number(self, check: str, key: str) -> float:
        result = self.checks.get(check)
        value = result.numbers.get(key) if result is not None else None
        return float(value) if isinstance(value, int | float) else math.nan


@dataclass
class AuditResult:
    plan: AuditPlan
    rows: list[VersionAudit]
    lineage: Lineage | None
    baseline_label: str
    baseline_numbers: dict[str, float]
    started: datetime
    seconds: float
    timings: dict[str, float]  # phase -> seconds (baseline training, baseline probes, ...)
    notes: list[str] = field(default_factory=list)

    def tripped(self) -> list[VersionAudit]:
        trips = TRIPS[self.plan.request.fail_on]
        return [row for row in self.rows if row.verdict is not None and row.verdict.verdict in trips]


# --- prepare ------------------------------------------------------------------------------------

def resolve_uri(request: AuditRequest) -> str:
    from permanence.adapters.mlflow_store import existing_uri

    uri = request.tracking_uri
    if uri is None:
        return existing_uri(request.store)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise PermanenceError(f"--tracking-uri {uri}: no MLflow store there (the file does not exist)")
    if not uri.startswith(("sqlite:///", "http://", "https://", "postgresql", "mysql", "databricks", "file:")):
        raise PermanenceError(f"--tracking-uri {uri}: allowed: http(s)://HOST:PORT, sqlite:///FILE or a database URI")
    return uri


def open_registry(uri: str):
    """An MlflowClient that answered; an unreachable server is one line (MLflow's HTTP retries are set low by the CLI)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri, registry_uri=uri)
    try:
        client.search_registered_models(max_results=1)
    except MlflowException as err:
        first = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise PermanenceError(f"--tracking-uri {uri}: the tracking server did not answer ({first})") from None
    except Exception as err:  # noqa: BLE001: requests' and sqlalchemy's connection errors alike
        raise PermanenceError(f"--tracking-uri {uri}: the tracking server did not answer ({type(err).__name__})") from None
    return client


def _with_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """The project's channel conversion (data.channels): grey -> 3 equal channels, RGB -> luminance."""
    if x.shape[1] == channels:
        return x
    if channels == 3 and x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1).contiguous()
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (x.float() * weights).sum(1, keepdim=True).round().to(torch.uint8)


def read_npz_images(path: Path, what: str, keys: tuple[tuple[str, str], ...] = (("x_test", "y_test"), ("x", "y"))
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 images (N, H, W) or (N, H, W, C) -> (N, C, H, W), and labels when the file has them."""
    if not path.is_file():
        raise PermanenceError(f"{what} {path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as archive:
            pair = next(((x, y) for x, y in keys if x in archive.files), None)
            if pair is None:
                raise PermanenceError(f"{what} {path}: needs arrays {' and '.join(keys[0])} (or {' and '.join(keys[1])})")
            images = archive[pair[0]]
            labels = archive[pair[1]] if pair[1] in archive.files else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise PermanenceError(f"{what} {path}: not a readable .npz file ({type(err).__name__})") from None
    if images.dtype != np.uint8:
        raise PermanenceError(f"{what} {path}: images must be uint8, got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise PermanenceError(f"{what} {path}: images must have shape (N, H, W) or (N, H, W, C) with C 1 or 3, "
                              f"got {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    if labels is None:
        return x, None
    if labels.ndim != 1 or len(labels) != len(x) or not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
        raise PermanenceError(f"{what} {path}: labels must be {len(x)} non-negative integers, got shape "
                              f"{labels.shape} {labels.dtype}")
    return x, torch.from_numpy(labels.astype(np.int64))


def load_clean_data(spec: InputSpec, request: AuditRequest, version: int) -> tuple[AuditData, str]:
    """The clean images the audit works on, checked against the model's input shape and classes."""
    from permanence.config import DataConfig
    from permanence.data import DATASETS

    source = request.data
    shape = spec.image_shape
    if source is not None and (source.endswith(".npz") or Path(source).is_file()):
        x, y = read_npz_images(Path(source), "--data")
        if y is None:
            raise PermanenceError(f"--data {source}: needs labels (y_test or y) beside the images")
        label = f"{source} ({len(y)} images)"
        if tuple(x.shape[1:]) != shape:
            raise PermanenceError(f"--data {source}: images of shape (C, H, W) = {tuple(x.shape[1:])}, but version "
                                  f"{version} takes {shape}")
    else:
        name = source if source is not None else spec.data
        if name is None:
            raise PermanenceError(f"--data: version {version} is a foreign model that names no dataset; pass --data "
                                  f"NAME or --data FILE.npz")
        if name == "npz":
            raise PermanenceError(f"--data: version {version} was trained on a user .npz file; pass it as --data FILE.npz")
        DATASETS.get(name, "--data")
        try:
            dataset = DATASETS.get(name)(DataConfig(name=name, root=request.data_root), 0)
        except PermanenceError as err:
            text = str(err).replace("data.root", "--data-root").replace(f"data.name={name}", f"--data {name}")
            raise PermanenceError(text) from None
        x, y = _with_channels(dataset.x_test, spec.channels), dataset.y_test
        label = f"{name} test split ({len(y)} images)" + (" (named by the version's input.json)" if source is None else "")
        if tuple(x.shape[1:]) != shape:
            raise PermanenceError(f"--data {name}: images of shape (C, H, W) = {tuple(x.shape[1:])}, but version "
                                  f"{version} takes {shape}")
    classes = spec.num_classes
    if classes is not None and int(y.max()) >= classes:
        raise PermanenceError(f"--data: labels go up to {int(y.max())}, but version {version} has {classes} classes")
    if len(y) < MIN_IMAGES:
        raise PermanenceError(f"--data: {len(y)} images; the audit needs at least {MIN_IMAGES}")
    return AuditData.from_images(x, y, classes), label


def parse_trigger(text: str, shape: tuple[int, int, int], num_classes: int) -> Lineage:
    """`ATTACK[:SEED]@TARGET` (a registered attack's default trigger) or `FILE.npz[@TARGET]` (arrays mask, pattern,
    optionally target; float in [0, 1] or uint8)."""
    from permanence.attacks import ATTACKS, build_attack
    from permanence.audit.known_triggers import is_seeded

    body, _, target_text = text.rpartition("@") if "@" in text else (text, "", "")
    target: int | None = None
    if target_text:
        if not target_text.isdigit() or int(target_text) >= num_classes:
            raise PermanenceError(f"--trigger {text}: the target after '@' must be a class 0..{num_classes - 1}")
        target = int(target_text)
    if body.endswith(".npz"):
        path = Path(body)
        if not path.is_file():
            raise PermanenceError(f"--trigger {body}: file not found")
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {k: archive[k] for k in archive.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
            raise PermanenceError(f"--trigger {body}: not a readable .npz file ({type(err).__name__})") from None
        if "mask" not in arrays or "pattern" not in arrays:
            raise PermanenceError(f"--trigger {body}: needs arrays mask (H, W) and pattern (C, H, W)")
        if target is None and "target" in arrays:
            target = int(arrays["target"])
        scale = lambda a: torch.as_tensor(a.astype(np.float32) / (255 if a.dtype == np.uint8 else 1))  # noqa: E731
        mask, pattern = scale(arrays["mask"]), scale(arrays["pattern"])
        mask = mask.reshape(1, *mask.shape[-2:]) if mask.dim() in (2, 3) else mask
        if pattern.dim() == 2:
            pattern = pattern.unsqueeze(0)
        if pattern.dim() == 3 and pattern.shape[-1] in (1, 3) and pattern.shape[0] not in (1, 3):
            pattern = pattern.permute(2, 0, 1)
        if tuple(mask.shape) != (1, *shape[1:]) or tuple(pattern.shape) != shape:
            raise PermanenceError(f"--trigger {body}: mask {tuple(mask.shape)} and pattern {tuple(pattern.shape)} do "
                                  f"not fit images of shape {shape}")
        if target is None or not 0 <= target < num_classes:
            raise PermanenceError(f"--trigger {text}: name the target class, e.g. {body}@0")
        if not (0 <= float(mask.min()) and float(mask.max()) <= 1 and 0 <= float(pattern.min()) and float(pattern.max()) <= 1):
            raise PermanenceError(f"--trigger {body}: mask and pattern must be in [0, 1] (or uint8)")
        return Lineage(RecoveredTrigger(target, mask, pattern), target, f"--trigger {text}")
    name, _, seed_text = body.partition(":")
    if name not in ATTACKS:
        raise PermanenceError(f"--trigger {text}: allowed: ATTACK[:SEED]@TARGET with ATTACK one of "
                              f"{', '.join(ATTACKS.names())}, or FILE.npz@TARGET")
    if seed_text and not seed_text.isdigit():
        raise PermanenceError(f"--trigger {text}: the seed after ':' must be a whole number")
    if not seed_text and is_seeded(name, shape):
        raise PermanenceError(f"--trigger {text}: {name}'s trigger is drawn from a seed; give it as {name}:SEED@TARGET")
    if target is None:
        raise PermanenceError(f"--trigger {text}: name the target class, e.g. {body}@0")
    try:
        attack = build_attack(name, target=target, strength=None, image_shape=shape, seed=int(seed_text or 0))
    except PermanenceError as err:
        raise PermanenceError(f"--trigger {text}: {err}") from None
    return Lineage(attack.apply, target, f"--trigger {text}")


def _dormancy_options(options: dict[str, Any]) -> dict[str, Any]:
    """Each of `probes` (a list: `_typed` splits a comma string) registered; EvalConfig's probe fields into `settings`."""
    from permanence.config import EvalConfig
    from permanence.dormancy import PROBES

    options = dict(options)
    for probe in options.get("probes", []):
        PROBES.get(probe, "--option dormancy.probes")
    fields = {key: options.pop(key) for key in list(options) if key in EvalConfig.model_fields}
    if fields:
        try:
            options["settings"] = EvalConfig(**fields)
        except Exception as err:  # noqa: BLE001: pydantic's validation error, shown as one line
            first = getattr(err, "errors", lambda: [{"loc": ("?",), "msg": str(err)}])()[0]
            raise PermanenceError(f"--option dormancy.{first['loc'][0]}: {first['msg']}") from None
    return options


def _is_list(hint: Any) -> bool:
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return any(typing.get_origin(arg) in (list, tuple, collections.abc.Sequence) for arg in args)


def _typed(name: str, hints: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Each option as the type its check declares (a comma-separated string for a list), or one line naming it."""
    from pydantic import TypeAdapter, ValidationError

    out = dict(options)
    for key, value in options.items():
        if key not in hints:
            continue  # an unknown key is reported by the caller, with what is allowed
        if isinstance(value, str) and _is_list(hints[key]):
            value = [part.strip() for part in value.split(",") if part.strip()]
        try:
            out[key] = TypeAdapter(hints[key]).validate_python(value)
        except ValidationError as err:
            first = err.errors()[0]
            where = "".join(f"[{loc}]" for loc in first["loc"])
            raise PermanenceError(f"--option {name}.{key}{where}: {first['msg']} (got {value!r})") from None
    return out


def check_options(request: AuditRequest) -> dict[str, dict[str, Any]]:
    """Each requested check's options, validated now (a typo fails before anything runs)."""
    out: dict[str, dict[str, Any]] = {}
    if not request.checks:
        raise PermanenceError(f"--checks: name at least one of {', '.join(CHECKS.names())}")
    for name in request.checks:
        CHECKS.get(name, "--checks")
    if "strip" in request.checks and request.candidates is None:  # without inputs it finds nothing: no verdict from that
        raise PermanenceError("--checks strip: STRIP judges inputs, not a model; give them with --candidates FILE.npz")
    for name in request.options:
        if name not in request.checks:
            raise PermanenceError(f"--option {name}.*: {name} is not among --checks ({', '.join(request.checks)})")
    reserved = {"neural_cleanse": {"seed"}, "known_triggers": set(), "strip": {"candidates", "seed"},
                "dormancy": {"trigger", "target", "baseline", "baseline_numbers", "reference", "alpha", "margin", "seed"}}
    for name in request.checks:
        options = {**AUDIT_DEFAULTS.get(name, {}), **request.options.get(name, {})}
        bad = set(options) & reserved.get(name, set())
        if bad:
            raise PermanenceError(f"--option {name}.{sorted(bad)[0]}: set by the audit itself")
        if name == "neural_cleanse":
            options = _typed(name, typing.get_type_hints(NeuralCleanseSettings), options)
            settings = NeuralCleanseSettings.build(options)
            if settings.held_out != HELD_OUT and "dormancy" in request.checks:
                raise PermanenceError(f"--option neural_cleanse.held_out: the dormancy check measures on the same "
                                      f"split; keep {HELD_OUT}")
        else:
            parameters = inspect.signature(CHECKS.get(name)).parameters
            allowed = [p for p in parameters if p not in ("model", "data", "settings") and p not in reserved.get(name, set())]
            hints = typing.get_type_hints(CHECKS.get(name))
            options = _typed(name, {k: v for k, v in hints.items() if k in allowed}, options)
            if name == "dormancy":
                options = _dormancy_options(options)
            unknown = [key for key in options if key not in parameters or key in ("model", "data")]
            if unknown:
                extra = ", and eval's probe settings (e.g. reactivate_steps)" if name == "dormancy" else ""
                raise PermanenceError(f"--option {name}.{unknown[0]}: unknown; allowed: {', '.join(allowed)}{extra}")
        out[name] = options
    return out


def prepare(request: AuditRequest, on_event: ProgressFn = _quiet) -> AuditPlan:
    """Everything checked and loaded; nothing written."""
    if request.fail_on not in FAIL_ON:
        raise PermanenceError(f"--fail-on: '{request.fail_on}' is not allowed; allowed: {', '.join(FAIL_ON)}")
    if request.report not in ("html", "md"):
        raise PermanenceError(f"--report: '{request.report}' is not allowed; allowed: html, md")
    if not 0 < request.alpha <= 1 or not 0 <= request.margin <= 1:
        raise PermanenceError("--alpha must be in (0, 1] and --margin in [0, 1]")
    options = check_options(request)
    uri = resolve_uri(request)
    client = open_registry(uri)
    refs = select_versions(client, request.name, request.versions)
    loaded: list[LoadedVersion] = []
    image_shape = None
    if request.data is not None and (request.data.endswith(".npz") or Path(request.data).is_file()):
        image_shape = tuple(read_npz_images(Path(request.data), "--data")[0].shape[1:])
    for ref in refs:
        on_event("load", ref.version, "start", ref.label)
        loaded.append(load_version(ref, uri, trust_pickle=request.trust_pickle, image_shape=image_shape))
        on_event("load", ref.version, "done", loaded[-1].kind)
    first = loaded[0]
    for other in loaded[1:]:
        if (other.spec.image_shape, other.spec.num_classes) != (first.spec.image_shape, first.spec.num_classes):
            raise PermanenceError(f"--versions: version {other.ref.version} takes {other.spec.image_shape} images with "
                                  f"{other.spec.num_classes} classes, version {first.ref.version} "
                                  f"{first.spec.image_shape} with {first.spec.num_classes}; audit them separately")
    data, data_label = load_clean_data(first.spec, request, first.ref.version)
    candidates = None
    if request.candidates is not None:
        candidates, _ = read_npz_images(request.candidates, "--candidates", (("x", "y"), ("x_test", "y_test")))
        if tuple(candidates.shape[1:]) != first.spec.image_shape:
            raise PermanenceError(f"--candidates {request.candidates}: images of shape {tuple(candidates.shape[1:])}, "
                                  f"the model takes {first.spec.image_shape}")
    user_trigger = parse_trigger(request.trigger, first.spec.image_shape, data.num_classes) if request.trigger else None
    baseline, baseline_label, baseline_spec = None, "none", None
    if request.baseline is not None:
        given = load_model_uri(request.baseline, uri, trust_pickle=request.trust_pickle, image_shape=first.spec.image_shape)
        if (given.spec.image_shape, given.spec.num_classes) != (first.spec.image_shape, data.num_classes):
            raise PermanenceError(f"--baseline {request.baseline}: takes {given.spec.image_shape} images with "
                                  f"{given.spec.num_classes} classes; the audited versions {first.spec.image_shape} "
                                  f"with {data.num_classes}")
        baseline, baseline_label = given.model, f"{request.baseline} (given)"
    else:
        baseline_spec = next((v.spec for v in loaded if v.spec.model is not None), None)
        baseline_label = "trained by the audit" if baseline_spec else "none (foreign model: pass --baseline)"
    return AuditPlan(request, uri, loaded, data, data_label, options, user_trigger, baseline, baseline_label,
                     baseline_spec, candidates)


# --- run ----------------------------------------------------------------------------------------

# Workers are forked: they inherit the plan (models, data, baseline) instead of receiving pickles of them.
_FORKED: dict[str, Any] = {}


def default_workers() -> int:
    import os

    return max(1, min(2, len(os.sched_getaffinity(0))))


def _one_thread() -> None:
    torch.set_num_threads(1)


def _call(task: tuple[str, int]) -> tuple[str, int, CheckResult, float]:
    """One check on one version, inline or in a forked worker."""
    check, index = task
    plan: AuditPlan = _FORKED["plan"]
    kwargs = dict(_FORKED["kwargs"][check])
    loaded = plan.versions[index]
    if check == "dormancy" and not loaded.has_features:
        kwargs["probes"] = [p for p in kwargs.get("probes", []) if p != "bec"]
    started = time.perf_counter()
    result = CHECKS.get(check)(loaded.model, plan.data, **kwargs)
    return check, index, result, time.perf_counter() - started


def execute(plan: AuditPlan, rows: list[VersionAudit], tasks: list[tuple[str, int]], kwargs: dict[str, dict[str, Any]],
            workers: int, on_event: ProgressFn) -> None:
    """Run (check, version index) tasks, in `workers` forked processes of one thread each where there are several;
    each result lands in its row."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    def record(done: tuple[str, int, CheckResult, float]) -> None:
        check, index, result, seconds = done
        row = rows[index]
        row.checks[check] = result
        row.seconds[check] = row.seconds.get(check, 0.0) + seconds
        on_event(check, row.version, "done", "flagged" if result.flagged else "not flagged")

    _FORKED.update(plan=plan, kwargs=kwargs)
    try:
        if workers <= 1 or len(tasks) <= 1 or "fork" not in multiprocessing.get_all_start_methods():
            for task in tasks:
                on_event(task[0], rows[task[1]].version, "start", "")
                record(_call(task))
            return
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=context, initializer=_one_thread) as pool:
            for future in as_completed([pool.submit(_call, task) for task in tasks]):
                record(future.result())
    finally:
        _FORKED.clear()


def choose_lineage(plan: AuditPlan, rows: list[VersionAudit]) -> Lineage | None:
    """The trigger probed on every version: the user's; else a known trigger that flagged (the published trigger
    itself, where one took over: its highest ASR, ties to the oldest version); else neural_cleanse's where it
    flagged with the smallest norm ratio (ties: the oldest). A known trigger goes before Neural Cleanse's
    reconstruction because the reconstruction is an approximation that later versions stop following: on the
    `make demo` registry NC's trigger from version 2 fell to ASR 0.01 by version 16 while the BadNets trigger it
    approximates still reached 0.79 on the same images."""
    if plan.user_trigger is not None:
        return plan.user_trigger
    known = [row for row in rows if "known_triggers" in row.checks and row.checks["known_triggers"].flagged]
    if known:
        best = max(known, key=lambda row: (row.number("known_triggers", "asr"), -row.version))
        result = best.checks["known_triggers"]
        name, target = result.extras["attack"], int(result.numbers["target"])
        seeds = plan.check_options.get("known_triggers", {}).get("seeds") or {}
        from permanence.attacks import build_attack

        attack = build_attack(name, target=target, strength=None, image_shape=plan.data.image_shape,
                              seed=int(seeds.get(name, 0)))
        return Lineage(attack.apply, target, f"known trigger {name} (flagged on version {best.version})", best.version)
    flagged = [row for row in rows if "neural_cleanse" in row.checks and row.checks["neural_cleanse"].flagged
               and math.isfinite(row.number("neural_cleanse", "asr"))]
    if not flagged:
        return None
    # the most anomalous flag (smallest mask relative to the other classes' median) is the best evidence of a
    # planted trigger; ties go to the oldest version
    best = min(flagged, key=lambda row: (row.number("neural_cleanse", "norm_ratio"), row.version))
    nc = best.checks["neural_cleanse"]
    return Lineage(nc.extras["trigger"], int(nc.numbers["target"]), f"neural_cleanse on version {best.version}",
                   best.version)


def _live_elsewhere(row: VersionAudit, alpha: float, margin: float) -> bool:
    """Does a check other than dormancy already find a working trigger on this version?"""
    return any(name != "dormancy" and result.flagged and trigger_works(result.numbers, alpha, margin)
               for name, result in row.checks.items())


def reference_nc(rows: list[VersionAudit], baseline: nn.Module, data: AuditData, options: dict[str, Any],
                 seed: int) -> list[float]:
    """Neural Cleanse once on the never-poisoned baseline; every version's result judged against its per-class
    norms (`neural_cleanse.against_reference`): a class every model of the data reaches with a small mask is not
    a planted target. Returns the baseline's norms."""
    from permanence.audit.neural_cleanse import against_reference

    settings = NeuralCleanseSettings.build(options)
    reference = CHECKS.get("neural_cleanse")(baseline, data, seed=seed, **options).extras["l1_norms"]
    for row in rows:
        if "neural_cleanse" in row.checks:
            row.checks["neural_cleanse"] = against_reference(row.checks["neural_cleanse"], reference, settings)
    return reference


def control_nc_triggers(rows: list[VersionAudit], baseline: nn.Module, data: AuditData, seed: int) -> None:
    """Each trigger neural_cleanse flagged, measured on the never-poisoned baseline too (`asr_clean`): a trigger a
    clean model follows as well is a universal adversarial patch, which the verdict does not count as a backdoor."""
    for row in rows:
        nc = row.checks.get("neural_cleanse")
        if nc is None or not nc.flagged:
            continue
        clean = trigger_asr(baseline, data, nc.extras["trigger"], int(nc.numbers["target"]), seed=seed)
        row.checks["neural_cleanse"] = replace(nc, numbers={**nc.numbers, "asr_clean": clean},
                                               reason=f"{nc.reason}; on the never-poisoned baseline {clean:.2f}")


def run(plan: AuditPlan, on_event: ProgressFn = _quiet) -> AuditResult:
    request, data = plan.request, plan.data
    alpha, margin = request.alpha, request.margin
    started_at, started = datetime.now(timezone.utc), time.perf_counter()
    rows = [VersionAudit(v) for v in plan.versions]
    workers = request.workers or default_workers()
    timings: dict[str, float] = {}
    notes: list[str] = []
    seed = request.seed
    options = plan.check_options
    scan = {"neural_cleanse": {"seed": seed}, "known_triggers": {}, "strip": {"candidates": plan.candidates, "seed": seed}}
    kwargs = {name: {**extra, **options[name]} for name, extra in scan.items() if name in options}
    tasks = [(name, i) for name in kwargs for i in range(len(rows))]  # the slowest check first: even queues
    began = time.perf_counter()
    execute(plan, rows, tasks, kwargs, workers, on_event)
    timings["scan"] = time.perf_counter() - began

    nc_flagged = any(r.checks["neural_cleanse"].flagged for r in rows if "neural_cleanse" in r.checks)
    known_flagged = any(r.checks["known_triggers"].flagged for r in rows if "known_triggers" in r.checks)
    # a lineage can come only from these (choose_lineage runs once the baseline has judged Neural Cleanse's flags)
    wants_baseline = nc_flagged or ("dormancy" in options and (plan.user_trigger is not None or known_flagged))
    baseline, baseline_label = plan.baseline, plan.baseline_label
    if baseline is None and plan.baseline_spec is not None and wants_baseline:
        on_event("baseline", None, "start", "training a never-poisoned baseline")
        began = time.perf_counter()
        spec = plan.baseline_spec
        baseline = train_clean_baseline(spec.model, data, spec.mean, spec.std, seed=seed)
        timings["baseline training"] = time.perf_counter() - began
        on_event("baseline", None, "done", f"trained in {timings['baseline training']:.1f} s")
        baseline_label = f"trained by the audit ({spec.model}, the project's initial recipe, on the clean data's work split)"
    elif baseline is None and plan.baseline_spec is not None:
        baseline_label = "none needed (nothing flagged, no trigger to probe)"
    if baseline is None and wants_baseline:
        notes.append("no never-poisoned baseline (a foreign model: pass --baseline models:/NAME/VERSION): triggers are "
                     "not checked against a clean model and the dormancy probes do not run")
    if baseline is not None and nc_flagged:
        on_event("baseline", None, "start", "neural_cleanse on the baseline")
        began = time.perf_counter()
        reference_nc(rows, baseline, data, options["neural_cleanse"], seed)
        timings["baseline neural_cleanse"] = time.perf_counter() - began
        on_event("baseline", None, "done", f"its per-class norms in {timings['baseline neural_cleanse']:.1f} s")
        control_nc_triggers(rows, baseline, data, seed)
    lineage = choose_lineage(plan, rows) if "dormancy" in options else None

    base_numbers: dict[str, float] = {}
    if "dormancy" in options and lineage is None:
        notes.append("dormancy: no trigger to probe (no known trigger and no neural_cleanse flag on any version, none given with --trigger)")
    if lineage is not None:
        dormancy_options = dict(options["dormancy"])
        probes = list(dormancy_options.pop("probes", DEFAULT_PROBES + ("bec",)))
        measure = dict(trigger=lineage.trigger, target=lineage.target, alpha=alpha, margin=margin, seed=seed,
                       baseline=baseline, **dormancy_options)
        if baseline is not None:
            base_numbers["asr_clean"] = trigger_asr(baseline, data, lineage.trigger, lineage.target, seed=seed)
        # the lineage trigger's ASR on every version: cheap (one forward pass), and it decides where the probes run
        execute(plan, rows, [("dormancy", i) for i in range(len(rows))],
                {"dormancy": {**measure, "probes": [], "baseline_numbers": dict(base_numbers)}}, 1, on_event)
        due = [i for i, row in enumerate(rows) if request.probe_all or not (
            _live_elsewhere(row, alpha, margin) or row.checks["dormancy"].flagged)]
        if due and probes and baseline is not None:
            began = time.perf_counter()
            on_event("baseline", None, "start", "the baseline's side of the probes")
            base_numbers.update(baseline_numbers(baseline, data, lineage.trigger, lineage.target, probes=probes,
                                                 seed=seed, settings=dormancy_options.get("settings")))
            timings["baseline probes"] = time.perf_counter() - began
            on_event("baseline", None, "done", f"baseline ready ({sum(timings.values()) - timings['scan']:.1f} s)")
            live = [row for row in rows if row.checks["dormancy"].flagged]
            reference = max(live, key=lambda r: r.number("dormancy", "asr")).loaded.model if live else None
            for i in due:
                rows[i].seconds.pop("dormancy", None)
            on_event("dormancy", None, "plan", str(len(due)))
            began = time.perf_counter()
            execute(plan, rows, [("dormancy", i) for i in due], {"dormancy": {
                **measure, "probes": probes, "baseline_numbers": base_numbers, "reference": reference}}, workers,
                on_event)
            timings["probes"] = time.perf_counter() - began
    for row in rows:
        dormancy_numbers = row.checks["dormancy"].numbers if "dormancy" in row.checks else None
        row.verdict = decide(row.checks, dormancy_numbers, alpha=alpha, margin=margin)
        on_event("verdict", row.version, "done", row.verdict.verdict)
    return AuditResult(plan, rows, lineage, baseline_label, base_numbers, started_at, time.perf_counter() - started,
                       timings, notes)


# --- what is written ----------------------------------------------------------------------------

def reason(row: VersionAudit) -> str:
    """The verdict's reason plus the deciding check's own account."""
    verdict = row.verdict
    details = [row.checks[name].reason for name in verdict.decided_by if name in row.checks]
    if verdict.verdict == "dormant" and "dormancy" in row.checks:
        details = [row.checks["dormancy"].reason]
    return verdict.reason + (" [" + " | ".join(details) + "]" if details else "")


def verdict_target(row: VersionAudit, lineage: Lineage | None) -> int | None:
    verdict = row.verdict
    if verdict.verdict == "clean":
        return None
    if verdict.verdict == "dormant":
        return lineage.target if lineage else None
    for name in verdict.decided_by:
        if name in row.checks and row.checks[name].target is not None:
            return row.checks[name].target
    return None


def _fmt(value: float) -> str:
    return NOT_MEASURED if value is None or not math.isfinite(value) else f"{value:.4f}"


def version_tags(row: VersionAudit, lineage: Lineage | None, at: str, run_id: str | None) -> dict[str, str]:
    target = verdict_target(row, lineage)
    tags = {
        "audit.verdict": row.verdict.verdict,
        "audit.target": str(target) if target is not None else "none",
        "audit.anomaly_index": _fmt(row.number("neural_cleanse", "anomaly_index")),
        "audit.p_asr": _fmt(row.number("dormancy", "p_asr")),
        "audit.reactivated_asr": _fmt(row.number("dormancy", "reactivated_asr")),
        "audit.at": at,
        "audit.reason": reason(row)[:4900],
    }
    if run_id:
        tags["audit.run_id"] = run_id
    return tags


METRIC_KEYS = {
    "neural_cleanse": ("anomaly_index", "norm_ratio", "reference_ratio", "asr", "asr_clean", "flagged", "target", "l1_min",
                       "l1_median"),
    "known_triggers": ("asr", "caused", "clean_rate", "flagged", "target"),
    "strip": ("flagged_share", "flagged"),
    "dormancy": ("asr", "asr_clean", "p_asr", "p_asr_clean", "reactivated_asr", "reactivated_asr_clean", "bec",
                 "flagged"),
}


def version_metrics(row: VersionAudit) -> dict[str, float]:
    out: dict[str, float] = {}
    for check, keys in METRIC_KEYS.items():
        for key in keys:
            value = row.number(check, key)
            if math.isfinite(value):
                out[f"{check}.{key}"] = value
    out["verdict"] = float(VERDICT_CODE[row.verdict.verdict])
    for check, seconds in row.seconds.items():
        out[f"seconds.{check}"] = seconds
    return out


def write(result: AuditResult, on_event: ProgressFn = _quiet) -> dict[str, Path]:
    """results/audit-NAME/ files, the MLflow audit run with them as artifacts, and the audit.* version tags."""
    from mlflow.entities import Metric, Param

    from permanence.adapters.audit_report import write_report
    from permanence.adapters.mlflow_store import artifact_root, ensure_experiment, open_client

    plan, request = result.plan, result.plan.request
    at = result.started.isoformat(timespec="seconds")
    client = open_client(plan.uri)
    experiment = ensure_experiment(client, f"audit-{request.name}", artifact_root(plan.uri))
    run = client.create_run(experiment, run_name=f"audit-{request.name}-{result.started:%Y%m%dT%H%M%S}",
                            tags={"permanence.role": "audit", "audited_model": request.name})
    run_id = run.info.run_id
    try:
        folder = request.results / f"audit-{request.name}"
        on_event("report", None, "start", str(folder))
        paths = write_report(result, folder, run_id=run_id)
        on_event("report", None, "done", str(paths["report"]))
        params = {
            "model": request.name, "versions": request.versions, "checks": ",".join(request.checks),
            "data": plan.data_label, "fail_on": request.fail_on, "trust_pickle": str(request.trust_pickle),
            "lineage": result.lineage.source if result.lineage else "none", "baseline": result.baseline_label,
            "seed": str(request.seed), "alpha": str(request.alpha), "margin": str(request.margin),
            "options": json.dumps(request.options, sort_keys=True),
        }
        client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        stamp = int(time.time() * 1000)
        for row in result.rows:
            metrics = [Metric(k, v, stamp, row.version) for k, v in version_metrics(row).items()]
            client.log_batch(run_id, metrics=metrics)
        summary = [Metric(f"verdicts.{name}", float(sum(r.verdict.verdict == name for r in result.rows)), stamp, 0)
                   for name in VERDICT_CODE]
        client.log_batch(run_id, metrics=summary + [Metric("seconds", result.seconds, stamp, 0)])
        for path in paths.values():
            if path.is_file():
                client.log_artifact(run_id, str(path))
        if (folder / "triggers").is_dir():
            client.log_artifacts(run_id, str(folder / "triggers"), "triggers")
        for row in result.rows:
            for key, value in version_tags(row, result.lineage, at, run_id).items():
                client.set_model_version_tag(request.name, str(row.version), key, value)
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    paths["run_id"] = run_id  # type: ignore[assignment]
    return paths


def audit(request: AuditRequest, on_event: ProgressFn = _quiet) -> tuple[AuditResult, dict[str, Path]]:
    """prepare, run and write: the whole `permanence audit`."""
    result = run(prepare(request, on_event), on_event)
    return result, write(result, on_event)


__all__ = ["AuditPlan", "AuditRequest", "AuditResult", "FAIL_ON", "Lineage", "TRUST_FLAG", "VersionAudit", "audit",
           "prepare", "run", "write"]
