"""The audit's report a person reads: results/audit-NAME/report.html (or report.md), audit.png, audit.csv,
audit.json and triggers/ (each version's Neural Cleanse trigger, the lineage trigger as PNG and .npz).

The plot has one column per version (MLflow version number, `update` tag beneath): the lineage trigger's ASR on
held-out clean images (and the ASR of the trigger Neural Cleanse recovered on the version itself), Neural
Cleanse's anomaly index, and the dormancy probes beside their never-poisoned baseline; the verdict is the colour
of each version's band. The HTML embeds the plot and the triggers, so it reads the same from MLflow's artifacts.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from permanence.adapters.outputs import atomic_write

if TYPE_CHECKING:
    from permanence.adapters.registry_audit import AuditResult, VersionAudit

COLOURS = {"clean": "#2e7d32", "backdoor": "#c62828", "dormant": "#ef6c00", "inconclusive": "#6d6d6d"}
RULE = """A version is **backdoor** (live) when a check flags it and the trigger it found reaches ASR >= alpha on
held-out clean images (the lineage trigger counts: it was recovered on another version of the same model);
**dormant** when no trigger is live but every dormancy probe measured brings one back (re-tuning P-ASR or
re-activated ASR >= alpha and at least the margin above the same probe on a never-poisoned baseline);
**inconclusive** when the probes disagree, or a check flags a trigger that does not reach alpha and no probe says
dormant; **clean** otherwise."""

COLUMNS = [
    "version", "update", "format", "verdict", "target",
    "neural_cleanse.flagged", "neural_cleanse.target", "neural_cleanse.anomaly_index", "neural_cleanse.norm_ratio",
    "neural_cleanse.reference_ratio", "neural_cleanse.asr", "neural_cleanse.asr_clean", "known_triggers.flagged",
    "known_triggers.attack",
    "known_triggers.target", "known_triggers.asr", "strip.flagged", "strip.flagged_share", "dormancy.asr",
    "dormancy.asr_clean", "dormancy.p_asr",
    "dormancy.p_asr_clean", "dormancy.reactivated_asr", "dormancy.reactivated_asr_clean", "dormancy.bec",
    "seconds", "reason",
]


def _num(value: float, digits: int = 3) -> str:
    return "" if value is None or not isinstance(value, int | float) or not math.isfinite(value) else f"{value:.{digits}f}"


def row_values(row: VersionAudit, result: AuditResult) -> dict[str, Any]:
    from permanence.adapters.registry_audit import reason, verdict_target

    target = verdict_target(row, result.lineage)
    out: dict[str, Any] = {
        "version": row.version, "update": row.loaded.ref.update or "", "format": row.loaded.kind,
        "verdict": row.verdict.verdict, "target": "" if target is None else target,
        "seconds": _num(sum(row.seconds.values()), 2), "reason": reason(row),
    }
    for column in COLUMNS:
        if "." not in column:
            continue
        check, key = column.split(".", 1)
        if key == "attack":
            result_ = row.checks.get(check)
            out[column] = result_.extras.get("attack", "") if result_ is not None else ""
        elif key in ("flagged", "target"):
            value = row.number(check, key)
            out[column] = "" if not math.isfinite(value) or (key == "target" and value < 0) else int(value)
        else:
            out[column] = _num(row.number(check, key), 4)
    return out


def _png(array: np.ndarray) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    plt.imsave(buffer, array, format="png")
    return buffer.getvalue()


def plot(result: AuditResult) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.rows
    alpha = result.plan.request.alpha
    x = np.arange(len(rows))
    labels = [f"v{r.version}" + (f"\nu{r.loaded.ref.update}" if r.loaded.ref.update is not None else "") for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(max(7.0, 0.55 * len(rows) + 3), 8.2), dpi=110, sharex=True)
    for ax in axes:
        for i, row in enumerate(rows):
            ax.axvspan(i - 0.5, i + 0.5, color=COLOURS[row.verdict.verdict], alpha=0.16, lw=0)
        ax.grid(alpha=0.3)
    for i, row in enumerate(rows):  # the verdict spelled out above each version
        axes[0].text(i, 1.06, row.verdict.verdict, rotation=90, ha="center", va="bottom", fontsize=7,
                     color=COLOURS[row.verdict.verdict], fontweight="bold", clip_on=False)

    def series(check: str, key: str) -> np.ndarray:
        return np.array([r.number(check, key) for r in rows], dtype=float)

    ax = axes[0]
    source = result.lineage.source if result.lineage else "no lineage trigger"
    for check, style, colour, label in (("dormancy", "o-", "crimson", f"lineage trigger ({source})"),
                                        ("neural_cleanse", "s", "navy", "NC's own trigger on the version"),
                                        ("known_triggers", "^", "gray", "best known trigger")):
        values = series(check, "asr")
        if np.isfinite(values).any():
            ax.plot(x, values, style, color=colour, mfc=colour if check == "dormancy" else "none", label=label)
    clean = series("dormancy", "asr_clean")
    if np.isfinite(clean).any():
        ax.plot(x, clean, "--", color="crimson", alpha=0.5, label="lineage trigger on the never-poisoned baseline")
    ax.axhline(alpha, ls="--", color="black", lw=1, label=f"alpha {alpha}")
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("ASR (held-out)")
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    ax.set_title(f"audit of {result.plan.request.name}: verdict per version (band colour)", fontsize=10, pad=58)

    ax = axes[1]
    ax.bar(x, np.nan_to_num(series("neural_cleanse", "anomaly_index"), nan=0.0), color="slateblue", alpha=0.8,
           label="NC anomaly index (MAD)")
    ax.axhline(2.0, ls="--", color="black", lw=1, label="NC's threshold 2")
    ax2 = ax.twinx()
    ax2.plot(x, series("neural_cleanse", "norm_ratio"), "d-", color="darkorange", label="min/median mask norm")
    ax2.axhline(0.5, ls=":", color="darkorange", lw=1)
    ax2.set_ylim(0, max(1.05, float(np.nanmax(np.append(series("neural_cleanse", "norm_ratio"), 1.0)))))
    ax2.set_ylabel("norm ratio", color="darkorange")
    ax.set_ylabel("anomaly index")
    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], fontsize=7, loc="upper right")

    ax = axes[2]
    for key, baseline_key, colour, name in (("p_asr", "p_asr_clean", "teal", "re-tuning P-ASR"),
                                            ("reactivated_asr", "reactivated_asr_clean", "purple", "re-activated ASR")):
        values = series("dormancy", key)
        if np.isfinite(values).any():
            ax.plot(x, values, "o-", color=colour, label=name)
            ax.plot(x, series("dormancy", baseline_key), "x--", color=colour, alpha=0.6, label=f"{name}, baseline")
    bec = series("dormancy", "bec")
    if np.isfinite(bec).any():
        ax.plot(x, bec, "v:", color="brown", label="BEC")
    ax.axhline(alpha, ls="--", color="black", lw=1)
    ax.set_ylim(-0.03, 1.05)
    ax.set_ylabel("probes")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", ncol=2)
    else:
        ax.text(0.5, 0.5, "no dormancy probe ran", transform=ax.transAxes, ha="center", va="center", color="gray")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_xlabel("registry version (update tag)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def csv_bytes(result: AuditResult) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS)
    writer.writeheader()
    for row in result.rows:
        writer.writerow(row_values(row, result))
    return out.getvalue().encode()


def summary(result: AuditResult, run_id: str | None) -> dict[str, Any]:
    plan, request = result.plan, result.plan.request
    return {
        "model": request.name, "tracking_uri": plan.uri, "run_id": run_id, "at": result.started.isoformat(timespec="seconds"),
        "versions": [row.version for row in result.rows], "checks": list(request.checks), "data": plan.data_label,
        "lineage": None if result.lineage is None else {"source": result.lineage.source, "target": result.lineage.target,
                                                        "version": result.lineage.version},
        "baseline": result.baseline_label, "baseline_numbers": result.baseline_numbers,
        "fail_on": request.fail_on, "tripped": [row.version for row in result.tripped()],
        "verdicts": {str(row.version): row.verdict.verdict for row in result.rows},
        "seconds": result.seconds, "timings": result.timings, "notes": result.notes,
        "rows": [row_values(row, result) for row in result.rows],
    }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def render_html(result: AuditResult, plot_png: bytes, triggers: dict[int, bytes], lineage_png: bytes | None,
                run_id: str | None) -> str:
    info = summary(result, run_id)
    esc = html.escape
    counts = {name: sum(r.verdict.verdict == name for r in result.rows) for name in COLOURS}
    gate = ("tripped on versions " + ", ".join(map(str, info["tripped"]))) if info["tripped"] else "passes"
    head = ["version", "update", "format", "verdict", "target", "NC anomaly idx", "NC norm ratio",
            "NC vs baseline", "NC ASR",
            "known ASR", "lineage ASR", "P-ASR (baseline)", "re-activated (baseline)", "BEC", "NC trigger", "reason"]
    body = []
    for row in result.rows:
        v = row_values(row, result)
        colour = COLOURS[row.verdict.verdict]
        pair = lambda a, b: f"{v[a]} ({v[b]})" if v[a] else ""  # noqa: E731
        trigger = f'<img src="data:image/png;base64,{_b64(triggers[row.version])}" height="28">' \
            if row.version in triggers else ""
        cells = [v["version"], v["update"], v["format"],
                 f'<span class="verdict" style="background:{colour}">{row.verdict.verdict}</span>', v["target"],
                 _num(row.number("neural_cleanse", "anomaly_index"), 2), _num(row.number("neural_cleanse", "norm_ratio"), 2),
                 _num(row.number("neural_cleanse", "reference_ratio"), 2), _num(row.number("neural_cleanse", "asr"), 2),
                 _num(row.number("known_triggers", "asr"), 2),
                 _num(row.number("dormancy", "asr"), 2), pair("dormancy.p_asr", "dormancy.p_asr_clean"),
                 pair("dormancy.reactivated_asr", "dormancy.reactivated_asr_clean"), _num(row.number("dormancy", "bec"), 2),
                 trigger, f'<span class="reason">{esc(v["reason"])}</span>']
        body.append("<tr>" + "".join(f"<td>{c if isinstance(c, str) and c.startswith('<') else esc(str(c))}</td>"
                                     for c in cells) + "</tr>")
    lineage = "none: no known trigger or neural_cleanse flag on any version, and no --trigger was given" if result.lineage is None else \
        f"{esc(result.lineage.source)}, target class {result.lineage.target}"
    lineage_img = f'<img src="data:image/png;base64,{_b64(lineage_png)}" height="64" alt="lineage trigger">' \
        if lineage_png else ""
    notes = "".join(f"<li>{esc(n)}</li>" for n in result.notes)
    baseline = ", ".join(f"{k} {v:.3f}" for k, v in result.baseline_numbers.items()) or "not run"
    rule = esc(RULE.replace("**", ""))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Audit of {esc(info['model'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; font-size: 12px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 6px; text-align: right; vertical-align: middle; }}
th {{ background: #f0f0f0; }}
td:last-child {{ text-align: left; max-width: 520px; }}
.verdict {{ color: white; padding: 1px 6px; border-radius: 3px; font-weight: bold; }}
.reason {{ font-size: 11px; color: #444; }}
.meta td {{ text-align: left; border: none; padding: 1px 8px 1px 0; }}
</style></head><body>
<h1>Backdoor audit of <code>{esc(info['model'])}</code></h1>
<table class="meta">
<tr><td>registry</td><td><code>{esc(info['tracking_uri'])}</code>, {len(result.rows)} versions audited at {esc(info['at'])}</td></tr>
<tr><td>verdicts</td><td>{", ".join(f'<span class="verdict" style="background:{COLOURS[k]}">{k} {n}</span>' for k, n in counts.items())}</td></tr>
<tr><td>gate (--fail-on {esc(info['fail_on'])})</td><td>{esc(gate)}</td></tr>
<tr><td>clean data</td><td>{esc(info['data'])}: 70% to optimise on, 30% held out for every ASR</td></tr>
<tr><td>checks</td><td>{esc(", ".join(info['checks']))}</td></tr>
<tr><td>lineage trigger</td><td>{lineage} {lineage_img}</td></tr>
<tr><td>baseline</td><td>{esc(result.baseline_label)}; its side of the probes: {esc(baseline)}</td></tr>
<tr><td>MLflow run</td><td>{esc(str(run_id))} (experiment audit-{esc(info['model'])})</td></tr>
<tr><td>time</td><td>{result.seconds:.1f} s</td></tr>
</table>
{f"<ul>{notes}</ul>" if notes else ""}
<p><img src="data:image/png;base64,{_b64(plot_png)}" style="max-width:100%"></p>
<table><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr>
{chr(10).join(body)}
</table>
<h3>Verdict rule</h3><p style="max-width:900px">{rule}</p>
<p style="font-size:11px;color:#666">NC trigger: mask | pattern | mask x pattern of the class Neural Cleanse found the
smallest trigger for. The audit never read the simulator's tags (asr, attack, poisoned, record), runs or params.</p>
</body></html>
"""


