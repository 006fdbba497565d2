"""Write a study's clean test split at one update's drift as an audit data file (`permanence audit --data FILE`).

    python bench/drifted_test_npz.py 15 /tmp/test_update15.npz                  # params.yaml's study, update 15
    python bench/drifted_test_npz.py 15 out.npz --set drift.delta=5

A production team audits on the data its model serves now; for a simulated registry that is the test split at
the last update's drift (what the simulator's `asr` tag of that version was measured on). Writes x_test
(N, H, W, C) uint8 and y_test.
"""

from __future__ import annotations

import argparse

import numpy as np

from permanence.config import load_config
from permanence.simulation import Simulation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("update", type=int, help="the update whose drift the test images get")
    parser.add_argument("out", help="the .npz to write")
    parser.add_argument("--config", default="params.yaml")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="key=value overrides")
    args = parser.parse_args()
    sim = Simulation(load_config(args.config, args.sets))
    images, labels, _, _ = sim.test_sets(args.update)
    np.savez(args.out, x_test=images.permute(0, 2, 3, 1).cpu().numpy(), y_test=labels.cpu().numpy())
    print(f"{args.out}: {tuple(images.shape)} uint8, drift parameter {sim.drift_parameter(args.update)}")


if __name__ == "__main__":
    main()
