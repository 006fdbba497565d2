"""Sweep files: a grid of timelines over seeds, attacks, drifts and policies, expanded and validated up front.

    name: policies
    config: params.yaml            # the params file every cell starts from (cwd, else the file's folder or above)
    base: [update.updates=15]      # overrides for every cell
    grid:                          # axis -> values; the cells are the cartesian product
      update.policy: "*"           # "*": every registered entry of a registry-backed axis
      attack.name: [badnets, blended]
    cells:                         # optional: override sets for axes that change together (x the grid)
      - {update.policy: finetune, update.lr: 0.01}
    seeds: 3                       # seeds 0..2, or a list
    exclude: [{update.policy: static, attack.name: blended}]
    compare: update.policy         # one line per value in curves.png (default: the first axis)
    heatmap: [update.policy, attack.name]

Every timeline's config is built exactly as `permanence simulate --set ...` would build it, and checked by the
same `Simulation` (attack strength, colour drift on grayscale data, target class), with each dataset loaded
once. Any problem is one line naming the file, the axis and the value. Nothing here touches the tools.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from collections.abc import Callable
from typing import Any

import yaml

from permanence.attacks import ATTACKS
from permanence.config import Config, build_config, load_config
from permanence.drift import DRIFTS
from permanence.errors import PermanenceError
from permanence.models import MODELS
from permanence.policies import POLICIES

TOP_LEVEL = ("name", "config", "base", "grid", "cells", "seeds", "exclude", "compare", "heatmap", "control")
# axes whose "*" means every registered entry (that applies to the cell's data, see STAR_APPLIES)
REGISTRY_AXES = {"update.policy": POLICIES, "attack.name": ATTACKS, "drift.kind": DRIFTS, "model.name": MODELS}
# axis -> (entry name, the cell's data splits) -> why the entry does not apply, or None; "*" leaves such entries out,
# where naming one explicitly is an error (the same check `permanence simulate` makes)
STAR_APPLIES: dict[str, Callable[[str, Any], str | None]] = {
    "drift.kind": lambda kind, splits: "it needs colour images" if DRIFTS.get(kind).needs_color
    and splits.is_grayscale else None,
}
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,39}")
NAME_RULE = "an identifier of at most 40 letters, digits, '_' or '-'"  # what NAME accepts


@dataclass(frozen=True)
class Timeline:
    """One cell of the grid at one seed: one timeline, one MLflow child run, one registered model."""

    values: dict[str, Any]  # axis -> value (None where this cell does not set that axis)
    seed: int
    overrides: tuple[str, ...]
    config: Config
    control: bool = False  # the never-poisoned control of its data/drift/attack/seed (its ASR is the floor)
    control_study: str | None = None  # this timeline's control, when the sweep has controls

    @property
    def study(self) -> str:
        return self.config.study


@dataclass
class Sweep:
    name: str
    path: Path
    params: Path
    axes: list[str]
    compare: str
    heatmap: list[str]
    seeds: list[int]
    timelines: list[Timeline] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the sweep left out of a "*" axis, and why

    def spec(self) -> dict[str, Any]:
        """What the comparison needs to be rebuilt from the tracking store alone."""
        return {"name": self.name, "axes": self.axes, "compare": self.compare, "heatmap": self.heatmap,
                "seeds": self.seeds,
                "timelines": [{"study": t.study, "values": t.values, "seed": t.seed, "control": t.control,
                               "control_study": t.control_study} for t in self.timelines]}


def _fail(path: Path, message: str) -> None:
    raise PermanenceError(f"{path}: {message}")


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PermanenceError(f"{path}: sweep file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        _fail(path, f"not valid YAML{f' at line {mark.line + 1}' if mark else ''}")
    if not isinstance(raw, dict):
        _fail(path, "expected a mapping with keys " + ", ".join(TOP_LEVEL))
    unknown = sorted(set(raw) - set(TOP_LEVEL))
    if unknown:
        _fail(path, f"unknown key '{unknown[0]}'; allowed: {', '.join(TOP_LEVEL)}")
    return raw


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value) if isinstance(value, (dict, list)) else 'null' if value is None else value}"


def _seeds(path: Path, raw: Any) -> list[int]:
    if isinstance(raw, bool) or raw is None:
        _fail(path, f"seeds: expected a count >= 1 or a list of distinct seeds >= 0 (got {raw!r})")
    if isinstance(raw, int):
        if raw < 1:
            _fail(path, f"seeds: a count must be >= 1 (got {raw})")
        return list(range(raw))
    if isinstance(raw, list) and raw and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in raw):
        if len(set(raw)) != len(raw):
            _fail(path, f"seeds: {raw} repeats a seed")
        return list(raw)
    _fail(path, f"seeds: expected a count >= 1 or a list of distinct seeds >= 0 (got {raw!r})")


def _axis_values(path: Path, key: str, values: Any) -> list[Any]:
    if values == "*" and key in REGISTRY_AXES:
        return REGISTRY_AXES[key].names()
    if not isinstance(values, list):
        allowed = " or '*' (every registered entry)" if key in REGISTRY_AXES else ""
        _fail(path, f"grid: axis '{key}' needs a list of values{allowed} (got {values!r})")
    if not values:
        _fail(path, f"grid: axis '{key}' has no values")
    if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
        _fail(path, f"grid: axis '{key}' repeats a value in {values}")
    return values


# what a sweep sets in every timeline itself, so that neither an axis, `base` nor `--set` may
SET_BY_THE_SWEEP = {"seed": "a sweep's seeds come from its file's `seeds:` (or --seeds)",
             "study": "a sweep names each timeline's study from its own name and the timeline's cell"}


def _matches(point: dict[str, Any], partial: dict[str, Any]) -> bool:
    return all(point.get(k) == v for k, v in partial.items())


def _points(path: Path, raw: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]], set[str]]:
    grid = raw.get("grid") or {}
    cells = raw.get("cells")
    if not isinstance(grid, dict):
        _fail(path, "grid: expected a mapping of axis -> list of values")
    if cells is not None and (not isinstance(cells, list) or not all(isinstance(c, dict) and c for c in cells)):
        _fail(path, "cells: expected a list of non-empty mappings of key -> value")
    if not grid and not cells:
        _fail(path, "grid: empty (and no cells): there is nothing to run")
    axes_values = {str(key): _axis_values(path, str(key), values) for key, values in grid.items()}
    starred = {str(key) for key, values in grid.items() if values == "*" and str(key) in STAR_APPLIES}
    grid_points = [dict(zip(axes_values, combo)) for combo in itertools.product(*axes_values.values())]
    cell_axes = [k for c in cells or [] for k in c]
    axes = list(dict.fromkeys([*axes_values, *cell_axes]))
    overlap = sorted(set(axes_values) & set(cell_axes))
    if overlap:
        _fail(path, f"cells: '{overlap[0]}' is also a grid axis; set it in one place")
    for axis in axes:
        if axis in SET_BY_THE_SWEEP:
            _fail(path, f"grid: '{axis}' cannot be an axis: {SET_BY_THE_SWEEP[axis]}")
    points = [{**cell, **point} for cell in (cells or [{}]) for point in grid_points]
    exclude = raw.get("exclude") or []
    if not isinstance(exclude, list) or not all(isinstance(e, dict) and e for e in exclude):
        _fail(path, "exclude: expected a list of non-empty mappings of axis -> value")
    for entry in exclude:
        for key, value in entry.items():
            if key not in axes:
                _fail(path, f"exclude: '{key}' is not an axis of this sweep; axes: {', '.join(axes)}")
            values = [p[key] for p in points if key in p]
            if value not in values:  # compared as _matches compares, so 3.0 excludes the value 3
                _fail(path, f"exclude: {key}={value} is not a value of that axis; its values: "
                            + ", ".join(dict.fromkeys(str(v) for v in values)))
        if not any(_matches(p, entry) for p in points):
            _fail(path, f"exclude: {_where(entry).removeprefix('cell ')} matches no cell of the grid")
    points = [p for p in points if not any(_matches(p, e) for e in exclude)]
    if not points:
        _fail(path, "exclude: drops every cell: there is nothing to run")
    return axes, points, starred


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", str(value)).strip("_") or "x"


def study_name(sweep: str, values: dict[str, Any], seed: int, taken: set[str]) -> str:
    """A readable, stable registered-model name for one timeline; hashed where it would be long or taken."""
    slug = "-".join(_slug(v) for v in values.values() if v is not None)
    name = f"{sweep}-{slug}-s{seed}" if slug else f"{sweep}-s{seed}"
    if len(name) > 64 or name in taken:
        digest = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:6]
        name = f"{sweep[:24]}-{slug[:24]}-{digest}-s{seed}"
    return name


def _canonical(raw: dict[str, Any]) -> dict[str, Any]:
    """A config's dump with the settings its timeline never reads set to one value, so that cells that run the same
    timeline compare equal: the poisoning window and its policy where no update ingests poison (`none`, `d0`), the
    last update of a one-update injection, an injection policy that is the study's own."""
    poisoning = dict(raw["poisoning"])
    if poisoning["inject"] in ("none", "d0"):
        poisoning.update(first=1, last=1, policy=None)
    elif poisoning["inject"] == "update":
        poisoning["last"] = poisoning["first"]
    if poisoning["policy"] == raw["update"]["policy"]:
        poisoning["policy"] = None
    return {**raw, "poisoning": poisoning}


