"""bench/reproduce_paper.py: one job per M0, and every timeline of a job starts from that M0."""

import argparse
import importlib.util
from pathlib import Path

import pytest

from conftest import TINY

BENCH = Path(__file__).resolve().parents[1] / "bench" / "reproduce_paper.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("reproduce_paper", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_jobs_share_m0_by_seed_and_poisoned_d0(bench):
    args = argparse.Namespace(attacks="badnets,wanet", injections="D0,D1", policies="finetune,stlr,static")
    jobs = bench.jobs_for(args, base=[], seeds=range(2))
    assert len(jobs) == 2 * (2 + 1), "per seed: one poisoned M0 per attack, one clean M0 for every D1 row"
    for job in jobs:
        injections = {injection for _, injection, _ in job["rows"]}
        attacks = {attack for _, _, attack in job["rows"]}
        assert len(injections) == 1
        assert len(attacks) == (1 if injections == {"D0"} else 2)
        assert len(job["rows"]) == 3 * len(attacks)
    assert sorted(len(job["rows"]) for job in jobs) == [3, 3, 3, 3, 6, 6]
    assert len(jobs[0]["rows"]) == 6, "longest jobs first"


@pytest.mark.parametrize("injection", ["D0", "D1"])
def test_a_job_starts_every_policy_from_one_m0(bench, injection):
    base = ["data.name=digits", "runtime.device=cpu", *TINY, "update.updates=2"]
    rows = [("finetune", injection, "badnets"), ("static", injection, "badnets")]
    results = bench.run_job({"seed": 0, "rows": rows, "base": base})
    finetune, static = results
    assert finetune["records"][0] == static["records"][0]
    assert finetune["records"][0]["poisoned"] is (injection == "D0")
    assert [r["poisoned"] for r in finetune["records"]] == [injection == "D0", injection == "D1", False]
    if injection == "D0":
        assert finetune["asr_injected"] > 0.5, "the shared M0 learned the backdoor"
