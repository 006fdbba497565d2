"""A policy comparison at scale: every timeline of a sweep file, on Dask through Prefect, into one MLflow store.

Each distinct M0 is trained once (a task) and every timeline that starts from it waits for it; each timeline is a
task that runs the same per-timeline pipeline as `permanence simulate` (registry, drift checks, metrics, resume).
By default a local Dask cluster of single-thread worker processes is started for the sweep; with an address the
tasks go to an existing scheduler (`dask scheduler` + `dask worker ADDRESS` on any machines that reach the store).

    permanence sweep sweeps/policies.yaml [--workers N] [--address tcp://HOST:PORT]
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from permanence.adapters import env  # noqa: F401  (first: Prefect reads its settings when imported)
import dask
from prefect import flow
from prefect.context import get_run_context
from prefect_dask import DaskTaskRunner

from permanence.adapters.comparison import write_comparison
from permanence.adapters.mlflow_store import StudyLock, config_hash
from permanence.adapters.sweep_store import SweepStore
from permanence.adapters.sweep_tasks import SweepProgress, sweep_timeline, train_shared_m0
from permanence.sweep import Sweep, baseline_key, estimated_cost, m0_key


TASKS_MODULE = "permanence.adapters.sweep_tasks"


def task_runner(workers: int, address: str | None) -> DaskTaskRunner:
    if address:
        return DaskTaskRunner(address=address)
    # Dask's nanny would start each worker with MALLOC_TRIM_THRESHOLD_=65536, which makes torch's CPU buffers cost
    # a page fault each (3x slower timelines; see sweep_tasks.undo_malloc_trim); None unsets it for our workers
    dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})
    # and each worker samples its threads' stacks every 10 ms for the dashboard's profile, in Python under the GIL
    # (py-spy on a 6-timeline digits sweep: 15.5 s of the workers' 404.5 s of Python samples); this cluster has no dashboard
    dask.config.set({"distributed.worker.profile.enabled": False})
    # every worker imports the tasks' module (torch, Prefect, MLflow: seconds of CPU) as it starts, side by side,
    # not when its first task arrives: otherwise the second worker begins importing only once the first M0 is done
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None, "preload": [TASKS_MODULE]})


def _params(sweep: Sweep) -> dict[str, Any]:
    values: dict[str, list] = {}
    for timeline in sweep.timelines:
        for axis, value in timeline.values.items():
            if value is not None and value not in values.setdefault(axis, []):
                values[axis].append(value)
    return {"sweep.file": str(sweep.path), "sweep.config": str(sweep.params), "sweep.seeds": sweep.seeds,
            "sweep.timelines": len(sweep.timelines), "sweep.compare": sweep.compare,
            **{f"grid.{axis}": vals for axis, vals in values.items()}}


@flow(name="policy-sweep", log_prints=False)
def policy_sweep(sweep: Any, store_dir: Path = Path("mlruns"), results_dir: Path = Path("results"),
                 on_progress: Callable[[SweepProgress], None] | None = None) -> dict[str, Any]:
    """Run (or resume) every timeline of `sweep` (a validated `permanence.sweep.Sweep`; typed `Any` so Prefect does not
    derive a schema from it) and write the comparison; returns where everything went and what failed."""
    store = SweepStore(sweep.name, store_dir)
    with StudyLock(store.uri, sweep.name, "sweep"):
        parent = store.open_parent(sweep.spec(), _params(sweep))
        finished = store.finished_hashes()
        results_dir = results_dir.resolve()
        timelines_dir = results_dir / sweep.name / "timelines"
        m0s: dict[str, Any] = {}

        def shared(config, key):
            if key not in m0s:
                m0s[key] = train_shared_m0.submit(config, store.uri, sweep.name, parent, key)
            return m0s[key]

        futures, skipped = {}, 0
        for timeline in sorted(sweep.timelines, key=lambda t: -estimated_cost(t.config)):  # costliest first
            config = timeline.config
            if config_hash(config) in finished:
                skipped += 1
                continue
            m0 = shared(config, m0_key(config))
            baseline = None
            if any(getattr(config.eval, probe) for probe in ("retune", "reactivate", "bec")):
                clean = config.model_copy(update={"poisoning": config.poisoning.model_copy(update={"inject": "none"})})
                baseline = shared(clean, baseline_key(config))
            with dask.annotate(priority=round(estimated_cost(config) * 100)):  # a worker's queue runs them in that order
                futures[timeline.study] = sweep_timeline.submit(config, store.uri, timelines_dir, sweep.name, parent, m0,
                                                                baseline)
        failures = _follow(futures, m0s, skipped, on_progress)
        results, missing = store.results(sweep.spec()["timelines"])
        files = write_comparison(results_dir / sweep.name, sweep.name, sweep.axes, sweep.compare, sweep.heatmap, results)
        store.finish(parent, "FAILED" if failures or missing else "FINISHED", files)
    return {"sweep": sweep.name, "parent_run_id": parent, "experiment_id": store.experiment_id, "tracking_uri": store.uri,
            "files": files, "timelines": len(sweep.timelines), "finished_before": skipped, "failures": failures, "missing": missing}


def _follow(futures: dict[str, Any], m0s: dict[str, Any], skipped: int,
            on_progress: Callable[[SweepProgress], None] | None) -> dict[str, str]:
    """Wait for every timeline, reporting done / running / left; returns study -> error for the ones that failed."""
    client = get_run_context().task_runner.client
    pending, failures = dict(futures), {}
    while True:
        for study, future in list(pending.items()):
            if future.wrapped_future.done():
                outcome = future.result(raise_on_failure=False)
                if isinstance(outcome, BaseException):
                    failures[study] = f"{type(outcome).__name__}: {outcome}".splitlines()[0]
                del pending[study]
        if on_progress is not None:
            processing = {key for keys in client.processing().values() for key in keys}
            running = sum(f.wrapped_future.key in processing for f in pending.values())
            m0_done = sum(f.wrapped_future.done() for f in m0s.values())
            on_progress(SweepProgress(len(futures) - len(pending) - len(failures) + skipped, running, len(pending),
                                 len(failures), skipped, m0_done, len(m0s)))
        if not pending:
            return failures
        time.sleep(0.5)
