"""Adapters between the simulation core and the pipeline's tools (MLflow, Evidently, files, plots).

The core never imports this package; the flow and the CLI do.
"""