def _identity(config: Config) -> str:
    raw = _canonical(config.model_dump(mode="json"))
    raw.pop("study")
    return json.dumps(raw, sort_keys=True)


def _params_file(sweep_file: Path, params: Path) -> Path:
    """Where a relative `config` is: the working directory, else the sweep file's folder or the nearest folder above
    it that holds it (a project's sweeps/ or sweeps/paper/ file names the project's params.yaml from anywhere)."""
    if params.is_absolute() or params.is_file():
        return params
    for folder in sweep_file.resolve().parents:
        if (folder / params).is_file():
            return folder / params
    return params  # load_config names it as not found


def load_sweep(path: str | Path, sets: list[str] | tuple[str, ...] = (), seeds: int | None = None,
               extra_base: list[str] | tuple[str, ...] = ()) -> Sweep:
    """Read, expand and validate a sweep file; `sets` apply to every cell (never to an axis), `seeds` replaces the
    file's, `extra_base` are defaults for every cell that the file's own settings override (a runner's choices)."""
    path = Path(path)
    raw = _read(path)
    name = raw.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        _fail(path, f"name: expected {NAME_RULE} (got {name!r})")
    params = _params_file(path, Path(raw.get("config") or "params.yaml"))
    base = raw.get("base") or []
    if not isinstance(base, list) or not all(isinstance(b, str) for b in base):
        _fail(path, "base: expected a list of key=value strings")
    for text in base:
        key = text.partition("=")[0].strip()
        if key in SET_BY_THE_SWEEP:
            _fail(path, f"base: '{text}': {SET_BY_THE_SWEEP[key]}")
    axes, points, starred = _points(path, raw)
    for text in sets:
        key = text.partition("=")[0].strip()
        if key in axes:
            raise PermanenceError(f"--set {text}: '{key}' is an axis of {path}; change its values in the file")
        if key in SET_BY_THE_SWEEP:
            raise PermanenceError(f"--set {text}: {SET_BY_THE_SWEEP[key]}")
    seed_list = _seeds(path, raw.get("seeds", 1)) if seeds is None else _seeds(Path("--seeds"), seeds)
    compare = raw.get("compare") or axes[0]
    if compare not in axes:
        _fail(path, f"compare: '{compare}' is not an axis of this sweep; axes: {', '.join(axes)}")
    heatmap = raw.get("heatmap") or axes[:2]
    if (not isinstance(heatmap, list) or not 1 <= len(heatmap) <= 2 or any(h not in axes for h in heatmap)
            or len(set(heatmap)) < len(heatmap)):
        _fail(path, f"heatmap: expected one or two different axes of this sweep ({', '.join(axes)}), got {heatmap!r}")
    control = raw.get("control", True)
    if not isinstance(control, bool):
        _fail(path, f"control: expected true or false (got {control!r})")

    try:
        defaults = load_config(params).model_dump(mode="json")
    except PermanenceError as err:
        _fail(path, f"config: {err}")
    defaults.pop("study")
    sweep = Sweep(name, path, params, axes, compare, list(heatmap), seed_list)
    taken: set[str] = set()
    seen: dict[str, dict[str, Any]] = {}
    for point in points:
        values = {axis: point.get(axis) for axis in axes}
        cell_overrides = [_override(k, v) for k, v in point.items()]
        for seed in seed_list:
            study = study_name(name, values, seed, taken)
            overrides = (*extra_base, *base, *sets, *cell_overrides, f"seed={seed}", f"study={study}")
            try:
                config = build_config(defaults, overrides, source=str(path))
            except PermanenceError as err:
                blame = _blame(defaults, path, base, sets, points, str(err))
                if blame:
                    raise PermanenceError(f"{blame}: {str(err).removeprefix(f'{path}: ')}") from None
                raise PermanenceError(f"{_where(values)}: {err}") from None
            identity = _identity(config)
            if identity in seen and seed == seed_list[0]:
                _fail(path, f"cells {_where(seen[identity])} and {_where(values)} give the same timeline")
            seen.setdefault(identity, values)
            taken.add(study)
            sweep.timelines.append(Timeline(values, seed, tuple(overrides), config))
    splits = SplitsCache()
    _leave_out_inapplicable(sweep, starred, splits)
    if control:
        _add_controls(sweep, defaults)
    check_simulations(sweep, splits)
    return sweep


