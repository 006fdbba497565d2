"""Adapters between the simulation core and the pipeline's tools (MLflow, Evidently, files, plots).

The core never imports this package; the flow and the CLI do.
"""

from permanence.adapters import env  # noqa: E402,F401  (the tools' settings, before an adapter imports a tool)
