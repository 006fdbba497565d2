"""A policy comparison at scale: every timeline of a sweep file, on Dask through Prefect, into one MLflow store.

Work that timelines share is done once, each piece a task that the timelines needing it wait for: each distinct M0,
and with dormancy probes the paired probes' baseline side and version 0 (the M0 probed); each timeline is a task that
runs the same per-timeline pipeline as `permanence simulate` (registry, drift checks, metrics, resume).
By default a local Dask cluster of single-thread worker processes is started for the sweep; with an address the
tasks go to an existing scheduler (`dask scheduler` + `dask worker ADDRESS` on any machines that reach the store).

    permanence sweep sweeps/policies.yaml [--workers N] [--address tcp://HOST:PORT]
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from permanence.adapters import env  # noqa: F401  (first: Prefect reads its settings when imported)
import dask
from distributed import wait as dask_wait
from prefect import flow
from prefect.context import get_run_context
from prefect_dask import DaskTaskRunner

from permanence.adapters.comparison import write_comparison
from permanence.adapters.mlflow_store import StudyLock, config_hash
from permanence.adapters.sweep_store import SweepStore
from permanence.adapters import sweep_tasks
from permanence.adapters.sweep_tasks import (
    SweepProgress, measure_shared_m0, probe_shared_baseline, sweep_timeline, train_shared_m0,
)
from permanence.dormancy import PROBES
from permanence.sweep import Sweep, baseline_key, estimated_cost, m0_key, m0_record_key, probe_baseline_key


# Dask settings for the local cluster a sweep starts (Dask's workers inherit them):
# - Dask's nanny would start each worker with MALLOC_TRIM_THRESHOLD_=65536, which makes torch's CPU buffers cost a
#   page fault each (3x slower timelines; see sweep_tasks.undo_malloc_trim); None unsets it for our workers
# - each worker samples its threads' stacks every 10 ms for the dashboard's profile, in Python under the GIL (py-spy
#   on a 6-timeline digits sweep: 15.5 s of the workers' 404.5 s of Python samples); this cluster has no dashboard
# - the housekeeping timers, tuned for clusters of many short tasks, wake every event loop 50 (tick) and 10 (memory
#   monitor) times a second: an idle 2-worker cluster spent 2.0 CPU-s a minute in the sweep's process and 1.0 in
#   each worker, 0.4 and 0.15 with these; a timeline runs for minutes, and nothing here needs them sooner
LOCAL_CLUSTER_CONFIG = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
                        "distributed.worker.profile.enabled": False,
                        "distributed.admin.tick.interval": "1s", "distributed.worker.memory.monitor-interval": "1s",
                        "distributed.admin.system-monitor.interval": "2s", "distributed.scheduler.work-stealing": False}


def task_runner(workers: int, address: str | None) -> DaskTaskRunner:
    if address:
        return DaskTaskRunner(address=address)
    dask.config.set(LOCAL_CLUSTER_CONFIG)
    # every worker imports the tasks' module (torch, Prefect, MLflow: seconds of CPU) as it starts, side by side,
    # not when its first task arrives: otherwise the second worker begins importing only once the first M0 is done
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None, "preload": [sweep_tasks.__name__]})


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
        try:
            return _run(sweep, store, parent, results_dir, on_progress)
        except BaseException as err:  # an interrupt, or a fault of the sweep itself: no parent left RUNNING
            store.finish(parent, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED", {})
            raise


class Job:
    """Work for Dask, handed to it once the jobs it needs have finished: `submit(their results)` -> a future. A shared
    job (an M0, a probe baseline) is done once for every timeline that needs it. (A plain class: this file is loaded
    by path, and dataclasses look their module up by name.)"""

    def __init__(self, submit: Callable[[dict[str, Any]], Any], needs: dict[str, Job] | None = None,
                 study: str | None = None, what: str = "timeline") -> None:
        self.submit, self.needs, self.study, self.what = submit, needs or {}, study, what  # what: as a failure names it
        self.future: Any = None
        self.error: str | None = None  # why it could not run: a job it needs failed

    @property
    def finished(self) -> bool:
        return self.error is not None or (self.future is not None and self.future.wrapped_future.done())

    def outcome(self) -> Any:
        return RuntimeError(self.error) if self.error is not None else _outcome(self.future)


def _run(sweep: Any, store: SweepStore, parent: str, results_dir: Path,
         on_progress: Callable[[SweepProgress], None] | None) -> dict[str, Any]:
    """Submit the shared work and the unfinished timelines, follow them, write the comparison and close the parent."""
    finished = store.finished_hashes()
    results_dir = results_dir.resolve()
    timelines_dir = results_dir / sweep.name / "timelines"
    shared: dict[str, Job] = {}

    def model(config, key) -> Job:
        if key not in shared:
            shared[key] = Job(lambda _, c=config, k=key: _ahead(train_shared_m0, c, store.uri, sweep.name, parent, k),
                              what="shared model")
        return shared[key]

    def probe_baseline(config, key, baseline: Job) -> Job:
        if key not in shared:
            shared[key] = Job(lambda needs, c=config, k=key: _ahead(
                probe_shared_baseline, c, store.uri, sweep.name, parent, k, needs["baseline"]), {"baseline": baseline},
                what="shared probe baseline")
        return shared[key]

    def version0(config, key, needs: dict[str, Job]) -> Job:
        if key not in shared:
            shared[key] = Job(lambda done, c=config, k=key: _ahead(
                measure_shared_m0, c, store.uri, sweep.name, parent, k, done["m0"], done["baseline"],
                done.get("baseline_fields")), dict(needs), what="shared version 0")
        return shared[key]

    # each timeline goes to Dask once the shared work it needs is done, costliest first, so that free workers take
    # the longest timelines first (handed out as the M0's dependents, they would run in arbitrary order)
    timelines, skipped = [], 0
    for cost, timeline in sorted(((estimated_cost(t.config), t) for t in sweep.timelines), key=lambda ct: -ct[0]):
        config = timeline.config
        if config_hash(config) in finished:
            skipped += 1
            continue
        needs = {"m0": model(config, m0_key(config))}
        if any(getattr(config.eval, probe) for probe in PROBES):
            clean = config.model_copy(update={"poisoning": config.poisoning.model_copy(update={"inject": "none"})})
            needs["baseline"] = model(clean, baseline_key(config))
            key = probe_baseline_key(config)
            if key is not None:
                needs["baseline_fields"] = probe_baseline(config, key, needs["baseline"])
            # with probes, version 0 costs as much as a probed update: measured once for every policy from this M0
            needs["m0_record"] = version0(config, m0_record_key(config), needs)

        def submit(results, config=config, cost=cost):
            with dask.annotate(priority=round(cost * 100)):  # a worker's queue runs them in that order
                return sweep_timeline.submit(config, store.uri, timelines_dir, sweep.name, parent, results["m0"],
                                             results.get("baseline"), results.get("baseline_fields"),
                                             results.get("m0_record"))

        timelines.append(Job(submit, needs, timeline.study))

    failures = _follow(list(shared.values()), timelines, skipped, on_progress)
    results, missing = store.results(sweep.spec()["timelines"])
    files = write_comparison(results_dir / sweep.name, sweep.name, sweep.axes, sweep.compare, sweep.heatmap, results)
    store.finish(parent, "FAILED" if failures or missing else "FINISHED", files)
    return {"sweep": sweep.name, "parent_run_id": parent, "experiment_id": store.experiment_id, "tracking_uri": store.uri,
            "files": files, "timelines": len(sweep.timelines), "finished_before": skipped, "failures": failures, "missing": missing}


def _ahead(task: Any, *args: Any) -> Any:
    """Submit a shared job at a Dask priority above any timeline's (cost x 100): each one unblocks timelines."""
    with dask.annotate(priority=10**9):
        return task.submit(*args)


