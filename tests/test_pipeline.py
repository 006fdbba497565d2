"""The pipeline with every tool real: Prefect flow, MLflow tracking and registry, Evidently, outputs."""

import csv
import json
import os

import pytest
import torch

from conftest import TINY
from permanence import build_config

pytestmark = pytest.mark.pipeline


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def flows(prefect_harness):
    from permanence.adapters.flow_loader import load_retrain_flow

    return load_retrain_flow()


@pytest.fixture(scope="session")
def study(flows, tmp_path_factory):
    """One tiny study through the whole flow, drift 10 degrees per update."""
    workdir = tmp_path_factory.mktemp("study")
    config = build_config({}, TINY + ["study=tiny", "drift.delta=10"])
    summary = flows.retraining_pipeline(config, results_dir=workdir / "results", store_dir=workdir / "mlruns")
    return config, summary, workdir


def _client(summary):
    from mlflow import MlflowClient

    return MlflowClient(summary["tracking_uri"])


def test_run_has_one_metric_step_per_version(study):
    config, summary, _ = study
    client = _client(summary)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    for key in ("clean_acc", "asr", "ra", "train_seconds"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [0, 1, 2, 3]
    for key in ("drift_score", "drift_detected"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [1, 2, 3]
    assert run.data.params["attack.name"] == "badnets" and run.data.params["update.updates"] == "3"


def test_registry_has_one_version_per_model_version_and_production_on_newest(study):
    config, summary, _ = study
    client = _client(summary)
    versions = client.search_model_versions(f"name='{config.study}'")
    assert sorted(int(v.tags["update"]) for v in versions) == [0, 1, 2, 3]
    newest = client.get_model_version_by_alias(config.study, "production")
    assert newest.tags["update"] == "3" and int(newest.version) == max(int(v.version) for v in versions)
    first = next(v for v in versions if v.tags["update"] == "0")
    assert first.tags["poisoned"] == "true" and first.tags["attack"] == "badnets" and first.tags["policy"] == "finetune"
    assert {"clean_acc", "asr", "drift_detected"} <= set(first.tags)


def test_registered_weights_load_without_unpickling_code(study, flows):
    config, summary, workdir = study
    from permanence import Simulation
    from permanence.adapters.mlflow_store import StudyStore

    store = StudyStore(config, workdir / "mlruns")
    production = store.client.get_model_version_by_alias(config.study, "production")
    state = store.load_version(production.version)  # torch.load(weights_only=True) inside
    model = Simulation(config).load_model(state)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    rows = list(csv.DictReader((workdir / "results" / "tiny" / "timeline.csv").open()))
    assert model is not None and rows[-1]["model_version"] == str(production.version)


def test_outputs_written(study):
    config, summary, workdir = study
    folder = workdir / "results" / "tiny"
    rows = list(csv.DictReader((folder / "timeline.csv").open()))
    assert [r["update"] for r in rows] == ["0", "1", "2", "3"]
    for column in ("update", "drift", "poisoned", "clean_acc", "asr", "ra", "drift_score", "drift_detected", "model_version"):
        assert column in rows[0]
    saved = json.loads((folder / "summary.json").read_text())
    assert saved["survivability"] == summary["survivability"] and "asr_injected" in saved
    assert (folder / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    artifacts = {a.path for a in _client(summary).list_artifacts(summary["mlflow_run_id"])}
    assert {"timeline.csv", "summary.json", "timeline.png"} <= artifacts
    for name in ("timeline.csv", "summary.json", "timeline.png"):  # as any new file of the user's, not 0600
        assert (folder / name).stat().st_mode & 0o777 == 0o666 & ~umask(), name


def umask() -> int:
    """This process's umask (set to read it: the test's thread is the only one creating files now)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_drift_is_flagged_at_default_drift(study):
    _, _, workdir = study
    rows = list(csv.DictReader((workdir / "results" / "tiny" / "timeline.csv").open()))
    assert rows[0]["drift_detected"] == ""
    assert [r["drift_detected"] for r in rows[1:]] == ["True", "True", "True"]


def test_zero_drift_control_is_not_flagged(flows, tmp_path):
    config = build_config({}, TINY + ["study=control", "drift.delta=0", "poisoning.inject=none"])
    flows.retraining_pipeline(config, results_dir=tmp_path / "results", store_dir=tmp_path / "mlruns")
    rows = list(csv.DictReader((tmp_path / "results" / "control" / "timeline.csv").open()))
    assert [r["drift_detected"] for r in rows[1:]] == ["False", "False", "False"]
    assert all(float(r["drift_score"]) < config.tracking.drift_threshold for r in rows[1:])


def test_each_scheduled_update_is_one_prefect_task_run(flows, tmp_path):
    """What the Prefect UI shows of a flow run: M0's training and registration, then one task run per update."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    config = build_config({}, TINY + ["study=tasks", "update.updates=2"])
    flows.retraining_pipeline(config, results_dir=tmp_path / "results", store_dir=tmp_path / "mlruns")
    with get_client(sync_client=True) as client:
        run = next(r for r in client.read_flow_runs() if r.parameters["config"]["study"] == "tasks")
        for _ in range(50):  # task runs reach the server as events, a moment after the flow returns
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
            if len(tasks) >= 4 and all(t.state and t.state.is_completed() for t in tasks):
                break
            time.sleep(0.2)
    names = sorted(t.name for t in tasks)
    assert [n for n in names if n.startswith("update-")] == ["update-1", "update-2"]
    assert sorted(n.rsplit("-", 1)[0] for n in names if not n.startswith("update-")) == ["register", "train_initial_model"]
    assert all(t.state.is_completed() for t in tasks)


def test_rerun_of_a_finished_study_starts_a_new_run_and_keeps_the_old_versions(flows, study):
    config, summary, workdir = study
    again = flows.retraining_pipeline(config, results_dir=workdir / "results", store_dir=workdir / "mlruns")
    client = _client(summary)
    versions = client.search_model_versions(f"name='{config.study}'")
    assert again["mlflow_run_id"] != summary["mlflow_run_id"] and len(versions) == 8
    assert client.get_model_version_by_alias(config.study, "production").run_id == again["mlflow_run_id"]


def test_transient_failure_is_retried_and_drift_reports_are_kept(flows, tmp_path, monkeypatch):
    from permanence.adapters.mlflow_store import StudyStore

    original = StudyStore.register_version
    calls = {"failures": 0}

    def flaky(self, record, *args):
        if record["version"] == 1 and calls["failures"] == 0:
            calls["failures"] += 1
            raise ConnectionError("tracking server hiccup")
        return original(self, record, *args)

    monkeypatch.setattr(StudyStore, "register_version", flaky)
    config = build_config({}, TINY + ["study=flaky", "update.updates=1", "tracking.drift_reports=true"])
    summary = flows.retraining_pipeline(config, results_dir=tmp_path / "results", store_dir=tmp_path / "mlruns")
    assert calls["failures"] == 1
    client = _client(summary)
    assert sorted(int(v.tags["update"]) for v in client.search_model_versions("name='flaky'")) == [0, 1]
    reports = [a.path for a in client.list_artifacts(summary["mlflow_run_id"], "drift_reports")]
    assert reports == ["drift_reports/drift_v001.html"]
    # the retried update started again from the production weights: the same model as a run that never failed
    monkeypatch.setattr(StudyStore, "register_version", original)
    steady = flows.retraining_pipeline(config.model_copy(update={"study": "steady"}), results_dir=tmp_path / "results",
                                       store_dir=tmp_path / "mlruns")
    assert (steady["clean_acc_final"], steady["asr_final"]) == (summary["clean_acc_final"], summary["asr_final"])


TRIGGERED = TINY + ["update.trigger=drift", "drift.schedule=sudden", "drift.at_update=2", "drift.delta=45",
                    "poisoning.inject=none"]


def test_drift_triggered_updates_skip_without_drift_and_update_on_a_sudden_shift(flows, tmp_path, monkeypatch):
    """Update 1 sees no drift (kept), update 2 a sudden 45-degree shift (runs), update 3 the same data as what
    production was last trained on (kept). A crash before version 2 is registered resumes knowing update 1 was kept."""
    from permanence.adapters.mlflow_store import StudyStore

    original = StudyStore.register_version

    def down(self, record, *args):
        if record["version"] == 2:
            raise ConnectionError("registry down")
        return original(self, record, *args)

    config = build_config({}, TRIGGERED + ["study=triggered"])
    monkeypatch.setattr(StudyStore, "register_version", down)
    with pytest.raises(ConnectionError):
        flows.retraining_pipeline(config, results_dir=tmp_path / "results", store_dir=tmp_path / "mlruns")
    monkeypatch.setattr(StudyStore, "register_version", original)
    summary = flows.retraining_pipeline(config, results_dir=tmp_path / "results", store_dir=tmp_path / "mlruns")

    rows = list(csv.DictReader((tmp_path / "results" / "triggered" / "timeline.csv").open()))
    assert [r["updated"] for r in rows] == ["True", "False", "True", "False"]
    assert [r["drift_detected"] for r in rows] == ["", "False", "True", "False"]
    assert rows[1]["model_version"] == rows[0]["model_version"] and rows[3]["model_version"] == rows[2]["model_version"]
    assert rows[1]["n_train"] == "0" and rows[2]["n_train"] != "0"
    client = _client(summary)
    versions = client.search_model_versions("name='triggered'")
    assert sorted(int(v.tags["update"]) for v in versions) == [0, 2], "a kept update registers nothing"
    assert len({v.run_id for v in versions}) == 1, "the re-run resumed the crashed run"
    run = client.get_run(summary["mlflow_run_id"])
    assert {"skipped.v001", "skipped.v003"} <= set(run.data.tags)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "asr")) == [0, 1, 2, 3]
    assert summary["versions"] == 4 and summary["updates_run"] == 1


def test_dormancy_probes_run_in_the_pipeline_and_are_logged(flows, tmp_path):
    config = build_config({}, TINY + ["study=probed", "eval.bec=true", "update.updates=2", "tracking.drift_check=false"])
    summary = flows.retraining_pipeline(config, results_dir=tmp_path / "results", store_dir=tmp_path / "mlruns")
    rows = list(csv.DictReader((tmp_path / "results" / "probed" / "timeline.csv").open()))
    assert float(rows[0]["bec"]) == pytest.approx(1.0), "the poisoned M0 is its own reference"
    assert all(r["bec"] != "" for r in rows) and "p_asr" not in rows[0], "only the enabled probe"
    client = _client(summary)
    assert sorted(m.step for m in client.get_metric_history(summary["mlflow_run_id"], "bec")) == [0, 1, 2]
    assert "baseline" in {a.path for a in client.list_artifacts(summary["mlflow_run_id"])}, "kept for resume"
    assert summary["bec_final"] == pytest.approx(float(rows[-1]["bec"]))


def test_compare_studies_reads_a_simulated_study_from_its_own_experiment(study, tmp_path):
    from permanence.adapters.studies import compare_studies

    _, summary, workdir = study
    client = _client(summary)
    newest = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], "attributes.status = 'FINISHED'",
                                order_by=["attributes.start_time DESC"], max_results=1)[0]  # other tests re-run it
    files = compare_studies(["tiny"], workdir / "mlruns", tmp_path, "one")
    rows = list(csv.DictReader(files["cells"].open()))
    assert [(r["study"], r["mlflow_run_id"]) for r in rows] == [("tiny", newest.info.run_id)]
    assert float(rows[0]["final_asr"]) == pytest.approx(newest.data.metrics["asr"])


def test_all_experiments_reads_every_page_of_the_store(tmp_path):
    """compare --study looks for a study in every experiment: one search_experiments call stops at its page size."""
    from permanence.adapters.mlflow_store import all_experiments, open_client, tracking_uri

    client = open_client(tracking_uri(tmp_path / "mlruns"))
    for index in range(5):
        client.create_experiment(f"e{index}")
    assert len(client.search_experiments(max_results=2)) == 2
    names = sorted(e.name for e in all_experiments(client, per_page=2))
    assert names == ["Default", "e0", "e1", "e2", "e3", "e4"]
