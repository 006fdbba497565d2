"""The `permanence` command: run a study through the pipeline, show a study's results."""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# the heavy imports (the core pulls in torch and torchvision: seconds) happen inside each command, so that
# `permanence --help` and a usage error answer at once
from permanence.errors import PermanenceError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Permanence: how long does a one-shot backdoor survive retraining?")
console = Console(stderr=True)
out = Console()


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _load_flow_module(name: str = "retrain"):
    import logging

    from permanence.adapters.flow_loader import load_flow

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    try:
        return load_flow(name)
    except PermanenceError as err:
        fail(str(err))


def _fmt(value) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


@app.command()
def simulate(
    config: Annotated[Path, typer.Option("--config", "-c", help="params.yaml to read")] = Path("params.yaml"),
    study: Annotated[Optional[str], typer.Option(help="study name (overrides params.yaml's)")] = None,
    set_: Annotated[list[str], typer.Option("--set", "-s", help="override: key.sub=value (repeatable)")] = [],
    results: Annotated[Path, typer.Option(help="folder for results/<study>/")] = Path("results"),
    store: Annotated[Path, typer.Option(help="local MLflow store (ignored if MLFLOW_TRACKING_URI is set)")] = Path("mlruns"),
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
    export: Annotated[Optional[Path], typer.Option(help="also write timeline.csv, summary.json and timeline.png to this "
                                                        "fixed folder (what dvc.yaml tracks)")] = None,
) -> None:
    """Run (or resume) a study through the Prefect flow, tracked in MLflow."""
    from permanence.config import load_config

    overrides = list(set_) + ([f"study={study}"] if study is not None else [])
    try:
        cfg = load_config(config, overrides)
        from permanence.simulation import Simulation

        simulation = Simulation(cfg)  # loads and checks data, attack and drift: bad input fails before any run exists
    except PermanenceError as err:
        fail(str(err))
    flows = _load_flow_module()
    from permanence.adapters.mlflow_store import StudyLock, tracking_uri
    from permanence.simulation import EpochEnd

    try:
        StudyLock(tracking_uri(store), cfg.study).check_free()
    except PermanenceError as err:
        fail(str(err))

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=console, disable=not progress, transient=False) as bars:
        versions = bars.add_task(f"{cfg.study} versions", total=cfg.update.updates + 1, info="")
        epochs = bars.add_task("  epochs", total=cfg.train.epochs, info="")

        def on_event(event) -> None:
            if isinstance(event, EpochEnd):
                bars.update(epochs, total=event.epochs, completed=event.epoch, description=f"  v{event.version} epochs",
                            info=f"loss {event.loss:.3f}")

        def on_version(row, resumed: bool) -> None:
            flag = " drift!" if row.get("drift_detected") else ""
            note = " (resumed)" if resumed else ""
            bars.update(versions, advance=1, info=f"v{row['version']}: acc {row['clean_acc']:.3f} asr {row['asr']:.3f}{flag}{note}")

        from permanence.adapters.prefect_api import local_flow_settings

        try:
            with local_flow_settings():
                summary = flows.retraining_pipeline(cfg, results_dir=results, store_dir=store, on_event=on_event,
                                                    on_version=on_version, simulation=simulation, export_dir=export)
        except PermanenceError as err:
            fail(str(err))
    _print_summary(summary, results / cfg.study)


def _print_summary(summary: dict, folder: Path) -> None:
    surv = summary.get("survivability")
    out.print(f"[bold]{summary['study']}[/]: {summary['attack']} injected in {summary['injection']}, policy {summary['policy']}")
    out.print(f"  ASR right after injection {_fmt(summary.get('asr_injected'))}; alpha-survivability "
              f"(alpha={summary['alpha']}) {_fmt(surv)} updates; final clean accuracy {_fmt(summary['clean_acc_final'])}")
    out.print(f"  results: {folder}/timeline.csv, summary.json, timeline.png")
    out.print(f"  MLflow run {summary['mlflow_run_id']} at {summary['tracking_uri']}; registered model '{summary['registered_model']}'")


