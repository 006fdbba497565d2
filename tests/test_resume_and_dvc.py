"""End to end through real processes: a run killed with SIGKILL resumes; DVC drives the pipeline."""

import csv
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY

pytestmark = pytest.mark.pipeline
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
UPDATES = 5
ARGS = [a for a in TINY if not a.startswith("update.updates")] + [f"update.updates={UPDATES}", "update.epochs=2", "study=resume"]


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PREFECT_HOME=str(tmp / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false", DVC_NO_ANALYTICS="1",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", DVC_SITE_CACHE_DIR=str(tmp / "dvc-site"))
    return env


def _command(tmp: Path) -> list[str]:
    sets = [x for a in ARGS for x in ("--set", a)]
    return [str(BIN / "permanence"), "simulate", "--config", str(ROOT / "params.yaml"), *sets, "--no-progress",
            "--results", str(tmp / "results"), "--store", str(tmp / "mlruns")]


def _registered(tmp: Path) -> int:
    db = tmp / "mlruns" / "mlflow.db"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return conn.execute("select count(*) from model_versions where name = 'resume'").fetchone()[0]
    except sqlite3.Error:
        return 0


def _rows(tmp: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((tmp / "results" / "resume" / "timeline.csv").open()))


def test_sigkill_then_rerun_resumes_without_duplicates(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    killed.mkdir(), clean.mkdir()
    uninterrupted = subprocess.Popen(_command(clean), cwd=clean, env=_env(clean), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    victim = subprocess.Popen(_command(killed), cwd=killed, env=_env(killed), start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    while _registered(killed) < 3 and victim.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert victim.poll() is None, "the run finished before it could be killed"
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    done_before = _registered(killed)
    assert 3 <= done_before <= UPDATES, done_before

    rerun = subprocess.run(_command(killed), cwd=killed, env=_env(killed), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert uninterrupted.wait(timeout=600) == 0, uninterrupted.stderr.read()[-2000:]

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{killed / 'mlruns' / 'mlflow.db'}")
    versions = client.search_model_versions("name='resume'")
    assert sorted(int(v.tags["update"]) for v in versions) == list(range(UPDATES + 1)), "one version per model version"
    assert len({v.run_id for v in versions}) == 1, "the re-run resumed the same MLflow run"
    run = client.get_run(versions[0].run_id)
    assert run.info.status == "FINISHED"
    for key in ("clean_acc", "asr", "ra"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(UPDATES + 1)), f"{key}: no lost or doubled steps, got {sorted(steps)}"
    assert client.get_model_version_by_alias("resume", "production").tags["update"] == str(UPDATES)

    resumed, reference = _rows(killed), _rows(clean)
    for a, b in zip(resumed, reference, strict=True):
        assert (a["update"], a["clean_acc"], a["asr"], a["ra"]) == (b["update"], b["clean_acc"], b["asr"], b["ra"])


def test_dvc_repro_and_exp_run(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(ROOT / "flows", repo / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo)
    shutil.copy(ROOT / ".gitignore", repo)
    params = (ROOT / "params.yaml").read_text()
    for old, new in (("study: digits_badnets", "study: dvc_study"), ("  updates: 15", "  updates: 2"),
                     ("  epochs: 12", "  epochs: 6"), ("  epochs: 5", "  epochs: 1")):
        assert old in params
        params = params.replace(old, new)
    (repo / "params.yaml").write_text(params)
    env = _env(tmp_path)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    run = lambda *cmd: subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)  # noqa: E731
    assert run("git", "init", "-q").returncode == 0
    assert run(str(BIN / "dvc"), "init", "-q").returncode == 0
    assert run(*git, "add", "-A").returncode == 0 and run(*git, "commit", "-qm", "init").returncode == 0

    dvc = str(BIN / "dvc")
    names = []
    for policy in ("stlr", "fst"):  # two experiments side by side, each from the same baseline commit
        exp = run(dvc, "exp", "run", "-S", f"update.policy={policy}", "-S", "attack.ratio=0.2", "-n", f"exp-{policy}")
        assert exp.returncode == 0, exp.stdout[-2000:] + exp.stderr[-2000:]
        names.append(f"exp-{policy}")
    rows = list(csv.DictReader((repo / "outputs" / "timeline.csv").open()))
    assert int(rows[0]["n_poisoned"]) == round(0.2 * int(rows[0]["n_train"])), "the experiment ran with the new ratio"
    summary = json.loads((repo / "results" / "dvc_study" / "summary.json").read_text())
    assert summary["versions"] == 3 and summary["policy"] == "fst"
    assert (repo / "dvc.lock").exists()

    shown = run(dvc, "exp", "show", "--json")
    assert shown.returncode == 0, shown.stderr[-2000:]
    experiments = {}

    def collect(node):
        if isinstance(node, dict):
            if node.get("name") in names and node.get("data"):
                experiments[node["name"]] = node["data"]
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(json.loads(shown.stdout))
    assert set(experiments) == set(names), shown.stdout[:3000]
    for name, data in experiments.items():
        metrics = data["metrics"]["outputs/summary.json"]["data"]
        policy = data["params"]["params.yaml"]["data"]["update"]["policy"]
        assert isinstance(metrics["survivability"], int) and f"exp-{policy}" == name

    diff = run(dvc, "plots", "diff", *names, "--json")
    assert diff.returncode == 0, diff.stderr[-2000:]
    plotted = json.loads(diff.stdout)["data"]["outputs/timeline.csv"]
    values = [point for entry in plotted for point in entry["content"]["data"]["values"]]
    for name in names:
        updates = sorted({int(p["update"]) for p in values if p["rev"] == name})
        assert updates == [0, 1, 2], f"{name}'s whole timeline is in the plot data"
