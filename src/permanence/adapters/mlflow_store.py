"""MLflow tracking and model registry for one study: one experiment, one run per timeline, one
registered model whose versions are the timeline's model versions (alias `production` on the newest).

Weights are stored as a plain state dict and loaded with `torch.load(weights_only=True)` into the
project's own model class: loading a registered version never unpickles code.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from permanence.config import Config

DEFAULT_STORE = Path("mlruns")
PRODUCTION = "production"
WEIGHTS = "weights.pt"
METRICS = ("clean_acc", "asr", "ra", "drift_score", "drift_detected", "stat_drift_share", "train_seconds")


def tracking_uri(store: Path = DEFAULT_STORE) -> str:
    """MLFLOW_TRACKING_URI if set (a server, PostgreSQL), else sqlite under `mlruns/`."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store.resolve() / 'mlflow.db'}"


def config_hash(config: Config) -> str:
    return hashlib.sha256(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CompletedVersion:
    update: int
    registry_version: str
    record: dict[str, Any]


class StudyStore:
    def __init__(self, config: Config, store: Path = DEFAULT_STORE) -> None:
        from mlflow import MlflowClient

        self.config = config
        self.name = config.study
        self.uri = tracking_uri(store)
        self.client = MlflowClient(self.uri)
        self.hash = config_hash(config)
        experiment = self.client.get_experiment_by_name(self.name)
        if experiment is None:
            artifacts = None
            if not os.environ.get("MLFLOW_TRACKING_URI"):
                artifacts = (store.resolve() / "artifacts" / self.name).as_uri()
            self.experiment_id = self.client.create_experiment(self.name, artifact_location=artifacts)
        else:
            self.experiment_id = experiment.experiment_id
        self.run_id: str | None = None
        self._artifact_uri: str | None = None
        self._registered = False

    # --- the run --------------------------------------------------------------------------------
    def open_run(self) -> tuple[str, bool]:
        """Resume this config's unfinished run, or start a new one. Returns (run_id, resumed)."""
        unfinished = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.config_hash = '{self.hash}' and attributes.status != 'FINISHED'",
            order_by=["attributes.start_time DESC"], max_results=1,
        )
        if unfinished:
            self.run_id = unfinished[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return self.run_id, True
        run = self.client.create_run(self.experiment_id, run_name=f"{self.name}-seed{self.config.seed}",
                                     tags={"config_hash": self.hash, "study": self.name})
        self.run_id = run.info.run_id
        params = [(k, "null" if v is None else str(v)) for k, v in self.config.flat().items()]
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, v[:6000]) for k, v in params])
        return self.run_id, False

    def end_run(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)

    def log_step(self, record: dict[str, Any]) -> None:
        """Log one version's metrics at step=version, in one batch."""
        from mlflow.entities import Metric

        step = int(record["version"])
        metrics = [Metric(key, float(record[key]), 0, step) for key in METRICS if record.get(key) is not None]
        self.client.log_batch(self.run_id, metrics=metrics)

    def logged_steps(self) -> set[int]:
        """Steps whose metrics this run already holds (a batch is all or nothing, so one key tells)."""
        return {m.step for m in self.client.get_metric_history(self.run_id, "clean_acc")}

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    # --- the registry ---------------------------------------------------------------------------
    def _ensure_registered_model(self) -> None:
        from mlflow.exceptions import MlflowException

        if self._registered:
            return
        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            self.client.create_registered_model(self.name, description=f"Permanence study {self.name}")
        self._registered = True

    def completed_versions(self) -> dict[int, CompletedVersion]:
        """This run's registered versions, by timeline version: the resume point."""
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.search_model_versions(f"name='{self.name}' and run_id='{self.run_id}'")
        except MlflowException:
            return {}
        done = {}
        for mv in found:
            if "record" in mv.tags:
                update = int(mv.tags["update"])
                done[update] = CompletedVersion(update, mv.version, json.loads(mv.tags["record"]))
        return done

    def register_version(self, record: dict[str, Any], state: dict[str, torch.Tensor]) -> str:
        """Upload the weights, then create the version with all its tags in one call, then move the alias."""
        self._ensure_registered_model()
        update = int(record["version"])
        folder = f"versions/v{update:03d}"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / WEIGHTS
            torch.save(state, path)
            self.client.log_artifact(self.run_id, str(path), folder)
        c = self.config
        tags = {
            "update": str(update), "poisoned": str(bool(record["poisoned"])).lower(), "attack": c.attack.name,
            "policy": c.update.policy, "clean_acc": f"{record['clean_acc']:.4f}", "asr": f"{record['asr']:.4f}",
            "drift_detected": str(record.get("drift_detected")).lower(), "config_hash": self.hash,
            "record": json.dumps(record),
        }
        if self._artifact_uri is None:
            self._artifact_uri = self.client.get_run(self.run_id).info.artifact_uri
        source = f"{self._artifact_uri}/{folder}"
        mv = self.client.create_model_version(self.name, source=source, run_id=self.run_id, tags=tags)
        self.client.set_registered_model_alias(self.name, PRODUCTION, mv.version)
        return mv.version

    def point_production_at(self, registry_version: str) -> None:
        self.client.set_registered_model_alias(self.name, PRODUCTION, registry_version)

    def load_production(self, expected_update: int) -> dict[str, torch.Tensor]:
        """Weights of the version `production` points to; it must be this run's version `expected_update`."""
        mv = self.client.get_model_version_by_alias(self.name, PRODUCTION)
        if mv.run_id != self.run_id or int(mv.tags.get("update", -1)) != expected_update:
            raise RuntimeError(
                f"registry: alias '{PRODUCTION}' of {self.name} points to version {mv.version} "
                f"(run {mv.run_id}, update {mv.tags.get('update')}), expected update {expected_update} of run {self.run_id}"
            )
        return self.load_version(mv.version)

    def load_version(self, registry_version: str) -> dict[str, torch.Tensor]:
        import mlflow.artifacts

        mv = self.client.get_model_version(self.name, registry_version)
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"{mv.source}/{WEIGHTS}", dst_path=tmp,
                                                        tracking_uri=self.uri)
            return torch.load(local, weights_only=True, map_location="cpu")
