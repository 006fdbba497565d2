"""Sweeps through real processes: a Dask scheduler and workers started as users start them, concurrent writers on
one fresh MLflow store, a sweep killed with SIGKILL and resumed, and the comparison re-rendered from MLflow."""

import csv
import json
import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.pipeline
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CELL = ["update.updates=2", "train.epochs=3", "update.epochs=1", "data.limit=400", "data.test_limit=100",
        "train.batch_size=64", "update.batch_size=64", "tracking.drift_check=false"]
SWEEP = """name: tiny
config: {config}
base: {base}
grid:
  update.policy: [finetune, stlr]
seeds: 2
"""
TIMELINES = 6  # 2 policies x 2 seeds + 2 never-poisoned controls
VERSIONS = 3


PREFECT_API: dict[str, str] = {}  # the module's Prefect server, once started


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "DASK_"))}
    env.update(PREFECT_HOME=str(tmp / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", **PREFECT_API)
    return env


@pytest.fixture(scope="module", autouse=True)
def prefect_server(tmp_path_factory):
    """One `prefect server start` for the module, as a team runs one: every flow and worker reports to it."""
    import httpx

    tmp = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    env = _env(tmp)
    log = (tmp / "server.log").open("w")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                               "--no-ui"], env=env, stdout=log, stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        pytest.fail("prefect server did not start: " + (tmp / "server.log").read_text()[-2000:])
    PREFECT_API["PREFECT_API_URL"] = url
    yield url
    PREFECT_API.clear()
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=60)


def _sweep_file(tmp: Path) -> Path:
    path = tmp / "tiny.yaml"
    path.write_text(SWEEP.format(config=ROOT / "params.yaml", base=json.dumps(CELL)))
    return path


def _sweep(tmp: Path, *args: str, **popen) -> list[str]:
    return [str(BIN / "permanence"), "sweep", str(_sweep_file(tmp)), "--results", str(tmp / "results"),
            "--store", str(tmp / "mlruns"), "--no-progress", *args]


def _client(tmp: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}")


def _check_store(tmp: Path) -> None:
    """Every timeline in one store: nested under the parent, one registered model each, no lost step or version."""
    client = _client(tmp)
    experiment = client.get_experiment_by_name("tiny")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("permanence.role") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id
    assert parents[0].data.params["grid.update.policy"] == "['finetune', 'stlr']"
    timelines = [r for r in runs if r.data.tags.get("permanence.role") == "timeline" and r.info.status == "FINISHED"]
    assert len({r.data.tags["study"] for r in timelines}) == TIMELINES
    assert all(r.data.tags["mlflow.parentRunId"] == parent for r in timelines)
    m0s = [r for r in runs if r.data.tags.get("permanence.role") == "m0" and r.info.status == "FINISHED"]
    assert len(m0s) == 4 and all(r.data.tags["mlflow.parentRunId"] == parent for r in m0s)  # 2 seeds x (poisoned, clean)
    for run in timelines:
        study = run.data.tags["study"]
        versions = client.search_model_versions(f"name='{study}'")
        assert sorted(int(v.tags["update"]) for v in versions) == list(range(VERSIONS)), study
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "asr"))
        assert steps == list(range(VERSIONS)), study
        first = next(v for v in versions if v.tags["update"] == "0")
        assert any(first.source == f"{m0.info.artifact_uri}/m0" for m0 in m0s), "M0 registered from the shared artifact"
    artifacts = {a.path for a in client.list_artifacts(parent)}
    assert {"cells.csv", "comparison.csv", "comparison.md", "heatmap.png", "curves.png", "sweep.json"} <= artifacts


