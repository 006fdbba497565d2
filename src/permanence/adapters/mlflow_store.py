"""MLflow tracking and model registry for one timeline: a run in an experiment (the study's own, or a
sweep's, nested under its parent run) and a registered model whose versions are the timeline's model
versions (alias `production` on the newest).

Every version is an MLflow Model logged from code (`permanence/adapters/pyfunc_model.py`, never a pickle):
the folder holds the weights as a plain state dict (`torch.load(weights_only=True)`) and `input.json`, which
says how to rebuild the project's model class and normalise its input.

Safe for concurrent writers on the default sqlite store: creating (migrating) the database happens under a
file lock, and a timeline is written by one process at a time (a second one stops with one line).
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import shutil
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from filelock import FileLock, Timeout

from permanence.config import Config
from permanence.errors import PermanenceError

DEFAULT_STORE = Path("mlruns")
PRODUCTION = "production"
WEIGHTS = "weights.pt"
TIMELINE_RUN = "timeline_run_id"  # version tag: the timeline run a version belongs to
INPUT_SPEC = "input.json"
# MLflow 3.x opens an experiment in its GenAI view unless it carries this tag
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
PARENT_TAG = "mlflow.parentRunId"
CORE_METRICS = ("clean_acc", "asr", "ra", "drift_score", "drift_detected", "stat_drift_share", "train_seconds")


def tracking_uri(store: Path = DEFAULT_STORE) -> str:
    """MLFLOW_TRACKING_URI if set (a server, PostgreSQL), else sqlite under `mlruns/`."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store.resolve() / 'mlflow.db'}"


def existing_uri(store: Path = DEFAULT_STORE) -> str:
    """Like `tracking_uri`, for readers: a local store that does not exist is an error, not created."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = store / "mlflow.db"
    if not db.is_file():
        raise PermanenceError(f"{db}: no MLflow store there; run permanence first, or set MLFLOW_TRACKING_URI")
    return f"sqlite:///{db.resolve()}"


def _sqlite_file(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def artifact_root(uri: str) -> Path | None:
    """Artifacts of a local sqlite store live beside it (`mlruns/artifacts/<experiment>`); a server decides itself."""
    db = _sqlite_file(uri)
    return db.parent / "artifacts" if db is not None else None


def lock_dir(uri: str) -> Path:
    """Where the locks of a store live: beside a local sqlite file, else in the user's cache (one machine)."""
    db = _sqlite_file(uri)
    if db is not None:
        return db.parent / "locks"
    return cache_root() / "locks" / hashlib.sha256(uri.encode()).hexdigest()[:16]


def open_client(uri: str):
    """An MlflowClient whose store exists and is migrated. Several processes creating one new sqlite database
    at once crash MLflow's migrations, so the first touch of the database happens under a file lock."""
    from mlflow import MlflowClient

    db = _sqlite_file(uri)
    if db is None:
        return MlflowClient(uri)
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock", timeout=300):  # the store may be created (and migrated) as soon as it is named
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)
    return client


def all_experiments(client, per_page: int = 1000) -> list:
    """Every active experiment of the store, page by page (one `search_experiments` call returns at most 1000)."""
    from mlflow.utils import get_results_from_paginated_fn

    return get_results_from_paginated_fn(
        lambda count, token: client.search_experiments(max_results=count, page_token=token), per_page)


