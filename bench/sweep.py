"""The same timelines three ways: as one sweep (Dask workers, shared M0s), as the same pipeline one cell after another
in one warm process, and as `permanence simulate` commands one after another (what a user did before sweeps).

    python bench/sweep.py [--sweep bench/sweep.yaml] [--workers 2]

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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", default=str(ROOT / "bench" / "sweep.yaml"))
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
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

    sweep = load_sweep(args.sweep)
    cells = [t for t in sweep.timelines]
    print(f"# {len(cells)} timelines, {len({m0_key(t.config) for t in cells})} distinct M0s, {args.workers} workers; "
          f"cells from {args.sweep}", flush=True)
    stores = {way: workdir / way for way in ("sweep", "sequential", "cli")}
    for store in stores.values():
        open_client(tracking_uri(store / "mlruns"))  # create each database before any clock starts

    with shared_api(), local_flow_settings():  # as `permanence sweep` / `simulate` run their flows
        t0 = time.perf_counter()
        summary = sweep_flow.policy_sweep.with_options(task_runner=sweep_flow.task_runner(args.workers, None))(
            sweep, store_dir=stores["sweep"] / "mlruns", results_dir=stores["sweep"] / "results")
        swept = time.perf_counter() - t0
        assert not summary["failures"], summary["failures"]
        print(f"sweep ({args.workers} workers, shared M0s): {swept:.1f} s", flush=True)

        t0 = time.perf_counter()
        for timeline in cells:
            retrain.retraining_pipeline(timeline.config, results_dir=stores["sequential"] / "results",
                                        store_dir=stores["sequential"] / "mlruns")
        sequential = time.perf_counter() - t0
        print(f"same pipeline, one cell after another in this process: {sequential:.1f} s", flush=True)

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
    print(f"sweep_speedup={sequential / swept:.3f}")


if __name__ == "__main__":
    main()
