"""Do the dormancy probes separate a backdoored model from a never-poisoned one beyond the study's own M0?

    python bench/probe_separation.py                                   # digits, params.yaml, BadNets/Blended/WaNet
    python bench/probe_separation.py --set data.name=mnist --set data.root=../shared/data --set data.limit=4000 \
        --set data.test_limit=1000 --set train.epochs=8 --set train.label_smoothing=0.1   # the MNIST subset

For each attack: the study (seed 0) gives the probe inputs (its update pool, its test set, its trigger) and its
never-poisoned baseline; the probed models are M0s of other seeds (`--seeds`, default 1 and 2), each trained on its
own seed's D0 (its split, initialisation and draws) poisoned with the study's trigger (Blended's pattern and WaNet's
field are drawn from the seed, so the study's attack object is lent to them), and the never-poisoned M0 of seed 1 (a second clean model: what the probes
read on a model that never saw the trigger). Prints p_asr, reactivated_asr and bec per model beside the baseline's
own p_asr_clean and reactivated_asr_clean (bec is 1 for the study's backdoored M0 and 0 for its baseline by
construction). One torch thread; the core only (no MLflow).
"""

from __future__ import annotations

import argparse
import time

import torch

from permanence import Simulation, load_config
from permanence.dormancy import PROBES, ProbeModels, run_probes

PROBES_ON = ["eval.retune=true", "eval.reactivate=true", "eval.bec=true"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="params.yaml")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="key=value for every study")
    parser.add_argument("--attacks", default="badnets,blended,wanet")
    parser.add_argument("--seeds", default="1,2", help="seeds of the other backdoored M0s")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'attack':>8} {'model':>22} {'asr':>6} {'p_asr':>6} {'(base)':>6} {'react':>6} {'(base)':>6} {'bec':>6}")
    for attack in args.attacks.split(","):
        started = time.perf_counter()
        overrides = [*args.sets, *PROBES_ON, f"attack.name={attack}", "seed=0"]
        study = Simulation(load_config(args.config, overrides))
        reference, baseline = study.train_initial(), study.train_baseline()
        inputs = study.probe_inputs(0, ProbeModels(baseline, reference))
        others = {seed: Simulation(load_config(args.config, [*overrides[:-1], f"seed={seed}"]))
                  for seed in dict.fromkeys([*args.seeds.split(","), "1"])}
        models = {}
        for seed in args.seeds.split(","):
            others[seed].attack = study.attack  # the study's trigger, planted in another seed's D0
            models[f"backdoored M0 seed {seed}"] = others[seed].train_initial()
        models["clean M0 seed 1"] = others["1"].train_baseline()  # never poisoned: the attack plays no part
        for label, model in models.items():
            asr = study.evaluate(model, 0)["asr"]
            values = run_probes(model, inputs, list(PROBES))
            print(f"{attack:>8} {label:>22} {asr:6.3f} {values['p_asr']:6.3f} {values['p_asr_clean']:6.3f} "
                  f"{values['reactivated_asr']:6.3f} {values['reactivated_asr_clean']:6.3f} {values['bec']:6.3f}",
                  flush=True)
        print(f"{attack:>8} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