class SplitsCache:
    """Each dataset split a sweep's checks need, loaded once (on the CPU)."""

    def __init__(self) -> None:
        self._splits: dict[str, Any] = {}

    def __call__(self, config: Config) -> Any:
        from permanence.data import load_splits

        key = json.dumps([config.data.model_dump(mode="json"), config.seed])
        if key not in self._splits:
            self._splits[key] = load_splits(config, "cpu")
        return self._splits[key]


def _leave_out_inapplicable(sweep: Sweep, starred: set[str], splits: SplitsCache) -> None:
    """Drop the timelines whose value of a "*" axis does not apply to their data (a colour drift on grayscale
    images), with a note saying which and why; an error if nothing is left."""
    kept, left_out = [], {}
    for timeline in sweep.timelines:
        why = None
        for axis in sorted(starred):
            try:
                why = STAR_APPLIES[axis](timeline.values[axis], splits(timeline.config))
            except PermanenceError as err:
                raise PermanenceError(f"{sweep.path}: {_where(timeline.values)}: {err}") from None
            if why:
                left_out.setdefault(f"{axis} '*': left out {timeline.values[axis]} on {timeline.config.data.name} "
                                    f"({why})", None)
                break
        if not why:
            kept.append(timeline)
    if not kept:
        _fail(sweep.path, "grid: no value of the '*' axes applies to this data: " + "; ".join(left_out))
    sweep.timelines = kept
    sweep.notes.extend(left_out)


