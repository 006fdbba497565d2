"""A sweep in MLflow: one experiment, one parent run (the grid as params, the comparison files as artifacts),
one child run per timeline and per shared M0, nested under the parent through `mlflow.parentRunId`."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from permanence.adapters.comparison import TimelineResult
from permanence.adapters.mlflow_store import (
    PARENT_TAG, ModelSpec, all_experiments, artifact_root, ensure_experiment, existing_uri, open_client, write_mlflow_model, tracking_uri,
)
from permanence.errors import PermanenceError

SPEC_FILE = "sweep.json"
M0_FOLDER = "m0"
M0_RECORD_FILE = "version0.json"


def spec_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


class SweepStore:
    def __init__(self, name: str, store: Path, uri: str | None = None, create: bool = True) -> None:
        self.name = name
        self.uri = uri or (tracking_uri(store) if create else existing_uri(store))
        self.client = open_client(self.uri)
        if create:
            self.experiment_id = ensure_experiment(self.client, name, artifact_root(self.uri))
            return
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            known = sorted(e.name for e in all_experiments(self.client) if e.tags.get("permanence.kind") == "sweep")
            raise PermanenceError(f"compare: no sweep '{name}' in {self.uri}; sweeps there: {', '.join(known) or 'none'}")
        self.experiment_id = experiment.experiment_id

    def _search(self, clause: str, max_results: int = 1000) -> list:
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=clause, max_results=max_results,
                                           order_by=["attributes.start_time DESC"], page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    # --- the parent run -----------------------------------------------------------------------
    def open_parent(self, spec: dict[str, Any], params: dict[str, Any]) -> str:
        """The parent run of this exact sweep (resumed if it exists), or a new one."""
        digest = spec_hash(spec)
        found = self._search(f"tags.`permanence.role` = 'sweep' and tags.sweep_hash = '{digest}'", 1)
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        self.client.set_experiment_tag(self.experiment_id, "permanence.kind", "sweep")
        run = self.client.create_run(self.experiment_id, run_name=f"sweep-{self.name}",
                                     tags={"permanence.role": "sweep", "sweep_hash": digest, "sweep": self.name})
        from mlflow.entities import Param

        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / SPEC_FILE
            path.write_text(json.dumps(spec, indent=1, default=str))
            self.client.log_artifact(run.info.run_id, str(path))
        return run.info.run_id

    def finish(self, run_id: str, status: str, files: dict[str, Path]) -> None:
        for path in files.values():
            self.client.log_artifact(run_id, str(path))
        self.client.set_terminated(run_id, status=status)

    def latest_spec(self) -> tuple[str, dict[str, Any]]:
        found = self._search("tags.`permanence.role` = 'sweep'", 1)
        if not found:
            raise PermanenceError(f"compare: experiment '{self.name}' holds no sweep (no parent run)")
        run_id = found[0].info.run_id
        import mlflow.artifacts

        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=SPEC_FILE, dst_path=tmp,
                                                        tracking_uri=self.uri)
            return run_id, json.loads(Path(local).read_text())

    # --- shared M0s -----------------------------------------------------------------------------
    def finished_m0(self, key: str):
        from permanence.adapters.pipeline import SharedModel

        found = self._search(f"tags.m0_key = '{key}' and attributes.status = 'FINISHED'", 1)
        if not found:
            return None
        run = found[0]
        return SharedModel(key, f"{run.info.artifact_uri}/{M0_FOLDER}", run.info.run_id,
                           float(run.data.metrics.get("train_seconds", 0.0)))

    def log_m0(self, key: str, parent_run_id: str, state: dict[str, torch.Tensor], spec: ModelSpec, seconds: float,
               description: str):
        from mlflow.entities import Metric

        from permanence.adapters.pipeline import SharedModel

        run = self.client.create_run(self.experiment_id, run_name=f"m0-{key[:8]}",
                                     tags={"permanence.role": "m0", "m0_key": key, PARENT_TAG: parent_run_id,
                                           "mlflow.note.content": description})
        run_id = run.info.run_id
        with tempfile.TemporaryDirectory() as tmp:
            self.client.log_artifacts(run_id, str(write_mlflow_model(Path(tmp) / "model", state, spec)), M0_FOLDER)
        self.client.log_batch(run_id, metrics=[Metric("train_seconds", seconds, 0, 0)])
        self.client.set_terminated(run_id, "FINISHED")
        return SharedModel(key, f"{run.info.artifact_uri}/{M0_FOLDER}", run_id, seconds)

    # --- shared probe baselines ----------------------------------------------------------------
    def finished_probe_baseline(self, key: str) -> dict[int, dict[str, float]] | None:
        """The baseline fields logged by a finished probe-baseline run with this key: version -> field -> value."""
        found = self._search(f"tags.probe_baseline_key = '{key}' and attributes.status = 'FINISHED'", 1)
        if not found:
            return None
        run_id = found[0].info.run_id
        fields: dict[int, dict[str, float]] = {}
        for name in found[0].data.metrics:
            if name != "seconds":
                for metric in self.client.get_metric_history(run_id, name):
                    fields.setdefault(metric.step, {})[name] = metric.value
        return fields

    def log_probe_baseline(self, key: str, parent_run_id: str, fields: dict[int, dict[str, float]], seconds: float,
                           description: str) -> dict[int, dict[str, float]]:
        """One run holding the paired probes' baseline fields, each a metric stepped by version."""
        from mlflow.entities import Metric

        run = self.client.create_run(self.experiment_id, run_name=f"probe-baseline-{key[:8]}",
                                     tags={"permanence.role": "probe-baseline", "probe_baseline_key": key,
                                           PARENT_TAG: parent_run_id, "mlflow.note.content": description})
        metrics = [Metric(name, value, 0, version) for version, values in fields.items() for name, value in values.items()]
        metrics.append(Metric("seconds", seconds, 0, 0))
        for start in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self.client.log_batch(run.info.run_id, metrics=metrics[start : start + 1000])
        self.client.set_terminated(run.info.run_id, "FINISHED")
        return fields

    # --- shared versions 0 -----------------------------------------------------------------------
    def finished_m0_record(self, key: str) -> dict[str, Any] | None:
        """The version-0 row logged by a finished run with this key."""
        found = self._search(f"tags.m0_record_key = '{key}' and attributes.status = 'FINISHED'", 1)
        if not found:
            return None
        import mlflow.artifacts

        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(run_id=found[0].info.run_id, artifact_path=M0_RECORD_FILE,
                                                        dst_path=tmp, tracking_uri=self.uri)
            return json.loads(Path(local).read_text())

    def log_m0_record(self, key: str, parent_run_id: str, record: dict[str, Any], description: str) -> dict[str, Any]:
        """One run holding a shared M0's version-0 row: its metrics (step 0) to read, the row as a JSON artifact."""
        from mlflow.entities import Metric

        run = self.client.create_run(self.experiment_id, run_name=f"m0-version0-{key[:8]}",
                                     tags={"permanence.role": "version0", "m0_record_key": key, PARENT_TAG: parent_run_id,
                                           "mlflow.note.content": description})
        run_id = run.info.run_id
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / M0_RECORD_FILE
            path.write_text(json.dumps(record, indent=1))
            self.client.log_artifact(run_id, str(path))
        numbers = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in numbers.items() if k != "version"])
        self.client.set_terminated(run_id, "FINISHED")
        return record

    # --- the finished timelines ----------------------------------------------------------------
    def finished_hashes(self) -> set[str]:
        """Config hashes of the timelines that finished in this experiment: a re-run skips them."""
        runs = self._search("tags.`permanence.role` = 'timeline' and attributes.status = 'FINISHED'")
        return {run.data.tags.get("config_hash") for run in runs}

    def results(self, timelines: list[dict[str, Any]]) -> tuple[list[TimelineResult], list[str]]:
        """The newest FINISHED run of each timeline (read from its logged timeline.csv and summary.json), and the
        studies that have none."""
        newest: dict[str, Any] = {}
        for run in self._search("tags.`permanence.role` = 'timeline' and attributes.status = 'FINISHED'"):
            newest.setdefault(run.data.tags.get("study"), run)  # newest first
        results, missing = [], []
        for timeline in timelines:
            run = newest.get(timeline["study"])
            if run is None:
                missing.append(timeline["study"])
                continue
            rows, summary = read_timeline_artifacts(self.client, run.info.run_id, self.uri)
            results.append(TimelineResult(timeline["study"], timeline["values"], timeline["seed"], summary, rows,
                                          run.info.run_id, timeline.get("control_study")))
        return results, missing


def read_timeline_artifacts(client, run_id: str, uri: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import csv

    import mlflow.artifacts

    with tempfile.TemporaryDirectory() as tmp:
        for name in ("timeline.csv", "summary.json"):
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=tmp, tracking_uri=uri)
        with open(Path(tmp) / "timeline.csv", newline="") as f:
            rows = [{"version": int(r["update"]), **r} for r in csv.DictReader(f)]
        return rows, json.loads((Path(tmp) / "summary.json").read_text())
