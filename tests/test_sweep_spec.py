"""Sweep files: expansion, validation (one line, exit 2, nothing written), shared M0s, the comparison tables."""

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from permanence.cli import app
from permanence.errors import PermanenceError
from permanence.policies import POLICIES
from permanence.sweep import baseline_key, estimated_cost, load_sweep, m0_key, probe_baseline_key

ROOT = Path(__file__).resolve().parents[1]
TINY_BASE = ["update.updates=2", "train.epochs=2", "update.epochs=1", "data.limit=400", "data.test_limit=100"]


def _write(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text.replace("CONFIG", str(ROOT / "params.yaml")))
    return path


def test_grid_times_cells_times_seeds_with_exclude_and_controls(tmp_path):
    path = _write(tmp_path, """
name: demo
config: CONFIG
base: [update.updates=2]
grid:
  attack.name: [badnets, blended]
cells:
  - {update.policy: finetune, update.lr: 0.02}
  - {update.policy: stlr}
seeds: [3, 5]
exclude: [{update.policy: stlr, attack.name: blended}]
""")
    sweep = load_sweep(path)
    cells = [t for t in sweep.timelines if not t.control]
    assert sweep.axes == ["attack.name", "update.policy", "update.lr"]
    assert len(cells) == 3 * 2  # (2 attacks x 2 cells - 1 excluded) x 2 seeds
    assert {(t.values["update.policy"], t.values["attack.name"]) for t in cells} == {
        ("finetune", "badnets"), ("finetune", "blended"), ("stlr", "badnets")}
    finetune = next(t for t in cells if t.values["update.policy"] == "finetune")
    assert finetune.config.update.lr == 0.02 and finetune.config.update.updates == 2
    assert {t.seed for t in cells} == {3, 5} and all(t.config.seed == t.seed for t in cells)
    assert len({t.study for t in sweep.timelines}) == len(sweep.timelines), "one registered model per timeline"
    controls = [t for t in sweep.timelines if t.control]
    # one never-poisoned control per (attack, update recipe) and seed: finetune's lr of 0.02 is its own recipe
    assert len(controls) == 6 and all(c.config.poisoning.inject == "none" for c in controls)
    assert all(c.config.update.policy == "finetune" for c in controls)
    assert {t.control_study for t in cells} == {c.study for c in controls}


def test_cells_that_differ_only_in_settings_their_timeline_never_reads_share_one_control(tmp_path):
    """A control poisons nothing, so the injection window and the injection's policy do not make another control."""
    sweep = load_sweep(_write(tmp_path, """
name: windows
config: CONFIG
base: [update.updates=3, update.policy=stlr]
cells:
  - {poisoning.inject: update, poisoning.first: 2}
  - {poisoning.inject: range, poisoning.first: 1, poisoning.last: 3}
  - {poisoning.inject: update, poisoning.first: 1, poisoning.policy: finetune}
  - {poisoning.inject: d0}
"""))
    controls = [t for t in sweep.timelines if t.control]
    assert len(controls) == 1 and {t.control_study for t in sweep.timelines if not t.control} == {controls[0].study}
    assert len(sweep.timelines) == 5


def test_star_means_every_registered_policy(tmp_path):
    sweep = load_sweep(_write(tmp_path, "name: all\nconfig: CONFIG\ngrid: {update.policy: '*'}\ncontrol: false\n"))
    assert [t.values["update.policy"] for t in sweep.timelines] == POLICIES.names()


def test_timelines_share_m0_only_where_it_is_the_same_model(tmp_path):
    sweep = load_sweep(_write(tmp_path, """
name: share
config: CONFIG
grid:
  update.policy: [finetune, stlr, static]
  poisoning.inject: [d0, update]
seeds: 2
control: false
"""))
    keys = {(t.values["update.policy"], t.values["poisoning.inject"], t.seed): m0_key(t.config) for t in sweep.timelines}
    assert len(set(keys.values())) == 4  # (poisoned D0, clean D0) x 2 seeds
    assert keys[("finetune", "d0", 0)] == keys[("stlr", "d0", 0)] != keys[("finetune", "d0", 1)]
    assert keys[("finetune", "update", 0)] != keys[("finetune", "d0", 0)]
    d0 = next(t for t in sweep.timelines if t.values["poisoning.inject"] == "d0")
    later = next(t for t in sweep.timelines if t.values["poisoning.inject"] == "update" and t.seed == d0.seed)
    assert baseline_key(d0.config) == m0_key(later.config), "the probes' baseline is the clean M0 of the same seed"



