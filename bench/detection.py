"""What `permanence audit` finds, blind, in registries whose ground truth the simulator knows: the detection table.

    python bench/detection.py                                   # sweeps/detection.yaml on digits: run it, audit all
    python bench/detection.py --skip-sweep                      # the sweep's registries are already in --store
    python bench/detection.py --versions 1,6,11,16 --set data.name=mnist --set data.root=../shared/data \
        --set data.limit=4000 --set data.test_limit=1000 --set train.epochs=8 --set train.label_smoothing=0.1 \
        --set update.epochs=2 --set update.batch_size=64 --data-root ../shared/data   # the MNIST subset, 4 versions

Runs the sweep with `permanence sweep` (the product command), then `permanence audit`'s prepare / run / write on
every poisoned cell's registered model and on one never-poisoned control per seed (the controls of one seed are
the same timeline whatever the attack). The audit is blind; only this bench reads the ground truth: the `asr`
tag the simulator wrote on each version (its trigger, on its drifted test images).

Per attack it prints: M0s that neural_cleanse alone flags, M0s the whole audit calls `backdoor` or `dormant`
(and how many `inconclusive`), and among later versions whose true ASR fell below alpha, the share the lineage
probes call `dormant` (and `backdoor`, `clean`). For the clean registries: flagged M0s and, over every clean
version audited, the false-positive rate (any verdict but `clean`). `--out FILE.json` keeps the rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from permanence.adapters.mlflow_store import existing_uri, open_client
from permanence.adapters.registry_audit import AuditRequest, prepare, run, write
from permanence.sweep import load_sweep

ROOT = Path(__file__).resolve().parents[1]
ALPHA = 0.5


def audit_registry(name: str, args: argparse.Namespace) -> tuple[list[dict], float]:
    request = AuditRequest(name, versions=args.versions, store=args.store, fail_on="never", workers=args.workers,
                           results=args.results, seed=0, data=args.data, data_root=args.data_root)
    started = time.perf_counter()
    result = run(prepare(request))
    write(result)
    client = open_client(existing_uri(args.store))
    rows = []
    for row in result.rows:
        truth = client.get_model_version(name, str(row.version)).tags
        nc = row.checks.get("neural_cleanse")
        rows.append({"registry": name, "version": row.version, "update": row.loaded.ref.update,
                     "true_asr": float(truth["asr"]) if "asr" in truth else None,
                     "verdict": row.verdict.verdict, "reason": row.verdict.reason,
                     "nc_flagged": bool(nc and nc.flagged), "nc_target": row.number("neural_cleanse", "target"),
                     "lineage_asr": row.number("dormancy", "asr"), "p_asr": row.number("dormancy", "p_asr"),
                     "reactivated_asr": row.number("dormancy", "reactivated_asr")})
    return rows, time.perf_counter() - started


def share(hits: int, total: int) -> str:
    return f"{hits}/{total}" if total else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", type=Path, default=ROOT / "sweeps" / "detection.yaml")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="key=value for every cell")
    parser.add_argument("--store", type=Path, default=Path("mlruns"))
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--versions", default="all", help="versions audited in each registry")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--data", default=None, help="the audit's clean data (default: each version's test split)")
    parser.add_argument("--data-root", type=Path, default=None, help="folder of a named dataset (e.g. mnist)")
    parser.add_argument("--skip-sweep", action="store_true", help="the sweep already ran into --store")
    parser.add_argument("--out", type=Path, default=None, help="save the rows here (JSON)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sweep = load_sweep(args.sweep, args.sets)
    if not args.skip_sweep:
        command = [sys.executable, "-m", "permanence.cli", "sweep", str(args.sweep), "--store", str(args.store),
                   "--results", str(args.results), "--no-progress"]
        for text in args.sets:
            command += ["--set", text]
        started = time.perf_counter()
        subprocess.run(command, check=True)
        print(f"sweep: {time.perf_counter() - started:.0f} s")
    poisoned = [t for t in sweep.timelines if not t.control]
    controls = {}
    for timeline in sweep.timelines:
        if timeline.control:
            controls.setdefault(timeline.seed, timeline)
    rows, seconds = [], {}
    for timeline in poisoned + list(controls.values()):
        found, seconds[timeline.study] = audit_registry(timeline.study, args)
        attack = "clean" if timeline.control else timeline.config.attack.name
        for row in found:
            row.update(attack=attack, seed=timeline.seed)
        rows.extend(found)
        verdicts = " ".join(r["verdict"][0] for r in found)
        print(f"{timeline.study}: {seconds[timeline.study]:.0f} s, verdicts {verdicts}", flush=True)

    by_attack = defaultdict(list)
    for row in rows:
        by_attack[row["attack"]].append(row)
    print(f"\n{'attack':>8} {'M0 NC flag':>10} {'M0 audit':>9} {'M0 inconcl':>10} {'fell<a':>7} "
          f"{'dormant':>8} {'backdoor':>8} {'clean':>6} {'incon.':>6}  versions flagged (any verdict but clean)")
    for attack, found in by_attack.items():
        m0 = [r for r in found if r["version"] == 1]
        later = [r for r in found if r["version"] > 1 and r["true_asr"] is not None and r["true_asr"] < ALPHA]
        count = lambda rs, v: sum(r["verdict"] == v for r in rs)  # noqa: E731
        flagged = sum(r["verdict"] != "clean" for r in found)
        print(f"{attack:>8} {share(sum(r['nc_flagged'] for r in m0), len(m0)):>10} "
              f"{share(sum(r['verdict'] in ('backdoor', 'dormant') for r in m0), len(m0)):>9} "
              f"{share(count(m0, 'inconclusive'), len(m0)):>10} {len(later):>7} "
              f"{share(count(later, 'dormant'), len(later)):>8} {share(count(later, 'backdoor'), len(later)):>8} "
              f"{share(count(later, 'clean'), len(later)):>6} {share(count(later, 'inconclusive'), len(later)):>6}  "
              f"{share(flagged, len(found))}")
    clean = by_attack.get("clean", [])
    if clean:
        fp = sum(r["verdict"] != "clean" for r in clean)
        print(f"false-positive rate over {len(clean)} clean versions: {fp / len(clean):.3f} ({fp} flagged)")
    print(f"audit seconds per registry: mean {sum(seconds.values()) / len(seconds):.0f}, "
          f"max {max(seconds.values()):.0f} ({len(seconds)} registries)")
    if args.out:
        args.out.write_text(json.dumps({"sweep": str(args.sweep), "sets": args.sets, "versions": args.versions,
                                        "seconds": seconds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
