"""The production retraining pipeline as a Prefect flow: one timeline of one study.

The steps (train or load M0, ingest and check for drift, update and evaluate, register) and resume live in
`permanence.adapters.pipeline.run_timeline`, the one per-timeline code path that a sweep's timelines take too.

    python flows/retrain.py --config params.yaml [--set key=value ...]
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from permanence.adapters import env  # noqa: F401  (first: Prefect reads its settings when imported)
from prefect import flow

from permanence.adapters.mlflow_store import StudyStore
from permanence.adapters.outputs import pyplot
from permanence.adapters.pipeline import run_timeline
from permanence.config import Config
from permanence.simulation import ProgressCallback, Simulation

pyplot()  # the timeline ends with a plot: import matplotlib with the flow, not at the end of the first timeline


@flow(name="retraining-pipeline", log_prints=False)
def retraining_pipeline(config: Config, results_dir: Path = Path("results"), store_dir: Path = Path("mlruns"),
                        on_event: ProgressCallback | None = None,
                        on_version: Callable[[dict[str, Any], bool], None] | None = None,
                        simulation: Any = None, export_dir: Path | None = None) -> dict[str, Any]:
    """Run (or resume) the study's timeline; returns the summary. `on_version(record, resumed)` sees each version.

    `export_dir`: also write the timeline's files there under fixed names (DVC's metrics and plots).
    `simulation`: a `Simulation` already built from `config` (the CLI builds one to check the input before the
    flow starts). Typed `Any` because Prefect derives a parameter schema from the annotations on every call, and
    a `Simulation` annotation measured 2 s slower on the digits timeline (bench/overhead.py: 15.1 s vs 13.1 s).
    """
    if simulation is not None and simulation.config != config:
        raise ValueError("simulation was built from another config")
    sim = simulation or Simulation(config)  # validates data, attack and drift before anything is written
    return run_timeline(sim, StudyStore(config, store_dir), results_dir, on_event=on_event, on_version=on_version,
                        export_dir=export_dir)


if __name__ == "__main__":
    from permanence.cli import app

    app(["simulate", *sys.argv[1:]])