def ensure_experiment(client, name: str, artifact_root: Path | None) -> str:
    """The experiment's id, creating it (model-training view, artifacts under `artifact_root`) if needed."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND["mlflow.experimentKind"]:
            client.set_experiment_tag(experiment.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
        return experiment.experiment_id
    artifacts = (artifact_root / name).as_uri() if artifact_root is not None else None
    try:
        return client.create_experiment(name, artifact_location=artifacts, tags=EXPERIMENT_KIND)
    except MlflowException:  # another process created it a moment ago
        return client.get_experiment_by_name(name).experiment_id


def config_hash(config: Config) -> str:
    return hashlib.sha256(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


class StudyLock:
    """One process at a time writes a timeline: an OS file lock, released even when the holder is SIGKILLed."""

    def __init__(self, uri: str, name: str, kind: str = "study") -> None:
        folder = lock_dir(uri)
        folder.mkdir(parents=True, exist_ok=True)
        self.name, self.kind = name, kind
        self.path = folder / (f"{name}.lock" if kind == "study" else f"{kind}-{name}.lock")
        self._lock = FileLock(str(self.path), timeout=0)

    def __enter__(self) -> StudyLock:
        try:
            self._lock.acquire()
        except Timeout:
            raise PermanenceError(
                f"{self.kind}: '{self.name}' is being run by another process right now (lock {self.path}); "
                f"wait for it to finish, then run again to resume"
            ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def check_free(self) -> None:
        """Fail now, before a flow starts, if another process holds it (the flow takes it for real)."""
        with self:
            pass


@dataclass(frozen=True)
class ModelSpec:
    """What rebuilds a registered model outside the simulator: class, shape, input normalisation."""

    model: str
    channels: int
    height: int
    width: int
    num_classes: int
    mean: list[float]
    std: list[float]
    data: str  # the dataset it serves (a platform team knows that much): the audit's default clean data

    @classmethod
    def of(cls, sim) -> ModelSpec:
        s = sim.splits
        return cls(sim.config.model.name, s.channels, *s.image_size, s.num_classes, s.mean.cpu().tolist(),
                   s.std.cpu().tolist(), sim.config.data.name)


def save_mlflow_model(folder: Path, state: dict[str, torch.Tensor], spec: ModelSpec) -> Path:
    """Write an MLflow Model (models from code) into `folder`: pyfunc code, weights state dict, input spec."""
    staging = folder.parent / f".{folder.name}-files"
    staging.mkdir(parents=True, exist_ok=True)
    torch.save(state, staging / WEIGHTS)
    (staging / INPUT_SPEC).write_text(json.dumps(spec.__dict__))
    # MLflow's pyfunc warns at import about its own GenAI type hints, and about our predict()'s missing ones: the
    # signature below already says what goes in and out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        import mlflow.pyfunc
        import numpy as np
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        from permanence.adapters import pyfunc_model

        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, spec.channels, spec.height, spec.width))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, spec.num_classes))]),
        )
        mlflow.pyfunc.save_model(
            path=str(folder), python_model=pyfunc_model.__file__,
            artifacts={"weights": str(staging / WEIGHTS), "input": str(staging / INPUT_SPEC)},
            signature=signature, pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "permanence"],
            metadata={"permanence": {"format": 1, "input": "float32 images in [0, 1], (N, C, H, W)"}},
        )
    return folder


def cache_root() -> Path:
    """Where Permanence keeps what it can rebuild: PERMANENCE_CACHE_DIR, else $XDG_CACHE_HOME/permanence or
    ~/.cache/permanence."""
    if os.environ.get("PERMANENCE_CACHE_DIR"):
        return Path(os.environ["PERMANENCE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "permanence"


@functools.cache
def _environment_key() -> str:
    """What every template of this process depends on: the tools' versions and the pyfunc and writer code."""
    import sys

    import mlflow

    from permanence import __version__
    from permanence.adapters import pyfunc_model

    parts = [mlflow.__version__, torch.__version__, sys.version, __version__,
             hashlib.sha256(Path(pyfunc_model.__file__).read_bytes()).hexdigest(),
             hashlib.sha256(Path(__file__).read_bytes()).hexdigest()]
    return "\n".join(parts)


def template_key(spec: ModelSpec) -> str:
    """What an MLflow Model template folder depends on: the spec and the environment."""
    return hashlib.sha256(f"{json.dumps(spec.__dict__, sort_keys=True)}\n{_environment_key()}".encode()).hexdigest()[:24]


def model_template(spec: ModelSpec) -> Path:
    """An MLflow Model folder for `spec` without its weights, written by `save_model` once per environment and kept in
    the cache. The first `save_model` of a process scans every installed distribution's
    metadata to check the model's requirements (0.7 s for the scan alone); on a background thread beside M0's
    training it took the GIL from the training loop (bench/overhead.py: train_initial 3.5 s, 1.5-1.7 s without it; py-spy); every process of a sweep paid it."""
    folder = cache_root() / "mlflow-model-templates" / template_key(spec)
    if (folder / "MLmodel").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        (save_mlflow_model(staging / "model", {}, spec) / "artifacts" / WEIGHTS).unlink()
        try:
            os.rename(staging / "model", folder)  # atomic: a reader sees the whole folder or none
        except OSError:
            if not (folder / "MLmodel").is_file():  # not another process's template written meanwhile
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def write_mlflow_model(folder: Path, state: dict[str, torch.Tensor], spec: ModelSpec) -> Path:
    """One MLflow Model folder (a version, a shared M0, a probe's baseline): a copy of the spec's template with these
    weights and its own `model_uuid`, time and size. Everything else in the folder (the code, the environment, the
    signature, the input spec) is the same for every model of a spec, and `save_model` spent 40-110 ms a version
    re-checking requirements and re-writing it (bench/overhead.py)."""
    shutil.copytree(model_template(spec), folder)
    torch.save(state, folder / "artifacts" / WEIGHTS)
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    mlmodel.update(model_uuid=uuid.uuid4().hex, utc_time_created=str(datetime.datetime.utcnow()),
                   model_size_bytes=sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()))
    (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel, default_flow_style=False, sort_keys=True))
    return folder


