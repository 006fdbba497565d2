"""The `permanence` command: run a study through the pipeline, show a study's results."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from permanence.config import load_config
from permanence.errors import PermanenceError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Permanence: how long does a one-shot backdoor survive retraining?")
console = Console(stderr=True)
out = Console()


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _load_flow_module():
    import logging

    from permanence.adapters.flow_loader import load_retrain_flow

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    try:
        return load_retrain_flow()
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
) -> None:
    """Run (or resume) a study through the Prefect flow, tracked in MLflow."""
    overrides = list(set_) + ([f"study={study}"] if study is not None else [])
    try:
        cfg = load_config(config, overrides)
        from permanence.simulation import Simulation

        simulation = Simulation(cfg)  # loads and checks data, attack and drift: bad input fails before any run exists
    except PermanenceError as err:
        fail(str(err))
    flows = _load_flow_module()
    from permanence.simulation import EpochEnd

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

        try:
            summary = flows.retraining_pipeline(cfg, results_dir=results, store_dir=store, on_event=on_event, on_version=on_version,
                                                   simulation=simulation)
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
                  f"MLflow UI: mlflow ui --backend-store-uri {summary['tracking_uri']}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