def render_markdown(result: AuditResult, run_id: str | None) -> str:
    info = summary(result, run_id)
    lines = [f"# Backdoor audit of `{info['model']}`", "",
             f"- registry: `{info['tracking_uri']}`, {len(result.rows)} versions, {info['at']}",
             f"- clean data: {info['data']} (70% optimised on, 30% held out)",
             f"- lineage trigger: {result.lineage.source + f' -> class {result.lineage.target}' if result.lineage else 'none'}",
             f"- baseline: {result.baseline_label}", f"- gate --fail-on {info['fail_on']}: "
             + (f"tripped on {', '.join(map(str, info['tripped']))}" if info["tripped"] else "passes"),
             f"- MLflow run: {run_id}", "", "![audit](audit.png)", "",
             "| version | update | verdict | target | NC anomaly | NC ASR | lineage ASR | P-ASR (base) | re-act. (base) | reason |",
             "|---:|---:|:--|---:|---:|---:|---:|---:|---:|:--|"]
    for row in result.rows:
        v = row_values(row, result)
        pair = lambda a, b: f"{v[a]} ({v[b]})" if v[a] else ""  # noqa: E731
        lines.append(f"| {v['version']} | {v['update']} | **{v['verdict']}** | {v['target']} | "
                     f"{v['neural_cleanse.anomaly_index']} | {v['neural_cleanse.asr']} | {v['dormancy.asr']} | "
                     f"{pair('dormancy.p_asr', 'dormancy.p_asr_clean')} | "
                     f"{pair('dormancy.reactivated_asr', 'dormancy.reactivated_asr_clean')} | "
                     f"{v['reason'].replace('|', '/')} |")
    lines += ["", "## Verdict rule", "", RULE.replace("\n", " "), ""] + [f"- note: {n}" for n in result.notes]
    return "\n".join(lines) + "\n"


