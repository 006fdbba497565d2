"""Sweeps on local Dask clusters and simulates side by side: 4 simulates at once on a fresh store, a study already
being run, the local cluster's worker settings, the start order and the shared probe baseline on one worker, and an
address that does not answer."""

import csv
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sweeping import BIN, CELL, ROOT, VERSIONS, _client, _env, _free_port, _sweep, prefect_server  # noqa: F401 (autouse)

pytestmark = pytest.mark.pipeline


def test_unreachable_address_fails_fast_in_one_line(tmp_path):
    started = time.time()
    done = subprocess.run(_sweep(tmp_path, "--address", f"tcp://127.0.0.1:{_free_port()}"), cwd=tmp_path,
                          env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert time.time() - started < 30
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "no Dask scheduler answered" in lines[0], done.stderr
    assert not (tmp_path / "mlruns").exists()


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
        seen = client.run(lambda dask_worker: (__import__("dask").config.get("distributed.worker.profile.enabled"),
                                               os.environ.get("MALLOC_TRIM_THRESHOLD_"),
                                               "permanence.adapters.sweep_tasks" in __import__("sys").modules,
                                               dask_worker.periodic_callbacks["tick"].callback_time,
                                               dask_worker.periodic_callbacks["memory_monitor"].callback_time))
        stealing = client.run_on_scheduler(lambda dask_scheduler: "stealing" in dask_scheduler.extensions)
    print(json.dumps([list(seen.values()), stealing]))
"""


def test_the_local_clusters_workers_run_without_dasks_profiler_and_malloc_trim_with_the_tasks_imported(tmp_path):
    """... and with Dask's housekeeping timers slowed (event-loop tick, memory monitor: 1 s instead of 20 / 100 ms),
    work stealing off."""
    script = tmp_path / "workers.py"
    script.write_text(LOCAL_WORKERS)
    env = {k: v for k, v in _env(tmp_path).items() if k != "MALLOC_TRIM_THRESHOLD_"}  # Dask's nanny would add it
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [[[False, None, True, 1000, 1000]], False]


@pytest.fixture(scope="module")
def one_worker_sweep(tmp_path_factory):
    """One seed of static, finetune and ft_sam with the BEC and re-tuning probes, on a local cluster of one worker (so
    the start order is the submission order); returns its runs, the MLflow client and its folder. One sweep for the
    tests below, since each local cluster starts a worker that imports torch, Prefect and MLflow."""
    tmp = tmp_path_factory.mktemp("one-worker")
    path = tmp / "probed.yaml"
    probes = ["eval.bec=true", "eval.probe_images=50", "eval.retune=true", "eval.retune_epochs=1"]
    path.write_text(f"name: probed\nconfig: {ROOT / 'params.yaml'}\n"
                    f"base: {json.dumps(CELL + probes)}\n"
                    "grid:\n  update.policy: [static, finetune, ft_sam]\nseeds: 1\ncontrol: false\n")
    done = subprocess.run([str(BIN / "permanence"), "sweep", str(path), "--workers", "1", "--results",
                           str(tmp / "results"), "--store", str(tmp / "mlruns"), "--no-progress"],
                          cwd=tmp, env=_env(tmp), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    client = _client(tmp)
    return client.search_runs([client.get_experiment_by_name("probed").experiment_id]), client, tmp


def test_timelines_start_costliest_first(one_worker_sweep):
    """On one local worker the start order is the submission order: ft_sam (cost 2.3), finetune (1), static (0)."""
    runs, _, _ = one_worker_sweep
    timelines = [r for r in runs if r.data.tags.get("permanence.role") == "timeline"]
    started = [r.data.tags["study"] for r in sorted(timelines, key=lambda r: r.info.start_time)]
    assert started == ["probed-ft_sam-s0", "probed-finetune-s0", "probed-static-s0"], started


def test_a_sweep_with_probes_shares_the_never_poisoned_baseline(one_worker_sweep):
    """The dormancy probes' baseline is a shared model too, and so is its side of the paired probes (re-tuning here):
    computed once, at every probed version, for every timeline; each timeline is submitted once all three exist."""
    runs, client, tmp = one_worker_sweep
    roles = sorted(r.data.tags.get("permanence.role", "") for r in runs if r.info.status == "FINISHED")
    # M0 and its clean baseline, once each; the baseline's re-tuning once; version 0 (M0 probed) once
    assert roles == ["m0", "m0", "probe-baseline", "sweep", "timeline", "timeline", "timeline", "version0"], roles
    shared = next(r for r in runs if r.data.tags.get("permanence.role") == "probe-baseline")
    p_asr_clean = {m.step: m.value for m in client.get_metric_history(shared.info.run_id, "p_asr_clean")}
    assert sorted(p_asr_clean) == list(range(VERSIONS)) and set(shared.data.metrics) == {"p_asr_clean", "seconds"}
    for run in runs:
        if run.data.tags.get("permanence.role") == "timeline":  # loaded the shared baseline, did not train its own
            assert "baseline" not in {a.path for a in client.list_artifacts(run.info.run_id)}
            assert run.info.start_time >= shared.info.end_time
            logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "p_asr_clean")}
            assert logged == p_asr_clean
    rows = list(csv.DictReader((tmp / "results" / "probed" / "cells.csv").open()))
    assert len(rows) == 3 and all(math.isfinite(float(r["bec_final"])) for r in rows), rows
    assert all(0 <= float(r["p_asr_final"]) <= 1 for r in rows), rows


def test_a_timeline_given_the_shared_baseline_side_logs_what_simulate_computes_itself(one_worker_sweep):
    """`permanence simulate` of one of the sweep's cells (its torch on one thread, as in a worker) computes the
    baseline's re-tuning itself, beside its own: the same numbers as the sweep's timeline given the shared ones."""
    runs, client, tmp = one_worker_sweep
    timeline = next(r for r in runs if r.data.tags.get("study") == "probed-finetune-s0")
    sets = [x for a in [*CELL, "eval.bec=true", "eval.probe_images=50", "eval.retune=true", "eval.retune_epochs=1",
                        "update.policy=finetune", "runtime.threads=1", "study=alone"] for x in ("--set", a)]
    done = subprocess.run([str(BIN / "permanence"), "simulate", "--config", str(ROOT / "params.yaml"), *sets, "--no-progress",
                           "--results", str(tmp / "alone"), "--store", str(tmp / "alone-mlruns")],
                          cwd=tmp, env=_env(tmp), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    alone = list(csv.DictReader((tmp / "alone" / "alone" / "timeline.csv").open()))
    swept = list(csv.DictReader((tmp / "results" / "probed" / "timelines" / "probed-finetune-s0" / "timeline.csv").open()))
    for field in ("p_asr", "p_asr_clean", "bec", "asr", "clean_acc"):
        assert [r[field] for r in alone] == [r[field] for r in swept], field
    assert timeline.info.status == "FINISHED"
