"""The production retraining pipeline as a Prefect flow: thin orchestration over the simulation core.

M0 is trained and registered; then each scheduled update loads the weights the registry's `production`
alias points to, ingests the drifted (maybe poisoned) data, checks it for drift against the reference
with Evidently, updates the model by the configured policy, evaluates it, and registers the new version.
The registry is the source of truth: a re-run after a crash resumes after the last registered version.

    python flows/retrain.py --config params.yaml [--set key=value ...]
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PREFECT_HOME", str(PROJECT / ".prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from permanence.adapters.drift_check import check_drift as evidently_check  # noqa: E402
from permanence.adapters.mlflow_store import StudyStore  # noqa: E402
from permanence.adapters.outputs import write_outputs  # noqa: E402
from permanence.config import Config  # noqa: E402
from permanence.simulation import ProgressCallback, Simulation, state_on_cpu  # noqa: E402
from permanence.timeline import Timeline, VersionRecord  # noqa: E402
from permanence.training import embed  # noqa: E402

# Resume goes through the registry, not Prefect's result cache: hashing datasets and models as task
# inputs would cost more than the work.
RETRIES = dict(retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE, persist_result=False)


@task(**RETRIES)
def train_initial_model(sim: Simulation, on_event: ProgressCallback | None):
    return sim.step(None, 0, on_event)


@task(**RETRIES)
def load_production(store, update: int, sim: Simulation):
    return sim.load_model(store.load_production(update))


@task(**RETRIES)
def check_drift(sim: Simulation, model, version: int, images, report_dir: Path | None):
    cfg = sim.config.tracking
    reference = sim.splits.d0_x  # the clean reference distribution (D0 before poisoning)
    report = report_dir / f"drift_v{version:03d}.html" if report_dir else None
    return evidently_check(reference, images, lambda x: embed(model, x, sim.runtime, sim.eval_batch_size), threshold=cfg.drift_threshold,
                           stat_share=cfg.stat_drift_share, seed=sim.config.seed + version, report_path=report)


@task(**RETRIES)
def ingest(sim: Simulation, version: int):
    """This update's incoming data: drifted, and poisoned where the schedule says."""
    return sim.training_set(version)


@task(**RETRIES)
def update_and_evaluate(sim: Simulation, model, version: int, data, on_event: ProgressCallback | None):
    return sim.step(model, version, on_event, data)


@task(**RETRIES)
def register(store, record: dict[str, Any], model) -> str:
    version = store.register_version(record, state_on_cpu(model))
    store.log_step({**record, "model_version": version})
    return version


def _record(base, drift=None) -> dict[str, Any]:
    record = base.as_dict()
    if drift is not None:
        record.update(drift_score=drift.drift_score, drift_detected=drift.drift_detected,
                      stat_drift_share=drift.stat_drift_share)
    else:
        record.update(drift_score=None, drift_detected=None, stat_drift_share=None)
    return record


@flow(name="retraining-pipeline", log_prints=False)
def retraining_pipeline(config: Config, results_dir: Path = Path("results"), store_dir: Path = Path("mlruns"),
                        on_event: ProgressCallback | None = None,
                        on_version: Callable[[dict[str, Any], bool], None] | None = None,
                        simulation: Any = None) -> dict[str, Any]:
    """Run (or resume) the study's timeline; returns the summary. `on_version(record, resumed)` sees each version.

    `simulation`: a `Simulation` already built from `config` (the CLI builds one to check the input before the
    flow starts). Typed `Any` because Prefect derives a parameter schema from the annotations on every call, and
    a `Simulation` annotation measured 2 s slower on the digits timeline (bench/overhead.py: 15.1 s vs 13.1 s).
    """
    if simulation is not None and simulation.config != config:
        raise ValueError("simulation was built from another config")
    sim = simulation or Simulation(config)  # validates data, attack and drift before anything is written
    store = StudyStore(config, store_dir)
    run_id, _ = store.open_run()
    reports = tempfile.TemporaryDirectory(prefix="drift-reports-") if config.tracking.drift_reports else None
    try:
        done = store.completed_versions()
        logged = store.logged_steps() if done else set()
        rows: list[dict[str, Any]] = []
        report_dir = Path(reports.name) if reports else None
        model = None
        for version in range(sim.versions):
            if version in done:
                completed = done[version]
                row = {**completed.record, "model_version": completed.registry_version}
                if version not in logged:  # a crash between registering and logging loses nothing
                    store.log_step(row)
                rows.append(row)
                if on_version:
                    on_version(row, True)
                continue
            if version == 0:
                model, base = train_initial_model(sim, on_event)
                record = _record(base)
            else:
                if model is None:
                    store.point_production_at(done[version - 1].registry_version)
                    model = load_production(store, version - 1, sim)
                incoming = ingest(sim, version)
                drift = check_drift(sim, model, version, incoming.x, report_dir) if config.tracking.drift_check else None
                model, base = update_and_evaluate(sim, model, version, incoming, on_event)
                record = _record(base, drift)
            registry_version = register(store, record, model)
            row = {**record, "model_version": registry_version}
            rows.append(row)
            if on_version:
                on_version(row, False)

        records = [VersionRecord(**{k: r[k] for k in VersionRecord.__dataclass_fields__}) for r in rows]
        summary = Timeline(records=records, alpha=config.eval.alpha).summary()
        summary.update(study=config.study, seed=config.seed, attack=config.attack.name, policy=config.update.policy,
                       injection=config.poisoning.inject, mlflow_run_id=run_id, tracking_uri=store.uri,
                       registered_model=config.study, drift_flags=sum(bool(r.get("drift_detected")) for r in rows[1:]))
        paths = write_outputs(results_dir / config.study, rows, summary,
                              f"{config.study}: {config.attack.name} in {config.poisoning.inject}, {config.update.policy}")
        for path in paths.values():
            store.log_artifact(path)
        if report_dir:
            for report in sorted(report_dir.glob("*.html")):
                store.log_artifact(report, "drift_reports")
        store.end_run("FINISHED")
        return summary
    except BaseException:
        store.end_run("FAILED")
        raise
    finally:
        if reports:
            reports.cleanup()


if __name__ == "__main__":
    from permanence.cli import app

    app(["simulate", *sys.argv[1:]])
