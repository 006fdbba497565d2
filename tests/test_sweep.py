"""Sweeps on an external Dask cluster (a `dask scheduler` and two `dask worker` processes started as users start
them): every timeline in one MLflow store, the comparison re-rendered from MLflow, a failed task reported in one line,
and a sweep killed with SIGKILL resumed with four local workers."""

import csv
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from sweeping import (BIN, CELL, ROOT, TIMELINES, VERSIONS, _cells, _check_store, _client, _env, _free_port, _sweep,
                      prefect_server)  # noqa: F401 (the module's autouse Prefect server)

pytestmark = pytest.mark.pipeline


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