def _blame(defaults: dict[str, Any], path: Path, base: list[str], sets: list[str] | tuple[str, ...],
           points: list[dict[str, Any]], error: str) -> str | None:
    """Who is to blame for a cell's config error when every cell, and no cell at all, give that same error: `base`,
    or the `--set` overrides; None when some cell's values change it."""
    def error_of(overrides: list[str]) -> str | None:
        try:
            build_config(defaults, overrides, source=str(path))
        except PermanenceError as err:
            return str(err)
        return None

    for label, overrides in ((f"{path}: base", list(base)), ("--set " + " ".join(sets), [*base, *sets])):
        if error_of(overrides) is not None:
            same = error_of(overrides) == error and all(
                error_of([*overrides, *(_override(k, v) for k, v in point.items())]) == error for point in points)
            return label if same else None
    return None


def _where(values: dict[str, Any]) -> str:
    return "cell " + ", ".join(f"{k}={v}" for k, v in values.items() if v is not None)


POLICY_KNOBS = ("policy", "max_lr", "cut_frac", "ratio", "fst", "ft_sam", "fine_pruning", "replay", "ewc")


def _add_controls(sweep: Sweep, defaults: dict[str, Any]) -> None:
    """One never-poisoned control per group of timelines that differ only in their policy and poisoning: its ASR per
    version is the floor that drift alone reaches (a model that never learnt the trigger still sends some triggered
    images to the target). It runs `finetune` with the group's update recipe, shared by every policy of the group."""
    groups: dict[str, Timeline] = {}
    for index, timeline in enumerate(sweep.timelines):
        raw = timeline.config.model_dump(mode="json")
        raw.pop("study")
        raw["poisoning"] = {**raw["poisoning"], "inject": "none"}
        raw["attack"] = {**raw["attack"], "ratio": defaults["attack"]["ratio"]}  # a control poisons nothing
        raw["update"] = {**raw["update"], **{k: defaults["update"][k] for k in POLICY_KNOBS}}
        raw = _canonical(raw)
        key = json.dumps(raw, sort_keys=True)
        if key not in groups:
            digest = hashlib.sha256(key.encode()).hexdigest()[:8]
            raw["study"] = f"{sweep.name[:36]}-control-{digest}-s{timeline.seed}"
            groups[key] = Timeline({axis: None for axis in sweep.axes}, timeline.seed, (), Config.model_validate(raw),
                                   control=True)
        sweep.timelines[index] = replace(timeline, control_study=groups[key].study)
    sweep.timelines.extend(groups.values())