def load_weights(client_uri: str, source: str) -> dict[str, torch.Tensor]:
    """The state dict of a Permanence MLflow Model at `source`, loaded without unpickling code."""
    import mlflow.artifacts

    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{source}/artifacts/{WEIGHTS}", dst_path=tmp,
                                                    tracking_uri=client_uri)
        return torch.load(local, weights_only=True, map_location="cpu")


@dataclass(frozen=True)
class CompletedVersion:
    update: int
    registry_version: str | None  # None: a drift-triggered update that was skipped (no version registered)
    record: dict[str, Any]


class StudyStore:
    """One timeline's run and registered model. `experiment` defaults to the study; `parent_run_id` nests the run."""

    def __init__(self, config: Config, store: Path = DEFAULT_STORE, experiment: str | None = None,
                 parent_run_id: str | None = None, uri: str | None = None) -> None:
        self.config = config
        self.name = config.study
        self.uri = uri or tracking_uri(store)
        self.client = open_client(self.uri)
        self.hash = config_hash(config)
        self.parent_run_id = parent_run_id
        self.experiment_id = ensure_experiment(self.client, experiment or self.name, artifact_root(self.uri))
        self.run_id: str | None = None
        self._artifact_uri: str | None = None
        self._registered = False

    # --- the run --------------------------------------------------------------------------------
    def _runs(self, status_clause: str) -> list:
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.config_hash = '{self.hash}' and {status_clause}",
            order_by=["attributes.start_time DESC"], max_results=1,
        )

    def finished_run(self):
        """This config's newest FINISHED run in the experiment, if any (a sweep skips such timelines)."""
        found = self._runs("attributes.status = 'FINISHED'")
        return found[0] if found else None

    def open_run(self) -> tuple[str, bool]:
        """Resume this config's unfinished run, or start a new one. Returns (run_id, resumed)."""
        unfinished = self._runs("attributes.status != 'FINISHED'")
        if unfinished:
            self.run_id = unfinished[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return self.run_id, True
        tags = {"config_hash": self.hash, "study": self.name, "permanence.role": "timeline"}
        if self.parent_run_id:
            tags[PARENT_TAG] = self.parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=f"{self.name}-seed{self.config.seed}", tags=tags)
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(k, ("null" if v is None else str(v))[:6000]) for k, v in self.config.flat().items()]
        self.client.log_batch(self.run_id, params=params)
        return self.run_id, False

    def end_run(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)

    def log_step(self, record: dict[str, Any]) -> None:
        """Log one version's numeric metrics at step=version, in one batch."""
        from mlflow.entities import Metric

        step = int(record["version"])
        metrics = [Metric(key, float(value), 0, step) for key, value in record.items()
                   if key not in ("version", "model_version") and isinstance(value, (int, float)) and value is not None]
        self.client.log_batch(self.run_id, metrics=metrics)

    def logged_steps(self) -> set[int]:
        """Steps whose metrics this run already holds (a batch is all or nothing, so one key tells)."""
        return {m.step for m in self.client.get_metric_history(self.run_id, "clean_acc")}

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def record_skip(self, record: dict[str, Any]) -> None:
        """A scheduled update that did not run (drift-triggered, no drift): kept as a run tag for resume."""
        self.client.set_tag(self.run_id, f"skipped.v{int(record['version']):03d}", json.dumps(record))

    # --- the registry ---------------------------------------------------------------------------
    def _ensure_registered_model(self) -> None:
        from mlflow.exceptions import MlflowException

        if self._registered:
            return
        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            try:
                self.client.create_registered_model(self.name, description=f"Permanence timeline {self.name}")
            except MlflowException:  # created by another process meanwhile
                self.client.get_registered_model(self.name)
        self._registered = True

    def completed_versions(self) -> dict[int, CompletedVersion]:
        """This run's versions by timeline version (registered, or skipped updates): the resume point."""
        from mlflow.exceptions import MlflowException

        done: dict[int, CompletedVersion] = {}
        try:
            found = self.client.search_model_versions(f"name='{self.name}'")
        except MlflowException:
            found = []
        for mv in found:
            if _timeline_run(mv) != self.run_id:
                continue
            if "record" in mv.tags:
                update = int(mv.tags["update"])
                done[update] = CompletedVersion(update, mv.version, json.loads(mv.tags["record"]))
        for key, value in self.client.get_run(self.run_id).data.tags.items():
            if key.startswith("skipped.v"):
                update = int(key.removeprefix("skipped.v"))
                done[update] = CompletedVersion(update, None, json.loads(value))
        return done

    def _tags(self, record: dict[str, Any]) -> dict[str, str]:
        c = self.config
        return {
            "update": str(int(record["version"])), "poisoned": str(bool(record["poisoned"])).lower(),
            "attack": c.attack.name, "policy": c.update.policy, "clean_acc": f"{record['clean_acc']:.4f}",
            "asr": f"{record['asr']:.4f}", "drift_detected": str(record.get("drift_detected")).lower(),
            "config_hash": self.hash, "record": json.dumps(record),
        }

    def _create_version(self, record: dict[str, Any], source: str, run_id: str) -> str:
        """`run_id`: the run whose artifacts hold `source` (an MLflow server refuses any other); the timeline's run
        is in the TIMELINE_RUN tag, which differs from the version's run for a sweep's shared M0."""
        self._ensure_registered_model()
        tags = {**self._tags(record), TIMELINE_RUN: self.run_id}
        mv = self.client.create_model_version(self.name, source=source, run_id=run_id, tags=tags)
        self.client.set_registered_model_alias(self.name, PRODUCTION, mv.version)
        return mv.version

    def register_version(self, record: dict[str, Any], state: dict[str, torch.Tensor], spec: ModelSpec) -> str:
        """Log the version as an MLflow Model, then create the registry version with all its tags in one call."""
        folder = f"versions/v{int(record['version']):03d}"
        with tempfile.TemporaryDirectory() as tmp:
            self.client.log_artifacts(self.run_id, str(write_mlflow_model(Path(tmp) / "model", state, spec)), folder)
        if self._artifact_uri is None:
            self._artifact_uri = self.client.get_run(self.run_id).info.artifact_uri
        return self._create_version(record, f"{self._artifact_uri}/{folder}", self.run_id)

    def register_shared(self, record: dict[str, Any], source: str, source_run_id: str) -> str:
        """Register a model logged by another run (a sweep's shared M0, `source` in run `source_run_id`) as this
        timeline's version, from the same artifact."""
        return self._create_version(record, source, source_run_id)

    def point_production_at(self, registry_version: str) -> None:
        self.client.set_registered_model_alias(self.name, PRODUCTION, registry_version)

    def load_production(self, expected_update: int) -> dict[str, torch.Tensor]:
        """Weights of the version `production` points to; it must be this run's version `expected_update`."""
        mv = self.client.get_model_version_by_alias(self.name, PRODUCTION)
        if _timeline_run(mv) != self.run_id or int(mv.tags.get("update", -1)) != expected_update:
            raise RuntimeError(
                f"registry: alias '{PRODUCTION}' of {self.name} points to version {mv.version} "
                f"(run {_timeline_run(mv)}, update {mv.tags.get('update')}), expected update {expected_update} of run {self.run_id}"
            )
        return load_weights(self.uri, mv.source)

    def load_version(self, registry_version: str) -> dict[str, torch.Tensor]:
        return load_weights(self.uri, self.client.get_model_version(self.name, registry_version).source)


def _timeline_run(mv: Any) -> str:
    """The timeline run a registered version belongs to (versions registered before the tag existed: their run)."""
    return mv.tags.get(TIMELINE_RUN, mv.run_id)


def register_simulated(config: Config, store: Path = DEFAULT_STORE):
    """Run the core `simulate` and register every version of the timeline as the pipeline registers it, without
    Prefect or the drift check (a registry to audit in tests and benches). Returns (timeline, simulation, uri)."""
    from permanence.simulation import Simulation, simulate

    sim = Simulation(config)
    timeline = simulate(config, splits=sim.splits)  # the data loaded once
    spec = ModelSpec.of(sim)
    study = StudyStore(config, store)
    study.open_run()
    for record, state in zip(timeline.records, timeline.states, strict=True):
        study.register_version({**record.as_dict(), "drift_score": None, "drift_detected": None,
                                "stat_drift_share": None}, state, spec)
    study.end_run()
    return timeline, sim, study.uri
