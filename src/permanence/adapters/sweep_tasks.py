"""The Prefect tasks a sweep runs on Dask workers: train a shared M0 once, run one timeline.

They live in the package (not in flows/) so that a Dask worker in another process, or on another machine, imports
them by name. A timeline goes through `run_timeline`, the same per-timeline pipeline as `permanence simulate`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import cloudpickle
import torch

from prefect import task

from permanence.adapters.mlflow_store import ModelSpec, StudyLock, StudyStore, load_weights
from permanence.adapters.pipeline import RETRIES, BaselineFields, SharedModel, run_timeline
from permanence.adapters.sweep_store import SweepStore
from permanence.config import Config
from permanence.data import Splits, load_splits
from permanence.dormancy import ProbeModels, paired
from permanence.simulation import Simulation, probed_versions, resolve_device, state_on_cpu

T = TypeVar("T")


@dataclass(frozen=True)
class SweepProgress:
    """What the live view shows: timelines done / running / left, and the shared work (M0s, probe baselines)."""

    done: int
    running: int
    left: int
    failed: int
    skipped: int  # finished by an earlier run of the sweep
    shared_done: int
    shared_total: int


# A failed timeline is retried once as a whole: it resumes from the registry, so only the step in flight reruns.
TIMELINE_RETRIES = {**RETRIES, "retries": 1}


@functools.lru_cache(maxsize=4)
def _splits(data: str, seed: int, device: str) -> Splits:
    """Each worker process loads a dataset split once and keeps it for every timeline that needs it."""
    config = Config.model_validate({"data": json.loads(data), "seed": seed})
    return load_splits(config, resolve_device(device))


@functools.cache
def undo_malloc_trim() -> bool:
    """Give glibc back its dynamic mmap threshold in a worker that a Dask nanny started with MALLOC_TRIM_THRESHOLD_.

    Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in every worker it spawns (distributed.nanny.pre-spawn-environ).
    Setting any malloc threshold switches off glibc's dynamic mmap threshold, so every tensor buffer above 128 KiB
    is mmap'ed and unmapped again, page-faulted in on each use: measured on digits (bench/sweep.yaml, 1 seed, 2
    workers) a timeline took 33 s in a worker instead of 10.6 s, a third of the worker's CPU time in the kernel.
    The local cluster unsets the variable (flows/sweep.py); a worker someone else started gets fixed thresholds
    close to what the dynamic ones grow to (mmap above 32 MiB, trim above 64 MiB). Returns whether it changed them."""
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl has no such thresholds)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 64 << 20))


def dask_teardown(worker: Any) -> None:
    """Dask calls this in a worker that preloads this module as the worker closes: its process's exit then skips the
    interpreter's garbage collections over everything imported (closing a 2-worker local cluster that preloads this
    module: 2.50 s, 0.26-0.30 s with the freeze; 0.77 s for workers without these imports)."""
    gc.freeze()


class TaskFailure(RuntimeError):
    """What a task raised, as one line, where the exception itself cannot travel back to the flow (Dask pickles a
    task's outcome; an exception holding a lock or an open file cannot be pickled, and would crash the sweep)."""


@contextlib.contextmanager
def portable_errors() -> Iterator[None]:
    """Re-raise an exception that cannot be pickled as a TaskFailure that says the same in one line."""
    try:
        yield
    except Exception as err:
        try:
            cloudpickle.dumps(err)
        except Exception:
            raise TaskFailure(f"{type(err).__name__}: {err}".splitlines()[0]) from None
        raise


def simulation(config: Config) -> Simulation:
    undo_malloc_trim()
    if config.runtime.threads is None:
        torch.set_num_threads(1)  # one timeline per Dask worker thread: its own core
    return Simulation(config, _splits(json.dumps(config.data.model_dump(mode="json")), config.seed, config.runtime.device))


def once(uri: str, sweep: str, key: str, kind: str, finished: Callable[[SweepStore, str], T | None],
         make: Callable[[SweepStore], T]) -> T:
    """A sweep's shared work of this key: what a finished run logged (a re-run, or another worker that got there
    first), else `make` it under the store's lock for that key (it logs what it made)."""
    with portable_errors():
        store = SweepStore(sweep, Path("."), uri)
        done = finished(store, key)
        if done is not None:
            return done
        with StudyLock(uri, f"{sweep}-{key}", kind):
            return make(store)


@task(name="train-shared-m0", **RETRIES)
def train_shared_m0(config: Config, uri: str, sweep: str, parent_run_id: str, key: str) -> SharedModel:
    """Train the M0 that every timeline with this key starts from, once, and log it as an MLflow Model."""

    def train(store: SweepStore) -> SharedModel:
        sim = simulation(config)
        started = time.perf_counter()
        model = sim.train_initial()
        seconds = time.perf_counter() - started
        poisoned = f"{config.attack.name} in D0" if config.poisoning.inject == "d0" else "never poisoned"
        return store.log_m0(key, parent_run_id, state_on_cpu(model), ModelSpec.of(sim), seconds,
                            f"M0 of seed {config.seed}, {config.model.name} on {config.data.name}, {poisoned}")

    return once(uri, sweep, key, "m0", SweepStore.finished_m0, train)


@task(name="probe-baseline", **RETRIES)
def probe_shared_baseline(config: Config, uri: str, sweep: str, parent_run_id: str, key: str,
                          baseline: SharedModel) -> BaselineFields:
    """The paired dormancy probes' baseline fields at every probed version, once for every timeline with this key
    (`permanence.sweep.probe_baseline_key`): half of each paired probe's work, the same for every policy."""

    def probe(store: SweepStore) -> BaselineFields:
        sim = simulation(config)
        model = sim.load_model(load_weights(uri, baseline.source))
        started = time.perf_counter()
        fields = {version: sim.baseline_fields(version, model) for version in probed_versions(config)}
        probes = ", ".join(paired(sim.probes_enabled))
        return store.log_probe_baseline(key, parent_run_id, fields, time.perf_counter() - started,
                                        f"{probes} on the never-poisoned baseline of seed {config.seed}, "
                                        f"{config.attack.name}'s trigger, {config.drift.kind} drift")

    return once(uri, sweep, key, "probe-baseline", SweepStore.finished_probe_baseline, probe)


@task(name="m0-version0", **RETRIES)
def measure_shared_m0(config: Config, uri: str, sweep: str, parent_run_id: str, key: str, m0: SharedModel,
                      baseline: SharedModel, baseline_fields: BaselineFields | None) -> dict[str, Any]:
    """Version 0 of every timeline with this key (`permanence.sweep.m0_record_key`), measured once: the shared M0's
    accuracy, ASR and dormancy probes, the same whatever policy updates it next."""

    def measure(store: SweepStore) -> dict[str, Any]:
        sim = simulation(config)
        model = sim.load_model(load_weights(uri, m0.source))
        probes = ProbeModels(sim.load_model(load_weights(uri, baseline.source)), baseline_fields=baseline_fields or {})
        record = sim.measure(model, 0, sim.training_set(0), probes, train_seconds=m0.seconds).as_dict()
        return store.log_m0_record(key, parent_run_id, record, f"version 0 (M0 {m0.key[:8]}) with "
                                   f"{', '.join(sim.probes_enabled)}, for every policy that starts from it")

    return once(uri, sweep, key, "m0-version0", SweepStore.finished_m0_record, measure)


@task(name="timeline", **TIMELINE_RETRIES)
def sweep_timeline(config: Config, uri: str, results_dir: Path, sweep: str, parent_run_id: str,
                   m0: SharedModel | None, baseline: SharedModel | None,
                   baseline_fields: BaselineFields | None = None, m0_record: dict[str, Any] | None = None) -> dict[str, Any]:
    """One timeline of the sweep through the per-timeline pipeline; a finished one is not run again."""
    with portable_errors():
        store = StudyStore(config, experiment=sweep, parent_run_id=parent_run_id, uri=uri)
        finished = store.finished_run()
        if finished is not None:
            return {"study": config.study, "mlflow_run_id": finished.info.run_id, "skipped": True}
        return run_timeline(simulation(config), store, results_dir, m0=m0, baseline=baseline,
                            baseline_fields=baseline_fields, m0_record=m0_record, plot=False)
