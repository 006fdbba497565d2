"""The per-timeline production pipeline: the one code path through which every timeline meets the tools.

`permanence simulate` (flows/retrain.py) and each timeline of a sweep (flows/sweep.py) call `run_timeline`:
M0 is trained (or a shared M0 loaded) and registered; then each scheduled update loads the weights the
registry's `production` alias points to, ingests the drifted (maybe poisoned) data, checks it for drift with
Evidently, updates the model by the configured policy (or, with `update.trigger=drift` and no drift, keeps the
production version), evaluates it (and runs the enabled dormancy probes), and registers the new version.
The registry is the source of truth: a re-run after a crash resumes after the last registered version.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from prefect import task
from prefect.cache_policies import NO_CACHE

from permanence.adapters.drift_check import check_drift as evidently_check
from permanence.adapters.mlflow_store import ModelSpec, StudyLock, StudyStore, load_weights, write_mlflow_model
from permanence.adapters.outputs import atomic_write, write_outputs
from permanence.dormancy import ProbeModels
from permanence.simulation import ProgressCallback, Simulation, state_on_cpu
from permanence.timeline import Timeline, VersionRecord
from permanence.training import embed

# Resume goes through the registry, not Prefect's result cache: hashing datasets and models as task inputs
# would cost more than the work. A retried step starts again from what the registry holds.
RETRIES = dict(retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE, persist_result=False)
BASELINE_FOLDER = "baseline"
RECORD_FIELDS = set(VersionRecord.__dataclass_fields__)


@dataclass(frozen=True)
class SharedModel:
    """A model trained once and logged as an MLflow Model that several timelines start from (a sweep's M0)."""

    key: str
    source: str  # artifact URI of its MLflow Model folder
    run_id: str
    seconds: float  # what training it cost


BaselineFields = dict[int, dict[str, float]]  # version -> the paired probes' baseline fields


@task(**RETRIES)
def train_initial_model(sim: Simulation, on_event: ProgressCallback | None, probes: ProbeModels | None):
    return sim.step(None, 0, on_event, probes=probes)


@task(**RETRIES)
def start_from_shared(sim: Simulation, uri: str, shared: SharedModel, probes: ProbeModels | None,
                      measured: dict[str, Any] | None = None):
    """A shared M0 as version 0: its row as `measured` once for the timelines that share it, else measured here."""
    model = sim.load_model(load_weights(uri, shared.source))
    if measured is not None:
        return model, VersionRecord(**measured)
    return model, sim.measure(model, 0, sim.training_set(0), probes, train_seconds=shared.seconds)


@task(**RETRIES)
def load_registered(store: StudyStore, registry_version: str, update: int, sim: Simulation, production: bool = True):
    if production:
        store.point_production_at(registry_version)
        return sim.load_model(store.load_production(update))
    return sim.load_model(store.load_version(registry_version))


def ingest_and_check_drift(sim: Simulation, model, version: int, reference, report_dir: Path | None):
    """This update's incoming data, drifted and poisoned where the schedule says, and (with `tracking.drift_check`)
    Evidently's check of it against the `reference` images, on the production model's embeddings."""
    incoming = sim.training_set(version)
    cfg = sim.config.tracking
    if not cfg.drift_check:
        return incoming, None
    report = report_dir / f"drift_v{version:03d}.html" if report_dir else None
    drift = evidently_check(reference, incoming.x, lambda x: embed(model, x, sim.runtime, sim.eval_batch_size),
                            threshold=cfg.drift_threshold, stat_share=cfg.stat_drift_share, seed=sim.config.seed + version,
                            report_path=report)
    return incoming, drift


def keep_production(sim: Simulation, store: StudyStore, model, version: int, data, drift,
                    probes: ProbeModels | None) -> dict[str, Any]:
    """A drift-triggered update found no drift: the production version stays, faces this version's data, and the
    skip is recorded."""
    record = _record(sim.measure(model, version, data, probes, updated=False), drift)
    store.record_skip(record)
    store.log_step(record)
    return record


@task(name="scheduled-update", task_run_name="update-{version}", **RETRIES)
def scheduled_update(sim: Simulation, store: StudyStore, model, production: dict[str, torch.Tensor], version: int,
                     reference, report_dir: Path | None, spec: ModelSpec, on_event: ProgressCallback | None,
                     probes: ProbeModels | None):
    """One scheduled update as one Prefect task run: ingest and check the incoming data, then update the production
    model by the policy, evaluate it and register it as the new version (or, drift-triggered with no drift found,
    keep the production version). Returns the model, the version's record and the registry version (None: kept).
    One task run, not several: each costs Prefect's server CPU that a 2-core machine takes from training
    (bench/results: 21-57 ms per task run in session 8). `production`: a copy of the weights the update starts
    from, taken before the call, so that a retry (after a failed registration, say) trains this update again
    instead of a second one on top of the first try's in-place changes."""
    incoming, drift = ingest_and_check_drift(sim, model, version, reference, report_dir)
    if sim.config.update.trigger == "drift" and not drift.drift_detected:
        return model, keep_production(sim, store, model, version, incoming, drift, probes), None
    model.load_state_dict(production)
    model, base = sim.step(model, version, on_event, incoming, probes=probes)
    record = _record(base, drift)
    return model, record, register.fn(store, record, model, spec)


@task(**RETRIES)
def register(store: StudyStore, record: dict[str, Any], model, spec: ModelSpec, shared: SharedModel | None = None) -> str:
    if shared is not None:
        version = store.register_shared(record, shared.source, shared.run_id)
    else:
        version = store.register_version(record, state_on_cpu(model), spec)
    store.log_step({**record, "model_version": version})
    return version


@task(**RETRIES)
def baseline_model(sim: Simulation, store: StudyStore, shared: SharedModel | None):
    """The never-poisoned baseline of the dormancy probes: a sweep's shared clean M0, or trained once per study
    and kept in the run (so a resumed run reloads it instead of training it again)."""
    if shared is not None:
        return sim.load_model(load_weights(store.uri, shared.source))
    artifacts = {a.path for a in store.client.list_artifacts(store.run_id)}
    if BASELINE_FOLDER in artifacts:
        source = f"{store.client.get_run(store.run_id).info.artifact_uri}/{BASELINE_FOLDER}"
        return sim.load_model(load_weights(store.uri, source))
    model = sim.train_baseline()
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_mlflow_model(Path(tmp) / "model", state_on_cpu(model), ModelSpec.of(sim))
        store.client.log_artifacts(store.run_id, str(folder), BASELINE_FOLDER)
    return model


def _record(base: VersionRecord, drift=None) -> dict[str, Any]:
    record = base.as_dict()
    record.update(drift_score=drift.drift_score if drift else None, drift_detected=drift.drift_detected if drift else None,
                  stat_drift_share=drift.stat_drift_share if drift else None)
    return record


def _last(rows: list[dict[str, Any]], condition: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    return next((row for row in reversed(rows) if condition(row)), None)


def timeline_of(rows: list[dict[str, Any]], alpha: float) -> Timeline:
    records = [VersionRecord(**{k: v for k, v in row.items() if k in RECORD_FIELDS}) for row in rows]
    return Timeline(records=records, alpha=alpha)


def run_timeline(sim: Simulation, store: StudyStore, results_dir: Path, *, m0: SharedModel | None = None,
                 baseline: SharedModel | None = None, baseline_fields: BaselineFields | None = None,
                 m0_record: dict[str, Any] | None = None, on_event: ProgressCallback | None = None,
                 on_version: Callable[[dict[str, Any], bool], None] | None = None, plot: bool = True,
                 export_dir: Path | None = None) -> dict[str, Any]:
    """Run (or resume) one timeline through the registry; returns its summary. `m0`: start from a shared M0
    instead of training one; `baseline`: the probes' shared never-poisoned model; `baseline_fields`: the paired
    probes' baseline fields per version, and `m0_record`: the shared M0's row as version 0, each computed once for
    the timelines that share it; `on_version(row, resumed)`."""
    config = sim.config
    with StudyLock(store.uri, config.study):
        run_id, _ = store.open_run()
        reports = tempfile.TemporaryDirectory(prefix="drift-reports-") if config.tracking.drift_reports else None
        try:
            rows = _versions(sim, store, m0, baseline, baseline_fields, m0_record, on_event, on_version,
                             Path(reports.name) if reports else None)
            summary = timeline_of(rows, config.eval.alpha).summary()
            summary.update(study=config.study, seed=config.seed, attack=config.attack.name, policy=config.update.policy,
                           injection=config.poisoning.inject, mlflow_run_id=run_id, tracking_uri=store.uri,
                           registered_model=config.study, drift_flags=sum(bool(r.get("drift_detected")) for r in rows[1:]),
                           updates_run=sum(bool(r.get("updated", True)) for r in rows[1:]))
            paths = write_outputs(results_dir / config.study, rows, summary,
                                  f"{config.study}: {config.attack.name} in {config.poisoning.inject}, {config.update.policy}",
                                  plot=plot)
            for path in paths.values():
                store.log_artifact(path)
                if export_dir is not None:
                    atomic_write(export_dir / path.name, path.read_bytes())
            if reports:
                for report in sorted(Path(reports.name).glob("*.html")):
                    store.log_artifact(report, "drift_reports")
            store.end_run("FINISHED")
            return summary
        except BaseException:
            store.end_run("FAILED")
            raise
        finally:
            if reports:
                reports.cleanup()


def _versions(sim: Simulation, store: StudyStore, m0: SharedModel | None, shared_baseline: SharedModel | None,
              shared_fields: BaselineFields | None, m0_record: dict[str, Any] | None, on_event, on_version,
              report_dir: Path | None) -> list[dict[str, Any]]:
    config = sim.config
    spec = ModelSpec.of(sim)
    done = store.completed_versions()
    logged = store.logged_steps() if done else set()
    probes = None
    if sim.probes_enabled:
        probes = ProbeModels(baseline_model(sim, store, shared_baseline), baseline_fields=dict(shared_fields or {}))
    rows: list[dict[str, Any]] = []
    model = None
    for version in range(sim.versions):
        if version in done:
            completed = done[version]
            production = _last(rows, lambda r: r.get("updated", True))
            registry_version = completed.registry_version or (production["model_version"] if production else None)
            row = {**completed.record, "model_version": registry_version}
            if version not in logged:  # a crash between registering and logging loses nothing
                store.log_step(row)
            rows.append(row)
            if on_version:
                on_version(row, True)
            continue
        if probes is not None and probes.reference is None and rows:
            poisoned = _last(rows, lambda r: r["poisoned"])
            if poisoned is not None:  # resumed after the poisoning: the reference is that registered version
                probes = replace(probes, reference=load_registered(store, poisoned["model_version"], poisoned["version"],
                                                                   sim, production=False))
        if version == 0:
            if m0 is not None:
                model, base = start_from_shared(sim, store.uri, m0, probes, m0_record)
            else:
                model, base = train_initial_model(sim, on_event, probes)
            record = _record(base)
            registry_version = register(store, record, model, spec, m0)
        else:
            production = _last(rows, lambda r: r.get("updated", True))
            if model is None:  # resumed: continue from what the registry holds
                model = load_registered(store, production["model_version"], production["version"], sim)
            reference = None
            if config.tracking.drift_check:
                # always: against the clean reference (D0); drift-triggered: against what production last trained on
                reference = sim.splits.d0_x if config.update.trigger == "always" else sim.training_set(production["version"]).x
            production_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            model, record, registry_version = scheduled_update(sim, store, model, production_weights, version,
                                                               reference, report_dir, spec, on_event, probes)
            if registry_version is None:  # kept: production stays the version it was
                registry_version = production["model_version"]
        if probes is not None and record["poisoned"]:
            probes = replace(probes, reference=sim.load_model(state_on_cpu(model)))  # a copy: updates change `model`
        row = {**record, "model_version": registry_version}
        rows.append(row)
        if on_version:
            on_version(row, False)
    return rows
