"""The comparison a person reads in one look, from finished timelines: results/<sweep>/ holds

- cells.csv: one row per timeline (axis values under their full keys, seed, survivability, ASR right after
  injection, final ASR and clean accuracy, the never-poisoned control's final ASR (the floor), seconds, run id,
  and every other per-timeline number, such as the final dormancy probes);
- comparison.csv / comparison.md: mean and std over seeds for each combination of the axes;
- heatmap.png: mean survivability over the heatmap axes, annotated;
- curves.png: mean ASR and clean accuracy per model version, one line per value of the compared axis, shaded
  by std, with the control's ASR (the floor) dashed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from permanence.adapters.outputs import atomic_write, pyplot

HEADLINE = ["survivability", "survivability_above_floor", "asr_injected", "final_asr", "asr_floor_final",
            "final_clean_acc", "clean_acc_initial", "seconds"]
MAX_PANELS = 6


@dataclass(frozen=True)
class TimelineResult:
    """A finished timeline as the comparison needs it."""

    study: str
    values: dict[str, Any]  # axis -> value
    seed: int
    summary: dict[str, Any]
    rows: list[dict[str, Any]]  # per model version: version, clean_acc, asr, ...
    run_id: str
    control_study: str | None = None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _survivability_above(asr: list[float], floor: list[float], last_poisoned: int | None, alpha: float) -> int | None:
    """Survivability read against the floor: consecutive versions after poisoning whose ASR stays >= alpha above
    what the never-poisoned control reaches at that version (drift alone)."""
    if last_poisoned is None:
        return None
    count = 0
    for value, base in zip(asr[last_poisoned + 1:], floor[last_poisoned + 1:]):
        if not value - base >= alpha * (1 - base):
            break
        count += 1
    return count


def cell_rows(axes: list[str], results: list[TimelineResult]) -> list[dict[str, Any]]:
    by_study = {r.study: r for r in results}
    rows = []
    for result in results:
        if result.study in _control_studies(results):
            continue
        s = result.summary
        asr = [float(r["asr"]) for r in result.rows]
        row: dict[str, Any] = {axis: result.values.get(axis) for axis in axes}
        row.update(seed=result.seed, survivability=s.get("survivability"), asr_injected=s.get("asr_injected"),
                   final_asr=s.get("asr_final"), final_clean_acc=s.get("clean_acc_final"),
                   clean_acc_initial=s.get("clean_acc_initial"),
                   seconds=round(sum(float(r.get("train_seconds") or 0) + float(r.get("eval_seconds") or 0)
                                     + float(r.get("probe_seconds") or 0) for r in result.rows), 3))
        control = by_study.get(result.control_study) if result.control_study else None
        if control is not None:
            floor = [float(r["asr"]) for r in control.rows]
            row["asr_floor_final"] = floor[-1]
            row["survivability_above_floor"] = _survivability_above(asr, floor, s.get("last_poisoned_version"),
                                                                    float(s.get("alpha", 0.5)))
        for key, value in s.items():  # every other per-timeline number (probes, drift flags, ...)
            if key not in row and key not in ("version", "seed", "alpha", "asr_final", "clean_acc_final") \
                    and _number(value) is not None:
                row[key] = value
        row["mlflow_run_id"] = result.run_id
        row["study"] = result.study
        rows.append(row)
    return rows


def _control_studies(results: list[TimelineResult]) -> set[str]:
    return {r.control_study for r in results if r.control_study}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def comparison_rows(axes: list[str], cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds per combination of the axes, in the order the cells came."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for cell in cells:
        groups.setdefault(json.dumps([cell[a] for a in axes], default=str), []).append(cell)
    metrics = [m for m in HEADLINE if any(_number(c.get(m)) is not None for c in cells)]
    extra = sorted({k for c in cells for k, v in c.items() if k not in axes and k not in metrics
                    and k not in ("seed", "mlflow_run_id", "study") and _number(v) is not None})
    out = []
    for members in groups.values():
        row: dict[str, Any] = {axis: members[0][axis] for axis in axes}
        row["seeds"] = len(members)
        for metric in metrics + extra:
            values = [_number(m.get(metric)) for m in members]
            values = [v for v in values if v is not None]
            if values:
                row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std(values)
        out.append(row)
    return out


def _csv(rows: list[dict[str, Any]]) -> bytes:
    names = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=names)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt_csv(v) for k, v in row.items()})
    return buffer.getvalue().encode()


def _fmt_csv(value: Any) -> Any:
    return round(value, 6) if isinstance(value, float) else value


def comparison_markdown(name: str, axes: list[str], rows: list[dict[str, Any]]) -> str:
    shown = [m for m in HEADLINE if any(f"{m}_mean" in r for r in rows)]
    extra = [k.removesuffix("_mean") for k in dict.fromkeys(k for r in rows for k in r)
             if k.endswith("_mean") and k.removesuffix("_mean") not in shown
             and k.removesuffix("_mean").endswith("_final")]
    columns = shown + extra
    lines = [f"# {name}: mean ± std over seeds", "",
             "| " + " | ".join([*axes, "seeds", *columns]) + " |",
             "|" + "---|" * (len(axes) + 1 + len(columns))]
    for row in rows:
        cells = [str(row[a]) for a in axes] + [str(row["seeds"])]
        for column in columns:
            mean, std = row.get(f"{column}_mean"), row.get(f"{column}_std")
            digits = 1 if column.startswith("surviv") or column == "seconds" else 3
            cells.append("-" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _panels(axes: list[str], fixed: list[str], results: list[TimelineResult]) -> list[dict[str, Any]]:
    """Combinations of the axes not drawn inside a panel; one panel each (all together beyond MAX_PANELS)."""
    others = [a for a in axes if a not in fixed]
    combos = list(dict.fromkeys(json.dumps([r.values.get(a) for a in others], default=str) for r in results))
    if not others or len(combos) > MAX_PANELS:
        return [{}]
    return [dict(zip(others, json.loads(c))) for c in combos]


def _matches(result: TimelineResult, panel: dict[str, Any]) -> bool:
    return all(json.dumps(result.values.get(k), default=str) == json.dumps(v, default=str) for k, v in panel.items())


def _title(panel: dict[str, Any]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in panel.items()) or "all cells"


def heatmap_png(axes: list[str], heat_axes: list[str], cells: list[dict[str, Any]], results: list[TimelineResult],
                title: str) -> bytes:
    import numpy as np

    plt = pyplot()

    studies = {c["study"] for c in cells}
    kept = [r for r in results if r.study in studies]
    panels = _panels(axes, heat_axes, kept)
    rows_axis, cols_axis = heat_axes[0], heat_axes[1] if len(heat_axes) > 1 else None
    row_values = list(dict.fromkeys(c[rows_axis] for c in cells))
    col_values = list(dict.fromkeys(c[cols_axis] for c in cells)) if cols_axis else [None]
    updates = max(int(r["version"]) for res in kept for r in res.rows)  # the most survivability can be
    fig, axs = plt.subplots(1, len(panels), figsize=(1.2 + 1.6 * len(col_values) * len(panels), 1.2 + 0.55 * len(row_values)),
                            dpi=110, squeeze=False, layout="constrained")  # keeps the title above the panels' titles
    for ax, panel in zip(axs[0], panels):
        grid = np.full((len(row_values), len(col_values)), np.nan)
        spread = np.zeros_like(grid)
        for i, rv in enumerate(row_values):
            for j, cv in enumerate(col_values):
                values = [float(c["survivability"]) for c in cells if c[rows_axis] == rv
                          and (cols_axis is None or c[cols_axis] == cv) and c.get("survivability") is not None
                          and all(json.dumps(c.get(k), default=str) == json.dumps(v, default=str) for k, v in panel.items())]
                if values:
                    grid[i, j], spread[i, j] = _mean_std(values)
        image = ax.imshow(grid, cmap="Reds", vmin=0, vmax=max(1, updates), aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(j, i, f"{value:.1f}\n±{spread[i, j]:.1f}", ha="center", va="center", fontsize=8,
                        color="white" if value > 0.6 * updates else "black")
        ax.set_yticks(range(len(row_values)), [str(v) for v in row_values])
        ax.set_xticks(range(len(col_values)), [str(v) if v is not None else "" for v in col_values], rotation=30, ha="right")
        ax.set_ylabel(rows_axis)
        if cols_axis:
            ax.set_xlabel(cols_axis)
        ax.set_title(_title(panel) if panel else "", fontsize=9)
    fig.colorbar(image, ax=axs[0].tolist(), label=f"mean survivability (of {updates} updates)", shrink=0.9)
    fig.suptitle(f"{title}: mean alpha-survivability over seeds", fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _series(results: list[TimelineResult], key: str) -> tuple[list[int], list[float], list[float]]:
    length = min(len(r.rows) for r in results)
    columns = [[float(r.rows[v][key]) for r in results] for v in range(length)]
    means, stds = zip(*(_mean_std(c) for c in columns))
    return list(range(length)), list(means), list(stds)


def curves_png(axes: list[str], compare: str, results: list[TimelineResult], title: str, alpha: float) -> bytes:
    import matplotlib.ticker  # noqa: F401  (MaxNLocator)

    plt = pyplot()

    controls = _control_studies(results)
    by_study = {r.study: r for r in results}
    cells = [r for r in results if r.study not in controls]
    panels = _panels(axes, [compare], cells)
    values = list(dict.fromkeys(json.dumps(r.values.get(compare), default=str) for r in cells))
    colors = plt.get_cmap("tab10")
    rows_of_legend = 1 + (len(values) + 1) // 5
    fig, axs = plt.subplots(2, len(panels), figsize=(max(6.0, 4.2 * len(panels)), 6.4 + 0.35 * rows_of_legend), dpi=110,
                            squeeze=False, sharex=True)
    for column, panel in enumerate(panels):
        members = [r for r in cells if _matches(r, panel)]
        for index, value in enumerate(values):
            group = [r for r in members if json.dumps(r.values.get(compare), default=str) == value]
            if not group:
                continue
            label = f"{json.loads(value)} (n={len(group)})"
            for row, key in enumerate(("asr", "clean_acc")):
                x, mean, std = _series(group, key)
                ax = axs[row][column]
                ax.plot(x, mean, "-o", ms=3, color=colors(index % 10), label=label)
                ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=colors(index % 10), alpha=0.15)
        floors = [by_study[r.control_study] for r in members if r.control_study in by_study]
        if floors:
            unique = list({f.study: f for f in floors}.values())
            x, mean, std = _series(unique, "asr")
            axs[0][column].plot(x, mean, "--", color="dimgray", lw=1.5, label="never-poisoned control (floor)")
        axs[0][column].axhline(alpha, color="crimson", lw=0.8, ls=":")
        axs[0][column].set_title(_title(panel), fontsize=9)
        axs[0][column].set_ylim(-0.02, 1.02)
        axs[1][column].set_xlabel("model version (update)")
        for ax in axs[:, column]:
            ax.grid(alpha=0.3)
    axs[0][0].set_ylabel("attack success rate (mean ± std)")
    axs[1][0].set_ylabel("clean accuracy (mean ± std)")
    for ax in axs.flat:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    handles, labels = axs[0][0].get_legend_handles_labels()
    fig.suptitle(f"{title}: one line per {compare} (red dotted: alpha = {alpha})", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 0.97))
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8, title=compare,
               title_fontsize=8, frameon=False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def write_comparison(folder: Path, name: str, axes: list[str], compare: str, heat_axes: list[str],
                     results: list[TimelineResult]) -> dict[str, Path]:
    """Write the five comparison files (atomically) and return their paths."""
    if not results:
        return {}
    cells = cell_rows(axes, results)
    table = comparison_rows(axes, cells)
    alpha = float(results[0].summary.get("alpha", 0.5))
    paths = {"cells": folder / "cells.csv", "comparison": folder / "comparison.csv", "markdown": folder / "comparison.md",
             "heatmap": folder / "heatmap.png", "curves": folder / "curves.png"}
    atomic_write(paths["cells"], _csv(cells))
    atomic_write(paths["comparison"], _csv(table))
    atomic_write(paths["markdown"], comparison_markdown(name, axes, table).encode())
    atomic_write(paths["heatmap"], heatmap_png(axes, heat_axes, cells, results, name))
    atomic_write(paths["curves"], curves_png(axes, compare, results, name, alpha))
    return paths


def differing_axes(configs: list[dict[str, Any]]) -> list[str]:
    """The flat config keys (but study and seed) whose values differ between studies: their comparison's axes."""
    keys = list(dict.fromkeys(k for c in configs for k in c))
    return [k for k in keys if k not in ("study", "seed") and len({json.dumps(c.get(k)) for c in configs}) > 1]

