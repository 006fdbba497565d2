"""Time `permanence audit` on a registry: seconds per version per check, the phases, the total; verdicts.

    python bench/audit.py --store mlruns --name digits_badnets            # the registry `make demo` leaves
    python bench/audit.py --store mlruns --name digits_badnets --workers 1 --checks neural_cleanse,dormancy
    python bench/audit.py --make clean --seed 1                           # register a fresh study first (core
                                                                          # simulate, as the pipeline registers it)

Runs the same prepare / run / write as the command (tags and the audit run are written to the store), in one
process with `--workers` forked single-thread workers, and prints a table: per version its verdict and the seconds
of each check, then the phases (scan = neural_cleanse + known_triggers on every version; baseline training and
its side of the probes, once; probes where no trigger is live) and the wall time including loading and writing.
`--json` saves it all. `--make` needs no Prefect: a registry written by `permanence simulate` audits the same.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from permanence.adapters.registry_audit import AuditRequest, default_workers, prepare, run, write

MADE = {"badnets": [], "clean": ["poisoning.inject=none"]}


def make_registry(kind: str, seed: int, store: Path, updates: int) -> str:
    """A default digits study (`params.yaml`'s settings), registered version by version: returns its name."""
    from permanence.adapters.mlflow_store import register_simulated
    from permanence.config import load_config

    name = f"bench_{kind}_seed{seed}"
    root = Path(__file__).resolve().parents[1]
    config = load_config(root / "params.yaml", [f"study={name}", f"seed={seed}", f"update.updates={updates}",
                                                "tracking.drift_check=false", *MADE[kind]])
    started = time.perf_counter()
    timeline, _, _ = register_simulated(config, store)
    asr = " ".join(f"{r.asr:.2f}" for r in timeline.records)
    print(f"registered {name} in {time.perf_counter() - started:.0f} s; simulator's ASR (drifted test images): {asr}")
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, help="MLflow store holding the registry (default with --make: a temp dir)")
    parser.add_argument("--name", help="registered model to audit")
    parser.add_argument("--make", choices=sorted(MADE), help="register a fresh default digits study first")
    parser.add_argument("--seed", type=int, default=0, help="--make: the study's seed")
    parser.add_argument("--updates", type=int, default=15, help="--make: updates after M0")
    parser.add_argument("--checks", default="neural_cleanse,known_triggers,dormancy")
    parser.add_argument("--workers", type=int, default=None, help=f"default: {default_workers()}")
    parser.add_argument("--data", default=None, help="clean data (default: the versions' own test split)")
    parser.add_argument("--steps", type=int, default=None, help="neural_cleanse steps (default: the check's)")
    parser.add_argument("--probe-all", action="store_true")
    parser.add_argument("--results", type=Path, default=None, help="report folder (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="save the figures here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    temp = tempfile.TemporaryDirectory(prefix="bench-audit-")
    store = args.store or Path(temp.name) / "mlruns"
    name = make_registry(args.make, args.seed, store, args.updates) if args.make else args.name
    if name is None:
        parser.error("give --name (with --store) or --make")
    options = {"neural_cleanse": {"steps": args.steps}} if args.steps else {}
    request = AuditRequest(name, store=store, checks=tuple(args.checks.split(",")), options=options,
                           workers=args.workers, data=args.data, probe_all=args.probe_all, fail_on="never",
                           results=args.results or Path(temp.name) / "results")
    started = time.perf_counter()
    plan = prepare(request)
    loaded = time.perf_counter()
    result = run(plan)
    ran = time.perf_counter()
    paths = write(result)
    total = time.perf_counter() - started
    checks = [c for c in ("neural_cleanse", "known_triggers", "strip", "dormancy") if any(c in r.seconds for r in result.rows)]
    print(f"\n{name}: {len(result.rows)} versions, workers {request.workers or default_workers()}, data {plan.data_label}")
    print(f"{'version':>7} {'update':>6} {'verdict':>12} " + " ".join(f"{c:>15}" for c in checks))
    for row in result.rows:
        cells = " ".join(f"{row.seconds[c]:15.2f}" if c in row.seconds else f"{'-':>15}" for c in checks)
        print(f"{row.version:>7} {row.loaded.ref.update or '-':>6} {row.verdict.verdict:>12} {cells}")
    means = {c: statistics.mean(r.seconds[c] for r in result.rows if c in r.seconds) for c in checks}
    print(f"{'mean s':>27} " + " ".join(f"{means[c]:15.2f}" for c in checks) + "  (per version, in its worker)")
    phases = {"load (prepare)": loaded - started, **result.timings, "run (all checks)": ran - loaded,
              "write (tags, run, report)": total - (ran - started), "total wall": total}
    for phase, seconds in phases.items():
        print(f"  {phase:>28}: {seconds:7.1f} s")
    counts = {v: sum(r.verdict.verdict == v for r in result.rows) for v in ("clean", "backdoor", "dormant", "inconclusive")}
    print(f"  verdicts: {counts}; lineage: {result.lineage.source if result.lineage else 'none'}; report {paths['report']}")
    if args.json:
        args.json.write_text(json.dumps({
            "name": name, "versions": len(result.rows), "workers": request.workers or default_workers(),
            "checks": checks, "phases": phases, "mean_seconds": means, "verdicts": counts,
            "rows": [{"version": r.version, "update": r.loaded.ref.update, "verdict": r.verdict.verdict,
                      "seconds": r.seconds, "reason": r.verdict.reason} for r in result.rows]}, indent=2))
    temp.cleanup()


if __name__ == "__main__":
    main()
