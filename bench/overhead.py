"""What the pipeline costs on top of the core: the same timeline through `simulate()` alone and through
the full Prefect flow (MLflow tracking and registry, Evidently drift checks, outputs), and where the difference goes.

    python bench/overhead.py                              # the embedded digits
    python bench/overhead.py --data-root ../shared/data   # the MNIST subset

Run it in the project's environment (`make install`).

One-time start-up costs are measured and printed but not counted: importing the tools, starting Prefect's
embedded server, creating a new MLflow database. Everything after that is counted, data loading included
on both sides. The flow's pieces are timed from outside (each Prefect task as called, and the function inside it,
each MLflow client call, the MLflow Model writing, Evidently's report, the output files) and printed per model
version, with the CPU time this process and its children (Prefect's server) spent during the flow beside what they
spent during the core alone: on a 2-core machine the server's CPU is taken from the core's torch threads.
The flow runs `--repeats` times (default 3), each between two runs of the core. The last line is
`overhead_ratio=<median full / median core>`.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import os
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

SPENT: dict[str, float] = defaultdict(float)
THREAD_CPU: dict[str, float] = defaultdict(float)  # the calling thread's CPU (not torch's worker threads)
CALLS: dict[str, int] = defaultdict(int)


def timed(label: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        started, cpu = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[label] += time.perf_counter() - started
            THREAD_CPU[label] += time.thread_time() - cpu
            CALLS[label] += 1

    return wrapper


def instrument(flows) -> None:
    """Wrap the pieces of the flow so that their time is counted (the code under test is unchanged)."""
    from mlflow import MlflowClient

    from permanence.adapters import drift_check, mlflow_store, pipeline

    for name in ("train_initial_model", "load_registered", "scheduled_update", "register", "baseline_model",
                 "start_from_shared"):
        task = getattr(pipeline, name)
        # register's function also runs inside scheduled_update (one task per update): counted on its own line
        inside = "registry write (register, as a task or inside scheduled_update)" if name == "register" else \
            f"task {name}: inside"
        task.fn = timed(inside, task.fn)
        setattr(pipeline, name, timed(f"task {name}: as called", task))
    for name in ("ingest_and_check_drift", "keep_production"):  # the steps inside scheduled_update
        setattr(pipeline, name, timed(f"{name} (inside scheduled_update)", getattr(pipeline, name)))
    for name in ("log_batch", "log_artifacts", "log_artifact", "create_model_version", "set_registered_model_alias",
                 "get_run", "search_runs", "search_model_versions", "create_run", "set_terminated", "update_run",
                 "get_metric_history", "get_registered_model", "create_registered_model", "set_tag"):
        setattr(MlflowClient, name, timed(f"mlflow {name}", getattr(MlflowClient, name)))
    mlflow_store.save_mlflow_model = timed("MLflow Model files (pyfunc.save_model)", mlflow_store.save_mlflow_model)
    pipeline.write_outputs = timed("timeline files and plot", pipeline.write_outputs)
    flows.run_timeline = timed("run_timeline (all but the flow's own start and end)", flows.run_timeline)
    pipeline.StudyStore.open_run = timed("StudyStore.open_run", pipeline.StudyStore.open_run)
    pipeline.StudyStore.completed_versions = timed("StudyStore.completed_versions", pipeline.StudyStore.completed_versions)
    flows.StudyStore = timed("StudyStore() (client, lock, experiment)", flows.StudyStore)
    drift_check.Report.run = timed("Evidently report", drift_check.Report.run)
    classifier = drift_check.domain_classifier  # a factory: time the classifier it makes, as it is called
    drift_check.domain_classifier = lambda **kw: timed("drift check: Evidently domain classifier", classifier(**kw))
    drift_check.drifted_share = timed("drift check: per-column stattests", drift_check.drifted_share)
    drift_check.image_statistics = timed("drift check: image statistics", drift_check.image_statistics)
    pipeline.embed = timed("drift check: embeddings (production model)", pipeline.embed)


def cpu_used(fn):
    """`fn()` and the CPU seconds it took this process (all threads) and its children (Prefect's server), by name."""
    import psutil

    def now() -> dict[str, float]:
        me = psutil.Process()
        return {"CPU: this process, all threads": sum(me.cpu_times()[:2]),
                "CPU: Prefect server and other child processes":
                    sum(sum(child.cpu_times()[:2]) for child in me.children(recursive=True))}

    before = now()
    result = fn()
    return result, {label: seconds - before[label] for label, seconds in now().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", help="folder holding MNIST/raw; without it the embedded digits")
    parser.add_argument("--set", action="append", default=[], help="extra key=value overrides")
    parser.add_argument("--repeats", type=int, default=3, help="flow runs, each between two runs of the core")
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
    from permanence.adapters.prefect_api import local_flow_settings

    imported = time.perf_counter()

    @flow
    def start_server() -> None:
        return None

    start_server()
    served = time.perf_counter()

    data = ["data.name=digits"]
    if args.data_root:
        data = ["data.name=mnist", f"data.root={args.data_root}", "data.limit=6000", "data.test_limit=1000"]
    overrides = data + ["train.epochs=8", "update.updates=8", "update.epochs=5", "runtime.threads=2", *args.set]
    config = build_config({}, ["study=overhead", *overrides])
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

    # The flow runs `--repeats` times, each between two runs of the core, so that neither side is favoured by
    # warm-up (file cache, first kernels) or by a quiet or busy moment of the machine; the ratio divides the
    # medians. Each flow run is a new study (a re-run of one study would resume it and skip the work).
    (seconds, timeline), cpu_core = cpu_used(lambda: core_alone("first"))
    cores, fulls, cpu_flow, versions, core_in_flow = [seconds], [], defaultdict(float), 0, 0.0
    instrument(flows)
    for repeat in range(args.repeats):
        study = build_config({}, [f"study=overhead-{repeat}", *overrides])
        t0 = time.perf_counter()
        with local_flow_settings():  # as `permanence simulate` runs it
            summary, cpu = cpu_used(lambda: flows.retraining_pipeline(study, results_dir=workdir / "results",
                                                                      store_dir=workdir / "mlruns"))
        fulls.append(time.perf_counter() - t0)
        same = summary["clean_acc_final"] == timeline.records[-1].clean_acc and summary["asr_final"] == timeline.records[-1].asr
        print(f"full flow {repeat + 1}: {fulls[-1]:.1f} s (same final metrics as the core: {same})", flush=True)
        cores.append(core_alone(f"after flow {repeat + 1}")[0])
        for label, used in cpu.items():
            cpu_flow[label] += used
        versions += summary["versions"]
        core_in_flow += summary["train_seconds"] + summary["eval_seconds"]
    core, full = statistics.median(cores), statistics.median(fulls)
    per_run = versions / args.repeats
    print(f"# pairs: {', '.join(f'{f / ((a + b) / 2):.3f}' for f, a, b in zip(fulls, cores, cores[1:]))} "
          f"(each flow over the mean of the core runs beside it)")
    print(f"# per model version ({versions} versions in {args.repeats} flow runs): flow {1000 * sum(fulls) / versions:.0f} ms, "
          f"core inside the flow (train + eval) {1000 * core_in_flow / versions:.0f} ms, "
          f"core alone {1000 * sum(cores) / len(cores) / per_run:.0f} ms")
    print(f"{'component':52} {'ms/version':>10} {'calls':>6} {'thread CPU ms/version':>22}")
    for label in sorted(SPENT, key=lambda k: -SPENT[k]):
        print(f"{label:52} {1000 * SPENT[label] / versions:10.1f} {CALLS[label]:6d} "
              f"{1000 * THREAD_CPU[label] / versions:22.1f}")
    outer = sum(v for k, v in SPENT.items() if k.endswith("as called"))
    inner = sum(v for k, v in SPENT.items() if k.endswith("inside")) + SPENT["task register: as called"]
    print(f"{'Prefect task machinery (as called - inside)':52} {1000 * (outer - inner) / versions:10.1f}")
    print(f"{'outside the tasks (run open/close, resume, files)':52} {1000 * (sum(fulls) - outer) / versions:10.1f}")
    inside_flow = SPENT["run_timeline (all but the flow's own start and end)"] + SPENT["StudyStore() (client, lock, experiment)"]
    print(f"{'the Prefect flow run itself (start, parameters, end)':52} {1000 * (sum(fulls) - inside_flow) / versions:10.1f}")
    # CPU time, not wall time: what competes with the core's two torch threads on the same cores
    for label, seconds in cpu_flow.items():
        print(f"{label:52} {1000 * seconds / versions:10.1f}   (core alone: {1000 * cpu_core[label] / per_run:.1f})")
    print(f"overhead_ratio={full / core:.3f}")


if __name__ == "__main__":
    main()
