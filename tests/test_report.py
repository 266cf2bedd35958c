"""The trade-off report: Pareto front, self-contained HTML/Markdown/JSON, and a real-browser screenshot."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from slimtune.report.html import enrich, markdown_table, pareto_front, read_curves, write_report


def _rows(tmp_path: Path) -> list[dict]:
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in range(1, 40))
                   + json.dumps({"step": 39, "eval/accuracy": 0.87}) + "\nnot json\n")
    pc = {"negative": {"f1": 0.86}, "positive": {"f1": 0.88}}
    return [
        {"name": "teacher", "kind": "hf", "params": 22_713_986, "size_mb": 90.9, "latency_ms_p50": 39.0,
         "accuracy": 0.8716, "per_class": pc, "metrics_jsonl": str(log)},
        {"name": "int8", "kind": "onnx", "size_mb": 23.0, "latency_ms_p50": 13.8, "accuracy": 0.8681,
         "settings": {"quant": "int8"}},
        {"name": "student", "kind": "onnx", "size_mb": 8.0, "latency_ms_p50": 5.0, "accuracy": 0.8630},
        {"name": "dominated", "kind": "hf", "size_mb": 30.0, "latency_ms_p50": 20.0, "accuracy": 0.85},
        {"name": "no-latency", "kind": "hf", "size_mb": 5.0, "accuracy": 0.99},
    ]


def test_pareto_front_dominance() -> None:
    rows = [{"latency_ms_p50": 10, "size_mb": 10, "accuracy": 0.9},
            {"latency_ms_p50": 5, "size_mb": 5, "accuracy": 0.8},
            {"latency_ms_p50": 11, "size_mb": 11, "accuracy": 0.85},   # worse than row 0 everywhere
            {"latency_ms_p50": 10, "size_mb": 10, "accuracy": 0.9},    # a tie is not domination
            {"latency_ms_p50": None, "size_mb": 1, "accuracy": 1.0}]   # unmeasured: never on the front
    assert pareto_front(rows) == [True, True, False, True, False]
    # on size alone the last row (smallest and most accurate) dominates all others
    assert pareto_front(rows, ("size_mb",)) == [False, False, False, False, True]
    assert pareto_front([]) == []


def test_enrich_retention_and_ratios(tmp_path: Path) -> None:
    rows = enrich(_rows(tmp_path), _rows(tmp_path)[0])
    student = next(r for r in rows if r["name"] == "student")
    assert student["retention"] == pytest.approx(0.8630 / 0.8716)
    assert student["x_smaller"] == pytest.approx(90.9 / 8.0)
    assert student["x_faster"] == pytest.approx(39.0 / 5.0)
    assert student["on_pareto_front"] and not next(r for r in rows if r["name"] == "dominated")["on_pareto_front"]
    assert "test_retention" not in student  # no test accuracy given: no test retention


def test_test_retention_uses_test_accuracy_of_both() -> None:
    teacher = {"name": "input", "accuracy": 0.90, "test_accuracy": 0.87, "size_mb": 90.0, "latency_ms_p50": 40.0}
    student = {"name": "s", "accuracy": 0.93, "test_accuracy": 0.8613, "size_mb": 8.0, "latency_ms_p50": 8.0}
    r = enrich([teacher, student], teacher)[1]
    assert r["retention"] == pytest.approx(0.93 / 0.90)
    assert r["test_retention"] == pytest.approx(0.8613 / 0.87)
    assert "test retention" in markdown_table(enrich([teacher, student], teacher))


def test_read_curves_skips_bad_lines(tmp_path: Path) -> None:
    curves = read_curves(_rows(tmp_path)[0]["metrics_jsonl"])
    assert len(curves["train/loss"]) == 39 and curves["eval/accuracy"] == [(39, 0.87)]
    assert read_curves(tmp_path / "missing.jsonl") == {}


def test_report_is_self_contained(tmp_path: Path) -> None:
    paths = write_report(tmp_path / "rep", _rows(tmp_path), title="t <&> report", teacher="teacher",
                         best="student", verdict="student meets the constraint", verdict_ok=True,
                         min_accuracy=0.8616, meta={"hardware": {"cpu": "test"}})
    page = paths["html"].read_text()
    assert page.startswith("<!DOCTYPE html>") and "t &lt;&amp;&gt; report" in page
    assert page.count("<svg") == 2  # Pareto plots + training curves, inline
    # Nothing to fetch: no scripts, stylesheets, images, fonts or iframes from anywhere.
    assert not re.search(r"<(script|link|img|iframe)\b", page, re.I)
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:|//)", page, re.I)
    assert "url(http" not in page and "@import" not in page and "@font-face" not in page
    for text in ("F1 negative", "F1 positive", "retention", "99.0%", "student meets the constraint", "class='front"):
        assert text in page
    md = paths["md"].read_text()
    assert "| teacher |" in md and "| student |" in md
    data = json.loads(paths["json"].read_text())
    assert data["best"] == "student" and len(data["rows"]) == 5
    assert [r["on_pareto_front"] for r in data["rows"]] == [True, True, True, False, False]
    assert "F1 negative" in markdown_table(data["rows"])


def _png_stats(path: Path) -> tuple[int, int, float, float]:
    """(height, width, pixel std, fraction of non-white pixels) of a PNG."""
    import matplotlib.image as mpimg

    img = mpimg.imread(str(path))[..., :3]  # (H, W, 3) floats in [0, 1]
    nonwhite = float((img.mean(axis=-1) < 0.95).mean())
    return img.shape[0], img.shape[1], float(img.std()), nonwhite


def test_report_screenshot_in_headless_chromium(tmp_path: Path) -> None:
    """Open the report from disk in a real headless Chromium (no network) and screenshot it."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is required in CI: run scripts/install-chromium.sh")
        pytest.skip("chromium not installed (scripts/install-chromium.sh)")
    paths = write_report(tmp_path / "rep", _rows(tmp_path), title="screenshot test", teacher="teacher",
                         best="student", verdict="student meets the constraint", verdict_ok=True,
                         min_accuracy=0.8616)
    shot = tmp_path / "shot.png"
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2000",
           paths["html"].resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), f"no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    assert shot.stat().st_size > 20_000  # a blank 1280x2000 PNG is a few KB
    h, w, std, nonwhite = _png_stats(shot)
    assert (h, w) == (2000, 1280)
    assert std > 0.05 and nonwhite > 0.03, (std, nonwhite)  # text, table and plots drawn
    keep = os.environ.get("SLIMTUNE_SCREENSHOT_DIR")
    if keep:  # let a person look at it
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy2(shot, Path(keep) / "report-screenshot.png")


def test_label_offsets_separate_close_points_and_keep_lone_ones() -> None:
    from slimtune.report.html import label_offsets

    # two candidates 1 pt apart (the int8 pair of a compress report) and one far away
    anchors = [(100.0, 200.0), (101.0, 200.5), (400.0, 50.0)]
    names = ["L3-ffn50-int8", "L3-ffn67-int8", "input"]
    off = label_offsets(anchors, names)
    assert off[2] == (4.0, 4.0) and off[0] == (4.0, 4.0)
    boxes = [(a[0] + o[0], a[1] + o[1], a[0] + o[0] + 4.2 * len(n), a[1] + o[1] + 9.1)
             for a, o, n in zip(anchors, off, names, strict=True)]
    (a0, b0, a1, b1), (c0, d0, c1, d1) = boxes[0], boxes[1]
    assert not (a0 < c1 and c0 < a1 and b0 < d1 and d0 < b1), off
