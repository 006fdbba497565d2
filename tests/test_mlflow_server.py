"""A team's set-up: `mlflow server` as the one tracking server (proxied artifacts, as `mlflow server` serves them by
default), every command pointed at it with MLFLOW_TRACKING_URI. The server checks what a local store does not, such
as that a model version's source lies in the artifacts of the run it names."""

import subprocess

import pytest

from sweeping import BIN, TIMELINES, _check_store, _client, _env, _free_port, _sweep, prefect_server, serving  # noqa: F401 (autouse)

pytestmark = pytest.mark.pipeline


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = str(_free_port())
    uri = f"http://127.0.0.1:{port}"
    with serving([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
                  "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", port,
                  "--workers", "1"], f"{uri}/health", tmp):
        yield uri


def test_a_sweep_and_an_audit_through_an_mlflow_server(tmp_path, mlflow_server):
    env = {**_env(tmp_path), "MLFLOW_TRACKING_URI": mlflow_server}
    done = subprocess.run(_sweep(tmp_path, "--workers", "2"), cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "failed:" not in done.stdout, done.stdout[-3000:]
    assert f"open {mlflow_server}/#/experiments/" in done.stdout  # the server is the UI: no `mlflow ui` to start
    _check_store(tmp_path, mlflow_server)
    assert not (tmp_path / "mlruns").exists(), "everything went to the server"

    again = subprocess.run(_sweep(tmp_path, "--workers", "2"), cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=900)
    assert again.returncode == 0 and f"({TIMELINES} finished before)" in again.stdout, again.stdout[-3000:]

    client = _client(tmp_path, mlflow_server)
    study = next(m.name for m in client.search_registered_models() if "finetune" in m.name)
    audit = subprocess.run([str(BIN / "permanence"), "audit", study, "--checks", "known_triggers", "--fail-on", "never"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr[-3000:]
    versions = client.search_model_versions(f"name='{study}'")
    assert len(versions) == 3 and all(v.tags.get("audit.verdict") for v in versions)
