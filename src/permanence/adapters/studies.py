"""`permanence compare`: the comparison rebuilt from what MLflow holds, without running anything."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from permanence.adapters.comparison import TimelineResult, differing_axes, write_comparison
from permanence.adapters.mlflow_store import all_experiments, existing_uri, open_client
from permanence.adapters.sweep_store import SweepStore, read_timeline_artifacts
from permanence.errors import PermanenceError


def compare_sweep(name: str, store: Path, results: Path) -> dict[str, Path]:
    sweeps = SweepStore(name, store, create=False)
    _, spec = sweeps.latest_spec()
    found, missing = sweeps.results(spec["timelines"])
    if not found:
        raise PermanenceError(f"compare: sweep '{name}' has no finished timeline yet")
    return write_comparison(results / name, name, spec["axes"], spec["compare"], spec["heatmap"], found)


def _parse(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def compare_studies(studies: list[str], store: Path, results: Path, name: str) -> dict[str, Path]:
    """Each study's newest finished run, wherever it ran (simulate or a sweep), compared along the config keys in which
    the studies differ."""
    uri = existing_uri(store)
    client = open_client(uri)
    experiments = [e.experiment_id for e in all_experiments(client)]
    runs = []
    for study in studies:
        # a study run by `permanence simulate` (its own experiment) or a timeline of a sweep (the sweep's experiment)
        found = client.search_runs(experiments, f"tags.study = '{study}' and tags.`permanence.role` = 'timeline' and "
                                   "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"],
                                   max_results=1) if experiments else []
        if not found:
            raise PermanenceError(f"--study {study}: no finished run of that study in {uri}")
        runs.append(found[0])
    configs = [{k: _parse(v) for k, v in run.data.params.items()} for run in runs]
    axes = differing_axes(configs) or ["study"]
    found = []
    for study, run, config in zip(studies, runs, configs, strict=True):
        rows, summary = read_timeline_artifacts(client, run.info.run_id, uri)
        values = {axis: (study if axis == "study" else config.get(axis)) for axis in axes}
        found.append(TimelineResult(study, values, int(config.get("seed", 0)), summary, rows, run.info.run_id))
    return write_comparison(results / name, name, axes, axes[0], axes[:2], found)
