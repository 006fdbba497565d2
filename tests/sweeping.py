"""What the sweep tests share: the tiny sweep, a `prefect server start` per module as a team runs one, the MLflow
checks. Imported by tests/test_sweep.py (an external Dask cluster) and tests/test_sweep_local.py (local clusters and
simulates), which `make test` runs side by side."""

import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

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
    """One `prefect server start` for each module that imports this fixture, as a team runs one: every flow and
    worker reports to it."""
    tmp = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    with serving([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
                 f"{url}/health", tmp):
        PREFECT_API["PREFECT_API_URL"] = url
        yield url
        PREFECT_API.clear()


@contextlib.contextmanager
def serving(command: list[str], health: str, tmp: Path) -> Iterator[None]:
    """Start a server as its users do (its own session, logging to tmp/server.log), wait until `health` answers 200,
    and stop it (SIGTERM to its process group) on the way out."""
    import httpx

    log = (tmp / "server.log").open("w")
    server = subprocess.Popen(command, env=_env(tmp), stdout=log, stderr=log, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and server.poll() is None:
        try:
            if httpx.get(health, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        pytest.fail(f"{Path(command[0]).name} server did not start: " + (tmp / "server.log").read_text()[-2000:])
    try:
        yield
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def _sweep_file(tmp: Path) -> Path:
    path = tmp / "tiny.yaml"
    path.write_text(SWEEP.format(config=ROOT / "params.yaml", base=json.dumps(CELL)))
    return path


def _sweep(tmp: Path, *args: str) -> list[str]:
    return [str(BIN / "permanence"), "sweep", str(_sweep_file(tmp)), "--results", str(tmp / "results"),
            "--store", str(tmp / "mlruns"), "--no-progress", *args]


def _client(tmp: Path, uri: str | None = None):
    """The sweep's store: the local one under `tmp`, or the tracking server at `uri`."""
    from mlflow import MlflowClient

    return MlflowClient(uri or f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}")


def _check_store(tmp: Path, uri: str | None = None) -> None:
    """Every timeline in one store: nested under the parent, one registered model each, no lost step or version."""
    client = _client(tmp, uri)
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
        assert any(first.source == f"{m0.info.artifact_uri}/m0" and first.run_id == m0.info.run_id for m0 in m0s), \
            "M0 registered from the shared artifact, as a version of the run that holds it"
        assert {v.tags["timeline_run_id"] for v in versions} == {run.info.run_id}, "every version names its timeline"
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


