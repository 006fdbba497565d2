import pytest

from permanence.config import Config, build_config, load_config
from permanence.errors import PermanenceError


def test_defaults_validate():
    cfg = build_config()
    assert cfg.data.name == "digits" and cfg.update.policy == "finetune" and cfg.eval.alpha == 0.5


def test_overrides_apply_typed_values():
    cfg = build_config({}, ["attack.ratio=0.05", "update.policy=stlr", "data.root=/tmp", "runtime.threads=1"])
    assert cfg.attack.ratio == 0.05 and cfg.update.policy == "stlr" and str(cfg.data.root) == "/tmp"


def test_flat_has_dotted_keys():
    flat = build_config().flat()
    assert flat["attack.name"] == "badnets" and flat["update.lr"] == 0.01


@pytest.mark.parametrize("override,pattern", [
    ("attack.name=trojan", r"attack\.name: unknown attack 'trojan'; allowed: badnets, blended, sig, wanet"),
    ("update.policy=magic", r"update\.policy: unknown policy 'magic'; allowed: .*finetune"),
    ("data.name=imagenet", r"data\.name: unknown dataset 'imagenet'; allowed: .*digits"),
    ("model.name=vit", r"model\.name: unknown model 'vit'"),
    ("drift.kind=fog", r"drift\.kind: unknown drift 'fog'"),
    ("attack.ratio=1.5", r"attack\.ratio: .*less than or equal to 1"),
    ("attack.ratio=-0.1", r"attack\.ratio: .*greater than or equal to 0"),
    ("drift.delta=-3", r"drift\.delta: .*greater than or equal to 0"),
    ("drift.schedule=sometimes", r"drift\.schedule: .*'linear', 'sudden' or 'recurring'"),
    ("study=my study", r"study: must be an identifier"),
    ("attack.colour=red", r"unknown key 'attack\.colour'; allowed keys here: name, target, ratio, strength"),
    ("poisoning.inject=update", None),
    ("runtime.device=tpu", r"runtime\.device: allowed: auto, cpu, cuda"),
])
def test_bad_values_raise_one_line_naming_the_field(override, pattern):
    if pattern is None:  # valid: update 1 lies inside the default 15 updates
        build_config({}, [override])
        return
    with pytest.raises(PermanenceError) as err:
        build_config({}, [override])
    message = str(err.value)
    assert "\n" not in message
    assert __import__("re").search(pattern, message), message


def test_poisoned_update_beyond_timeline():
    with pytest.raises(PermanenceError, match="beyond the timeline"):
        build_config({}, ["update.updates=3", "poisoning.inject=update", "poisoning.first=4"])


def test_unknown_top_level_key_in_yaml(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 1\nlearning_rate: 3\n")
    with pytest.raises(PermanenceError, match=r"params\.yaml: unknown key 'learning_rate'; allowed keys here: study, seed"):
        load_config(path)


def test_yaml_file_round_trip(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("study: s1\nattack:\n  name: blended\n  strength: 0.3\n")
    cfg = load_config(path, ["attack.ratio=0.2"])
    assert (cfg.study, cfg.attack.name, cfg.attack.strength, cfg.attack.ratio) == ("s1", "blended", 0.3, 0.2)


@pytest.mark.parametrize("text,pattern", [("a: [1, 2\n", "not valid YAML"), ("- 1\n- 2\n", "expected a mapping")])
def test_broken_yaml(tmp_path, text, pattern):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(PermanenceError, match=pattern):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(PermanenceError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_malformed_override():
    with pytest.raises(PermanenceError, match="expected key.sub=value"):
        build_config({}, ["attack.ratio"])


def test_config_is_the_single_source(tmp_path):
    assert set(Config.model_fields) >= {"data", "drift", "attack", "poisoning", "model", "train", "update", "eval"}


def test_drift_triggered_updates_need_the_pipelines_drift_check():
    from permanence import simulate

    with pytest.raises(PermanenceError, match=r"update\.trigger: drift needs tracking\.drift_check=true"):
        build_config({}, ["update.trigger=drift", "tracking.drift_check=false"])
    with pytest.raises(PermanenceError, match=r"update\.trigger: drift needs the pipeline's drift check"):
        simulate(build_config({}, ["update.trigger=drift"]))


def test_registries_and_config_import_without_a_circle():
    """No module of the core imports (at module level) one that imports it back: the config checks names against the
    registries, so the registries must never need the config at import time."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "src" / "permanence"
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.parse(path.read_text()).body:  # module level only: TYPE_CHECKING and lazy imports don't count
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("permanence"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("permanence"))
        graph[name] = {d for d in deps if d in modules and d != name and not name.startswith(d + ".")}

    def reaches(start, goal, seen):
        return any(d == goal or (d not in seen and not seen.add(d) and reaches(d, goal, seen)) for d in graph[start])

    for module in ("permanence.config", "permanence.data", "permanence.policies", "permanence.data.split"):
        assert not reaches(module, module, set()), f"{module} imports itself back"
