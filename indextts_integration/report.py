"""The validation report a person reads: report.md and report.html (same content) plus results.json.

Sections: settings, adapter checks (refused files with their reasons), checkpoints x metrics with the best of
each column marked, training curves from each run's metrics.jsonl, and per text the mel spectrograms of every
checkpoint side by side with the audio to listen to (HTML players; links in Markdown).
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from lora_engine.atomic import atomic_write_bytes

# (key, column title, which value is best: "max", "min", "one" = closest to 1, None = not ranked)
METRICS: list[tuple[str, str, str | None]] = [
    ("speaker_similarity", "speaker similarity ↑", "max"),
    ("duration_ratio", "duration ratio (→1)", "one"),
    ("wer", "WER ↓", "min"),
    ("val_loss", "val loss ↓", "min"),
    ("mel_accuracy", "mel accuracy ↑", "max"),
    ("mel_perplexity", "mel perplexity ↓", "min"),
    ("seconds", "mean seconds", None),
]
BEST = "★"
SECTIONS = ("Settings", "Adapter checks", "Metrics", "Training curves", "Samples", "How to read this")
NOTES = [
    "speaker similarity: cosine of CAMPPlus speaker embeddings (IndexTTS2's own speaker encoder) between each "
    "sample and the reference audio; 1 = same embedding. Use held-out reference audio, not the prompt.",
    "duration ratio: sample length / expected length (the text's recording, or the reference speaking rate); "
    "far above 1 usually means the GPT did not stop.",
    "WER: word error rate of a local ASR transcript (only with --asr-model).",
    "val loss / mel accuracy / mel perplexity: teacher-forced GPT scores on the prepared validation manifest.",
    "With random weights (the embedded tiny checkpoint) every number is meaningless; the report still shows "
    "every section so the pipeline can be checked end to end.",
]


def best_labels(checkpoints: list[dict[str, Any]]) -> dict[str, set[str]]:
    """For each ranked metric, the labels of the checkpoints that have its best value (ties all win, unless
    every checkpoint ties)."""
    out: dict[str, set[str]] = {}
    for key, _, goal in METRICS:
        vals = {c["label"]: c["metrics"].get(key) for c in checkpoints}
        vals = {k: v for k, v in vals.items() if v is not None and math.isfinite(v)}
        if goal is None or len(vals) < 2:
            continue
        rank = {"max": lambda v: -v, "min": lambda v: v, "one": lambda v: abs(v - 1.0)}[goal]
        top = min(rank(v) for v in vals.values())
        winners = {k for k, v in vals.items() if math.isclose(rank(v), top, rel_tol=0, abs_tol=1e-12)}
        if len(winners) < len(vals):  # a column where all tie ranks nothing
            out[key] = winners
    return out


def _columns(checkpoints: list[dict[str, Any]]) -> list[tuple[str, str, str | None]]:
    return [m for m in METRICS if any(c["metrics"].get(m[0]) is not None for c in checkpoints)]


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _check_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for c in results["checks"]:
        rows.append([c["label"], "accepted" if c["ok"] else "REFUSED", c["reason"] or "", c["adapter"] or "",
                     ",".join(map(str, c["ranks"])), _fmt(c["alpha"]), str(c["targets"] or ""),
                     str(c["lora_params"] or ""), _fmt(c["trained_steps"]), c["path"]])
    return rows


CHECK_HEAD = ["checkpoint", "status", "reason", "adapter name", "rank", "alpha", "targets", "LoRA params",
              "trained steps", "file"]


def _figures(results: dict[str, Any], out: Path) -> dict[str, Any]:
    """Write the PNGs; returns {"curves": path or None, "mels": [path per text]} relative to `out`."""
    from indextts_integration.report_plots import plot_mels_side_by_side, plot_training_curves
    from lora_engine.training.metrics import read_metrics

    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    runs: dict[str, list[dict[str, Any]]] = {}
    for c in results["checkpoints"]:
        metrics = (c.get("training") or {}).get("metrics")
        if metrics and Path(metrics).is_file():
            runs.setdefault(Path(c["training"]["run_dir"]).name, read_metrics(metrics))
    curves = plot_training_curves(runs, fig_dir / "training_curves.png").relative_to(out).as_posix() if runs else None
    mels = []
    for i, t in enumerate(results["texts"]):
        panels = [(c["label"], out / c["samples"][i]["path"]) for c in results["checkpoints"]]
        path = fig_dir / f"mels_{i:02d}.png"
        mels.append(plot_mels_side_by_side(panels, t["text"][:90], path).relative_to(out).as_posix() if panels else None)
    return {"curves": curves, "mels": mels, "runs": sorted(runs)}


def render_markdown(results: dict[str, Any], figs: dict[str, Any]) -> str:
    cps, best = results["checkpoints"], best_labels(results["checkpoints"])
    cols = _columns(cps)
    s = results["settings"]
    lines = ["# Validation report", "", f"Created {results['created']}.", "", "## Settings", ""]
    lines += [f"- **{k}**: `{v}`" for k, v in s.items() if v not in (None, [], "")]
    lines += ["", "## Adapter checks", ""]
    if results["checks"]:
        lines += _md_table(CHECK_HEAD, [[_md(x) for x in r] for r in _check_rows(results)])
    else:
        lines.append("No adapter files were given: only the base model was evaluated.")
    lines += ["", "## Metrics", "", f"Mean over {len(results['texts'])} text(s); {BEST} marks the best value "
              "of each ranked column.", ""]
    rows = [[c["label"]] + [_fmt(c["metrics"].get(k)) + (f" {BEST}" if c["label"] in best.get(k, ()) else "")
                            for k, _, _ in cols] for c in cps]
    lines += _md_table(["checkpoint"] + [t for _, t, _ in cols], rows)
    lines += ["", "## Training curves", ""]
    lines.append(f"![training curves]({figs['curves']})  \nRuns: {', '.join(figs['runs'])}" if figs["curves"] else
                 "No metrics.jsonl was found next to any adapter (it sits in the training run folder).")
    lines += ["", "## Samples", ""]
    for i, t in enumerate(results["texts"]):
        lines += [f"### Text {i + 1}: {t['text']}", ""]
        if figs["mels"][i]:
            lines += [f"![mel spectrograms, text {i + 1}]({figs['mels'][i]})", ""]
        rows = [[c["label"], f"[{c['samples'][i]['path']}]({c['samples'][i]['path']})",
                 _fmt(c["samples"][i]["seconds"]), _fmt(c["samples"][i]["speaker_similarity"]),
                 _fmt(c["samples"][i].get("duration_ratio")), _fmt(c["samples"][i].get("wer"))] for c in cps]
        lines += _md_table(["checkpoint", "audio", "seconds", "speaker similarity", "duration ratio", "WER"], rows)
        lines.append("")
    lines += ["## How to read this", ""] + [f"- {n}" for n in NOTES]
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(r) + " |" for r in rows])


def render_html(results: dict[str, Any], figs: dict[str, Any]) -> str:
    e = html.escape
    cps, best = results["checkpoints"], best_labels(results["checkpoints"])
    cols = _columns(cps)
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Validation report</title><style>",
             "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px;vertical-align:top}"
             ".best{background:#d9f2d9;font-weight:bold}.refused{background:#f8d7da}img{max-width:100%}",
             "</style></head><body>", "<h1>Validation report</h1>", f"<p>Created {e(results['created'])}.</p>",
             "<h2>Settings</h2><ul>"]
    parts += [f"<li><b>{e(k)}</b>: <code>{e(str(v))}</code></li>" for k, v in results["settings"].items()
              if v not in (None, [], "")]
    parts.append("</ul><h2>Adapter checks</h2>")
    if results["checks"]:
        parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in CHECK_HEAD) + "</tr>")
        for r in _check_rows(results):
            cls = " class='refused'" if r[1] == "REFUSED" else ""
            parts.append(f"<tr{cls}>" + "".join(f"<td>{e(x)}</td>" for x in r) + "</tr>")
        parts.append("</table>")
    else:
        parts.append("<p>No adapter files were given: only the base model was evaluated.</p>")
    parts.append(f"<h2>Metrics</h2><p>Mean over {len(results['texts'])} text(s); {BEST} and green mark the best "
                 "value of each ranked column.</p><table><tr><th>checkpoint</th>"
                 + "".join(f"<th>{e(t)}</th>" for _, t, _ in cols) + "</tr>")
    for c in cps:
        cells = []
        for k, _, _ in cols:
            win = c["label"] in best.get(k, ())
            cells.append(f"<td class='best'>{_fmt(c['metrics'].get(k))} {BEST}</td>" if win
                         else f"<td>{_fmt(c['metrics'].get(k))}</td>")
        parts.append(f"<tr><td>{e(c['label'])}</td>{''.join(cells)}</tr>")
    parts.append("</table><h2>Training curves</h2>")
    parts.append(f"<img src='{e(figs['curves'])}' alt='training curves'><p>Runs: {e(', '.join(figs['runs']))}</p>"
                 if figs["curves"] else "<p>No metrics.jsonl was found next to any adapter (it sits in the "
                                        "training run folder).</p>")
    parts.append("<h2>Samples</h2>")
    for i, t in enumerate(results["texts"]):
        parts.append(f"<h3>Text {i + 1}: {e(t['text'])}</h3>")
        if figs["mels"][i]:
            parts.append(f"<img src='{e(figs['mels'][i])}' alt='mel spectrograms, text {i + 1}'>")
        parts.append("<table><tr><th>checkpoint</th><th>listen</th><th>seconds</th><th>speaker similarity</th>"
                     "<th>duration ratio</th><th>WER</th></tr>")
        for c in cps:
            s = c["samples"][i]
            parts.append(f"<tr><td>{e(c['label'])}</td><td><audio controls preload='none' src='{e(s['path'])}'>"
                         f"</audio> <a href='{e(s['path'])}'>wav</a></td><td>{_fmt(s['seconds'])}</td>"
                         f"<td>{_fmt(s['speaker_similarity'])}</td><td>{_fmt(s.get('duration_ratio'))}</td>"
                         f"<td>{_fmt(s.get('wer'))}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>How to read this</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in NOTES) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(results: dict[str, Any], output_dir: str | Path) -> tuple[Path, Path]:
    """Write results.json, figures/, report.md and report.html into output_dir (each file atomically)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "results.json", json.dumps(results, indent=2).encode())
    figs = _figures(results, out)
    md_path, html_path = out / "report.md", out / "report.html"
    atomic_write_bytes(md_path, render_markdown(results, figs).encode())
    atomic_write_bytes(html_path, render_html(results, figs).encode())
    return md_path, html_path
