"""What each retraining policy and each dormancy probe costs, against plain `finetune`.

    python bench/policies.py                     # digits defaults, 1 thread
    python bench/policies.py --pipeline          # also each policy's whole timeline through the Prefect flow

Part 1 (the core): seconds per update of every registered policy on the same model and data, and seconds per version
of every registered probe (the probed version and the never-poisoned baseline together), each as a ratio to one
`finetune` update. Part 2 (`--pipeline`): `permanence simulate --set update.policy=<policy>`'s timeline through the
flow (MLflow, Evidently, registry), timed in one warm process, as a ratio to finetune's. Run it in the project's
environment (`make install`).
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def per_update(sim, policy_model, versions: range) -> float:
    times = []
    model = policy_model
    for version in versions:
        data = sim.training_set(version)
        started = time.perf_counter()
        model = sim.update(model, version, data)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], help="extra key=value overrides")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--updates", type=int, default=3, help="updates timed per policy (the median is shown)")
    parser.add_argument("--pipeline", action="store_true", help="also time each policy's timeline through the flow")
    args = parser.parse_args()

    import torch

    from permanence import Simulation, load_config
    from permanence.dormancy import PROBES, ProbeModels
    from permanence.policies import POLICIES

    torch.set_num_threads(args.threads)
    base = load_config(ROOT / "params.yaml", [f"runtime.threads={args.threads}", *args.set])
    sim = Simulation(base)
    m0 = sim.train_initial()
    state = {k: v.clone() for k, v in m0.state_dict().items()}
    print(f"# {base.data.name}, {base.model.name}, {base.update.epochs} epochs per update, {args.threads} thread(s); "
          f"median of updates 1..{args.updates}")
    seconds = {}
    for policy in POLICIES.names():
        cfg = base.model_copy(update={"update": base.update.model_copy(update={"policy": policy})})
        policy_sim = Simulation(cfg, sim.splits)
        seconds[policy] = per_update(policy_sim, policy_sim.load_model(state), range(1, args.updates + 1))
    finetune = seconds["finetune"]
    print(f"{'policy':14} {'s/update':>9} {'x finetune':>10} {'registered cost':>16}  (what a sweep orders by)")
    for policy, value in seconds.items():
        print(f"{policy:14} {value:9.3f} {value / finetune:10.2f} {POLICIES.hint(policy, 'cost', 1.0):16.2f}")

    probe_cfg = base.model_copy(update={"eval": base.eval.model_copy(update={p: True for p in PROBES.names()})})
    probe_sim = Simulation(probe_cfg, sim.splits)
    baseline = probe_sim.train_baseline()
    model = probe_sim.load_model(state)
    references = ProbeModels(baseline, reference=model)
    print(f"{'probe':14} {'s/version':>9} {'x finetune':>10}  (probed version + baseline)")
    for name in PROBES.names():
        one = probe_cfg.model_copy(update={"eval": base.eval.model_copy(update={name: True})})
        one_sim = Simulation(one, sim.splits)
        started = time.perf_counter()
        one_sim.run_probes(model, 5, references)
        value = time.perf_counter() - started
        print(f"{name:14} {value:9.3f} {value / finetune:10.2f}")

    if args.pipeline:
        workdir = Path(tempfile.mkdtemp(prefix="permanence-policies-bench-"))
        atexit.register(shutil.rmtree, workdir, ignore_errors=True)
        os.environ["PREFECT_HOME"] = str(workdir / "prefect")
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        from permanence.adapters.flow_loader import load_flow
        from permanence.adapters.mlflow_store import open_client, tracking_uri

        flows = load_flow("retrain")
        open_client(tracking_uri(workdir / "mlruns"))
        flows.retraining_pipeline(base.model_copy(update={"study": "warmup", "update": base.update.model_copy(
            update={"updates": 1})}), results_dir=workdir / "results", store_dir=workdir / "mlruns")
        timeline = {}
        for policy in POLICIES.names():
            cfg = base.model_copy(update={"study": f"bench_{policy}",
                                          "update": base.update.model_copy(update={"policy": policy})})
            started = time.perf_counter()
            flows.retraining_pipeline(cfg, results_dir=workdir / "results", store_dir=workdir / "mlruns")
            timeline[policy] = time.perf_counter() - started
        print(f"{'policy':14} {'timeline s':>10} {'x finetune':>10}  (through the flow, M0 + {base.update.updates} updates)")
        for policy, value in timeline.items():
            print(f"{policy:14} {value:10.1f} {value / timeline['finetune']:10.2f}")


if __name__ == "__main__":
    main()
