"""The trade-off report: one self-contained HTML page, plus Markdown and JSON.

Input is a list of *rows*, one per model (a pipeline stage or a compress candidate), each a dict
with any of: ``name``, ``stage``, ``path``, ``kind``, ``params``, ``size_mb``,
``latency_ms_p50``, ``latency_ms_p95``, ``accuracy``, ``macro_f1``, ``per_class``
({label: {"f1": ...}}), ``settings`` (dict), ``metrics_jsonl`` (path of a training log).
:func:`write_report` adds ``retention`` (accuracy / the teacher's) and ``on_pareto_front``, and
writes ``report.html`` (table, Pareto plots of accuracy vs latency and vs size, training
curves; figures are inline SVG, no JavaScript, no external CSS/fonts: it opens from disk with
no server and no network), ``report.md`` and ``report.json``.

Top-level imports are stdlib only; matplotlib is imported when a report is written.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any

from slimtune.io import atomic_write_json, atomic_write_text

CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;
color:#1d2330;background:#fff;padding:0 16px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:28px 0 8px;border-bottom:1px solid #dde;padding-bottom:4px}
.sub{color:#556;margin:0 0 16px}.box{background:#f4f6fa;border-radius:8px;padding:10px 14px;margin:10px 0}
.ok{background:#e7f6ea;border-left:5px solid #2e9b47}.miss{background:#fdecea;border-left:5px solid #c62828}
table{border-collapse:collapse;font-size:13px;width:100%}th,td{padding:5px 8px;border-bottom:1px solid #e3e6ee;
text-align:right;white-space:nowrap}th{background:#eef1f7;position:sticky;top:0}td.l,th.l{text-align:left}
tr.front td{font-weight:600}td.wrap{white-space:normal;text-align:left}tr.best td{background:#fff7d6}.fig svg{max-width:100%;height:auto}
.small{font-size:12px;color:#667}code{background:#eef1f7;padding:1px 4px;border-radius:3px}
"""


# --------------------------------------------------------------------------------------------
# Pareto front
# --------------------------------------------------------------------------------------------


def pareto_front(rows: list[dict[str, Any]], costs: tuple[str, ...] = ("latency_ms_p50", "size_mb"),
                 gain: str = "accuracy") -> list[bool]:
    """Which rows are Pareto-optimal: no other row is at least as good on every axis and
    strictly better on one (lower ``costs``, higher ``gain``). Rows missing a value are not."""
    def vec(r: dict[str, Any]) -> tuple[float, ...] | None:
        vals = [r.get(c) for c in costs] + [r.get(gain)]
        if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in vals):
            return None
        return tuple(float(v) for v in vals[:-1]) + (-float(vals[-1]),)  # all minimised

    vs = [vec(r) for r in rows]
    out = []
    for i, a in enumerate(vs):
        if a is None:
            out.append(False)
            continue
        dominated = any(b is not None and j != i and all(x <= y for x, y in zip(b, a, strict=True)) and b != a
                        for j, b in enumerate(vs))
        out.append(not dominated)
    return out


# --------------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------------


