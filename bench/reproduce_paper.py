"""Reproduce the paper's MNIST study: policy x injection x attack, mean and std over seeds.

    python bench/reproduce_paper.py --scale small --data-root ../shared/data            # CPU, < 30 min
    python bench/reproduce_paper.py --scale paper --data-root ../shared/data --seeds 1  # GPU

Run it in the project's environment (`make install`), or with PYTHONPATH=src on a machine that has
only torch, torchvision, pydantic and pyyaml (the core needs nothing else).

M0 depends only on (seed, attack, whether D0 is poisoned), not on the policy, so each M0 is trained once
and every policy starts from a copy of it. Each row's `seconds` counts its M0 training plus its updates.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from permanence import Simulation, build_config
from permanence.data import load_splits
from permanence.simulation import resolve_device, state_on_cpu
from permanence.timeline import Timeline

SCALES = {
    # CPU: a 4,000-image subset of MNIST, the small CNN, 8 updates x 2 epochs (batch 64), 3 seeds
    "small": dict(
        seeds=3,
        overrides=[
            "data.limit=4000", "data.test_limit=1000", "model.name=small_cnn", "train.epochs=8", "train.lr=0.25",
            "update.updates=8", "update.epochs=2", "update.batch_size=64", "drift.delta=3",
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


def run_row(base: list[str], policy: str, injection: str, attack: str, seed: int, splits_cache, m0_cache) -> tuple[Timeline, float]:
    config = build_config({}, base + INJECTIONS[injection] + [f"update.policy={policy}", f"attack.name={attack}", f"seed={seed}"])
    if seed not in splits_cache:
        splits_cache[seed] = load_splits(config, resolve_device(config.runtime.device))
    sim = Simulation(config, splits_cache[seed])
    key = (seed, attack if injection == "D0" else None)
    if key not in m0_cache:
        started = time.perf_counter()
        model, record = sim.step(None, 0)
        m0_cache[key] = (state_on_cpu(model), record, time.perf_counter() - started)
    state, record, m0_seconds = m0_cache[key]
    started = time.perf_counter()
    model = sim.load_model(state)
    timeline = Timeline(records=[record], alpha=config.eval.alpha)
    for version in range(1, sim.versions):
        model, record = sim.step(model, version)
        timeline.records.append(record)
    return timeline, m0_seconds + time.perf_counter() - started


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
    parser.add_argument("--set", action="append", default=[], help="extra key=value overrides")
    parser.add_argument("--out", help="write the rows as a JSON list to this file")
    parser.add_argument("--timelines", help="write every timeline's per-version records (JSON) to this file")
    args = parser.parse_args()

    scale = SCALES[args.scale]
    seeds = args.seeds or scale["seeds"]
    base = ["data.name=mnist", f"data.root={args.data_root}", f"runtime.device={args.device}", "study=reproduce_paper",
            *scale["overrides"], *args.set]
    splits_cache: dict = {}
    m0_cache: dict = {}
    rows, timelines = [], []
    header = f"{'policy':9} {'inj':3} {'attack':8} {'surv mean':>9} {'std':>5} {'ASR inj':>8} {'acc final':>9} {'acc M0':>7} {'s/timeline':>10}"
    print(f"# scale={args.scale} seeds={seeds} device={resolve_device(args.device)} overrides: {' '.join(scale['overrides'] + args.set)}")
    print(header, flush=True)
    started = time.perf_counter()
    for attack in args.attacks.split(","):
        for injection in args.injections.split(","):
            for policy in args.policies.split(","):
                results = [run_row(base, policy, injection, attack, seed, splits_cache, m0_cache) for seed in range(args.first_seed, args.first_seed + seeds)]
                surv = [t.survivability() for t, _ in results]
                s_mean, s_std = mean_std(surv)
                row = {
                    "policy": policy, "injection": injection, "attack": attack,
                    "survivability_mean": s_mean, "survivability_std": s_std,
                    "asr_injected_mean": statistics.fmean(t.asr_injected for t, _ in results),
                    "clean_acc_final_mean": statistics.fmean(t.records[-1].clean_acc for t, _ in results),
                    "clean_acc_m0_mean": statistics.fmean(t.records[0].clean_acc for t, _ in results),
                    "seconds_per_timeline_mean": statistics.fmean(s for _, s in results),
                    "seeds": seeds,
                }
                rows.append(row)
                timelines += [{"policy": policy, "injection": injection, "attack": attack, "seed": seed, "seconds": s,
                               "records": t.rows()} for seed, (t, s) in enumerate(results, start=args.first_seed)]
                print(f"{policy:9} {injection:3} {attack:8} {s_mean:9.2f} {s_std:5.2f} {row['asr_injected_mean']:8.3f} "
                      f"{row['clean_acc_final_mean']:9.3f} {row['clean_acc_m0_mean']:7.3f} {row['seconds_per_timeline_mean']:10.1f}",
                      flush=True)
    print(f"# total {time.perf_counter() - started:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    if args.timelines:
        Path(args.timelines).write_text(json.dumps(timelines))


if __name__ == "__main__":
    main()
