"""Many writers on one fresh MLflow store, two ways: the default sqlite file under the project's creation lock, and
one `mlflow server` in front of the same kind of file as the single writer.

    python bench/store_concurrency.py [--studies 4]

Each way starts N `permanence simulate` (N different tiny studies) at the same moment on an empty store and prints
the wall time until all finished and how many runs and versions landed. Run it in the project's environment.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = ["update.updates=3", "train.epochs=4", "update.epochs=1", "data.limit=600", "data.test_limit=200",
        "tracking.drift_check=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_all(workdir: Path, n: int, env: dict[str, str]) -> tuple[float, int]:
    started = time.perf_counter()
    procs = []
    for i in range(n):
        sets = [x for a in [*TINY, f"study=writer{i}"] for x in ("--set", a)]
        procs.append(subprocess.Popen([str(BIN / "permanence"), "simulate", "--config", str(ROOT / "params.yaml"), *sets,
                                       "--no-progress", "--store", str(workdir / "mlruns"), "--results",
                                       str(workdir / "results")], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
    failed = sum(p.wait() != 0 for p in procs)
    return time.perf_counter() - started, failed


def count(uri: str, n: int) -> tuple[int, int]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    versions = sum(len(client.search_model_versions(f"name='writer{i}'")) for i in range(n))
    runs = sum(len(client.search_runs([e.experiment_id], "attributes.status = 'FINISHED'"))
               for e in client.search_experiments() if e.name.startswith("writer"))
    return runs, versions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=4)
    args = parser.parse_args()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    expected = args.studies * 4  # versions: M0 + 3 updates each

    with tempfile.TemporaryDirectory(prefix="permanence-store-bench-") as tmp:
        local = Path(tmp) / "lock"
        seconds, failed = run_all(local, args.studies, {**base, "PREFECT_HOME": str(local / "prefect")})
        runs, versions = count(f"sqlite:///{local / 'mlruns' / 'mlflow.db'}", args.studies)
        print(f"sqlite + creation lock: {seconds:.1f} s, {failed} failed, {runs} runs, {versions}/{expected} versions")

        served = Path(tmp) / "server"
        served.mkdir()
        port = _free_port()
        server = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{served / 'mlflow.db'}",
                                   "--artifacts-destination", str(served / "artifacts"), "--host", "127.0.0.1",
                                   "--port", str(port), "--workers", "1"], env=base, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            import httpx

            t0 = time.perf_counter()
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            print(f"# mlflow server up in {time.perf_counter() - t0:.1f} s (not counted)")
            uri = f"http://127.0.0.1:{port}"
            seconds, failed = run_all(served, args.studies, {**base, "MLFLOW_TRACKING_URI": uri,
                                                             "PREFECT_HOME": str(served / "prefect")})
            runs, versions = count(uri, args.studies)
            print(f"one mlflow server:      {seconds:.1f} s, {failed} failed, {runs} runs, {versions}/{expected} versions")
        finally:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)
            shutil.rmtree(served, ignore_errors=True)


if __name__ == "__main__":
    main()