def read_curves(path: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` from a ``metrics.jsonl`` (bad lines are skipped)."""
    curves: dict[str, list[tuple[int, float]]] = {}
    p = Path(path)
    if not p.is_file():
        return curves
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        step = ev.get("step")
        for k, v in ev.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and step is not None:
                curves.setdefault(k, []).append((int(step), float(v)))
    return curves


# --------------------------------------------------------------------------------------------
# Figures (matplotlib -> inline SVG, text as paths: no fonts needed by the viewer)
# --------------------------------------------------------------------------------------------


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    import matplotlib.pyplot as plt  # optional dependency (the report extra)

    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog / DOCTYPE: inline in HTML


def _plt() -> Any:
    import matplotlib  # optional dependency (the report extra)

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "path"
    import matplotlib.pyplot as plt  # optional dependency (the report extra)

    return plt


def _null_formatter() -> Any:
    from matplotlib.ticker import NullFormatter  # optional dependency (the report extra)

    return NullFormatter()


def pareto_svg(rows: list[dict[str, Any]], teacher: dict[str, Any] | None = None,
               min_accuracy: float | None = None) -> str:
    """Accuracy vs latency p50 and accuracy vs size, front highlighted; returns inline SVG."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, key, label in ((axes[0], "latency_ms_p50", "latency p50 (ms)"), (axes[1], "size_mb", "size on disk (MB)")):
        pts = [r for r in rows if r.get(key) is not None and r.get("accuracy") is not None]
        if not pts:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        front = pareto_front(pts, (key,))
        xs = [float(r[key]) for r in pts]
        ys = [float(r["accuracy"]) for r in pts]
        ax.scatter([x for x, f in zip(xs, front, strict=True) if not f],
                   [y for y, f in zip(ys, front, strict=True) if not f], c="#9aa4b8", s=36, label="dominated")
        fx = sorted((x, y) for x, y, f in zip(xs, ys, front, strict=True) if f)
        ax.step([x for x, _ in fx], [y for _, y in fx], where="post", c="#1f6feb", lw=1.5)
        ax.scatter([x for x, _ in fx], [y for _, y in fx], c="#1f6feb", s=46, zorder=3, label="Pareto front")
        if teacher and teacher.get("accuracy") is not None:
            ax.axhline(teacher["accuracy"], c="#2e9b47", ls=":", lw=1, label="teacher accuracy")
        if min_accuracy is not None:
            ax.axhline(min_accuracy, c="#c62828", ls="--", lw=1, label="accuracy constraint")
        log = max(xs) / max(min(xs), 1e-12) > 20  # log scale only for a wide range (else no tick labels)
        if log:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(_null_formatter())  # minor log labels overlap
        # labels: placed after the scale is final, in points on the page, so close points
        # (e.g. two int8 candidates a few tenths of a ms apart) do not print over each other
        names = [str(r.get("name", ""))[:28] for r in pts]
        ax.get_xlim(), ax.get_ylim()  # resolves pending autoscaling before reading transData
        to_pt = 72.0 / fig.dpi
        anchors = [(float(a) * to_pt, float(b) * to_pt) for a, b in ax.transData.transform(list(zip(xs, ys, strict=True)))]
        for name, (x, y), off in zip(names, zip(xs, ys, strict=True), label_offsets(anchors, names), strict=True):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=off, fontsize=7)
        ax.set_xlabel(label + (", log scale" if log else ""))
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[0].set_title("accuracy vs latency")
    axes[1].set_title("accuracy vs size")
    return _svg(fig)


def label_offsets(anchors: list[tuple[float, float]], names: list[str], font_pt: float = 7.0,
                  ) -> list[tuple[float, float]]:
    """Greedy non-overlapping label positions for scatter points.

    Args:
        anchors: each point's position on the page, in points (x right, y up).
        names: the label of each point.
        font_pt: font size; a label is taken as ``0.6 * font_pt`` wide per character and
            ``1.3 * font_pt`` tall.

    Returns:
        One ``(dx, dy)`` offset in points per point: up-right of it if that box is free, else
        the nearest free slot stepping down/up a line at a time (the last slot if none is free).
    """
    w_char, h = 0.6 * font_pt, 1.3 * font_pt
    slots = [(4.0, 4.0)] + [(4.0, 4.0 + s * k * h) for k in range(1, 6) for s in (-1, 1)]
    placed: list[tuple[float, float, float, float]] = []  # boxes (x0, y0, x1, y1) already used
    out: list[tuple[float, float]] = [(4.0, 4.0)] * len(anchors)
    for i in sorted(range(len(anchors)), key=lambda n: (anchors[n][0], anchors[n][1])):
        (ax_, ay), w = anchors[i], w_char * max(len(names[i]), 1)
        for dx, dy in slots:
            box = (ax_ + dx, ay + dy, ax_ + dx + w, ay + dy + h)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
        placed.append(box)
        out[i] = (dx, dy)
    return out


def curves_svg(curves: dict[str, dict[str, list[tuple[int, float]]]]) -> str | None:
    """Training loss and eval accuracy per stage (one line per stage); None if no curves."""
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for name, c in curves.items():
        if "train/loss" in c:
            axes[0].plot(*zip(*c["train/loss"], strict=True), label=name, lw=1.2,
                         marker="." if len(c["train/loss"]) < 30 else None)
        if "eval/accuracy" in c:
            axes[1].plot(*zip(*c["eval/accuracy"], strict=True), marker="o", label=name, lw=1.2)
    for ax, title in ((axes[0], "training loss"), (axes[1], "eval accuracy")):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    return _svg(fig)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

COLUMNS = [("name", "model"), ("kind", "kind"), ("params", "params"), ("size_mb", "size MB"),
           ("latency_ms_p50", "p50 ms"), ("latency_ms_p95", "p95 ms"), ("accuracy", "accuracy"),
           ("test_accuracy", "test acc"), ("macro_f1", "macro-F1"), ("retention", "retention"),
           ("test_retention", "test retention"), ("x_smaller", "x smaller"), ("x_faster", "x faster")]


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if key == "params":
        return f"{int(v):,}"
    if key in ("retention", "test_retention"):
        return f"{100 * v:.1f}%"
    if key in ("x_smaller", "x_faster"):
        return f"{v:.2f}x"
    if key in ("accuracy", "macro_f1", "test_accuracy") or key.startswith("f1 "):
        return f"{v:.4f}"
    if isinstance(v, float):
        return f"{v:.2f}" if v < 100 else f"{v:,.1f}"
    return str(v)


def _labels(rows: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for r in rows:
        for k in (r.get("per_class") or {}):
            if k not in out:
                out.append(k)
    return out


def table_rows(rows: list[dict[str, Any]]) -> tuple[list[tuple[str, str]], list[list[str]]]:
    """(header, formatted cells) of the summary table; columns present in no row are dropped."""
    labels = _labels(rows)
    cols = [(k, h) for k, h in COLUMNS if any(r.get(k) is not None for r in rows)]
    cols += [(f"f1 {lb}", f"F1 {lb}") for lb in labels]
    if any(r.get("on_pareto_front") is not None for r in rows):
        cols.append(("on_pareto_front", "front"))
    cells = []
    for r in rows:
        line = []
        for k, _ in cols:
            if k.startswith("f1 "):
                v = ((r.get("per_class") or {}).get(k[3:]) or {}).get("f1")
            elif k == "on_pareto_front":
                v = "yes" if r.get(k) else ""
            else:
                v = r.get(k)
            line.append(_fmt(k, v))
        cells.append(line)
    return cols, cells


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The summary table in Markdown."""
    cols, cells = table_rows(rows)
    out = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "|".join("---" if k == "name" else "---:" for k, _ in cols) + "|"]
    out += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(out)


def _html_table(rows: list[dict[str, Any]], best: str | None) -> str:
    cols, cells = table_rows(rows)
    head = "".join(f"<th class='{'l' if k in ('name', 'kind') else ''}'>{html.escape(h)}</th>" for k, h in cols)
    body = []
    for r, line in zip(rows, cells, strict=True):
        cls = " ".join(c for c in ("front" if r.get("on_pareto_front") else "",
                                   "best" if best and r.get("name") == best else "") if c)
        tds = "".join(f"<td class='{'l' if k in ('name', 'kind') else ''}'>{html.escape(v)}</td>"
                      for (k, _), v in zip(cols, line, strict=True))
        body.append(f"<tr class='{cls}'>{tds}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def enrich(rows: list[dict[str, Any]], teacher: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Add retention, x_smaller, x_faster (vs ``teacher``) and on_pareto_front to copies of ``rows``."""
    out = [dict(r) for r in rows]
    for r in out:
        if teacher:
            if r.get("accuracy") is not None and teacher.get("accuracy"):
                r["retention"] = r["accuracy"] / teacher["accuracy"]
            if r.get("test_accuracy") is not None and teacher.get("test_accuracy"):
                r["test_retention"] = r["test_accuracy"] / teacher["test_accuracy"]
            if r.get("size_mb") and teacher.get("size_mb"):
                r["x_smaller"] = teacher["size_mb"] / r["size_mb"]
            if r.get("latency_ms_p50") and teacher.get("latency_ms_p50"):
                r["x_faster"] = teacher["latency_ms_p50"] / r["latency_ms_p50"]
    for r, f in zip(out, pareto_front(out), strict=True):
        r["on_pareto_front"] = f
    return out


def write_report(out_dir: str | os.PathLike, rows: list[dict[str, Any]], *, title: str = "slimtune report",
                 teacher: str | None = None, best: str | None = None, verdict: str | None = None,
                 verdict_ok: bool | None = None, min_accuracy: float | None = None,
                 meta: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write ``report.html``, ``report.md`` and ``report.json`` into ``out_dir``.

    Args:
        out_dir: folder to write into (created).
        rows: one dict per model (see the module docstring).
        title: page title.
        teacher: ``name`` of the reference row (retention and ratios are relative to it).
        best: ``name`` of the chosen row (highlighted).
        verdict: one sentence shown in a coloured box (e.g. whether the constraint was met).
        verdict_ok: colour of that box (green / red).
        min_accuracy: draws the accuracy constraint on the Pareto plots.
        meta: extra facts shown as a list and stored in the JSON (hardware, settings, commands).

    Returns: ``{"html": path, "md": path, "json": path}``.
    """

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_row = next((r for r in rows if r.get("name") == teacher), None)
    rows = enrich(rows, t_row)
    t_row = next((r for r in rows if r.get("name") == teacher), None)
    meta = dict(meta or {})
    curves = {str(r.get("name")): read_curves(r["metrics_jsonl"]) for r in rows if r.get("metrics_jsonl")}
    fig_pareto = pareto_svg(rows, t_row, min_accuracy)
    fig_curves = curves_svg(curves)
    md = [f"# {title}", ""]
    if verdict:
        md += [f"**{verdict}**", ""]
    md += [markdown_table(rows), ""]
    for k, v in meta.items():
        md.append(f"- {k}: {_meta_text(v)}")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<meta name='viewport' content='width=device-width'><style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             "<p class='sub'>Latency: p50 over interleaved rounds in one run (ratios are fair); size: weight files "
             "on disk; retention: accuracy / the teacher's (test retention: the same on the held-out test file, "
             "which never chooses anything). Bold rows are on the Pareto front "
             "(no other model is as accurate, as small and as fast at once).</p>"]
    if verdict:
        cls = "ok" if verdict_ok else ("miss" if verdict_ok is False else "")
        parts.append(f"<div class='box {cls}'>{html.escape(verdict)}</div>")
    parts += ["<h2>Models</h2>", _html_table(rows, best),
              "<h2>Trade-offs</h2>", f"<div class='fig'>{fig_pareto}</div>"]
    if fig_curves:
        parts += ["<h2>Training curves</h2>", f"<div class='fig'>{fig_curves}</div>"]
    settings = [r for r in rows if r.get("settings")]
    if settings:
        parts.append("<h2>Settings</h2><table><thead><tr><th class='l'>model</th><th class='l'>settings</th>"
                     "<th class='l'>folder</th></tr></thead><tbody>")
        for r in settings:
            parts.append(f"<tr><td class='l'>{html.escape(str(r.get('name')))}</td><td class='wrap'><code>"
                         f"{html.escape(json.dumps(r['settings'], sort_keys=True))}</code></td>"
                         f"<td class='l small'>{html.escape(str(r.get('path', '')))}</td></tr>")
        parts.append("</tbody></table>")
    if meta:
        parts.append("<h2>Run</h2><ul class='small'>")
        parts += [f"<li><b>{html.escape(str(k))}</b>: {html.escape(_meta_text(v))}</li>" for k, v in meta.items()]
        parts.append("</ul>")
    parts.append("</body></html>")
    paths = {"html": out / "report.html", "md": out / "report.md", "json": out / "report.json"}
    atomic_write_text(paths["html"], "\n".join(parts))
    atomic_write_text(paths["md"], "\n".join(md) + "\n")
    atomic_write_json(paths["json"], {"title": title, "teacher": teacher, "best": best, "verdict": verdict,
                                      "verdict_ok": verdict_ok, "min_accuracy": min_accuracy,
                                      "rows": rows, "meta": meta})
    return paths


def _meta_text(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k} {_meta_text(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ", ".join(_meta_text(x) for x in v)
    return str(v)
