"""Registered versions as MLflow Models (a pyfunc from code; served by `mlflow models serve` in a real process) and
foreign MLflow PyTorch models (pt2 and pickle) as the audit reads them, with the evidence for the pt2 decision."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from conftest import TINY
from permanence import build_config
from permanence.audit import InputNormalized
from permanence.training import predict

pytestmark = [pytest.mark.pipeline, pytest.mark.usefixtures("one_torch_thread")]
BIN = Path(sys.executable).parent


def register_study(store: Path, overrides: list[str]):
    """A tiny timeline registered version by version, as the pipeline registers it (no Prefect needed)."""
    from permanence.adapters.mlflow_store import register_simulated

    config = build_config({}, [*TINY, "runtime.device=cpu", "tracking.drift_check=false", *overrides])
    timeline, sim, uri = register_simulated(config, store)
    return SimpleNamespace(config=config, timeline=timeline, sim=sim, uri=uri, store=store)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    return register_study(tmp_path_factory.mktemp("registry") / "mlruns", ["study=tiny", "update.updates=1"])


def _images(registry, n: int = 48) -> torch.Tensor:
    return registry.sim.splits.test_x[:n]


def _expected(registry, index: int, images: torch.Tensor) -> np.ndarray:
    model = registry.sim.load_model(registry.timeline.states[index])
    return predict(model, images, registry.sim.runtime).numpy()


def test_pyfunc_load_model_predicts_the_simulators_labels(registry, monkeypatch):
    import mlflow.pyfunc

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", registry.uri)
    model = mlflow.pyfunc.load_model("models:/tiny@production")
    images = _images(registry)
    scores = model.predict(images.float().div(255).numpy())
    assert scores.shape == (len(images), registry.sim.splits.num_classes)
    assert (scores.argmax(1) == _expected(registry, -1, images)).all()
    inputs = model.metadata.get_input_schema().inputs[0]
    assert inputs.shape == (-1, 1, 16, 16) and str(inputs.type) == "float32"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_models_serve_answers_over_http(registry, tmp_path):
    import httpx

    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry.uri, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", "models:/tiny/1", "--env-manager", "local",
                               "--host", "127.0.0.1", "-p", str(port)], env=env, stdout=log, stderr=log,
                              start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow models serve did not answer within 120 s")
        images = _images(registry, 16)
        reply = httpx.post(f"http://127.0.0.1:{port}/invocations", timeout=60,
                           json={"inputs": images.float().div(255).numpy().tolist()})
        assert reply.status_code == 200, reply.text[:500]
        scores = np.asarray(reply.json()["predictions"])
        assert (scores.argmax(1) == _expected(registry, 0, images)).all()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


# --- foreign models ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def foreign(registry):
    """The study's (poisoned) M0 logged with mlflow.pytorch in both formats, as someone else's registry holds it."""
    import mlflow
    import mlflow.pytorch

    from permanence.adapters.mlflow_store import artifact_root, ensure_experiment, open_client

    m0 = registry.sim.load_model(registry.timeline.states[0]).eval()
    model = InputNormalized(m0, registry.sim.splits.mean, registry.sim.splits.std).eval()
    example = registry.sim.splits.test_x[:4].float().div(255).numpy()
    client = open_client(registry.uri)
    experiment = ensure_experiment(client, "foreign", artifact_root(registry.uri))
    with pytest.MonkeyPatch.context() as patch:  # not mlflow.set_tracking_uri: it leaves MLFLOW_TRACKING_URI set
        patch.setenv("MLFLOW_TRACKING_URI", registry.uri)
        patch.setenv("MLFLOW_REGISTRY_URI", registry.uri)
        for fmt in ("pickle", "pt2"):
            with mlflow.start_run(experiment_id=experiment):
                mlflow.pytorch.log_model(model, name="model", serialization_format=fmt, input_example=example,
                                         registered_model_name=f"foreign_{fmt}", pip_requirements=["torch"])
    return client


def _audit(registry, *args: str):
    from permanence.cli import app

    started = time.perf_counter()
    result = CliRunner().invoke(app, ["audit", *args, "--store", str(registry.store), "--results",
                                      str(registry.store.parent / "results"), "--no-progress", "--workers", "1",
                                      "-o", "neural_cleanse.steps=40"])
    result.seconds = time.perf_counter() - started
    return result


def _audit_tags(client, name: str) -> dict[str, str]:
    return {k: v for mv in client.search_model_versions(f"name='{name}'") for k, v in mv.tags.items()
            if k.startswith("audit.")}


def test_a_pickled_model_is_audited_only_with_trust_pickle(registry, foreign):
    refused = _audit(registry, "foreign_pickle", "--data", "digits")
    assert refused.exit_code == 2
    lines = [line for line in refused.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "pickle" in lines[0] and "--trust-pickle" in lines[0], refused.output
    assert _audit_tags(foreign, "foreign_pickle") == {}
    assert foreign.get_experiment_by_name("audit-foreign_pickle") is None

    trusted = _audit(registry, "foreign_pickle", "--data", "digits", "--trust-pickle", "--fail-on", "never")
    assert trusted.exit_code == 0, trusted.output
    tags = _audit_tags(foreign, "foreign_pickle")
    assert tags["audit.verdict"] == "backdoor" and tags["audit.target"] == "0"


def test_a_pt2_model_is_audited_without_the_flag_like_the_same_model_registered_by_permanence(registry, foreign):
    done = _audit(registry, "foreign_pt2", "--data", "digits", "--checks", "neural_cleanse,known_triggers")
    assert done.exit_code == 1, done.output  # backdoor found: the default --fail-on backdoor trips
    tags = _audit_tags(foreign, "foreign_pt2")
    assert tags["audit.verdict"] == "backdoor" and tags["audit.target"] == "0"
    assert "pt2" in done.output


# --- pt2: the evidence and the guard -------------------------------------------------------------------

def _exported(tmp: Path) -> Path:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 10)).eval()
    program = torch.export.export(model, (torch.rand(4, 1, 16, 16),), dynamic_shapes=[{0: torch.export.Dim.AUTO}])
    path = tmp / "model.pt2"
    torch.export.save(program, path)
    return path


def _rewrite(source: Path, target: Path, edit) -> Path:
    """A copy of the archive with one record edited: edit(name, bytes) -> bytes."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, edit(info.filename, src.read(info)))
    return target


