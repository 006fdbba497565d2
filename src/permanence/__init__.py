"""Permanence: how long does a backdoor planted once survive a model's scheduled retraining?

The simulation core. It imports none of mlflow, prefect, evidently or dvc: those live in
`permanence.adapters` and `flows/`, so the core runs alone (a GPU box, a notebook, another orchestrator).
"""

from permanence.config import Config, build_config, load_config
from permanence.errors import PermanenceError
from permanence.simulation import EpochEnd, Simulation, VersionEnd, simulate
from permanence.timeline import Timeline, VersionRecord

__all__ = [
    "Config", "EpochEnd", "PermanenceError", "Simulation", "Timeline", "VersionEnd", "VersionRecord",
    "build_config", "load_config", "simulate",
]
__version__ = "0.1.0"
