"""The same timelines three ways: as one sweep (Dask workers, shared M0s), as the same pipeline one cell after another
in one warm process, and as `permanence simulate` commands one after another (what a user did before sweeps).

    python bench/sweep.py [--sweep sweeps/policies.yaml] [--workers 2] [--seeds N] [--skip-cli]

By default the cells are those of `permanence sweep sweeps/policies.yaml` (every policy x BadNets and Blended x 3
seeds, the dormancy probes every 5th version); bench/sweep.yaml is a smaller grid without probes.

Run it in the project's environment (`make install`). One-time costs of this process (imports, the Prefect server)
are paid before any clock starts; the sweep's own costs (its Dask cluster, the workers' imports) are counted. Each
way writes to its own fresh MLflow store. The last line is `sweep_speedup=<in-process sequential s / sweep s>`.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil  # a dependency of dask.distributed

ROOT = Path(__file__).resolve().parents[1]


class ProcessCPU:
    """CPU seconds of this process and its descendants while it runs, by role (sampled every 0.5 s, so a process that
    ends loses at most its last half second): where a sweep's cores go besides its workers' training."""

    def __init__(self) -> None:
        self._start: dict[int, float] = {}
        self._last: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _role(process: psutil.Process) -> str:
        if process.pid == os.getpid():
            return "flow process (Prefect flow, Dask scheduler, live view)"
        line = " ".join(process.cmdline())
        if "uvicorn" in line or "prefect.server" in line:
            return "Prefect server"
        if "multiprocessing" in line or "dask" in line or "distributed" in line:
            return "Dask workers (and nannies)"
        return "other"

    def _sample(self) -> None:
        me = psutil.Process()
        for process in [me, *me.children(recursive=True)]:
            try:
                with process.oneshot():
                    times = process.cpu_times()
                    self._last[process.pid] = (self._role(process), times.user + times.system)
            except psutil.Error:
                continue

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._sample()

    def __enter__(self) -> "ProcessCPU":
        self._sample()
        self._start = {pid: cpu for pid, (_, cpu) in self._last.items()}
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def by_role(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for pid, (role, cpu) in self._last.items():
            totals[role] = totals.get(role, 0.0) + cpu - self._start.get(pid, 0.0)
        return totals


def print_cpu(way: str, cpu: ProcessCPU, seconds: float) -> None:
    cores = len(os.sched_getaffinity(0))
    for role, used in sorted(cpu.by_role().items(), key=lambda item: -item[1]):
        print(f"  {way} CPU: {role}: {used:.1f} s ({used / (seconds * cores):.0%} of {cores} cores)", flush=True)


def update_seconds(results: Path) -> float:
    """Training + evaluation seconds of every update (versions 1+) of every timeline under `results`, as the core
    timed them: the same work in each way, so their ratio is what torch's threads give one process."""
    from permanence.adapters.outputs import read_timeline_csv

    return sum(float(row["train_seconds"]) + float(row["eval_seconds"])
               for path in results.glob("**/timeline.csv") for row in read_timeline_csv(path) if int(row["update"]) > 0)