def _outcome(future: Any) -> Any:
    """A task's result, or the exception it failed with, or the one Dask gave up with (its worker died, KilledWorker,
    or its outcome could not be moved): a sweep reports a failed task on its line and goes on with the others."""
    try:
        return future.result(raise_on_failure=False)
    except Exception as err:
        return err


def _follow(shared: list[Job], timelines: list[Job], skipped: int,
            on_progress: Callable[[SweepProgress], None] | None) -> dict[str, str]:
    """Submit each job once the jobs it needs are done and wait for every timeline, reporting done / running / left;
    returns study -> error for the timelines that failed (a failed shared job fails the jobs that need it)."""
    client = get_run_context().task_runner.client
    waiting, failures, collected = [*shared, *timelines], {}, set()
    while True:
        still_waiting = []
        for job in waiting:
            if not all(need.finished for need in job.needs.values()):
                still_waiting.append(job)
                continue
            results = {name: need.outcome() for name, need in job.needs.items()}
            for need, result in zip(job.needs.values(), results.values()):
                if isinstance(result, BaseException):  # the first failure down the line, said once
                    job.error = need.error or f"its {need.what} failed: {type(result).__name__}: {result}".splitlines()[0]
                    break
            else:
                job.future = job.submit(results)
        waiting = still_waiting
        for job in timelines:
            if job.study not in collected and job.finished:
                collected.add(job.study)
                outcome = job.outcome()
                if isinstance(outcome, BaseException):
                    failures[job.study] = job.error or f"{type(outcome).__name__}: {outcome}".splitlines()[0]
        unfinished = [job for job in timelines if job.study not in collected]
        if on_progress is not None:
            processing = {key for keys in client.processing().values() for key in keys}
            running = sum(job.future is not None and job.future.wrapped_future.key in processing for job in unfinished)
            on_progress(SweepProgress(len(timelines) - len(unfinished) - len(failures) + skipped, running,
                                      len(unfinished), len(failures), skipped,
                                      sum(job.finished for job in shared), len(shared)))
        if not unfinished:
            return failures
        watched = {job.future.wrapped_future for job in [*shared, *timelines] if job.future is not None and not job.finished}
        try:  # wake as soon as anything finishes, and at least twice a second for the live view
            with client.as_current():
                dask_wait(list(watched), timeout=0.5, return_when="FIRST_COMPLETED")
        except TimeoutError:
            pass
