"""Defaults for the tools' environment, set before Prefect or MLflow is imported (they read it at import)."""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    """The checkout holding `flows/` (the installed package lives in its `src/`), else the current folder."""
    for base in (Path(__file__).resolve().parents[3], Path.cwd()):
        if (base / "flows").is_dir():
            return base
    return Path.cwd()


def apply_defaults() -> None:
    os.environ.setdefault("PREFECT_HOME", str(project_root() / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # a busy 2-core machine is slow
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


apply_defaults()
