"""Find and import `flows/retrain.py`: `flows/` is a top-level folder of the checkout, not an installed package."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from permanence.errors import PermanenceError


def retrain_flow_path() -> Path:
    for base in (Path(__file__).resolve().parents[3], Path.cwd()):
        if (base / "flows" / "retrain.py").is_file():
            return base / "flows" / "retrain.py"
    raise PermanenceError("flows/retrain.py: not found; run permanence from the project checkout")


def load_retrain_flow() -> ModuleType:
    spec = importlib.util.spec_from_file_location("permanence_flows_retrain", retrain_flow_path())
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