def test_timelines_share_the_probes_baseline_side_only_where_its_inputs_are_the_same(tmp_path):
    """The paired probes' baseline fields depend on the baseline model and the probes' inputs, never on the policy:
    a key per seed x attack x eval settings here, shared by the policies (and the never-poisoned control)."""
    sweep = load_sweep(_write(tmp_path, """
name: probed
config: CONFIG
base: [eval.retune=true]
grid:
  update.policy: [finetune, stlr]
  attack.name: [badnets, blended]
  eval.retune_epochs: [5, 2]
seeds: 2
"""))
    keys = {}
    for t in sweep.timelines:
        keys.setdefault(probe_baseline_key(t.config), set()).add(
            "control" if t.control else t.values["update.policy"])
    assert len(keys) == 2 * 2 * 2 and all(members == {"finetune", "stlr", "control"} for members in keys.values()), keys
    config = sweep.timelines[0].config
    changed = [config.model_copy(update={"update": config.update.model_copy(update={"batch_size": 32})}),
               config.model_copy(update={"drift": config.drift.model_copy(update={"delta": 9.0})}),
               config.model_copy(update={"train": config.train.model_copy(update={"epochs": 3})}),  # another baseline
               config.model_copy(update={"update": config.update.model_copy(update={"updates": 7})})]  # other versions
    assert len({probe_baseline_key(c) for c in [config, *changed]}) == 5
    unpaired = config.model_copy(update={"eval": config.eval.model_copy(update={"retune": False, "bec": True})})
    assert probe_baseline_key(unpaired) is None, "bec has no baseline side of its own to share"


