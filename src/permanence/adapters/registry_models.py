"""Registry versions as audit models: float images in [0, 1], (N, C, H, W) -> class scores, and nothing more.

Blind by construction: what the audit may know of a registry version is what this module returns. A
`VersionRef` holds the version number, the `update` tag (the pipeline's version counter, shown beside it) and
nothing else; a `LoadedVersion` adds the model and its input spec. No other tag (`asr`, `attack`, `poisoned`,
`record`, ...), no run, no param is read here, and the audit reads the registry only through this module.

Formats, told apart by the version's `MLmodel` file (read with `yaml.safe_load`):

- **Permanence** (`metadata.permanence`, written by `mlflow_store.save_mlflow_model`): a models-from-code pyfunc.
  Its code file is never run: the installed project's class is rebuilt from `artifacts/input.json` (validated)
  and `artifacts/weights.pt` is loaded with `torch.load(weights_only=True)`.
- **MLflow PyTorch flavour, `pt2`** (torch.export): `torch.export.load` is NOT safe on an untrusted archive,
  pickle or not (see `PT2Guard`): it passes every symbolic shape string of the program JSON to `sympy.sympify`,
  which is `eval`; it compiles the archive's `guards_code` strings; it resolves call targets to any callable
  under `torch`, `operator` or `math`; it writes attribute names into generated Python source; and it unpickles
  (`weights_only=False`) weights, constants and objects flagged `use_pickle`. So an archive is loaded without
  `--trust-pickle` only after `PT2Guard` has checked it against an allowlist and rewritten it without what
  inference does not need (node metadata, guards code); anything outside the allowlist is refused like a pickle.
- **MLflow PyTorch flavour, `pickle`** (`model.pth`): unpickling runs code stored in the model. Refused unless
  `trust_pickle`; then loaded by `mlflow.pytorch.load_model`.
- **Other pyfuncs** (cloudpickled `python_model.pkl`, someone else's models-from-code file): loading runs their
  code, and a pyfunc is a black box to gradient-based checks. Refused.
"""

from __future__ import annotations

import io
import json
import math
import re
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from permanence.audit.model import InputNormalized
from permanence.errors import PermanenceError

PUBLIC_TAG = "update"  # the only tag the audit reads: the pipeline's version counter, not a secret
TRUST_FLAG = "--trust-pickle"
MAX_ARCHIVE_BYTES = 2 << 30


class ModelRefused(PermanenceError):
    """A version whose format runs code when loaded, refused without the trust flag."""


@dataclass(frozen=True)
class VersionRef:
    """What the audit knows of a registry version before loading it."""

    name: str
    version: int
    update: str | None  # the `update` tag, where present

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def label(self) -> str:
        return f"v{self.version}" + (f" (update {self.update})" if self.update is not None else "")


@dataclass(frozen=True)
class InputSpec:
    """What feeds a version: image shape, classes; for Permanence versions also class name, normalisation, dataset."""

    channels: int
    height: int
    width: int
    num_classes: int | None
    data: str | None = None  # the dataset the version serves (Permanence's input.json), the audit's default data
    model: str | None = None  # the project's model class (Permanence versions only): the baseline's architecture
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


@dataclass
class LoadedVersion:
    ref: VersionRef
    model: nn.Module  # float [0, 1] (N, C, H, W) -> scores, eval mode, on the CPU
    spec: InputSpec
    kind: str  # "permanence", "pytorch-pt2", "pytorch-pickle"

    @property
    def has_features(self) -> bool:
        return self.kind == "permanence"


# --- the registry -------------------------------------------------------------------------------

def _ref(mv) -> VersionRef:
    return VersionRef(mv.name, int(mv.version), mv.tags.get(PUBLIC_TAG))