@app.command()
def show(
    study: Annotated[Optional[str], typer.Option(help="study name (default: params.yaml's)")] = None,
    config: Annotated[Path, typer.Option("--config", "-c")] = Path("params.yaml"),
    results: Annotated[Path, typer.Option()] = Path("results"),
) -> None:
    """Print a study's timeline, and where its MLflow run and registered versions are."""
    from permanence.adapters.outputs import read_timeline_csv
    from permanence.config import load_config

    if study is None:
        try:
            study = load_config(config if config.is_file() else None).study
        except PermanenceError as err:
            fail(str(err))
    folder = results / study
    if not (folder / "timeline.csv").is_file():
        known = sorted(p.name for p in results.glob("*") if (p / "timeline.csv").is_file()) if results.is_dir() else []
        fail(f"study: no results for '{study}' in {results}/; known studies: {', '.join(known) or 'none'}")
    rows = read_timeline_csv(folder / "timeline.csv")
    summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else {}
    table = Table(title=f"{study}: timeline", header_style="bold")
    names = ["update", "drift", "poisoned", "clean_acc", "asr", "ra", "drift_score", "drift_detected", "model_version"]
    for name in names:
        table.add_column(name, justify="right")
    for row in rows:
        cells = [_fmt(float(row[n])) if n in ("clean_acc", "asr", "ra", "drift_score") and row[n] else row[n] or "-" for n in names]
        table.add_row(*cells)
    out.print(table)
    if summary:
        _print_summary(summary, folder)
        from permanence.adapters.mlflow_store import PRODUCTION

        out.print(f"  registry: models:/{summary['registered_model']}@{PRODUCTION} -> version {rows[-1]['model_version']}; "
                  f"MLflow UI: {_ui_hint(summary['tracking_uri'])}")


def _check_address(address: str, named: str) -> None:
    """Fail in one line when `address` is not of the form a Dask client connects to (no scheme means tcp)."""
    from distributed.comm.addressing import parse_address, parse_host_port
    from distributed.comm.registry import backends, get_backend

    try:
        scheme, location = parse_address(address)
        get_backend(scheme)
        if scheme in ("tcp", "tls", "ws", "wss"):
            parse_host_port(location)
    except ValueError:
        fail(f"{named}: not a Dask scheduler address; expected [SCHEME://]HOST:PORT with SCHEME one of "
             f"{', '.join(sorted(backends))} (e.g. tcp://127.0.0.1:8786)")


def _check_scheduler(address: str, named: str, timeout: float = 5.0) -> None:
    """Fail in one line, before anything is written, when no Dask scheduler answers at `address`."""
    import logging

    import distributed

    logging.getLogger("distributed").setLevel(logging.CRITICAL)
    try:
        with distributed.Client(address, timeout=f"{timeout}s", set_as_default=False) as client:
            workers = len(client.scheduler_info(n_workers=-1)["workers"])
    except (OSError, TimeoutError, ValueError) as err:
        fail(f"{named}: no Dask scheduler answered within {timeout:.0f} s ({type(err).__name__})")
    if workers == 0:
        console.print(f"[yellow]note:[/] the scheduler at {address} has no workers yet; timelines wait for one")


def _dry_run(sweep) -> None:
    from permanence.sweep import m0_key, probe_baseline_key

    table = Table(title=f"sweep {sweep.name}: {len(sweep.timelines)} timelines", header_style="bold")
    for name in ["#", *sweep.axes, "seed", "study", "M0"]:
        table.add_column(name)
    m0s: dict[str, int] = {}
    for index, timeline in enumerate(sweep.timelines):
        m0 = m0s.setdefault(m0_key(timeline.config), len(m0s))
        values = ["(control)" if timeline.control else _fmt(timeline.values.get(a)) for a in sweep.axes]
        table.add_row(str(index), *values, str(timeline.seed), timeline.study, f"M0-{m0}")
    out.print(table)
    shares = {}
    for timeline in sweep.timelines:
        shares.setdefault(m0s[m0_key(timeline.config)], []).append(timeline)
    for m0, members in shares.items():
        first = members[0].config
        poisoned = f"{first.attack.name} in D0" if first.poisoning.inject == "d0" else "clean D0"
        uses = f"shared by {len(members)} timelines" if len(members) > 1 else "used by 1 timeline"
        out.print(f"M0-{m0}: seed {first.seed}, {first.model.name} on {first.data.name}, {poisoned}: {uses}")
    out.print(f"{len(m0s)} M0s trained once each for {len(sweep.timelines)} timelines")
    probed: dict[str, int] = {}
    for timeline in sweep.timelines:
        key = probe_baseline_key(timeline.config)
        if key is not None:
            probed[key] = probed.get(key, 0) + 1
    if probed:
        out.print(f"{len(probed)} probe baselines (the paired probes' baseline side at every probed version) computed "
                  f"once each for {sum(probed.values())} timelines")


