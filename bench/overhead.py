"""What the pipeline costs on top of the core: the same timeline through `simulate()` alone and through
the full Prefect flow (MLflow tracking and registry, Evidently drift checks, outputs).

    python bench/overhead.py --data-root ../shared/data     # MNIST subset (digits if no root is given)

Run it in the project's environment (`make install`).

One-time start-up costs are measured and printed but not counted: importing the tools, starting Prefect's
embedded server, creating a new MLflow database. Everything after that is counted, data loading included
on both sides. The last line is `overhead_ratio=<full/core>`.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", help="folder holding MNIST/raw; without it the embedded digits")
    parser.add_argument("--set", action="append", default=[], help="extra key=value overrides")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="permanence-overhead-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)  # registered before prefect's, so it runs after
    os.environ["PREFECT_HOME"] = str(workdir / "prefect")
    os.environ.pop("MLFLOW_TRACKING_URI", None)

    started = time.perf_counter()
    from permanence.adapters.flow_loader import load_retrain_flow

    flows = load_retrain_flow()  # first: it sets Prefect's home and log level before prefect is imported
    from prefect import flow

    from permanence import build_config, simulate
    from permanence.adapters.mlflow_store import StudyStore

    imported = time.perf_counter()

    @flow
    def start_server() -> None:
        return None

    start_server()
    served = time.perf_counter()

    data = ["data.name=digits"]
    if args.data_root:
        data = ["data.name=mnist", f"data.root={args.data_root}", "data.limit=6000", "data.test_limit=1000"]
    config = build_config({}, data + ["study=overhead", "train.epochs=8", "update.updates=8", "update.epochs=5",
                                      "runtime.threads=2", *args.set])
    StudyStore(build_config({}, ["study=warmup"]), workdir / "mlruns")  # creates the database once
    created = time.perf_counter()
    print(f"# start-up, not counted: imports {imported - started:.1f} s, Prefect server {served - imported:.1f} s, "
          f"new MLflow database {created - served:.1f} s")
    print(f"# timeline: {' '.join(data)}, {config.update.updates} updates x {config.update.epochs} epochs, "
          f"model {config.model.name}, drift checks {'on' if config.tracking.drift_check else 'off'}")

    def core_alone(label: str):
        t0 = time.perf_counter()
        timeline = simulate(config, keep_states=False)
        seconds = time.perf_counter() - t0
        print(f"core alone ({label}): {seconds:.1f} s (final clean_acc {timeline.records[-1].clean_acc:.3f}, "
              f"asr {timeline.records[-1].asr:.3f})", flush=True)
        return seconds, timeline

    # The core runs before and after the flow, so warm-up effects (file cache, first kernels) do not
    # favour whichever side runs second; the ratio divides by the mean of the two.
    before, timeline = core_alone("before the flow")
    t0 = time.perf_counter()
    summary = flows.retraining_pipeline(config, results_dir=workdir / "results", store_dir=workdir / "mlruns")
    full = time.perf_counter() - t0
    same = summary["clean_acc_final"] == timeline.records[-1].clean_acc and summary["asr_final"] == timeline.records[-1].asr
    print(f"full flow: {full:.1f} s (same final metrics as the core: {same})", flush=True)
    after, _ = core_alone("after the flow")
    print(f"overhead_ratio={full / ((before + after) / 2):.3f}")


if __name__ == "__main__":
    main()
