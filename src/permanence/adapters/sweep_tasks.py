"""The Prefect tasks a sweep runs on Dask workers: train a shared M0 once, run one timeline.

They live in the package (not in flows/) so that a Dask worker in another process, or on another machine, imports
them by name. A timeline goes through `run_timeline`, the same per-timeline pipeline as `permanence simulate`.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from permanence.adapters import env  # noqa: F401  (first: Prefect reads its settings when imported)
from prefect import task

from permanence.adapters.mlflow_store import ModelSpec, StudyLock, StudyStore
from permanence.adapters.pipeline import RETRIES, SharedModel, run_timeline
from permanence.adapters.sweep_store import SweepStore
from permanence.config import Config
from permanence.data import Splits, load_splits
from permanence.simulation import Simulation, resolve_device, state_on_cpu

@dataclass(frozen=True)
class SweepProgress:
    """What the live view shows: timelines done / running / left, and the shared M0s."""

    done: int
    running: int
    left: int
    failed: int
    skipped: int  # finished by an earlier run of the sweep
    m0_done: int
    m0_total: int


# A failed timeline is retried once as a whole: it resumes from the registry, so only the step in flight reruns.
TIMELINE_RETRIES = {**RETRIES, "retries": 1}


@functools.lru_cache(maxsize=4)
def _splits(data: str, seed: int, device: str) -> Splits:
    """Each worker process loads a dataset split once and keeps it for every timeline that needs it."""
    config = Config.model_validate({"data": json.loads(data), "seed": seed})
    return load_splits(config, resolve_device(device))


def simulation(config: Config) -> Simulation:
    if config.runtime.threads is None:
        torch.set_num_threads(1)  # one timeline per Dask worker thread: its own core
    return Simulation(config, _splits(json.dumps(config.data.model_dump(mode="json")), config.seed, config.runtime.device))


@task(name="train-shared-m0", **RETRIES)
def train_shared_m0(config: Config, uri: str, sweep: str, parent_run_id: str, key: str) -> SharedModel:
    """Train the M0 that every timeline with this key starts from, once, and log it as an MLflow Model."""
    store = SweepStore(sweep, Path("."), uri)
    done = store.finished_m0(key)
    if done is not None:
        return done
    with StudyLock(uri, f"{sweep}-{key}", "m0"):
        sim = simulation(config)
        started = time.perf_counter()
        model = sim.train_initial()
        seconds = time.perf_counter() - started
        poisoned = f"{config.attack.name} in D0" if config.poisoning.inject == "d0" else "never poisoned"
        return store.log_m0(key, parent_run_id, state_on_cpu(model), ModelSpec.of(sim), seconds,
                            f"M0 of seed {config.seed}, {config.model.name} on {config.data.name}, {poisoned}")


@task(name="timeline", **TIMELINE_RETRIES)
def sweep_timeline(config: Config, uri: str, results_dir: Path, sweep: str, parent_run_id: str,
                   m0: SharedModel | None, baseline: SharedModel | None) -> dict[str, Any]:
    """One timeline of the sweep through the per-timeline pipeline; a finished one is not run again."""
    store = StudyStore(config, experiment=sweep, parent_run_id=parent_run_id, uri=uri)
    finished = store.finished_run()
    if finished is not None:
        return {"study": config.study, "mlflow_run_id": finished.info.run_id, "skipped": True}
    return run_timeline(simulation(config), store, results_dir, m0=m0, baseline=baseline, plot=False)
