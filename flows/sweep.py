"""A policy comparison at scale: every timeline of a sweep file, on Dask through Prefect, into one MLflow store.

Each distinct M0 is trained once (a task) and every timeline that starts from it waits for it; each timeline is a
task that runs the same per-timeline pipeline as `permanence simulate` (registry, drift checks, metrics, resume).
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
from permanence.adapters.sweep_tasks import SweepProgress, sweep_timeline, train_shared_m0
from permanence.sweep import Sweep, baseline_key, estimated_cost, m0_key


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


def _run(sweep: Any, store: SweepStore, parent: str, results_dir: Path,
         on_progress: Callable[[SweepProgress], None] | None) -> dict[str, Any]:
    """Submit the M0s and the unfinished timelines, follow them, write the comparison and close the parent run."""
    finished = store.finished_hashes()
    results_dir = results_dir.resolve()
    timelines_dir = results_dir / sweep.name / "timelines"
    m0s: dict[str, Any] = {}

    def shared(config, key):
        if key not in m0s:
            m0s[key] = train_shared_m0.submit(config, store.uri, sweep.name, parent, key)
        return m0s[key]

    # each timeline goes to Dask once the M0s it starts from are trained, costliest first, so that free workers
    # take the longest timelines first (handed out as the M0's dependents, they would run in arbitrary order)
    waiting, skipped = [], 0
    for cost, timeline in sorted(((estimated_cost(t.config), t) for t in sweep.timelines), key=lambda ct: -ct[0]):
        config = timeline.config
        if config_hash(config) in finished:
            skipped += 1
            continue
        needs = {"m0": shared(config, m0_key(config))}
        if any(getattr(config.eval, probe) for probe in ("retune", "reactivate", "bec")):
            clean = config.model_copy(update={"poisoning": config.poisoning.model_copy(update={"inject": "none"})})
            needs["baseline"] = shared(clean, baseline_key(config))
        waiting.append((timeline, cost, needs))

    def submit(timeline, cost: float, models: dict[str, Any]):
        with dask.annotate(priority=round(cost * 100)):  # a worker's queue runs them in that order
            return sweep_timeline.submit(timeline.config, store.uri, timelines_dir, sweep.name, parent,
                                         models["m0"], models.get("baseline"))

    failures = _follow(waiting, submit, m0s, skipped, on_progress)
    results, missing = store.results(sweep.spec()["timelines"])
    files = write_comparison(results_dir / sweep.name, sweep.name, sweep.axes, sweep.compare, sweep.heatmap, results)
    store.finish(parent, "FAILED" if failures or missing else "FINISHED", files)
    return {"sweep": sweep.name, "parent_run_id": parent, "experiment_id": store.experiment_id, "tracking_uri": store.uri,
            "files": files, "timelines": len(sweep.timelines), "finished_before": skipped, "failures": failures, "missing": missing}


def _outcome(future: Any) -> Any:
    """A task's result, or the exception it failed with, or the one Dask gave up with (its worker died, KilledWorker,
    or its outcome could not be moved): a sweep reports a failed task on its line and goes on with the others."""
    try:
        return future.result(raise_on_failure=False)
    except Exception as err:
        return err


def _follow(waiting: list[tuple[Any, float, dict[str, Any]]], submit: Callable, m0s: dict[str, Any], skipped: int,
            on_progress: Callable[[SweepProgress], None] | None) -> dict[str, str]:
    """Submit each waiting timeline once its shared models are done and wait for every timeline, reporting done /
    running / left; returns study -> error for the ones that failed (a failed M0 fails the timelines that need it)."""
    client = get_run_context().task_runner.client
    total = len(waiting)
    pending, failures = {}, {}
    while True:
        still_waiting = []
        for timeline, cost, needs in waiting:
            if not all(need.wrapped_future.done() for need in needs.values()):
                still_waiting.append((timeline, cost, needs))
                continue
            models = {name: _outcome(need) for name, need in needs.items()}
            broken = next((m for m in models.values() if isinstance(m, BaseException)), None)
            if broken is not None:
                failures[timeline.study] = f"its shared model failed: {type(broken).__name__}: {broken}".splitlines()[0]
            else:
                pending[timeline.study] = submit(timeline, cost, models)
        waiting = still_waiting
        for study, future in list(pending.items()):
            if future.wrapped_future.done():
                outcome = _outcome(future)
                if isinstance(outcome, BaseException):
                    failures[study] = f"{type(outcome).__name__}: {outcome}".splitlines()[0]
                del pending[study]
        if on_progress is not None:
            processing = {key for keys in client.processing().values() for key in keys}
            running = sum(f.wrapped_future.key in processing for f in pending.values())
            m0_done = sum(f.wrapped_future.done() for f in m0s.values())
            on_progress(SweepProgress(total - len(waiting) - len(pending) - len(failures) + skipped, running,
                                      len(pending) + len(waiting), len(failures), skipped, m0_done, len(m0s)))
        if not pending and not waiting:
            return failures
        watched = {f.wrapped_future for f in pending.values()}  # a set: many timelines wait for one M0
        watched |= {need.wrapped_future for *_, needs in waiting for need in needs.values() if not need.wrapped_future.done()}
        try:  # wake as soon as anything finishes, and at least twice a second for the live view
            with client.as_current():
                dask_wait(list(watched), timeout=0.5, return_when="FIRST_COMPLETED")
        except TimeoutError:
            pass