def print_sweep_phases(summary: dict, started_at: float, workers: int) -> float:
    """Where the sweep's wall time went, from its MLflow runs' start and end times: start-up until the first shared M0
    was logged, the timelines (their summed seconds against their span), the comparison at the end. Returns the
    timelines' summed seconds."""
    from permanence.adapters.mlflow_store import open_client

    runs = open_client(summary["tracking_uri"]).search_runs([summary["experiment_id"]], max_results=10000)
    by_role = lambda role: [r for r in runs if r.data.tags.get("permanence.role") == role]  # noqa: E731
    m0_logged = min(r.info.end_time for r in by_role("m0")) / 1000 - started_at
    timelines = by_role("timeline")
    first, last = min(r.info.start_time for r in timelines) / 1000, max(r.info.end_time for r in timelines) / 1000
    busy = sum((r.info.end_time - r.info.start_time) / 1000 for r in timelines)
    parent_end = max(r.info.end_time for r in by_role("sweep")) / 1000
    print(f"  sweep phases: first M0 logged after {m0_logged:.1f} s (cluster start, workers' imports, M0 training); "
          f"{len(timelines)} timelines {busy:.1f} worker-s in {last - first:.1f} s ({busy / (workers * (last - first)):.0%} "
          f"of {workers} workers); {parent_end - last:.1f} s after the last one", flush=True)
    seconds = {"m0": lambda m: m.get("train_seconds", 0.0), "probe-baseline": lambda m: m.get("seconds", 0.0),
               "version0": lambda m: m.get("eval_seconds", 0.0) + m.get("probe_seconds", 0.0)}
    shared = [f"{len(by_role(role))} {role} ({sum(spent(r.data.metrics) for r in by_role(role)):.1f} s)"
              for role, spent in seconds.items() if by_role(role)]
    print(f"  shared work, done once for the timelines that need it: {', '.join(shared)}", flush=True)
    return busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", default=str(ROOT / "sweeps" / "policies.yaml"))
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--seeds", type=int, default=None, help="override the sweep file's seeds (a quicker look)")
    parser.add_argument("--skip-cli", action="store_true", help="leave out the slowest way (the CLI commands)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="permanence-sweep-bench-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    os.environ["PREFECT_HOME"] = str(workdir / "prefect")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
    os.chdir(ROOT)

    from permanence.adapters.flow_loader import load_flow

    retrain, sweep_flow = load_flow("retrain"), load_flow("sweep")  # first: they set Prefect's home and log level
    from permanence.adapters.mlflow_store import open_client, tracking_uri
    from permanence.adapters.prefect_api import local_flow_settings, shared_api
    from permanence.sweep import load_sweep, m0_key
    import torch

    sweep = load_sweep(args.sweep, seeds=args.seeds)
    cells = [t for t in sweep.timelines]
    print(f"# {len(cells)} timelines, {len({m0_key(t.config) for t in cells})} distinct M0s, {args.workers} workers; "
          f"cells from {args.sweep}", flush=True)
    stores = {way: workdir / way for way in ("sweep", "sequential", "cli")}
    for store in stores.values():
        open_client(tracking_uri(store / "mlruns"))  # create each database before any clock starts

    with shared_api(), local_flow_settings():  # as `permanence sweep` / `simulate` run their flows
        t0, started_at = time.perf_counter(), time.time()
        with ProcessCPU() as cpu:
            summary = sweep_flow.policy_sweep.with_options(task_runner=sweep_flow.task_runner(args.workers, None))(
                sweep, store_dir=stores["sweep"] / "mlruns", results_dir=stores["sweep"] / "results")
        swept = time.perf_counter() - t0
        assert not summary["failures"], summary["failures"]
        print(f"sweep ({args.workers} workers, shared M0s): {swept:.1f} s", flush=True)
        print_cpu("sweep", cpu, swept)
        timeline_seconds = print_sweep_phases(summary, started_at, args.workers)

        t0 = time.perf_counter()
        with ProcessCPU() as cpu:
            for timeline in cells:
                retrain.retraining_pipeline(timeline.config, results_dir=stores["sequential"] / "results",
                                            store_dir=stores["sequential"] / "mlruns")
        sequential = time.perf_counter() - t0
        print(f"same pipeline, one cell after another in this process: {sequential:.1f} s", flush=True)
        print_cpu("sequential", cpu, sequential)

    if not args.skip_cli:
        t0 = time.perf_counter()
        for timeline in cells:
            sets = [x for o in timeline.overrides for x in ("--set", o)]
            subprocess.run([str(Path(sys.executable).parent / "permanence"), "simulate", "--config", str(sweep.params),
                            *sets, "--no-progress", "--results", str(stores["cli"] / "results"),
                            "--store", str(stores["cli"] / "mlruns")], check=True, stdout=subprocess.DEVNULL)
        cli = time.perf_counter() - t0
        print(f"permanence simulate, one command after another: {cli:.1f} s", flush=True)
        print(f"sweep_speedup_vs_cli={cli / swept:.3f}")
    in_workers, in_process = update_seconds(stores["sweep"] / "results"), update_seconds(stores["sequential"] / "results")
    print(f"updates' core seconds, summed: {in_workers:.1f} in the sweep's workers (1 torch thread each), "
          f"{in_process:.1f} in one process ({torch.get_num_threads()} threads)", flush=True)
    print(f"ceiling of the updates' speedup from {args.workers} workers: {args.workers * in_process / in_workers:.2f}")
    print(f"best speedup with no sweep start-up (the timelines alone, perfectly packed): "
          f"{sequential / (timeline_seconds / args.workers):.2f}")
    print(f"sweep_speedup={sequential / swept:.3f}")


if __name__ == "__main__":
    main()