@app.command()
def sweep(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="sweep file (sweeps/*.yaml)")],
    set_: Annotated[list[str], typer.Option("--set", "-s", help="override for every cell: key.sub=value (not an axis)")] = [],
    seeds: Annotated[Optional[int], typer.Option(help="run seeds 0..N-1 instead of the file's")] = None,
    workers: Annotated[Optional[int], typer.Option(help="local cluster: worker processes (default: one per core)")] = None,
    address: Annotated[Optional[str], typer.Option(envvar="DASK_SCHEDULER_ADDRESS",
                                                   help="an existing Dask scheduler, tcp://HOST:PORT")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list the timelines and the M0s they share; run nothing")] = False,
    results: Annotated[Path, typer.Option(help="folder for results/<sweep>/")] = Path("results"),
    store: Annotated[Path, typer.Option(help="local MLflow store (ignored if MLFLOW_TRACKING_URI is set)")] = Path("mlruns"),
    progress: Annotated[bool, typer.Option(help="show the live view")] = True,
) -> None:
    """Run (or resume) a grid of timelines on Dask through Prefect and write the comparison."""
    import os

    source = ctx.get_parameter_source("address")  # a ParameterSource of Typer's own copy of click, or of click
    from_env = source is not None and source.name == "ENVIRONMENT"
    named = f"DASK_SCHEDULER_ADDRESS={address}" if from_env else f"--address {address}"
    if address:
        _check_address(address, named)
    if address and not dry_run:
        _check_scheduler(address, named)  # first: an address that does not answer is told within seconds
    from permanence.sweep import load_sweep  # the core: torch and torchvision, seconds of imports

    try:
        if workers is not None and workers < 1:
            raise PermanenceError(f"--workers: must be >= 1 (got {workers})")
        spec = load_sweep(file, set_, seeds)
    except PermanenceError as err:
        fail(str(err))
    for note in spec.notes:
        console.print(f"[yellow]note:[/] {note}")
    if dry_run:
        _dry_run(spec)
        return
    flows = _load_flow_module("sweep")
    from rich.progress import TimeRemainingColumn

    from permanence.adapters.mlflow_store import StudyLock, tracking_uri

    try:
        StudyLock(tracking_uri(store), spec.name, "sweep").check_free()
    except PermanenceError as err:
        fail(str(err))

    from permanence.adapters.prefect_api import LocalCallback, local_flow_settings, shared_api

    workers = workers or len(os.sched_getaffinity(0))
    import logging

    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")  # the local cluster's workers read it at start
    logging.getLogger("distributed").setLevel(logging.ERROR)
    where = address or f"a local cluster of {workers} single-thread workers"
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn()]
    with shared_api(), local_flow_settings(), Progress(*columns, console=console, disable=not progress, transient=False) as bars:
        bar = bars.add_task(f"{spec.name} timelines", total=len(spec.timelines), info="starting " + where)

        def on_progress(p) -> None:
            info = f"running {p.running}, left {p.left}" + (f", failed {p.failed}" if p.failed else "") + \
                   (f", {p.skipped} done before" if p.skipped else "") + f"; shared work {p.shared_done}/{p.shared_total}"
            bars.update(bar, completed=p.done, info=info)

        try:
            summary = flows.policy_sweep.with_options(task_runner=flows.task_runner(workers, address))(
                spec, store_dir=store, results_dir=results, on_progress=LocalCallback(on_progress))
        except PermanenceError as err:
            fail(str(err))
    _print_sweep(summary)