def _edit_program(change):
    def edit(name: str, data: bytes) -> bytes:
        if not name.endswith("models/model.json"):
            return data
        program = json.loads(data)
        change(program)
        return json.dumps(program).encode()

    return edit


def _first_symbolic_size(program) -> dict:
    for value in program["graph_module"]["graph"]["tensor_values"].values():
        for size in value["sizes"]:
            if "as_expr" in size:
                return size["as_expr"]
    raise AssertionError("the export has no symbolic batch size")


def test_torch_export_load_runs_code_from_the_program_json_and_the_guard_refuses_it(tmp_path):
    """Why pt2 is not trusted as it is: torch.export.load hands every symbolic size string to sympy.sympify
    (eval). MLflow 3.17's own pickle-free check passes such an archive."""
    import mlflow.pytorch

    from permanence.adapters.registry_models import ModelRefused, PT2Guard, VersionRef

    marker = tmp_path / "payload-ran"

    def inject(program):
        expr = _first_symbolic_size(program)
        expr["expr_str"] = f"__import__('pathlib').Path({str(marker)!r}).touch() or {expr['expr_str']}"

    evil = _rewrite(_exported(tmp_path), tmp_path / "evil.pt2", _edit_program(inject))
    with pytest.raises(ModelRefused, match="symbolic expression"):
        PT2Guard(VersionRef("x", 1, None), evil).sanitized()
    assert not marker.exists()
    mlflow.pytorch._validate_pt2_archive_is_pickle_free(str(evil))  # MLflow's check does not see it
    torch.export.load(evil)
    assert marker.exists(), "torch.export.load no longer evaluates symbolic sizes: revisit PT2Guard"


