"""The files a study leaves in results/<study>/: timeline.csv, summary.json, timeline.png.

Each is written to a temporary file and renamed, so a crash never leaves a half-written one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import uuid
from pathlib import Path
from typing import Any

from permanence.timeline import PROBE_FIELDS

COLUMNS = ["update", "drift", "poisoned", "updated", "clean_acc", "asr", "ra", "drift_score", "drift_detected",
           "stat_drift_share", "model_version", "train_seconds", "eval_seconds", "n_train", "n_poisoned"]
OPTIONAL = [*PROBE_FIELDS, "probe_seconds"]  # written when a row has them (the dormancy probes were on)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all, with the mode any new file of this user gets (the umask applied by the
    kernel; tempfile.mkstemp would make it 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def timeline_csv(rows: list[dict[str, Any]]) -> bytes:
    out = io.StringIO()
    extra = [name for name in OPTIONAL if any(row.get(name) is not None for row in rows)]
    writer = csv.DictWriter(out, fieldnames=COLUMNS + extra, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "update": row["version"]})
    return out.getvalue().encode()


def read_timeline_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def pyplot():
    """matplotlib's pyplot on the Agg backend, imported on first use: a sweep's workers import this module and never
    plot. `flows/retrain.py` calls it at import, since its timeline ends with a plot: matplotlib's import cost
    0.5-1.5 s at the end of the first timeline otherwise (bench/overhead.py), a start-up cost like the other tools'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_png(rows: list[dict[str, Any]], title: str, alpha: float) -> bytes:
    plt = pyplot()
    updates = [r["version"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(updates, [r["clean_acc"] for r in rows], "o-", label="clean accuracy")
    ax.plot(updates, [r["asr"] for r in rows], "s-", color="crimson", label="attack success rate")
    ax.plot(updates, [r["ra"] for r in rows], "^--", color="gray", alpha=0.7, label="robust accuracy")
    probes = (("p_asr", "P-ASR (re-tuned)", "tab:purple"), ("reactivated_asr", "re-activated ASR", "tab:brown"),
              ("bec", "backdoor existence coef.", "tab:olive"))
    for name, label, color in probes:
        points = [(r["version"], r[name]) for r in rows if r.get(name) is not None]
        if points:
            ax.plot(*zip(*points), "d--", color=color, lw=1, ms=4, label=label)
    ax.axhline(alpha, color="crimson", lw=0.8, ls=":", label=f"alpha = {alpha}")
    for r in rows:
        if not r.get("updated", True):
            ax.plot(r["version"], -0.0, "x", color="black", ms=6)
        if r["poisoned"]:
            ax.axvspan(r["version"] - 0.4, r["version"] + 0.4, color="crimson", alpha=0.12)
        if r.get("drift_detected"):
            ax.plot(r["version"], 1.03, "v", color="darkorange", ms=5)
    ax.set(xlabel="model version (update)", ylabel="rate", ylim=(-0.02, 1.07), title=title)
    ax.set_xticks(updates)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def write_outputs(folder: Path, rows: list[dict[str, Any]], summary: dict[str, Any], title: str,
                  plot: bool = True) -> dict[str, Path]:
    paths = {"csv": folder / "timeline.csv", "summary": folder / "summary.json"}
    atomic_write(paths["csv"], timeline_csv(rows))
    if plot:
        paths["png"] = folder / "timeline.png"
        atomic_write(paths["png"], plot_png(rows, title, summary["alpha"]))
    atomic_write(paths["summary"], json.dumps(summary, indent=2).encode())
    return paths
