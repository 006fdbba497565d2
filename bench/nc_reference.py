"""Neural Cleanse's per-class norms on registered versions beside never-poisoned baselines': what the audit's
per-class reference (`neural_cleanse.max_reference_ratio`) was chosen from.

    python bench/nc_reference.py --store mlruns_mnist --data-root ../shared/data \
        detection-badnets-s0 detection-control-0009b25d-s0 ...        # registries of bench/detection.py
    python bench/nc_reference.py --store mlruns --versions 1,6,11,16 detection-badnets-s0 ...   # digits

For every version: Neural Cleanse as the audit runs it (rule `both`, norm ratio 0.45), its suspect class, whether
it flags, and the suspect's norm over each baseline's norm for the same class (`ratio vs baseline S`). The baselines
are the audit's own never-poisoned model (`train_clean_baseline`) for `--baseline-seeds` (default 0, 1, 2: the
spread of the reference). It also prints the rejected alternative, the class with the smallest norm relative to the
baseline (`relative`: flagged when that ratio is <= 0.5 and its MAD anomaly index > 2). One torch thread.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from permanence.adapters.registry_audit import AUDIT_DEFAULTS, AuditRequest, prepare
from permanence.audit import CHECKS
from permanence.audit.dormancy import train_clean_baseline
from permanence.audit.neural_cleanse import anomaly_indices

RATIO = 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("registries", nargs="+")
    parser.add_argument("--store", type=Path, default=Path("mlruns"))
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--versions", default="all")
    parser.add_argument("--baseline-seeds", default="0,1,2")
    args = parser.parse_args()
    torch.set_num_threads(1)
    options = AUDIT_DEFAULTS["neural_cleanse"]
    check = CHECKS.get("neural_cleanse")
    versions, plan = {}, None
    for name in args.registries:
        plan = prepare(AuditRequest(name, versions=args.versions, store=args.store, data_root=args.data_root,
                                    checks=("neural_cleanse",)))
        for loaded in plan.versions:
            result = check(loaded.model, plan.data, seed=0, **options)
            versions[f"{name}/{loaded.ref.version}"] = (result.flagged, int(result.numbers["target"]),
                                                        result.extras["l1_norms"])
    spec = plan.baseline_spec
    seeds = [int(s) for s in args.baseline_seeds.split(",")]
    baselines = {s: check(train_clean_baseline(spec.model, plan.data, spec.mean, spec.std, seed=s), plan.data,
                          seed=0, **options).extras["l1_norms"] for s in seeds}
    for seed, norms in baselines.items():
        print(f"baseline seed {seed}: norms {' '.join(f'{n:.1f}' for n in norms)}")
    print(f"{'version':>36} {'NC':>4} {'class':>5} " + " ".join(f"{'vs b' + str(s):>7}" for s in seeds)
          + "  relative (per baseline)")
    for key, (flagged, suspect, norms) in versions.items():
        ratios = [norms[suspect] / baselines[s][suspect] for s in seeds]
        relative = []
        for s in seeds:
            rel = [n / b for n, b in zip(norms, baselines[s], strict=True)]
            low = min(range(len(rel)), key=rel.__getitem__)
            hit = rel[low] <= RATIO and anomaly_indices(rel)[low] > 2
            relative.append(f"{'F' if hit else '.'}{low}:{rel[low]:.2f}")
        print(f"{key:>36} {'flag' if flagged else '-':>4} {suspect:>5} " + " ".join(f"{r:7.2f}" for r in ratios)
              + "  " + " ".join(relative), flush=True)


if __name__ == "__main__":
    main()
