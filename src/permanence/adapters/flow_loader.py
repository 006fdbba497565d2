"""Find and import a flow of `flows/`: a top-level folder of the checkout, not an installed package."""

from __future__ import annotations

import importlib.util
from types import ModuleType

from permanence.adapters.env import project_root
from permanence.errors import PermanenceError


def load_flow(name: str) -> ModuleType:
    path = project_root() / "flows" / f"{name}.py"
    if not path.is_file():
        raise PermanenceError(f"flows/{name}.py: not found; run permanence from the project checkout")
    spec = importlib.util.spec_from_file_location(f"permanence_flows_{name}", path)
    module = importlib.util.module_from_spec(spec)
    # Deliberately not in sys.modules: a Dask worker cannot import flows/, so when Prefect ships the flow with a
    # task's context, pickle fails by reference and cloudpickle sends the flow's code by value.
    spec.loader.exec_module(module)
    return module


def load_retrain_flow() -> ModuleType:
    return load_flow("retrain")