def _cells(tmp: Path) -> list[dict[str, str]]:
    rows = list(csv.DictReader((tmp / "results" / "tiny" / "cells.csv").open()))
    return sorted(({k: v for k, v in r.items() if k not in ("seconds", "mlflow_run_id", "train_seconds", "eval_seconds")}
                   for r in rows), key=lambda r: r["study"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def external_cluster(tmp_path_factory):
    """`dask scheduler` and two `dask worker` processes, as a user starts them (with a fault for the sweep named
    `broken` preloaded: tests/dask_fault_preload.py)."""
    tmp = tmp_path_factory.mktemp("cluster")
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**_env(tmp), "OMP_NUM_THREADS": "1"}
    log = (tmp / "dask.log").open("w")
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], env=env, stdout=log, stderr=log, start_new_session=True)]
    for _ in range(2):
        procs.append(subprocess.Popen([str(BIN / "dask"), "worker", address, "--nthreads", "1", "--no-dashboard",
                                       "--memory-limit", "4GiB", "--preload", "permanence.adapters.sweep_tasks",
                                       "--preload", str(Path(__file__).with_name("dask_fault_preload.py"))],
                                      env=env, cwd=tmp, stdout=log, stderr=log, start_new_session=True))
    from distributed import Client

    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            with Client(address, timeout="5s") as client:
                if len(client.scheduler_info(n_workers=-1)["workers"]) == 2:
                    break
        except OSError:
            pass
        time.sleep(1)
    else:
        pytest.fail("the Dask cluster did not come up: " + (tmp / "dask.log").read_text()[-2000:])
    yield address
    for proc in procs:
        os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def swept(external_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("swept")
    done = subprocess.run(_sweep(tmp, "--address", external_cluster), cwd=tmp, env=_env(tmp), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return tmp, done


def test_sweep_on_an_external_dask_cluster_lands_in_one_store(swept):
    tmp, done = swept
    _check_store(tmp)
    for name in ("cells.csv", "comparison.csv", "comparison.md", "heatmap.png", "curves.png"):
        assert (tmp / "results" / "tiny" / name).stat().st_size > 0
    cells = _cells(tmp)
    assert len(cells) == 4 and {c["update.policy"] for c in cells} == {"finetune", "stlr"}
    assert all(c["asr_floor_final"] != "" for c in cells), "each timeline beside its never-poisoned floor"
    assert "| finetune | 2 |" in done.stdout


def test_compare_rerenders_the_same_comparison_from_mlflow(swept):
    tmp, _ = swept
    before = {n: (tmp / "results" / "tiny" / n).read_bytes() for n in ("cells.csv", "comparison.csv", "comparison.md")}
    rendered = subprocess.run([str(BIN / "permanence"), "compare", "tiny", "--results", str(tmp / "again"),
                               "--store", str(tmp / "mlruns")], cwd=tmp, env=_env(tmp), capture_output=True, text=True,
                              timeout=300)
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    assert "Downloading artifacts" not in rendered.stderr, "MLflow's progress bars are off in the tools' environment"
    for name, data in before.items():
        assert (tmp / "again" / "tiny" / name).read_bytes() == data, name


def test_compare_studies_finds_a_sweep_s_timelines_in_the_sweep_s_experiment(swept):
    tmp, _ = swept
    swept_cells = {r["study"]: r for r in csv.DictReader((tmp / "results" / "tiny" / "cells.csv").open())}
    picked = sorted(study for study in swept_cells if study.endswith("-s0") and "control" not in study)
    assert len(picked) == 2
    rendered = subprocess.run([str(BIN / "permanence"), "compare", *(a for s in picked for a in ("--study", s)),
                               "--name", "two", "--results", str(tmp / "picked"), "--store", str(tmp / "mlruns")],
                              cwd=tmp, env=_env(tmp), capture_output=True, text=True, timeout=300)
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    rows = list(csv.DictReader((tmp / "picked" / "two" / "cells.csv").open()))
    assert sorted((r["study"], r["mlflow_run_id"]) for r in rows) == [(s, swept_cells[s]["mlflow_run_id"]) for s in picked]
    assert {r["update.policy"] for r in rows} == {"finetune", "stlr"}, "compared along the key in which they differ"


def test_a_failed_task_fails_only_its_timelines_each_in_one_line(external_cluster, tmp_path):
    """The workers' preloaded faults: seed 1's M0 fails on every try, so its two timelines are reported failed and
    register nothing; broken-static-s0 fails in its first update with an exception that cannot be pickled, reported
    in one line all the same; broken-finetune-s0 finishes; the sweep exits 1 with no run left RUNNING."""
    path = tmp_path / "broken.yaml"
    path.write_text(f"name: broken\nconfig: {ROOT / 'params.yaml'}\nbase: {json.dumps(CELL)}\n"
                    "grid:\n  update.policy: [finetune, static]\nseeds: 2\ncontrol: false\n")
    done = subprocess.run([str(BIN / "permanence"), "sweep", str(path), "--address", external_cluster, "--results",
                           str(tmp_path / "results"), "--store", str(tmp_path / "mlruns"), "--no-progress"],
                          cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    failed = sorted(line for line in done.stderr.splitlines() if line.startswith("failed:"))
    reason = "its shared model failed: RuntimeError: injected: this worker cannot train seed 1's M0"
    assert failed == [f"failed: broken-finetune-s1: {reason}",
                      "failed: broken-static-s0: TaskFailure: HoldsALock: injected: update 1 holds a lock",
                      f"failed: broken-static-s1: {reason}"], done.stderr
    client = _client(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("broken").experiment_id])
    status = {r.data.tags["study"]: r.info.status for r in runs if r.data.tags.get("permanence.role") == "timeline"}
    assert status == {"broken-finetune-s0": "FINISHED", "broken-static-s0": "FAILED"}
    assert next(r for r in runs if r.data.tags.get("permanence.role") == "sweep").info.status == "FAILED"
    assert {m.name for m in client.search_registered_models()} <= {"broken-finetune-s0", "broken-static-s0"}
    assert "RUNNING" not in {r.info.status for r in runs}


def test_unreachable_address_fails_fast_in_one_line(tmp_path):
    started = time.time()
    done = subprocess.run(_sweep(tmp_path, "--address", f"tcp://127.0.0.1:{_free_port()}"), cwd=tmp_path,
                          env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert time.time() - started < 30
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "no Dask scheduler answered" in lines[0], done.stderr
    assert not (tmp_path / "mlruns").exists()


def _registered(tmp: Path) -> int:
    db = tmp / "mlruns" / "mlflow.db"
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return conn.execute("select count(*) from model_versions").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_sigkill_then_resume_with_four_workers_loses_nothing(swept, tmp_path):
    """Kill a running sweep (2 workers), then finish it with 4 workers writing to one store at once."""
    reference, _ = swept
    killed = tmp_path / "killed"
    killed.mkdir()
    victim = subprocess.Popen(_sweep(killed, "--workers", "2"), cwd=killed, env=_env(killed), start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while _registered(killed) < 2 * VERSIONS + 1 and victim.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert victim.poll() is None, "the sweep finished before it could be killed"
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    client = _client(killed)
    finished_before = {r.data.tags["study"] for r in client.search_runs(
        [client.get_experiment_by_name("tiny").experiment_id], "attributes.status = 'FINISHED'")
        if r.data.tags.get("permanence.role") == "timeline"}
    rerun = subprocess.run(_sweep(killed, "--workers", "4"), cwd=killed, env=_env(killed), capture_output=True,
                           text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"({len(finished_before)} finished before)" in rerun.stdout
    assert TIMELINES - len(finished_before) >= 3, "the re-run had several timelines for its 4 workers"
    _check_store(killed)  # as many versions as an uninterrupted sweep: one per model version, none twice
    for study in finished_before:
        runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], f"tags.study = '{study}'")
        assert len(runs) == 1, f"{study} finished before the kill and did not run again"
    assert _cells(killed) == _cells(reference)


def _simulate(tmp: Path, study: str) -> list[str]:
    sets = [x for a in [*CELL, f"study={study}"] for x in ("--set", a)]
    return [str(BIN / "permanence"), "simulate", "--config", str(ROOT / "params.yaml"), *sets, "--no-progress",
            "--results", str(tmp / "results"), "--store", str(tmp / "mlruns")]


def test_four_simulates_at_once_on_a_fresh_store_all_finish(tmp_path):
    procs = [subprocess.Popen(_simulate(tmp_path, f"study{i}"), cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    for proc in procs:
        assert proc.wait(timeout=900) == 0, proc.stderr.read()[-3000:]
    client = _client(tmp_path)
    for i in range(4):
        versions = client.search_model_versions(f"name='study{i}'")
        assert sorted(int(v.tags["update"]) for v in versions) == list(range(VERSIONS))
        run = client.get_run(versions[0].run_id)
        assert run.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "clean_acc")) == list(range(VERSIONS))


def test_a_study_already_being_run_stops_with_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from permanence.adapters.mlflow_store import StudyLock, tracking_uri
    from permanence.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with StudyLock(tracking_uri(tmp_path / "mlruns"), "busy"):  # another process holds it (an OS file lock)
        result = CliRunner().invoke(app, ["simulate", "--config", str(ROOT / "params.yaml"), "--study", "busy",
                                          *[x for a in CELL for x in ("--set", a)], "--no-progress",
                                          "--store", str(tmp_path / "mlruns"), "--results", str(tmp_path / "results")])
    lines = [line for line in result.stderr.splitlines() if line.strip() and "Prefect" not in line]
    assert result.exit_code == 2, result.output
    assert any("'busy' is being run by another process right now" in line for line in lines), result.stderr
    client = _client(tmp_path)
    experiment = client.get_experiment_by_name("busy")
    assert experiment is None or not client.search_runs([experiment.experiment_id]), "no run was started"


LOCAL_WORKERS = """
from permanence.adapters.flow_loader import load_flow
from distributed import Client, LocalCluster
import json, os

if __name__ == "__main__":
    runner = load_flow("sweep").task_runner(1, None)
    with LocalCluster(**runner.cluster_kwargs) as cluster, Client(cluster) as client:
        seen = client.run(lambda: (__import__("dask").config.get("distributed.worker.profile.enabled"),
                                   os.environ.get("MALLOC_TRIM_THRESHOLD_"),
                                   "permanence.adapters.sweep_tasks" in __import__("sys").modules))
    print(json.dumps(list(seen.values())))
"""


def test_the_local_clusters_workers_run_without_dasks_profiler_and_malloc_trim_with_the_tasks_imported(tmp_path):
    script = tmp_path / "workers.py"
    script.write_text(LOCAL_WORKERS)
    env = {k: v for k, v in _env(tmp_path).items() if k != "MALLOC_TRIM_THRESHOLD_"}  # Dask's nanny would add it
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [[False, None, True]]


def _one_worker_sweep(tmp: Path, name: str, cell: list[str], policies: list[str]):
    """A one-seed sweep of `policies` on a local cluster of one worker; returns its runs and the MLflow client."""
    path = tmp / f"{name}.yaml"
    path.write_text(f"name: {name}\nconfig: {ROOT / 'params.yaml'}\nbase: {json.dumps(cell)}\n"
                    f"grid:\n  update.policy: {json.dumps(policies)}\nseeds: 1\ncontrol: false\n")
    done = subprocess.run([str(BIN / "permanence"), "sweep", str(path), "--workers", "1", "--results",
                           str(tmp / "results"), "--store", str(tmp / "mlruns"), "--no-progress"],
                          cwd=tmp, env=_env(tmp), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    client = _client(tmp)
    return client.search_runs([client.get_experiment_by_name(name).experiment_id]), client


def test_timelines_start_costliest_first(tmp_path):
    """On one local worker the start order is the submission order: ft_sam (cost 2.3), finetune (1), static (0)."""
    runs, _ = _one_worker_sweep(tmp_path, "order", CELL, ["static", "finetune", "ft_sam"])
    timelines = [r for r in runs if r.data.tags.get("permanence.role") == "timeline"]
    started = [r.data.tags["study"] for r in sorted(timelines, key=lambda r: r.info.start_time)]
    assert started == ["order-ft_sam-s0", "order-finetune-s0", "order-static-s0"], started


def test_a_sweep_with_probes_shares_the_never_poisoned_baseline(tmp_path):
    """The dormancy probes' baseline is a shared model too: each timeline is submitted once both it and M0 exist."""
    runs, client = _one_worker_sweep(tmp_path, "probed", CELL + ["eval.bec=true", "eval.probe_images=50"],
                                     ["finetune", "static"])
    roles = sorted(r.data.tags.get("permanence.role", "") for r in runs if r.info.status == "FINISHED")
    assert roles == ["m0", "m0", "sweep", "timeline", "timeline"], roles  # M0 and its clean baseline, once each
    for run in runs:
        if run.data.tags.get("permanence.role") == "timeline":  # loaded the shared baseline, did not train its own
            assert "baseline" not in {a.path for a in client.list_artifacts(run.info.run_id)}
    rows = list(csv.DictReader((tmp_path / "results" / "probed" / "cells.csv").open()))
    assert len(rows) == 2 and all(math.isfinite(float(r["bec_final"])) for r in rows), rows
