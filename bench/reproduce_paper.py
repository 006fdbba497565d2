"""Reproduce the paper's MNIST study: policy x injection x attack, mean and std over seeds.

    python bench/reproduce_paper.py --scale small --data-root ../shared/data            # CPU, < 30 min
    python bench/reproduce_paper.py --scale paper --data-root ../shared/data --seeds 1  # GPU

Run it in the project's environment (`make install`), or with PYTHONPATH=src on a machine that has
only torch, torchvision, pydantic and pyyaml (the core needs nothing else).

M0 depends only on (seed, attack, whether D0 is poisoned), not on the policy, so each M0 is trained once
and every policy starts from a copy of it. Each row's `seconds` counts its M0 training plus its updates.
The work splits into one job per M0; on the CPU `--workers` runs jobs in parallel processes of one
thread each (small convolutions scale poorly across threads, so this is faster than one process with
all of them).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import time
from pathlib import Path

from permanence import Simulation, build_config
from permanence.simulation import resolve_device, state_on_cpu
from permanence.timeline import Timeline

SCALES = {
    # CPU: a 4,000-image subset of MNIST, the small CNN, 15 updates x 2 epochs (batch 64), 3 seeds.
    # Label smoothing 0.1 in the initial training, as at paper scale (FFCV's recipe).
    "small": dict(
        seeds=3,
        overrides=[
            "data.limit=4000", "data.test_limit=1000", "model.name=small_cnn", "train.epochs=8", "train.lr=0.25",
            "train.label_smoothing=0.1", "update.updates=15", "update.epochs=2", "update.batch_size=64",
            "drift.delta=3",
        ],
    ),
    # the paper: MNIST halves of 30,000, ResNet-9, 40 initial epochs, 15 updates x 5 epochs, 3 degrees per update
    "paper": dict(
        seeds=5,
        overrides=[
            "model.name=resnet9", "train.epochs=40", "train.lr=0.2", "train.batch_size=512",
            "train.label_smoothing=0.1", "update.updates=15", "update.epochs=5", "update.batch_size=512",
            "drift.delta=3", "eval.batch_size=4096",
        ],
    ),
}
INJECTIONS = {"D0": ["poisoning.inject=d0"], "D1": ["poisoning.inject=update", "poisoning.first=1"]}


def row_config(base: list[str], policy: str, injection: str, attack: str, seed: int):
    return build_config({}, base + INJECTIONS[injection] + [f"update.policy={policy}", f"attack.name={attack}", f"seed={seed}"])


def run_job(job: dict) -> list[dict]:
    """Train one M0, then every timeline that starts from it; returns one result per (policy, injection, attack)."""
    results, splits, m0 = [], None, None
    for policy, injection, attack in job["rows"]:
        config = row_config(job["base"], policy, injection, attack, job["seed"])
        sim = Simulation(config, splits)
        splits = sim.splits
        if m0 is None:
            started = time.perf_counter()
            model, record = sim.step(None, 0)
            m0 = (state_on_cpu(model), record, time.perf_counter() - started)
        state, record, m0_seconds = m0
        started = time.perf_counter()
        model = sim.load_model(state)
        timeline = Timeline(records=[record], alpha=config.eval.alpha)
        for version in range(1, sim.versions):
            model, record = sim.step(model, version)
            timeline.records.append(record)
        results.append({
            "policy": policy, "injection": injection, "attack": attack, "seed": job["seed"],
            "seconds": m0_seconds + time.perf_counter() - started, "survivability": timeline.survivability(),
            "asr_injected": timeline.asr_injected, "records": timeline.rows(),
        })
    return results


def jobs_for(args, base: list[str], seeds: range) -> list[dict]:
    """One job per M0: (seed, attack) when D0 is poisoned, (seed, clean) shared by every D1 row."""
    groups: dict[tuple, list] = {}
    for seed in seeds:
        for attack in args.attacks.split(","):
            for injection in args.injections.split(","):
                for policy in args.policies.split(","):
                    key = (seed, attack if injection == "D0" else "clean")
                    groups.setdefault(key, []).append((policy, injection, attack))
    jobs = [{"seed": seed, "rows": rows, "base": base} for (seed, _), rows in groups.items()]
    return sorted(jobs, key=lambda job: -len(job["rows"]))  # longest first, for a balanced pool


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=SCALES, default="small")
    parser.add_argument("--data-root", default="../shared/data", help="folder holding MNIST/raw")
    parser.add_argument("--seeds", type=int, help="number of seeds (default: 3 small, 5 paper)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run from here (to split a study across calls)")
    parser.add_argument("--policies", default="finetune,stlr,static")
    parser.add_argument("--injections", default="D0,D1")
    parser.add_argument("--attacks", default="badnets,blended,wanet")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, help="parallel processes, one thread each (default: the CPU count on "
                        "the CPU, 1 on CUDA)")
    parser.add_argument("--set", action="append", default=[], help="extra key=value overrides")
    parser.add_argument("--out", help="write the rows as a JSON list to this file")
    parser.add_argument("--timelines", help="write every timeline's per-version records (JSON) to this file")
    args = parser.parse_args()

    scale = SCALES[args.scale]
    seeds = range(args.first_seed, args.first_seed + (args.seeds or scale["seeds"]))
    device = resolve_device(args.device)
    workers = args.workers or (1 if device.type == "cuda" else len(os.sched_getaffinity(0)))
    threads = ["runtime.threads=1"] if workers > 1 else []
    base = ["data.name=mnist", f"data.root={args.data_root}", f"runtime.device={args.device}", "study=reproduce_paper",
            *scale["overrides"], *threads, *args.set]
    row_config(base, "finetune", "D0", "badnets", seeds[0])  # bad --set values fail here, in one line
    jobs = jobs_for(args, base, seeds)
    print(f"# scale={args.scale} seeds={len(seeds)} device={device} workers={workers} "
          f"overrides: {' '.join(scale['overrides'] + threads + args.set)}", flush=True)

    started = time.perf_counter()
    done: list[dict] = []

    def collect(results: list[dict]) -> None:
        done.extend(results)
        first = results[0]
        m0 = first["attack"] if first["injection"] == "D0" else "clean"
        print(f"# {len(done):>3} timelines done; last job: seed {first['seed']}, M0 {m0}, {len(results)} timelines, "
              f"{time.perf_counter() - started:.0f} s", flush=True)

    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for results in pool.imap_unordered(run_job, jobs):
                collect(results)
    else:
        for job in jobs:
            collect(run_job(job))
    total = time.perf_counter() - started

    header = f"{'policy':9} {'inj':3} {'attack':8} {'surv mean':>9} {'std':>5} {'ASR inj':>8} {'acc final':>9} {'acc M0':>7} {'s/timeline':>10}"
    print(header)
    rows = []
    for attack in args.attacks.split(","):
        for injection in args.injections.split(","):
            for policy in args.policies.split(","):
                runs = sorted((r for r in done if (r["policy"], r["injection"], r["attack"]) == (policy, injection, attack)),
                              key=lambda r: r["seed"])
                s_mean, s_std = mean_std([r["survivability"] for r in runs])
                row = {
                    "policy": policy, "injection": injection, "attack": attack,
                    "survivability_mean": s_mean, "survivability_std": s_std,
                    "asr_injected_mean": statistics.fmean(r["asr_injected"] for r in runs),
                    "clean_acc_final_mean": statistics.fmean(r["records"][-1]["clean_acc"] for r in runs),
                    "clean_acc_m0_mean": statistics.fmean(r["records"][0]["clean_acc"] for r in runs),
                    "seconds_per_timeline_mean": statistics.fmean(r["seconds"] for r in runs),
                    "asr_mean_by_version": [statistics.fmean(col) for col in zip(*([v["asr"] for v in r["records"]] for r in runs))],
                    "seeds": len(runs),
                }
                rows.append(row)
                print(f"{policy:9} {injection:3} {attack:8} {s_mean:9.2f} {s_std:5.2f} {row['asr_injected_mean']:8.3f} "
                      f"{row['clean_acc_final_mean']:9.3f} {row['clean_acc_m0_mean']:7.3f} {row['seconds_per_timeline_mean']:10.1f}")
    print("# mean ASR by version (M0, update 1, ...)")
    for row in rows:
        curve = " ".join(f"{a:.2f}" for a in row["asr_mean_by_version"])
        print(f"{row['policy']:9} {row['injection']:3} {row['attack']:8} {curve}")
    print(f"# total {total:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    if args.timelines:
        Path(args.timelines).write_text(json.dumps(sorted(done, key=lambda r: (r["attack"], r["injection"], r["policy"], r["seed"]))))


if __name__ == "__main__":
    main()