BAD = {
    "unknown axis": ("grid: {update.polcy: [a]}", r"update\.polcy.*unknown key 'update\.polcy'|unknown key"),
    "rejected value": ("grid: {update.policy: [finetune, yolo]}", r"cell update\.policy=yolo: .*update\.policy: unknown policy 'yolo'"),
    "out-of-range value": ("grid: {attack.ratio: [0.1, 1.5]}", r"cell attack\.ratio=1\.5: .*attack\.ratio: Input should be less than or equal to 1"),
    "strength out of range": ("grid: {attack.strength: [3, 40]}", r"cell attack\.strength=40: .*attack\.strength: 40\.0 is not a valid patch size"),
    "colour drift on grayscale": ("grid: {drift.kind: [rotation, hue]}", r"cell drift\.kind=hue: drift\.kind: hue does nothing to grayscale"),
    "empty grid": ("grid: {update.policy: []}", r"grid: axis 'update\.policy' has no values"),
    "no grid": ("seeds: 2", r"grid: empty \(and no cells\)"),
    "duplicate cells": ("cells: [{update.policy: stlr}, {update.policy: stlr, update.lr: 0.01}]", r"give the same timeline"),
    "same timeline in unread settings": ("grid: {poisoning.first: [1, 2]}", r"cells cell poisoning\.first=1 and cell poisoning\.first=2 give the same timeline"),
    "seed as an axis": ("grid: {seed: [1, 2]}", r"grid: 'seed' cannot be an axis: a sweep's seeds come from its file's `seeds:`"),
    "bad value in base": ("base: [train.lr=fast]\ngrid: {update.policy: [stlr, finetune]}", r"^error: \S+sweep\.yaml: base: train\.lr: Input should be a valid number"),
    "study in base": ("base: [study=mine]\ngrid: {update.policy: [stlr]}", r"base: 'study=mine': a sweep names each timeline's study"),
    "exclude of a value no axis has": ("grid: {attack.name: [badnets, blended]}\nexclude: [{attack.name: trojan}]",
                                       r"exclude: attack\.name=trojan is not a value of that axis; its values: badnets, blended"),
    "exclude matching no cell": ("cells: [{attack.name: badnets, update.policy: stlr}, {attack.name: blended, update.policy: fst}]\n"
                                 "exclude: [{attack.name: badnets, update.policy: fst}]",
                                 r"exclude: attack\.name=badnets, update\.policy=fst matches no cell"),
    "bad seeds": ("grid: {update.policy: [stlr]}\nseeds: 0", r"seeds: a count must be >= 1"),
    "repeated seeds": ("grid: {update.policy: [stlr]}\nseeds: [1, 1]", r"seeds: \[1, 1\] repeats a seed"),
    "unknown top-level key": ("gird: {update.policy: [stlr]}", r"unknown key 'gird'; allowed: name, config"),
    "malformed yaml": ("grid: {update.policy: [stlr\n", r"not valid YAML at line"),
    "compare not an axis": ("grid: {update.policy: [stlr]}\ncompare: attack.name", r"compare: 'attack\.name' is not an axis"),
    "heatmap with one axis twice": ("grid: {update.policy: [stlr, finetune], attack.name: [badnets]}\n"
                                    "heatmap: [update.policy, update.policy]",
                                    r"heatmap: expected one or two different axes"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_sweep_file_is_one_line_exit_2_and_writes_nothing(case, tmp_path, monkeypatch):
    body, pattern = BAD[case]
    path = _write(tmp_path, f"name: bad\nconfig: CONFIG\n{body}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = CliRunner().invoke(app, ["sweep", str(path), "--results", "results", "--store", "mlruns"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "results").exists()


@pytest.mark.parametrize("address", ["localhost", "http://127.0.0.1:8786", "tcp://127.0.0.1", "tcp://host:port"])
def test_a_malformed_scheduler_address_is_one_line_naming_where_it_came_from(address, tmp_path, monkeypatch):
    path = _write(tmp_path, "name: s\nconfig: CONFIG\ngrid: {update.policy: [stlr, finetune]}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    given = CliRunner().invoke(app, ["sweep", str(path), "--address", address])
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", address)
    from_env = CliRunner().invoke(app, ["sweep", str(path), "--dry-run"])
    for result, named in ((given, f"--address {address}"), (from_env, f"DASK_SCHEDULER_ADDRESS={address}")):
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1, result.stderr
        assert lines[0].startswith(f"error: {named}: not a Dask scheduler address; expected [SCHEME://]HOST:PORT"), lines
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "results").exists()


@pytest.mark.parametrize("address", ["127.0.0.1:8786", "tcp://127.0.0.1:8786", "tls://scheduler:8786"])
def test_an_address_dask_accepts_passes_the_check(address, tmp_path, monkeypatch):
    """A host:port without a scheme is tcp, as Dask's Client reads it; the dry run connects to nothing."""
    path = _write(tmp_path, "name: s\nconfig: CONFIG\ngrid: {update.policy: [stlr, finetune]}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    result = CliRunner().invoke(app, ["sweep", str(path), "--address", address, "--dry-run"])
    assert result.exit_code == 0, result.stderr


def test_missing_file_and_set_on_an_axis(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = CliRunner().invoke(app, ["sweep", "nowhere.yaml"])
    assert missing.exit_code == 2 and "nowhere.yaml: sweep file not found" in missing.stderr
    path = _write(tmp_path, "name: s\nconfig: CONFIG\ngrid: {update.policy: [stlr, finetune]}\n")
    on_axis = CliRunner().invoke(app, ["sweep", str(path), "--set", "update.policy=static"])
    assert on_axis.exit_code == 2 and "'update.policy' is an axis of" in on_axis.stderr
    for text in ("seed=4", "study=mine"):
        refused = CliRunner().invoke(app, ["sweep", str(path), "--dry-run", "--set", text])
        assert refused.exit_code == 2 and f"--set {text}: a sweep" in refused.stderr, refused.stderr
    with pytest.raises(PermanenceError, match=r"--seeds: seeds: a count must be >= 1"):
        load_sweep(path, seeds=0)
    assert not (tmp_path / "mlruns").exists()


def test_a_bad_set_is_blamed_on_the_set_and_a_cell_only_where_its_values_take_part(tmp_path):
    path = _write(tmp_path, "name: s\nconfig: CONFIG\ngrid: {attack.name: [badnets, blended]}\n")
    with pytest.raises(PermanenceError, match=r"^--set train\.epochs=many: train\.epochs: Input should be a valid integer"):
        load_sweep(path, ["train.epochs=many"])
    path = _write(tmp_path, "name: s\nconfig: CONFIG\ngrid: {poisoning.last: [1, 3]}\n")
    with pytest.raises(PermanenceError, match=r"^cell poisoning\.last=1: .*poisoning"):
        load_sweep(path, ["poisoning.inject=range", "poisoning.first=2"])  # first > last only in the cell last=1


def test_star_drift_leaves_out_the_colour_drifts_on_grayscale_data_with_a_note(tmp_path):
    from permanence.drift import DRIFTS

    path = _write(tmp_path, "name: d\nconfig: CONFIG\ngrid: {drift.kind: '*', update.policy: [stlr, finetune]}\n"
                            "control: false\n")
    sweep = load_sweep(path)
    colour = [name for name in DRIFTS.names() if DRIFTS.get(name).needs_color]
    assert colour, "the registry has colour drifts to leave out"
    kinds = [t.values["drift.kind"] for t in sweep.timelines]
    assert sorted(set(kinds)) == [n for n in DRIFTS.names() if n not in colour] and len(kinds) == 2 * len(set(kinds))
    assert sweep.notes == [f"drift.kind '*': left out {name} on digits (it needs colour images)" for name in colour]
    result = CliRunner().invoke(app, ["sweep", str(path), "--dry-run"])
    assert result.exit_code == 0 and f"note: drift.kind '*': left out {colour[0]}" in result.stderr, result.output
    explicit = _write(tmp_path, f"name: d\nconfig: CONFIG\ngrid: {{drift.kind: [rotation, {colour[0]}]}}\n")
    with pytest.raises(PermanenceError, match=f"cell drift.kind={colour[0]}: drift.kind: {colour[0]} does nothing"):
        load_sweep(explicit)  # named explicitly, it is an error, as in `permanence simulate`


def test_set_applies_to_every_cell_and_dry_run_lists_shared_m0s(tmp_path):
    path = _write(tmp_path, "name: s\nconfig: CONFIG\ngrid: {update.policy: [stlr, finetune]}\nseeds: 2\n")
    sweep = load_sweep(path, ["update.updates=4"])
    assert all(t.config.update.updates == 4 for t in sweep.timelines)
    result = CliRunner().invoke(app, ["sweep", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "4 M0s trained once each for 6 timelines" in result.stdout  # 2 poisoned + 2 clean (controls) for 6
    assert "shared by 2 timelines" in result.stdout and "probe baselines" not in result.stdout
    result = CliRunner().invoke(app, ["sweep", str(path), "--dry-run", "--set", "eval.reactivate=true"])
    assert result.exit_code == 0, result.output
    assert "2 probe baselines" in result.stdout and "once each for 6 timelines" in result.stdout  # one per seed


def test_comparison_tables_from_results():
    from permanence.adapters.comparison import TimelineResult, cell_rows, comparison_rows

    def result(study, policy, seed, asr, control=None):
        rows = [{"version": v, "asr": a, "clean_acc": 0.9, "train_seconds": 1.0, "eval_seconds": 0.5} for v, a in enumerate(asr)]
        summary = {"survivability": sum(1 for a in asr[1:] if a >= 0.5), "asr_injected": asr[0], "asr_final": asr[-1],
                   "clean_acc_final": 0.9, "alpha": 0.5, "last_poisoned_version": 0}
        return TimelineResult(study, {"update.policy": policy}, seed, summary, rows, f"run-{study}", control)

    results = [result("f0", "finetune", 0, [1, 0.9, 0.8], "c0"), result("f1", "finetune", 1, [1, 0.7, 0.6], "c1"),
               result("s0", "stlr", 0, [1, 0.1, 0.0], "c0"), result("c0", None, 0, [0.0, 0.3, 0.45]),
               result("c1", None, 1, [0.0, 0.0, 0.1])]
    cells = cell_rows(["update.policy"], results)
    assert [c["study"] for c in cells] == ["f0", "f1", "s0"], "controls are floors, not rows"
    f0 = cells[0]
    assert f0["asr_floor_final"] == 0.45 and f0["survivability"] == 2 and f0["seconds"] == 4.5
    # against the floor, seed 0's finetune ASR of 0.8 at a floor of 0.45 is (0.8 - 0.45) / 0.55 = 0.64 >= 0.5
    assert f0["survivability_above_floor"] == 2
    table = {r["update.policy"]: r for r in comparison_rows(["update.policy"], cells)}
    assert table["finetune"]["seeds"] == 2 and table["finetune"]["final_asr_mean"] == pytest.approx(0.7)
    assert table["finetune"]["final_asr_std"] == pytest.approx(0.1)
    assert table["stlr"]["survivability_mean"] == 0


def test_costliest_timelines_are_estimated_first_by_the_policies_registered_cost(tmp_path):
    path = _write(tmp_path, """
name: order
config: CONFIG
grid:
  update.policy: [static, finetune, ft_sam, retrain]
  update.epochs: [1, 3]
seeds: 1
control: false
""")
    cost = {(t.values["update.policy"], t.values["update.epochs"]): estimated_cost(t.config) for t in load_sweep(path).timelines}
    assert cost[("static", 3)] == 0.0
    assert cost[("finetune", 1)] < cost[("finetune", 3)] < cost[("ft_sam", 3)] < cost[("retrain", 3)]
    assert POLICIES.hint("finetune", "cost", 1.0) == 1.0  # registered without a cost: the default
    with pytest.raises(PermanenceError, match="unknown policy 'nope'"):
        POLICIES.hint("nope", "cost", 1.0)


@pytest.mark.parametrize("args, message", [
    (["--study", "a", "--name", "../../elsewhere"], "compare: --name: expected an identifier"),
    (["../up"], "compare: NAME: expected an identifier"),
    ([], "compare: give a finished sweep's name or one or more --study"),
    (["s", "--study", "a"], "not both"),
    (["--study", "a", "--study", "b", "--study", "a"], "compare: --study a is given more than once"),
    (["--study", "it's"], "compare: --study \"it's\": not a study's name"),
])
def test_compare_refuses_names_that_are_not_identifiers_before_writing(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["compare", *args, "--results", "results/deep", "--store", "mlruns"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_relative_config_is_found_from_any_working_directory(tmp_path, monkeypatch):
    """`config: params.yaml` in project/sweeps/paper/x.yaml names project/params.yaml, run from anywhere; the
    working directory's own file comes first, and a file found nowhere is named as not found."""
    project = tmp_path / "project"
    (project / "sweeps" / "paper").mkdir(parents=True)
    (project / "params.yaml").write_text((ROOT / "params.yaml").read_text().replace("  updates: 15", "  updates: 3"))
    sweep_file = project / "sweeps" / "paper" / "x.yaml"
    sweep_file.write_text("name: x\nconfig: params.yaml\ngrid: {update.policy: [stlr, finetune]}\ncontrol: false\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    sweep = load_sweep(sweep_file)
    assert sweep.params == project / "params.yaml"
    assert all(t.config.update.updates == 3 for t in sweep.timelines)

    (elsewhere / "params.yaml").write_text((ROOT / "params.yaml").read_text().replace("  updates: 15", "  updates: 4"))
    assert all(t.config.update.updates == 4 for t in load_sweep(sweep_file).timelines), "the working directory first"

    sweep_file.write_text(sweep_file.read_text().replace("config: params.yaml", "config: other.yaml"))
    with pytest.raises(PermanenceError, match=r"config: .*other\.yaml.*not found"):
        load_sweep(sweep_file)


def test_an_exclude_value_is_compared_as_the_cells_are(tmp_path):
    """3.0 names the grid's value 3 (as it drops the cells with 3), so it is not 'not a value of that axis'."""
    from permanence.sweep import load_sweep

    path = _write(tmp_path, f"name: ex\nconfig: {ROOT / 'params.yaml'}\ngrid: {{drift.delta: [3, 9]}}\n"
                            "exclude: [{drift.delta: 3.0}]\ncontrol: false\n")
    assert [t.values["drift.delta"] for t in load_sweep(path).timelines] == [9]
