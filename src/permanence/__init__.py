"""Permanence: how long does a backdoor planted once survive a model's scheduled retraining?

The simulation core. It imports none of mlflow, prefect, evidently or dvc: those live in
`permanence.adapters` and `flows/`, so the core runs alone (a GPU box, a notebook, another orchestrator).
The names below load on first use (PEP 562), so `import permanence.errors` or `permanence --help` does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from permanence.config import Config, build_config, load_config  # noqa: F401 (for type checkers)
    from permanence.errors import PermanenceError  # noqa: F401
    from permanence.simulation import EpochEnd, Simulation, VersionEnd, simulate  # noqa: F401
    from permanence.timeline import Timeline, VersionRecord  # noqa: F401

_EXPORTS = {
    "Config": "permanence.config", "build_config": "permanence.config", "load_config": "permanence.config",
    "PermanenceError": "permanence.errors",
    "EpochEnd": "permanence.simulation", "Simulation": "permanence.simulation", "VersionEnd": "permanence.simulation",
    "simulate": "permanence.simulation",
    "Timeline": "permanence.timeline", "VersionRecord": "permanence.timeline",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'permanence' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