def _ui_hint(uri: str, experiment_id: str | None = None) -> str:
    """Where a person sees the runs: a tracking server is its own UI; a local store needs `mlflow ui`. MLflow 3.17's
    UI opens every experiment in its GenAI view unless the URL asks for the model-training one."""
    page = f"/#/experiments/{experiment_id}?workflowType=machine_learning" if experiment_id else ""
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}{page}"
    return f"mlflow ui --backend-store-uri {uri}" + (f", then open http://127.0.0.1:5000{page}" if page else "")


def _print_sweep(summary: dict) -> None:
    files = summary["files"]
    if "markdown" in files:
        out.print(Path(files["markdown"]).read_text(), soft_wrap=True, highlight=False)
    out.print(f"[bold]{summary['sweep']}[/]: {summary['timelines']} timelines ({summary['finished_before']} finished "
              f"before); comparison in {Path(files['cells']).parent if files else '-'}/")
    out.print(f"  MLflow: parent run {summary['parent_run_id']} at {summary['tracking_uri']} "
              f"({_ui_hint(summary['tracking_uri'], summary['experiment_id'])})", soft_wrap=True)
    problems = {**summary["failures"], **{s: "no finished run" for s in summary["missing"] if s not in summary["failures"]}}
    for study, error in problems.items():
        console.print(f"[bold red]failed:[/] {study}: {error}", highlight=False, soft_wrap=True)
    if problems:
        raise typer.Exit(1)


@app.command()
def compare(
    name: Annotated[Optional[str], typer.Argument(help="a finished sweep's name (its MLflow experiment)")] = None,
    studies: Annotated[list[str], typer.Option("--study", help="compare these studies instead (repeatable)")] = [],
    results: Annotated[Path, typer.Option(help="folder for results/<name>/")] = Path("results"),
    store: Annotated[Path, typer.Option(help="local MLflow store (ignored if MLFLOW_TRACKING_URI is set)")] = Path("mlruns"),
    out_name: Annotated[str, typer.Option("--name", help="with --study: the comparison's folder name")] = "comparison",
) -> None:
    """Re-render a sweep's comparison (or one of several studies) from MLflow, without running anything."""
    from permanence.adapters.studies import compare_studies, compare_sweep
    from permanence.config import STUDY_NAME, STUDY_RULE
    from permanence.sweep import NAME, NAME_RULE

    if name is not None and studies:
        fail("compare: give a sweep name or one or more --study, not both")
    if name is None and not studies:
        fail("compare: give a finished sweep's name or one or more --study")
    unnamed = next((study for study in studies if not STUDY_NAME.fullmatch(study)), None)
    if unnamed is not None:
        fail(f"compare: --study {unnamed!r}: not a study's name ({STUDY_RULE})")
    repeated = sorted({study for study in studies if studies.count(study) > 1})
    if repeated:
        fail(f"compare: --study {repeated[0]} is given more than once")
    for option, value in (("NAME", name), ("--name", out_name)):
        if value is not None and not NAME.fullmatch(value):
            fail(f"compare: {option}: expected {NAME_RULE} (got {value!r})")
    try:
        files = compare_sweep(name, store, results) if name else compare_studies(studies, store, results, out_name)
    except PermanenceError as err:
        fail(str(err))
    out.print(Path(files["markdown"]).read_text(), soft_wrap=True, highlight=False)
    out.print(f"comparison written to {Path(files['cells']).parent}/")


