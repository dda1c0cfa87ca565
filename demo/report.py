"""The demo's report folder: a timeline plot a person can look at, and a page a person can read."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from vims.console import to_json

DECISION_STYLE = {"allow": ("tab:green", "o"), "deny": ("tab:red", "x"), "cut": ("black", "v")}


def plot_timeline(path: Path, reports: list[dict[str, Any]], decisions: list[dict[str, Any]],
                  marks: list[tuple[float, str]], start: float, threshold: float) -> Path:
    """Behaviour score over time with the threshold, the story's events and REM-S's decisions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, strip) = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True, height_ratios=[4, 1])
    t = [r["time"] - start for r in reports]
    score = [r.get("behaviour", {}).get("score") for r in reports]
    ax.plot(t, score, marker=".", color="tab:blue", label="behaviour score (1 = normal)")
    ax.axhline(threshold, color="tab:red", linestyle="--", linewidth=1, label=f"policy threshold {threshold:g}")
    failing = [r["time"] - start for r in reports
               if any(c.get("status") != "pass" for c in r.get("checks", []))]
    if failing:
        ax.scatter(failing, [1.04] * len(failing), marker="s", color="tab:orange", s=14,
                   label="a static check fails", clip_on=False)
    for i, (when, what) in enumerate(marks):
        ax.axvline(when, color="grey", linewidth=0.8, linestyle=":")
        # Staggered heights: events of the story often come within a second of each other.
        ax.annotate(what, (when, 0.02 + 0.3 * (i % 3)), rotation=90, fontsize=7, color="dimgrey",
                    va="bottom", ha="right")
    ax.set_ylim(-0.02, 1.08)
    ax.set_ylabel("behaviour score")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("VIMS demo: the guest's behaviour and REM-S's decisions")
    for row, kind in enumerate(("allow", "deny", "cut")):
        xs = [d["time"] - start for d in decisions if d["kind"] == kind and d["time"] >= start]
        color, marker = DECISION_STYLE[kind]
        strip.scatter(xs, [row] * len(xs), color=color, marker=marker, s=22)
    strip.set_yticks([0, 1, 2], ["allow", "deny", "cut"])
    strip.set_ylim(-0.6, 2.6)
    strip.set_xlabel("seconds since the A-VM attached")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(folder: Path, summary: dict[str, Any], reports: list[dict[str, Any]],
                 decisions: list[dict[str, Any]], marks: list[tuple[float, str]], start: float,
                 threshold: float) -> Path:
    """Write ``summary.json``, ``reports.jsonl``, ``decisions.json``, ``timeline.png`` and ``index.html``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(to_json(summary) + "\n")
    (folder / "reports.jsonl").write_text("".join(to_json(r, indent=None) + "\n" for r in reports))
    (folder / "decisions.json").write_text(to_json(decisions) + "\n")
    plot_timeline(folder / "timeline.png", reports, decisions, marks, start, threshold)
    esc = html.escape

    def yes(flag: Any) -> str:
        return '<b style="color:green">yes</b>' if flag else '<b style="color:red">no</b>'

    events = "".join(f"<tr><td>{when:.1f}</td><td>{esc(what)}</td></tr>" for when, what in marks)
    shown = [d for d in decisions if d["time"] >= start]
    rows = "".join(f"<tr><td>{d['time'] - start:.1f}</td><td>{esc(d['kind'])}</td><td>{esc(str(d['reason']))}</td>"
                   f"</tr>" for d in shown[-40:])
    blamed = [p for r in reports for p in r.get("behaviour", {}).get("top_processes", [])
              if r.get("behaviour", {}).get("score", 1) < threshold][:8]
    evidence = "".join(f"<tr><td>{esc(str(p.get('pid')))}</td><td>{esc(str(p.get('comm')))}</td>"
                       f"<td>{p.get('score', 0):.3f}</td><td><code>{esc('; '.join(map(str, p.get('evidence', []))))}"
                       f"</code></td></tr>" for p in blamed)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>VIMS demo report</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td,th{{padding:2px 8px;text-align:left}}
table{{border-collapse:collapse}}tr:nth-child(even){{background:#f4f4f4}}</style></head><body>
<h1>VIMS demo report</h1>
<table>
<tr><th>client allowed before the attack</th><td>{yes(summary.get('allowed_before_attack'))}</td></tr>
<tr><th>connection {esc(str(summary.get('cut_kind', 'cut')))} after the webshell started</th>
<td>{summary.get('cut_after_s', '-')} s; within the policy's {summary['policy']['deadline_s']:g} s deadline:
{yes(summary.get('cut_within_deadline'))}; within two {summary['interval_s']:g} s reporting intervals:
{yes(summary.get('cut_within_two_intervals'))}</td></tr>
<tr><th>processes blamed</th><td>{esc(', '.join(summary.get('blamed', [])) or '-')}</td></tr>
<tr><th>refused after the kernel-text patch</th><td>{yes(summary.get('refused_after_kernel_patch'))}
({esc(str(summary.get('refusal_reason', '')))})</td></tr>
<tr><th>kernel-text finding</th><td>{esc(str(summary.get('kernel_text_detail', '-')))}</td></tr>
</table>
<h2>Timeline</h2><img src="timeline.png" alt="behaviour score and decisions over time" width="100%">
<h2>What happened</h2><table><tr><th>t (s)</th><th>event</th></tr>{events}</table>
<h2>Most anomalous processes while the score was below the threshold</h2>
<table><tr><th>pid</th><th>process</th><th>score</th><th>evidence</th></tr>{evidence}</table>
<h2>REM-S decisions</h2><table><tr><th>t (s)</th><th>decision</th><th>reason</th></tr>{rows}</table>
<p>Raw data: <a href="summary.json">summary.json</a>, <a href="reports.jsonl">reports.jsonl</a>,
<a href="decisions.json">decisions.json</a>.</p></body></html>
"""
    (folder / "index.html").write_text(page)
    return folder