def check_simulations(sweep: Sweep, splits: SplitsCache | None = None) -> None:
    """The checks `permanence simulate` meets before anything is written, each dataset split loaded once."""
    from permanence.simulation import Simulation

    splits = splits or SplitsCache()
    for timeline in sweep.timelines:
        try:
            Simulation(timeline.config, splits(timeline.config))
        except PermanenceError as err:
            raise PermanenceError(f"{sweep.path}: {_where(timeline.values) if not timeline.control else 'control'}: {err}") from None


def m0_key(config: Config) -> str:
    """What M0 depends on: seed, data, model, initial training, runtime and D0's poisoning (not the policy, the drift
    or an update's poisoning). Timelines with equal keys start from the same M0, trained once."""
    d0_poison = config.attack.model_dump(mode="json") if config.poisoning.inject == "d0" else None
    parts = {"seed": config.seed, "data": config.data.model_dump(mode="json"), "model": config.model.name,
             "train": config.train.model_dump(mode="json"), "runtime": config.runtime.model_dump(mode="json"),
             "d0_poison": d0_poison}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def baseline_key(config: Config) -> str:
    """The never-poisoned M0 of the same seed, data, model and recipe: the dormancy probes' baseline."""
    raw = config.model_dump(mode="json")
    raw["poisoning"] = {**raw["poisoning"], "inject": "none"}
    return m0_key(Config.model_validate(raw))


def probe_baseline_key(config: Config) -> str | None:
    """What the paired dormancy probes' baseline fields depend on: the baseline model, the probes' inputs
    (`probe_context`) and the versions probed. Timelines with equal keys share them, computed once; None when no
    paired probe is enabled."""
    from permanence.dormancy import PROBES, paired
    from permanence.simulation import probe_context, probed_versions

    if not paired(name for name in PROBES if getattr(config.eval, name, False)):
        return None
    parts = {"baseline": baseline_key(config), "context": probe_context(config), "versions": probed_versions(config)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def m0_record_key(config: Config) -> str:
    """What version 0's row depends on: its M0, and the evaluation and probes it faces (`probe_context`, the probes'
    baseline model). Timelines with equal keys have the same version 0, measured once."""
    from permanence.simulation import probe_context

    parts = {"m0": m0_key(config), "context": probe_context(config), "baseline": baseline_key(config)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def estimated_cost(config: Config) -> float:
    """A timeline's update work relative to other timelines of its sweep: updates x epochs x the policy's registered
    cost. A sweep starts its costliest timelines first (longest processing time first) so that no worker is left with
    an ft_sam or a retrain timeline while the others idle; it orders the work and never changes what runs."""
    update = config.update
    return update.updates * update.epochs * POLICIES.hint(update.policy, "cost", 1.0)