def registry_versions(client, name: str) -> list[VersionRef]:
    """Every version of the registered model, oldest first; one line naming the known models if it does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if getattr(err, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise
        known = sorted(m.name for m in client.search_registered_models(max_results=50))
        shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
        raise PermanenceError(f"model: no registered model named '{name}'; known: {shown or 'none'}") from None
    found = client.search_model_versions(f"name='{name}'")
    return sorted((_ref(mv) for mv in found), key=lambda ref: ref.version)


def _ranges(numbers: list[int]) -> str:
    if not numbers:
        return "none"
    out, start, prev = [], numbers[0], numbers[0]
    for n in numbers[1:] + [None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ",".join(out)


def parse_selection(text: str) -> list[int] | str:
    """`all`, an alias (e.g. `production`), or version numbers and ranges (`3,5-9`)."""
    text = text.strip()
    if text == "all":
        return "all"
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", text):
        return text
    numbers: set[int] = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise PermanenceError(f"--versions: '{text}' is not allowed; allowed: all, an alias such as production, "
                                  f"or version numbers and ranges such as 3,5-9")
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            raise PermanenceError(f"--versions: range {first}-{last} runs backwards")
        numbers.update(range(first, last + 1))
    return sorted(numbers)


def select_versions(client, name: str, selection: str) -> list[VersionRef]:
    """The versions named by `selection` (see `parse_selection`), oldest first."""
    from mlflow.exceptions import MlflowException

    wanted = parse_selection(selection)
    versions = registry_versions(client, name)
    by_number = {ref.version: ref for ref in versions}
    if wanted == "all":
        if not versions:
            raise PermanenceError(f"--versions: '{name}' has no versions")
        return versions
    if isinstance(wanted, str):
        try:
            mv = client.get_model_version_by_alias(name, wanted)
        except MlflowException:
            raise PermanenceError(f"--versions: '{name}' has no alias '{wanted}'; allowed: all, an alias it has, "
                                  f"or version numbers ({_ranges(sorted(by_number))})") from None
        return [by_number.get(int(mv.version)) or _ref(mv)]
    missing = [n for n in wanted if n not in by_number]
    if missing:
        raise PermanenceError(f"--versions: '{name}' has no version {_ranges(missing)}; "
                              f"its versions: {_ranges(sorted(by_number))}")
    return [by_number[n] for n in wanted]


def download(ref: VersionRef, uri: str, folder: Path) -> Path:
    """The version's model files, copied to `folder`. (Resolved through an explicit client: `download_artifacts` of
    a `models:/` URI asks the default registry, which may not be this one.)"""
    import mlflow.artifacts
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        source = MlflowClient(uri, registry_uri=uri).get_model_version_download_uri(ref.name, str(ref.version))
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(folder), tracking_uri=uri))
    except (MlflowException, OSError) as err:
        raise PermanenceError(f"version {ref.version}: its model files cannot be read ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None


# --- formats ------------------------------------------------------------------------------------

def read_mlmodel(folder: Path, ref: VersionRef) -> dict[str, Any]:
    import yaml

    path = folder / "MLmodel"
    if not path.is_file():
        raise PermanenceError(f"version {ref.version}: no MLflow Model there (no MLmodel file in its files); "
                              f"the audit reads MLflow PyTorch models and Permanence versions")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise PermanenceError(f"version {ref.version}: its MLmodel file is not valid YAML") from None
    if not isinstance(loaded, dict):
        raise PermanenceError(f"version {ref.version}: its MLmodel file is not a mapping")
    return loaded


def model_kind(mlmodel: dict[str, Any]) -> str:
    flavors = mlmodel.get("flavors") or {}
    if isinstance(mlmodel.get("metadata"), dict) and "permanence" in mlmodel["metadata"]:
        return "permanence"
    if "pytorch" in flavors:
        return "pytorch"
    if "python_function" in flavors:
        return "pyfunc"
    return "other"


def _tensor_shape(signature: dict | None, side: str) -> list[int] | None:
    if not isinstance(signature, dict) or not signature.get(side):
        return None
    try:
        specs = json.loads(signature[side])
        return [int(v) for v in specs[0]["tensor-spec"]["shape"]]
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def signature_spec(mlmodel: dict[str, Any]) -> InputSpec | None:
    """(C, H, W) and classes from the MLmodel's tensor signature, when it has one of the audit's shape."""
    inputs = _tensor_shape(mlmodel.get("signature"), "inputs")
    outputs = _tensor_shape(mlmodel.get("signature"), "outputs")
    if inputs is None or len(inputs) != 4 or min(inputs[1:]) < 1:
        return None
    classes = outputs[-1] if outputs and len(outputs) == 2 and outputs[-1] > 0 else None
    return InputSpec(inputs[1], inputs[2], inputs[3], classes)


SPEC_FIELDS = {"model": str, "channels": int, "height": int, "width": int, "num_classes": int, "mean": list,
               "std": list, "data": str}


def read_input_spec(path: Path, ref: VersionRef) -> InputSpec:
    """Permanence's input.json, every field checked."""
    from permanence.models import MODELS

    where = f"version {ref.version}: artifacts/input.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        raise PermanenceError(f"{where} is missing or not JSON") from None
    if not isinstance(raw, dict):
        raise PermanenceError(f"{where} is not a JSON object")
    for key, kind in SPEC_FIELDS.items():
        if not isinstance(raw.get(key), kind) or isinstance(raw.get(key), bool):
            raise PermanenceError(f"{where}: field '{key}' missing or not a {kind.__name__}; needs "
                                  f"{', '.join(SPEC_FIELDS)}")
    if raw["model"] not in MODELS:
        raise PermanenceError(f"{where}: model '{raw['model']}' is not one of {', '.join(MODELS.names())}")
    channels = raw["channels"]
    for key in ("mean", "std"):
        if len(raw[key]) != channels or not all(isinstance(v, int | float) and math.isfinite(v) for v in raw[key]):
            raise PermanenceError(f"{where}: '{key}' must hold {channels} finite numbers")
    if min(raw["std"]) <= 0 or min(channels, raw["height"], raw["width"], raw["num_classes"] - 1) < 1:
        raise PermanenceError(f"{where}: std must be positive, shapes >= 1 and num_classes >= 2")
    return InputSpec(channels, raw["height"], raw["width"], raw["num_classes"], raw["data"], raw["model"],
                     tuple(float(v) for v in raw["mean"]), tuple(float(v) for v in raw["std"]))