@pytest.mark.parametrize("what, change", [
    ("call target", lambda p: p["graph_module"]["graph"]["nodes"][0].update(target="torch.os.system")),
    ("unexpected string", lambda p: p["graph_module"]["signature"]["input_specs"][0]["parameter"].update(
        parameter_name='x")\nimport os\n#')),
])
def test_the_pt2_guard_refuses_what_torch_would_run(tmp_path, what, change):
    from permanence.adapters.registry_models import ModelRefused, PT2Guard, VersionRef

    archive = _rewrite(_exported(tmp_path), tmp_path / "edited.pt2", _edit_program(change))
    with pytest.raises(ModelRefused, match=what):
        PT2Guard(VersionRef("x", 1, None), archive).sanitized()


def test_the_pt2_guard_refuses_pickled_payloads_and_keeps_a_clean_archive_exact(tmp_path):
    from permanence.adapters.registry_models import ModelRefused, PT2Guard, VersionRef, verify_graph

    source = _exported(tmp_path)
    ref = VersionRef("x", 1, None)
    module = torch.export.load(io.BytesIO(PT2Guard(ref, source).sanitized())).module(check_guards=False)
    verify_graph(module, ref)
    x = torch.rand(5, 1, 16, 16)
    assert torch.allclose(module(x), torch.export.load(source).module()(x))

    def pickled(name: str, data: bytes) -> bytes:
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            next(iter(config["config"].values()))["use_pickle"] = True
            return json.dumps(config).encode()
        return data

    with pytest.raises(ModelRefused, match="pickled"):
        PT2Guard(ref, _rewrite(source, tmp_path / "pickled.pt2", pickled)).sanitized()


def test_every_version_folder_is_its_own_mlflow_model_copied_from_one_template(tmp_path):
    """The folders are copies of one template folder: each has its own weights, uuid and size."""
    import torch
    import yaml

    from permanence.adapters.mlflow_store import ModelSpec, write_mlflow_model

    spec = ModelSpec("small_cnn", 1, 8, 8, 10, [0.5], [0.25], "digits")
    written = [write_mlflow_model(tmp_path / f"v{i}", {"w": torch.full((3, 3), float(i))}, spec) for i in range(2)]
    meta = [yaml.safe_load((f / "MLmodel").read_text()) for f in written]
    assert meta[0]["model_uuid"] != meta[1]["model_uuid"]
    assert meta[0]["signature"] == meta[1]["signature"] and "python_function" in meta[0]["flavors"]
    for i, folder in enumerate(written):
        weights = torch.load(folder / "artifacts" / "weights.pt", weights_only=True)
        assert torch.equal(weights["w"], torch.full((3, 3), float(i)))
        assert meta[i]["model_size_bytes"] > weights["w"].numel() * 4


def test_the_template_is_written_once_per_spec_and_environment_and_kept_in_the_cache(tmp_path, monkeypatch):
    import shutil

    import torch

    from permanence.adapters import mlflow_store
    from permanence.adapters.mlflow_store import ModelSpec, model_template, write_mlflow_model

    monkeypatch.setenv("PERMANENCE_CACHE_DIR", str(tmp_path / "cache"))
    writes = []
    save = mlflow_store.save_mlflow_model
    monkeypatch.setattr(mlflow_store, "save_mlflow_model", lambda *a: writes.append(a[2]) or save(*a))
    digits = ModelSpec("small_cnn", 1, 8, 8, 10, [0.5], [0.25], "digits")
    mnist = ModelSpec("small_cnn", 1, 28, 28, 10, [0.13], [0.31], "mnist")
    for spec in (digits, digits, mnist, digits):
        model_template(spec)  # e.g. one per process of a sweep
    assert writes == [digits, mnist]
    templates = sorted((tmp_path / "cache" / "mlflow-model-templates").iterdir())
    assert len(templates) == 2 and all(not (t / "artifacts" / "weights.pt").exists() for t in templates)
    # a copy is a whole MLflow Model again, and a cleared cache is written anew
    copy = write_mlflow_model(tmp_path / "v0", {"w": torch.zeros(2)}, mnist)
    assert (copy / "MLmodel").is_file() and (copy / "artifacts" / "input.json").is_file()
    shutil.rmtree(tmp_path / "cache")
    model_template(digits)
    assert writes == [digits, mnist, digits]