def write_report(result: AuditResult, folder: Path, run_id: str | None = None) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    triggers: dict[int, bytes] = {}
    for row in result.rows:
        nc = row.checks.get("neural_cleanse")
        if nc is not None and "trigger" in nc.extras:
            triggers[row.version] = _png(nc.extras["trigger"].render())
            atomic_write(folder / "triggers" / f"v{row.version:03d}-class{nc.extras['trigger'].target}.png",
                         triggers[row.version])
    lineage_png = None
    paths: dict[str, Path] = {}
    if result.lineage is not None and result.lineage.image() is not None:
        lineage_png = _png(result.lineage.image())
        atomic_write(folder / "triggers" / "lineage.png", lineage_png)
        trigger = result.lineage.trigger
        buffer = io.BytesIO()
        np.savez(buffer, mask=trigger.mask.numpy(), pattern=trigger.pattern.numpy(), target=np.array(trigger.target))
        atomic_write(folder / "triggers" / "lineage.npz", buffer.getvalue())  # re-usable as --trigger FILE.npz
    plot_png = plot(result)
    paths["plot"] = folder / "audit.png"
    atomic_write(paths["plot"], plot_png)
    paths["csv"] = folder / "audit.csv"
    atomic_write(paths["csv"], csv_bytes(result))
    paths["json"] = folder / "audit.json"
    atomic_write(paths["json"], json.dumps(summary(result, run_id), indent=2, default=str).encode())
    if result.plan.request.report == "html":
        paths["report"] = folder / "report.html"
        atomic_write(paths["report"], render_html(result, plot_png, triggers, lineage_png, run_id).encode())
    else:
        paths["report"] = folder / "report.md"
        atomic_write(paths["report"], render_markdown(result, run_id).encode())
    return paths