def load_permanence(folder: Path, ref: VersionRef) -> tuple[nn.Module, InputSpec]:
    """The project's classifier rebuilt from input.json, weights loaded with torch.load(weights_only=True)."""
    from permanence.models import build_model

    weights = folder / "artifacts" / "weights.pt"
    if not weights.is_file():
        raise PermanenceError(f"version {ref.version}: no weights (artifacts/weights.pt is missing from its model files)")
    spec = read_input_spec(folder / "artifacts" / "input.json", ref)
    try:
        state = torch.load(weights, weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001: any unreadable or non-tensor file is the same bad input
        raise PermanenceError(f"version {ref.version}: artifacts/weights.pt is not a weights-only state dict "
                              f"({type(err).__name__})") from None
    classifier = build_model(spec.model, spec.channels, spec.num_classes)
    try:
        classifier.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError):
        raise PermanenceError(f"version {ref.version}: artifacts/weights.pt does not fit a {spec.model} with "
                              f"{spec.channels} channels and {spec.num_classes} classes") from None
    classifier = classifier.to(memory_format=torch.channels_last)
    return InputNormalized(classifier, list(spec.mean), list(spec.std)).eval(), spec


class ExportedModel(nn.Module):
    """A torch.export module behind the audit interface. Its own train()/eval() raise (an exported graph has
    its mode baked in), so mode switches stop here; its parameters still train (the re-tuning probe)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def train(self, mode: bool = True) -> ExportedModel:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


# --- pt2 ----------------------------------------------------------------------------------------

ALLOWED_OP_NAMESPACES = ("aten", "prims")
TARGET = re.compile(r"torch\.ops\.(?:aten|prims)\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+|_operator\.getitem")
NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")
PLAIN = re.compile(r"[A-Za-z0-9_.+\-]*")  # version strings, verifier names, dtype-ish values
TEXT_RECORD = re.compile(r"[A-Za-z0-9._-]{1,64}\n?")
# what sympy.sympify may see: sympy's srepr of shape expressions and nothing that reaches Python objects
SYMPY_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<string>'[A-Za-z_][A-Za-z0-9_]*')"
                         r"|(?P<number>\d{1,19}(?:\.\d{1,19})?)|(?P<op>\*\*|[-+*/(),=]))")
SYMPY_NAMES = {
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Abs", "Mod", "Eq", "Ne", "Lt",
    "Le", "Gt", "Ge", "And", "Or", "Not", "True", "False", "true", "false", "oo", "zoo", "nan", "Infinity",
    "NegativeInfinity", "integer", "positive", "nonnegative", "negative", "real", "finite", "Equality",
    "Unequality", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "BooleanTrue", "BooleanFalse",
    # torch.utils._sympy.functions, the names torch's deserialiser binds
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift",
    "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity",
}
SYMBOL_NAME = re.compile(r"[a-z]{1,3}\d{1,6}")
MAX_EXPR = 400
TREESPEC_TYPES = {None, "builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict"}


def safe_sympy(expr: str) -> bool:
    """Only sympy constructors, symbol names, numbers and arithmetic: nothing `eval` could reach objects with."""
    if len(expr) > MAX_EXPR:
        return False
    position = 0
    while position < len(expr):
        if expr[position:].isspace():
            break
        match = SYMPY_TOKEN.match(expr, position)
        if match is None:
            return False
        name = match["name"]
        if name is not None and name not in SYMPY_NAMES and not SYMBOL_NAME.fullmatch(name):
            return False
        position = match.end()
    return True


def _safe_treespec(text: str) -> bool:
    try:
        loaded = json.loads(text)
    except ValueError:
        return False

    def walk(node: Any) -> bool:
        if isinstance(node, dict):
            if "type" in node and node["type"] not in TREESPEC_TYPES:
                return False
            if isinstance(node.get("context"), str) and not _safe_context(node["context"]):
                return False
            return all(walk(v) for v in node.get("children_spec", []))
        if isinstance(node, list):
            return all(walk(v) for v in node)
        return isinstance(node, int | float | type(None))

    return walk(loaded)


def _safe_context(text: str) -> bool:
    try:
        loaded = json.loads(text)
    except ValueError:
        return False
    if loaded is None:
        return True
    return isinstance(loaded, list) and all(isinstance(v, str) and NAME.fullmatch(v) for v in loaded)


class PT2Guard:
    """Checks a torch.export archive against an allowlist and rewrites it without what inference does not need.

    Records: plain-text version records, JSON configs, raw tensor payloads (`use_pickle: false`, named weight_N /
    tensor_constant_N) and sample inputs that `torch.load(weights_only=True)` accepts; nothing else (no pickled
    weight or constant, no custom or opaque object, no AOTInductor library, no extra file).
    The program JSON: every call target an aten/prims overload or `_operator.getitem`; every symbolic expression
    (`expr_str`, the input of `sympy.sympify`) sympy's srepr of arithmetic on symbols; every name and key a dotted
    identifier; pytree specs of tuples, lists and dicts only. Node metadata (stack traces, module paths) and
    `guards_code` (Python source torch compiles) are dropped, not checked. Fail closed: anything else refuses.
    """

    def __init__(self, ref: VersionRef, path: Path) -> None:
        self.ref, self.path = ref, path

    def refuse(self, what: str) -> ModelRefused:
        return ModelRefused(
            f"version {self.ref.version}: its torch.export (pt2) archive holds {what}, which torch.export.load would "
            f"execute or unpickle; refused (audit it only if you trust its source, with {TRUST_FLAG})")

    def sanitized(self) -> bytes:
        if self.path.stat().st_size > MAX_ARCHIVE_BYTES:
            raise self.refuse("more than 2 GiB")
        try:
            archive = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile:
            raise PermanenceError(f"version {self.ref.version}: its model.pt2 is not a zip archive") from None
        out = io.BytesIO()
        with archive, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as clean:
            records = {info.filename: info for info in archive.infolist() if not info.is_dir()}
            raw_payloads = self._payload_records(archive, records)
            models = [n for n in records if re.fullmatch(r"[^/]+/models/[^/]+\.json", n)]
            if len(models) != 1:
                raise self.refuse(f"{len(models)} programs (one expected)")
            for name, info in records.items():
                data = archive.read(info)
                leaf = name.rsplit("/", 1)[-1]
                if name in models:
                    data = self._program(data, name)
                elif name in raw_payloads:
                    pass
                elif re.fullmatch(r"[^/]+/data/(?:weights|constants)/[^/]+_config\.json", name):
                    pass  # checked by _payload_records
                elif re.fullmatch(r"[^/]+/data/sample_inputs/[^/]+\.pt", name):
                    self._sample_inputs(data, name)
                elif leaf in ("archive_format", "archive_version", "byteorder", "version", "serialization_id"):
                    if not TEXT_RECORD.fullmatch(data.decode("ascii", errors="replace")):
                        raise self.refuse(f"an unexpected record '{name}'")
                else:
                    raise self.refuse(f"a record the audit does not allow: '{name}'")
                clean.writestr(info, data)
        return out.getvalue()

    def _payload_records(self, archive: zipfile.ZipFile, records: dict) -> set[str]:
        raw: set[str] = set()
        for name in records:
            match = re.fullmatch(r"([^/]+/data/(weights|constants))/[^/]+_config\.json", name)
            if not match:
                continue
            try:
                config = json.loads(archive.read(name)).get("config")
            except (ValueError, AttributeError):
                raise self.refuse(f"an unreadable payload config '{name}'") from None
            if not isinstance(config, dict):
                raise self.refuse(f"an unreadable payload config '{name}'")
            prefix = "weight_" if match[2] == "weights" else "tensor_constant_"
            for key, entry in config.items():
                path_name = entry.get("path_name") if isinstance(entry, dict) else None
                if not isinstance(key, str) or not NAME.fullmatch(key):
                    raise self.refuse(f"a payload named {key!r}")
                if entry.get("use_pickle") is not False or not isinstance(path_name, str) \
                        or not re.fullmatch(re.escape(prefix) + r"\d+", path_name):
                    raise self.refuse(f"a pickled or non-tensor payload '{key}' ({path_name})")
                raw.add(f"{match[1]}/{path_name}")
        return raw

    def _sample_inputs(self, data: bytes, name: str) -> None:
        if not data:
            return
        try:  # torch tries weights_only=True first and falls back to a full unpickle only if that fails
            torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except Exception:  # noqa: BLE001
            raise self.refuse(f"sample inputs '{name}' that only a full unpickle reads") from None

    def _program(self, data: bytes, name: str) -> bytes:
        try:
            program = json.loads(data)
        except ValueError:
            raise self.refuse(f"a program '{name}' that is not JSON") from None
        if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
            raise self.refuse(f"a program '{name}' without a graph")
        program["guards_code"] = []
        module = program["graph_module"]
        module["metadata"] = {}
        for node in self._nodes(module):
            node["metadata"] = {}
        self._check(program, (name,))
        return json.dumps(program).encode()

    def _nodes(self, tree: Any) -> Iterator[dict]:
        if isinstance(tree, dict):
            if "target" in tree and "inputs" in tree and "outputs" in tree:
                yield tree
            for value in tree.values():
                yield from self._nodes(value)
        elif isinstance(tree, list):
            for value in tree:
                yield from self._nodes(value)

    def _check(self, tree: Any, path: tuple[str, ...]) -> None:
        key = path[-1]
        where = "/".join(path[1:])
        if isinstance(tree, dict):
            for k, v in tree.items():
                if not isinstance(k, str) or not NAME.fullmatch(k):
                    raise self.refuse(f"a key {k!r} at {where}")
                self._check(v, (*path, k))
        elif isinstance(tree, list):
            for v in tree:  # a list's items are checked by the rule of the key holding the list
                self._check(v, path)
        elif isinstance(tree, str):
            if key in ("target", "as_operator"):
                if not TARGET.fullmatch(tree):
                    raise self.refuse(f"a call target '{tree[:80]}' (only aten/prims operators are allowed)")
            elif key == "expr_str":
                if not safe_sympy(tree):
                    raise self.refuse(f"a symbolic expression that is not plain arithmetic: {tree[:80]!r}")
            elif key in ("in_spec", "out_spec"):
                if not _safe_treespec(tree):
                    raise self.refuse(f"a pytree spec of types outside tuple/list/dict at {where}")
            elif not (NAME.fullmatch(tree) or PLAIN.fullmatch(tree)):
                raise self.refuse(f"an unexpected string {tree[:60]!r} at {where}")
        elif not isinstance(tree, int | float | bool | type(None)):
            raise self.refuse(f"an unexpected value at {where}")


def verify_graph(module: nn.Module, ref: VersionRef) -> None:
    """After loading: every call in the graph is an aten/prims operator or operator.getitem."""
    import operator

    graph = getattr(module, "graph", None)
    if graph is None:
        raise ModelRefused(f"version {ref.version}: the loaded pt2 program has no graph")
    for node in graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        target = node.target
        ok = node.op == "call_function" and (
            target is operator.getitem or (isinstance(target, torch._ops.OpOverload)
                                           and target.namespace in ALLOWED_OP_NAMESPACES))
        if not ok:
            raise ModelRefused(f"version {ref.version}: the pt2 graph calls {node.op} {target!s:.80}; only aten/prims "
                               f"operators are allowed (audit it only if you trust its source, with {TRUST_FLAG})")


def load_pytorch(folder: Path, mlmodel: dict[str, Any], ref: VersionRef, trust_pickle: bool) -> tuple[nn.Module, str]:
    flavor = mlmodel["flavors"]["pytorch"] or {}
    data = folder / str(flavor.get("model_data", "data"))
    if (data / "model.pt2").is_file():
        archive = data / "model.pt2"
        try:
            program = torch.export.load(io.BytesIO(PT2Guard(ref, archive).sanitized()))
        except ModelRefused:
            if not trust_pickle:
                raise
            program = torch.export.load(archive)
        except PermanenceError:
            raise
        except Exception as err:  # noqa: BLE001: torch's own deserialisation errors
            raise PermanenceError(f"version {ref.version}: its pt2 archive does not load ({type(err).__name__})") from None
        module = program.module(check_guards=False)  # guards are Python source torch would compile
        if not trust_pickle:
            verify_graph(module, ref)
        return ExportedModel(module), "pytorch-pt2"
    if (data / "model.pth").is_file():
        if not trust_pickle:
            raise ModelRefused(
                f"version {ref.version}: an MLflow PyTorch model saved with serialization_format='pickle'; loading "
                f"it unpickles, which runs code stored in the model; refused (audit it only if you trust its source, "
                f"with {TRUST_FLAG})")
        import mlflow.pytorch

        model = mlflow.pytorch.load_model(str(folder), map_location="cpu")
        return model.eval(), "pytorch-pickle"
    raise PermanenceError(f"version {ref.version}: no weights (its PyTorch model has neither data/model.pt2 nor "
                          f"data/model.pth)")


@torch.no_grad()
def _output_classes(model: nn.Module, shape: tuple[int, int, int], ref: VersionRef) -> int:
    was = model.training
    model.eval()
    try:
        out = model(torch.zeros(2, *shape))
    except Exception as err:  # noqa: BLE001: the model's own error on the audit's input
        raise PermanenceError(f"version {ref.version}: the model fails on float images of shape (N, {shape[0]}, "
                              f"{shape[1]}, {shape[2]}) ({type(err).__name__}: {str(err)[:120]})") from None
    finally:
        model.train(was)
    if out.dim() != 2 or out.shape[1] < 2:
        raise PermanenceError(f"version {ref.version}: the model returns shape {tuple(out.shape)}; the audit needs "
                              f"class scores (N, classes)")
    return int(out.shape[1])


def load_version(ref: VersionRef, uri: str, *, trust_pickle: bool = False,
                 image_shape: tuple[int, int, int] | None = None) -> LoadedVersion:
    """Download and load one version behind the audit interface. `image_shape` (C, H, W): for a foreign model
    without a tensor signature, the shape of the clean data it will be fed."""
    with tempfile.TemporaryDirectory(prefix="permanence-audit-") as tmp:
        folder = download(ref, uri, Path(tmp))
        mlmodel = read_mlmodel(folder, ref)
        kind = model_kind(mlmodel)
        if kind == "permanence":
            model, spec = load_permanence(folder, ref)
            return LoadedVersion(ref, model, spec, kind)
        if kind == "pyfunc":
            flavor = mlmodel["flavors"]["python_function"] or {}
            how = "a models-from-code pyfunc whose code file" if flavor.get("model_code_path") else \
                "a cloudpickled pyfunc, which"
            raise ModelRefused(f"version {ref.version}: {how} runs when loaded, and a pyfunc is a black box to the "
                               f"gradient-based checks; the audit reads MLflow PyTorch models (pt2, or pickle with "
                               f"{TRUST_FLAG})")
        if kind != "pytorch":
            raise PermanenceError(f"version {ref.version}: flavours {', '.join(mlmodel.get('flavors') or {}) or 'none'}; "
                                  f"the audit reads MLflow PyTorch models and Permanence versions")
        model, kind = load_pytorch(folder, mlmodel, ref, trust_pickle)
    spec = signature_spec(mlmodel)
    if spec is None:
        if image_shape is None:
            raise PermanenceError(f"version {ref.version}: a foreign model without a (N, C, H, W) tensor signature; "
                                  f"pass --data so its input shape is known")
        spec = InputSpec(*image_shape, None)
    classes = _output_classes(model, spec.image_shape, ref)
    if spec.num_classes is not None and spec.num_classes != classes:
        raise PermanenceError(f"version {ref.version}: its signature says {spec.num_classes} classes, the model "
                              f"returns {classes}")
    return LoadedVersion(ref, model, InputSpec(spec.channels, spec.height, spec.width, classes), kind)


def load_model_uri(text: str, uri: str, *, trust_pickle: bool = False,
                   image_shape: tuple[int, int, int] | None = None) -> LoadedVersion:
    """`models:/NAME/VERSION` or `models:/NAME@ALIAS` (e.g. the audit's --baseline), loaded like a version."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    match = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@([A-Za-z0-9_\-]+))", text.strip())
    if not match:
        raise PermanenceError(f"--baseline: '{text}' is not allowed; allowed: models:/NAME/VERSION or models:/NAME@ALIAS")
    name = match[1]
    client = MlflowClient(uri)
    try:
        mv = client.get_model_version(name, match[2]) if match[2] else client.get_model_version_by_alias(name, match[3])
    except MlflowException:
        raise PermanenceError(f"--baseline: {text} does not exist in the registry") from None
    return load_version(_ref(mv), uri, trust_pickle=trust_pickle, image_shape=image_shape)
