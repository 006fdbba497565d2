"""`permanence audit` on a tiny registry: verdicts, tags, the MLflow audit run and the report; blind by
construction; lineage; the dormancy check; bad input (one line, exit 2, nothing written)."""

import csv
import json
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from permanence import PermanenceError
from permanence.audit import CHECKS, VERDICTS, AuditData, InputNormalized
from permanence.audit.verdict import trigger_works
from test_mlflow_models import register_study

pytestmark = [pytest.mark.pipeline, pytest.mark.usefixtures("one_torch_thread")]
BIN = Path(sys.executable).parent
FEW_STEPS = ["-o", "neural_cleanse.steps=60"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """BadNets in D0, two fine-tuning updates: three registered versions."""
    reg = register_study(tmp_path_factory.mktemp("audit") / "mlruns", ["study=tiny", "update.updates=2"])
    from mlflow import MlflowClient

    reg.client = MlflowClient(reg.uri)
    return reg


def _audit_tags(client, name: str) -> dict[str, dict[str, str]]:
    return {str(mv.version): {k: v for k, v in mv.tags.items() if k.startswith("audit.")}
            for mv in client.search_model_versions(f"name='{name}'")}


@pytest.fixture(scope="module")
def audited(registry):
    """`permanence audit` as a user runs it: a real process, two forked workers, probes on every version."""
    results = registry.store.parent / "results"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    started = time.perf_counter()
    done = subprocess.run([str(BIN / "permanence"), "audit", "tiny", "--store", str(registry.store), "--results",
                           str(results), "--no-progress", "--probe-all", *FEW_STEPS], env=env, cwd=registry.store.parent,
                          capture_output=True, text=True, timeout=300)
    return done, results / "audit-tiny", time.perf_counter() - started


def test_audit_flags_the_poisoned_m0_and_exits_1_on_the_default_gate(audited, registry):
    done, _, seconds = audited
    assert done.returncode == 1, done.stdout + done.stderr
    assert "gate --fail-on backdoor tripped" in done.stdout
    tags = _audit_tags(registry.client, "tiny")
    assert sorted(tags) == ["1", "2", "3"]
    m0 = tags["1"]
    assert m0["audit.verdict"] == "backdoor" and m0["audit.target"] == "0"
    assert float(m0["audit.anomaly_index"]) > 2
    for version in tags.values():
        assert version["audit.verdict"] in VERDICTS
        datetime.fromisoformat(version["audit.at"])
        assert version["audit.reason"] and math.isfinite(float(version["audit.p_asr"]))  # --probe-all
        assert math.isfinite(float(version["audit.reactivated_asr"]))


def test_the_audit_run_holds_metrics_per_version_and_the_report(audited, registry):
    _, folder, _ = audited
    experiment = registry.client.get_experiment_by_name("audit-tiny")
    runs = registry.client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    assert all(tags["audit.run_id"] == run_id for tags in _audit_tags(registry.client, "tiny").values())
    for key in ("neural_cleanse.anomaly_index", "dormancy.asr", "dormancy.p_asr", "verdict"):
        assert sorted(m.step for m in registry.client.get_metric_history(run_id, key)) == [1, 2, 3], key
    artifacts = {a.path for a in registry.client.list_artifacts(run_id)}
    assert {"report.html", "audit.png", "audit.csv", "audit.json", "triggers"} <= artifacts
    assert (folder / "audit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (folder / "report.html").read_text()
    assert page.count("<tr>") >= 3 + 1 and "data:image/png;base64," in page and "backdoor" in page
    rows = list(csv.DictReader((folder / "audit.csv").open()))
    assert [r["version"] for r in rows] == ["1", "2", "3"] and [r["update"] for r in rows] == ["0", "1", "2"]
    # Neural Cleanse's flag on M0 judged against the same inversion on the never-poisoned baseline
    assert rows[0]["neural_cleanse.flagged"] == "1" and 0 < float(rows[0]["neural_cleanse.reference_ratio"]) <= 0.5
    summary = json.loads((folder / "audit.json").read_text())
    # the published BadNets trigger took over: the lineage probes it, not Neural Cleanse's reconstruction of it
    assert summary["lineage"]["source"].startswith("known trigger badnets") and summary["lineage"]["target"] == 0
    assert set(summary["baseline_numbers"]) == {"asr_clean", "p_asr_clean", "reactivated_asr_clean"}
    assert any(path.name.startswith("v001-") for path in (folder / "triggers").glob("*.png"))  # NC's, per version


# --- blind by construction -----------------------------------------------------------------------------

def _request(registry, **changes):
    from permanence.adapters.registry_audit import AuditRequest

    base = AuditRequest("tiny", store=registry.store, results=registry.store.parent / "api-results", workers=1,
                        options={"neural_cleanse": {"steps": 60}}, probe_all=True)
    return replace(base, **changes)


def _numbers(result) -> list[tuple]:
    return [(row.version, row.verdict.verdict, tuple(sorted((f"{c}.{k}", round(v, 6)) for c, r in row.checks.items()
                                                            for k, v in r.numbers.items() if k != "seconds")))
            for row in result.rows]


def test_the_audit_is_blind_to_the_simulators_tags_and_runs(registry, monkeypatch):
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from permanence.adapters.registry_audit import prepare, run
    from permanence.adapters.registry_models import VersionRef

    assert set(VersionRef.__dataclass_fields__) == {"name", "version", "update"}
    before = run(prepare(_request(registry, probe_all=False)))
    for mv in registry.client.search_model_versions("name='tiny'"):  # what the simulator knows, altered or gone
        registry.client.set_model_version_tag("tiny", mv.version, "asr", "0.0000")
        registry.client.set_model_version_tag("tiny", mv.version, "attack", "none")
        registry.client.set_model_version_tag("tiny", mv.version, "poisoned", "false")
        registry.client.delete_model_version_tag("tiny", mv.version, "record")

    def no_runs(*args, **kwargs):
        raise AssertionError("the audit read a run (its params or metrics)")

    for method in ("get_run", "search_runs", "get_metric_history", "_search_runs"):
        monkeypatch.setattr(SqlAlchemyStore, method, no_runs)
    after = run(prepare(_request(registry, probe_all=False)))
    assert _numbers(after) == _numbers(before)
    assert after.rows[0].verdict.verdict == "backdoor"

    # the gate, on the same result: dormant trips on dormant or backdoor, never never trips
    assert [r.version for r in after.tripped()] == [r.version for r in after.rows if r.verdict.verdict == "backdoor"]
    dormant = replace(after, plan=replace(after.plan, request=replace(after.plan.request, fail_on="dormant")))
    assert {r.version for r in dormant.tripped()} == {r.version for r in after.rows
                                                       if r.verdict.verdict in ("backdoor", "dormant")}
    never = replace(after, plan=replace(after.plan, request=replace(after.plan.request, fail_on="never")))
    assert never.tripped() == []


def test_lineage_probes_every_version_with_the_trigger_recovered_where_neural_cleanse_flagged(registry):
    from permanence.adapters.registry_audit import prepare, run

    result = run(prepare(_request(registry, checks=("neural_cleanse", "dormancy"), probe_all=False)))
    lineage = result.lineage
    source = next(r for r in result.rows if r.version == lineage.version)
    assert source.checks["neural_cleanse"].flagged and lineage.target == 0
    assert lineage.source.startswith("neural_cleanse on version") and lineage.image() is not None
    assert all(math.isfinite(r.number("dormancy", "asr")) for r in result.rows)  # measured on every version
    for row in result.rows:  # probes only where no trigger works (>= alpha and clear of the baseline)
        nc = row.checks["neural_cleanse"]
        live = trigger_works(row.checks["dormancy"].numbers) or (nc.flagged and trigger_works(nc.numbers))
        assert math.isfinite(row.number("dormancy", "p_asr")) != live
        assert math.isfinite(row.number("dormancy", "asr_clean"))  # every ASR beside the never-poisoned baseline's


# --- the dormancy check (core) ----------------------------------------------------------------------------

def test_the_dormancy_check_tells_a_live_trigger_from_a_clean_model(registry):
    from permanence.attacks import build_attack
    from permanence.audit.dormancy import baseline_numbers, train_clean_baseline
    from permanence.data import DATASETS
    from permanence.config import DataConfig, EvalConfig

    digits = DATASETS.get("digits")(DataConfig(), 0)
    data = AuditData.from_images(digits.x_test, digits.y_test, 10)
    s = registry.sim.splits
    m0 = InputNormalized(registry.sim.load_model(registry.timeline.states[0]), s.mean, s.std).eval()
    trigger = build_attack("badnets", target=0, strength=None, image_shape=(1, 16, 16), seed=0).apply
    check = CHECKS.get("dormancy")
    live = check(m0, data, trigger=trigger, target=0, probes=[])
    assert live.flagged and live.asr >= 0.9 and "p_asr" not in live.numbers

    clean = train_clean_baseline("small_cnn", data, s.mean.tolist(), s.std.tolist(), seed=1)
    baseline = train_clean_baseline("small_cnn", data, s.mean.tolist(), s.std.tolist(), seed=0)
    quick = EvalConfig(reactivate_steps=5, probe_images=100, retune_epochs=2)
    known = baseline_numbers(baseline, data, trigger, 0, settings=quick)
    probed = check(clean, data, trigger=trigger, target=0, baseline=baseline, baseline_numbers=known, settings=quick)
    assert not probed.flagged and probed.asr < 0.2
    assert probed.numbers["p_asr_clean"] == known["p_asr_clean"]
    assert probed.numbers["reactivated_asr"] - probed.numbers["reactivated_asr_clean"] < 0.25
    again = check(clean, data, trigger=trigger, target=0, baseline=baseline, settings=quick, probes=["reactivate"])
    assert again.numbers["reactivated_asr_clean"] == known["reactivated_asr_clean"]
    with pytest.raises(PermanenceError, match="baseline"):
        check(clean, data, trigger=trigger, target=0)


# --- bad input: one line, exit 2, nothing written ----------------------------------------------------------

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bad_inputs(registry):
    """A version whose weights are gone, and a data file of the wrong shape."""
    import shutil

    tmp = registry.store.parent
    source = registry.client.get_model_version_download_uri("tiny", "1")
    broken = tmp / "noweights"
    shutil.copytree(source.removeprefix("file://"), broken)
    (broken / "artifacts" / "weights.pt").unlink()
    registry.client.create_registered_model("noweights")
    registry.client.create_model_version("noweights", broken.as_uri())
    wrong = tmp / "wrong.npz"
    np.savez(wrong, x_test=np.zeros((60, 28, 28), np.uint8), y_test=np.zeros(60, np.int64))
    return {"wrong": str(wrong)}


@pytest.mark.parametrize("case, args, says", [
    ("unknown model", ["nosuchmodel"], "no registered model named 'nosuchmodel'; known:"),
    ("missing version", ["tiny", "--versions", "2,7-9"], "no version 7-9"),
    ("bad selection", ["tiny", "--versions", "3-1"], "runs backwards"),
    ("no weights", ["noweights"], "no weights"),
    ("wrong shape", ["tiny", "--data", "{wrong}"], "images of shape (C, H, W) = (1, 28, 28)"),
    ("unreachable", ["tiny", "--tracking-uri", "http://127.0.0.1:{port}"], "did not answer"),
    ("bad option", ["tiny", "-o", "neural_cleanse.stepz=3"], "unknown option 'stepz'"),
    ("option of the wrong type", ["tiny", "-o", "neural_cleanse.steps=abc"],
     "--option neural_cleanse.steps: Input should be a valid integer"),
    ("a check's option of the wrong type", ["tiny", "-o", "known_triggers.threshold=abc"],
     "--option known_triggers.threshold: Input should be a valid number"),
    ("one unknown attack of a list", ["tiny", "-o", "known_triggers.attacks=badnets,trojan"], "unknown attack 'trojan'"),
    ("an unknown probe of a list", ["tiny", "-o", "dormancy.probes=retune,nope"], "unknown probe 'nope'"),
    ("strip without inputs", ["tiny", "--checks", "strip"], "give them with --candidates"),
    ("bad trigger", ["tiny", "--trigger", "blended@0"], "drawn from a seed"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(registry, bad_inputs, case, args, says):
    from permanence.cli import app

    before = _audit_tags(registry.client, "tiny")
    args = [a.format(port=_closed_port(), **bad_inputs) for a in args]
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["audit", *args, "--store", str(registry.store), "--results",
                                      str(registry.store.parent / "bad-results"), "--no-progress", "--workers", "1"])
    seconds = time.perf_counter() - started
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], result.output
    assert _audit_tags(registry.client, "tiny") == before
    assert _audit_tags(registry.client, "noweights") == {"1": {}}
    assert registry.client.get_experiment_by_name("audit-noweights") is None
    assert not (registry.store.parent / "bad-results").exists()
    assert seconds < 30, f"{case} took {seconds:.0f} s"