@app.command()
def audit(
    name: Annotated[str, typer.Argument(help="the registered model to audit")],
    versions: Annotated[str, typer.Option(help="all, an alias (production), or MLflow version numbers: 3,5-9")] = "all",
    tracking_uri: Annotated[Optional[str], typer.Option("--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                                                        help="MLflow tracking server or database (default: --store)")] = None,
    store: Annotated[Path, typer.Option(help="local MLflow store, when no --tracking-uri is given")] = Path("mlruns"),
    data: Annotated[Optional[str], typer.Option(help="clean data: a dataset name or FILE.npz (x_test/y_test or x/y, "
                                                     "uint8); default: the test split named in the version's input.json")] = None,
    data_root: Annotated[Optional[Path], typer.Option("--data-root", help="folder of a named dataset (e.g. mnist)")] = None,
    checks: Annotated[str, typer.Option(help="comma-separated audit checks")] = "neural_cleanse,known_triggers,dormancy",
    option: Annotated[list[str], typer.Option("--option", "-o", help="a check's option: CHECK.KEY=VALUE, e.g. "
                                              "neural_cleanse.steps=60 (repeatable)")] = [],
    fail_on: Annotated[str, typer.Option("--fail-on", help="exit 1 on: backdoor, dormant (dormant or backdoor), never")] = "backdoor",
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="also load formats that run code when loaded "
                                               "(pickled PyTorch models, unverifiable pt2 archives)")] = False,
    trigger: Annotated[Optional[str], typer.Option(help="a trigger to probe: ATTACK[:SEED]@TARGET or FILE.npz@TARGET "
                                                        "(mask, pattern)")] = None,
    baseline: Annotated[Optional[str], typer.Option(help="never-poisoned model for the probes: models:/NAME/VERSION "
                                                         "(default: trained by the audit from the clean data)")] = None,
    candidates: Annotated[Optional[Path], typer.Option(help="inputs for strip: FILE.npz (x)")] = None,
    probe_all: Annotated[bool, typer.Option("--probe-all", help="run the dormancy probes on every version, not only "
                                            "where no trigger is live")] = False,
    workers: Annotated[Optional[int], typer.Option(help="worker processes for the checks (default: up to 2)")] = None,
    results: Annotated[Path, typer.Option(help="folder for results/audit-<name>/")] = Path("results"),
    report: Annotated[str, typer.Option(help="report format: html or md")] = "html",
    seed: Annotated[int, typer.Option(help="seed of the audit's own draws")] = 0,
    progress: Annotated[bool, typer.Option(help="show the live view")] = True,
) -> None:
    """Scan every version of a registered model for live and dormant backdoors, blind (no trigger known)."""
    import os

    import yaml

    for key, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0"),
                       ("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")):  # an unreachable server fails in seconds
        os.environ.setdefault(key, value)
    import torch

    from permanence.adapters.registry_audit import AuditRequest, prepare, run, write

    torch.set_num_threads(1)  # one thread per process (the checks' workers too): same numbers for any --workers
    options: dict[str, dict] = {}
    try:
        for text in option:
            key, sep, raw = text.partition("=")
            check, dot, field = key.strip().partition(".")
            if not sep or not dot or not field:
                raise PermanenceError(f"--option {text!r}: expected CHECK.KEY=VALUE, e.g. neural_cleanse.steps=60")
            options.setdefault(check, {})[field] = yaml.safe_load(raw) if raw.strip() else None
        if workers is not None and workers < 1:
            raise PermanenceError(f"--workers: must be >= 1 (got {workers})")
        request = AuditRequest(
            name, versions=versions, tracking_uri=tracking_uri, store=store, data=data, data_root=data_root,
            checks=tuple(c.strip() for c in checks.split(",") if c.strip()), options=options, fail_on=fail_on,
            trust_pickle=trust_pickle, trigger=trigger, baseline=baseline, candidates=candidates, results=results,
            report=report, seed=seed, probe_all=probe_all, workers=workers)
    except PermanenceError as err:
        fail(str(err))

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=console, disable=not progress, transient=False) as bars:
        tasks: dict[str, int] = {}

        def bar(key: str, total: int | None) -> int:
            if key not in tasks:
                tasks[key] = bars.add_task(f"  {key}" if key != "versions" else f"{name} versions", total=total, info="")
            return tasks[key]

        def on_event(check: str, version, state: str, info: str) -> None:
            if check == "load":
                bars.update(bar("loading", None), advance=state == "done", info=f"v{version} {info}")
            elif check == "verdict":
                bars.update(bar("versions", None), advance=1, info=f"v{version}: {info}")
            elif check in ("baseline", "report"):
                bars.update(bar(check, 1), completed=state == "done", info=info)
            elif state == "plan":
                bars.update(bar(check, None), total=bars.tasks[bar(check, None)].total + int(info))
            elif state == "start":
                bars.update(bar(check, None), info=f"v{version}")
            else:
                bars.update(bar(check, None), advance=1, info=f"v{version} {info}")

        try:
            plan = prepare(request, on_event)
            for check in request.checks:
                bars.update(bar(check, None), total=len(plan.versions))
            bars.update(bar("versions", None), total=len(plan.versions))
            result = run(plan, on_event)
            paths = write(result, on_event)
        except PermanenceError as err:
            bars.stop()
            fail(str(err))
    table = Table(title=f"audit of {name}: {len(result.rows)} versions", header_style="bold")
    for column in ("ver", "upd", "verdict", "tgt", "NC idx", "lin ASR", "P-ASR", "react"):
        table.add_column(column, justify="right", no_wrap=True, min_width=12 if column == "verdict" else None)
    colours = {"clean": "green", "backdoor": "red", "dormant": "yellow", "inconclusive": "white"}
    from permanence.adapters.registry_audit import verdict_target

    def num(value: float) -> str:
        return "-" if value != value else f"{value:.2f}"

    for row in result.rows:
        target = verdict_target(row, result.lineage)
        table.add_row(str(row.version), row.loaded.ref.update or "-", f"[{colours[row.verdict.verdict]}]{row.verdict.verdict}[/]",
                      "-" if target is None else str(target), num(row.number("neural_cleanse", "anomaly_index")),
                      num(row.number("dormancy", "asr")), num(row.number("dormancy", "p_asr")),
                      num(row.number("dormancy", "reactivated_asr")))
    out.print(table)
    for note in result.notes:
        out.print(f"  note: {note}", highlight=False, soft_wrap=True)
    lineage = f"{result.lineage.source} -> class {result.lineage.target}" if result.lineage else "none"
    on_baseline = ", ".join(f"{key.removesuffix('_clean')} {value:.2f}" for key, value in result.baseline_numbers.items())
    out.print(f"  lineage trigger: {lineage}; baseline: {result.baseline_label}"
              + (f"; on it: {on_baseline}" if on_baseline else ""), highlight=False, soft_wrap=True)
    out.print(f"  report: {paths['report']}; MLflow run {paths['run_id']} (experiment audit-{name}); "
              f"tags audit.* on {len(result.rows)} versions; {result.seconds:.0f} s", highlight=False, soft_wrap=True)
    tripped = result.tripped()
    if tripped:
        out.print(f"[bold red]gate --fail-on {fail_on} tripped:[/] " + ", ".join(
            f"v{r.version} {r.verdict.verdict}" for r in tripped), highlight=False)
        raise typer.Exit(1)
    out.print(f"[bold green]gate --fail-on {fail_on} passes[/]", highlight=False)


def main() -> None:
    """The `permanence` console script: the Typer app, with a command-line usage error (an option's value of the wrong
    type, an unknown option, a missing argument) shown as one `error:` line, exit 2, like every other bad input."""
    try:
        from typer._click import exceptions as usage  # Typer 0.2x carries its own copy of click
    except ImportError:  # an older Typer on click
        from click import exceptions as usage

    try:
        code = app(standalone_mode=False)
    except usage.NoArgsIsHelpError:  # the help is already printed
        sys.exit(2)
    except usage.UsageError as err:
        where = f"{err.ctx.command_path}: " if err.ctx else ""
        console.print(f"[bold red]error:[/] {where}{err.format_message()}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except usage.ClickException as err:
        console.print(f"[bold red]error:[/] {err.format_message()}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except typer.Abort:
        console.print("[bold red]aborted[/]", highlight=False)
        sys.exit(130)
    finally:
        # leave the objects alive now out of the collections the interpreter runs as it shuts down: with torch,
        # torchvision and Evidently imported they took 2.04 s after a `permanence audit`'s exit handlers began, 0.31 s
        # frozen; exit handlers and thread joins still run, only cycles alive now are left to the OS
        gc.freeze()
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
