"""The command line: bad input ends with one line naming the field or file, exit code 2, nothing written."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from permanence.cli import app

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


def _corrupt_npz(tmp_path: Path) -> str:
    path = tmp_path / "images.npz"
    path.write_bytes(b"this is not an npz archive at all")
    return str(path)


def _unknown_key(tmp_path: Path) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS.read_text().replace("  ratio: 0.1", "  ratio: 0.1\n  colour: red"))
    return str(path)


BAD_INPUTS = {
    "unknown attack": (["--set", "attack.name=trojannn"], r"attack\.name: unknown attack 'trojannn'; allowed: badnets, blended, sig, wanet"),
    "unknown policy": (["--set", "update.policy=yolo"], r"update\.policy: unknown policy 'yolo'; allowed: ewc, fine_pruning, finetune, fst, ft_sam, replay, retrain, static, stlr"),
    "unknown dataset": (["--set", "data.name=imagenet"], r"data\.name: unknown dataset 'imagenet'; allowed: cifar10, digits"),
    "unknown model": (["--set", "model.name=gpt"], r"model\.name: unknown model 'gpt'"),
    "ratio above 1": (["--set", "attack.ratio=1.2"], r"attack\.ratio: Input should be less than or equal to 1 \(got 1\.2\)"),
    "negative ratio": (["--set", "attack.ratio=-0.1"], r"attack\.ratio: Input should be greater than or equal to 0"),
    "negative delta": (["--set", "drift.delta=-2"], r"drift\.delta: Input should be greater than or equal to 0 \(got -2\)"),
    "missing data root": (["--set", "data.name=mnist", "--set", "data.root=/nonexistent/data"], r"data\.root: folder '/nonexistent/data' does not exist"),
    "corrupt data file": (["--set", "data.name=npz", "--set", "data.root={corrupt}"], r"images\.npz: not a readable \.npz file"),
    "unknown key in params.yaml": (["--config", "{unknown_key}"], r"params\.yaml: unknown key 'attack\.colour'; allowed keys here: name, target, ratio, strength"),
    "invalid study name": (["--study", "my study!"], r"study: must be an identifier"),
    "missing config file": (["--config", "/nonexistent/params.yaml"], r"/nonexistent/params\.yaml: config file not found"),
    "malformed override": (["--set", "attack.ratio"], r"override 'attack\.ratio': expected key\.sub=value"),
    "target not a class": (["--set", "attack.target=10"], r"attack\.target: 10 is not a class of digits \(0\.\.9\)"),
    "hue on grayscale": (["--set", "drift.kind=hue"], r"drift\.kind: hue does nothing to grayscale images"),
    "bad trigger strength": (["--set", "attack.strength=50"], r"attack\.strength: 50\.0 is not a valid patch size"),
    "poisoned update beyond timeline": (["--set", "poisoning.inject=update", "--set", "poisoning.first=20"], r"poisoning: update 20 is beyond the timeline"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, monkeypatch):
    import re

    args, pattern = BAD_INPUTS[case]
    args = [a.format(corrupt=_corrupt_npz(tmp_path), unknown_key=_unknown_key(tmp_path)) for a in args]
    if "--config" not in args:
        args = ["--config", str(PARAMS), *args]
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["simulate", *args, "--results", "results", "--store", "mlruns"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and re.search(pattern, lines[0]), lines[0]
    assert not (tmp_path / "mlruns").exists(), "no MLflow run (and so no version) may be created"
    assert not (tmp_path / "results").exists()


def test_show_unknown_study(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["show", "--study", "nothing_here"])
    assert result.exit_code == 2 and "study: no results for 'nothing_here'" in result.stderr


def test_prefect_home_defaults_into_the_project(tmp_path):
    """Importing the flow points PREFECT_HOME at the project's git-ignored .prefect/, not at ~/.prefect."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["HOME"] = str(tmp_path)
    code = (
        "from permanence.adapters.flow_loader import load_retrain_flow; load_retrain_flow(); "
        "from prefect.settings import PREFECT_HOME; print(PREFECT_HOME.value())"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    assert Path(out) == ROOT / ".prefect"
    assert ".prefect/" in (ROOT / ".gitignore").read_text().split()
    assert not (tmp_path / ".prefect").exists()


@pytest.mark.parametrize("args, says", [
    (["sweep", "sweeps/policies.yaml", "--dry-run", "--seeds", "abc"], "permanence sweep: Invalid value for '--seeds'"),
    (["simulate", "--bogus"], "permanence simulate: No such option: --bogus"),
])
def test_a_command_line_usage_error_is_one_line_exit_2(args, says, tmp_path):
    """Through the installed console script, as a user types it (the Typer app alone prints a usage box)."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([str(Path(sys.executable).parent / "permanence"), *args], cwd=root, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")})
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], done.stderr
    assert done.stdout == ""


def test_help_and_usage_errors_answer_without_importing_torch():
    """`permanence --help` answered in 0.3 s instead of 6.9 s once the commands import the core where they need it;
    the package's names still load on first use."""
    code = (
        "import sys; from typer.testing import CliRunner; from permanence.cli import app; "
        "assert CliRunner().invoke(app, ['--help']).exit_code == 0; "
        "assert CliRunner().invoke(app, ['sweep', 'x.yaml', '--seeds', 'abc']).exit_code == 2; "
        "heavy = sorted(m for m in ('torch', 'torchvision', 'mlflow', 'prefect') if m in sys.modules); "
        "import permanence; assert permanence.Simulation.__module__ == 'permanence.simulation'; "
        "assert 'Simulation' in dir(permanence); print(heavy)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
    import permanence

    assert sorted(permanence.__all__) == sorted(permanence._EXPORTS), "every exported name loads on first use"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        permanence.nothing


def test_the_console_script_leaves_what_it_imported_out_of_the_exit_collections():
    """On every way out (here a bad input, exit 2) the live objects are frozen before the interpreter shuts down, and
    the exit handlers still run."""
    script = ("import atexit, gc, sys\nfrom permanence.cli import main\n"
              "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0))\n"
              "sys.argv = ['permanence', 'simulate', '--config', 'no-such-params.yaml']\nmain()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert "frozen at exit: True" in done.stdout


def test_a_dask_worker_that_preloads_the_tasks_freezes_its_objects_as_it_closes():
    script = ("import gc\nfrom permanence.adapters import sweep_tasks\nsweep_tasks.dask_teardown(None)\n"
              "print(gc.get_freeze_count() > 0)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "True", done.stderr
