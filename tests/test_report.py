"""Rendering of benchmark results: derived figures, notes, Markdown, HTML, the CLI, a screenshot.

Everything here runs on a hand-built results dict, so it is exact and needs no model.
"""

import copy
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from compress.bench.analysis import artifact_precision, derive, headline_point, pareto_front
from compress.bench.report import render_html, render_markdown
from compress.cli import main

ROOT = Path(__file__).resolve().parents[1]


def point(b, s, p50, converged=True):
    return {"batch_size": b, "seq_len": s, "p50_ms": p50, "p90_ms": p50 * 1.1, "p99_ms": p50 * 1.3,
            "mean_ms": p50 * 1.05, "min_ms": p50 * 0.9, "iters": 50, "ci95_rel": 0.01 if converged else 0.2,
            "converged": converged, "total_s": 1.0, "throughput_sps": round(b / (p50 / 1e3), 2)}


def artifact(name, path, fmt, precision, acc, size, params, points, stage="train", parent=None, fused=None):
    return {"name": name, "path": path, "resolved_path": path, "format": fmt, "device": "cpu",
            "precision": precision, "stage": stage, "parent": parent, "accuracy": acc, "macro_f1": acc - 0.02,
            "n": 1000, "size_bytes": size, "params": params, "params_method": "module",
            "arch": {"layers": 6, "hidden": 384, "ff": 1536, "heads": 12, "num_labels": 2, "vocab": 30522},
            "fused": fused, "threads": {"torch_intra_op": 2, "ort_intra_op": None}, "load_s": 0.5,
            "memory": {"method": "subprocess", "rss_before_load_mb": 500.0, "peak_rss_mb": 600.0,
                       "rss_delta_mb": 100.0, "model_memory_mb": 100.0, "peak_reset": True},
            "latency": points}


def sample_results(load=0.3, isa=("AVX2",)):
    """fp32 teacher, its int8 child (slower at batch 1), and a smaller fp32 student."""
    teacher = artifact("teacher", "/runs/teacher", "pytorch", "fp32", 0.80, 90_000_000, 22_700_000,
                       [point(1, 32, 10.0), point(32, 128, 200.0)])
    int8 = artifact("teacher-int8", "/runs/int8", "onnx", "int8", 0.795, 23_000_000, 22_700_000,
                    [point(1, 32, 12.5), point(32, 128, 100.0, converged=False)], stage="quantize",
                    parent="/runs/teacher", fused=False)
    student = artifact("student", "/runs/student", "pytorch", "fp32", 0.78, 45_000_000, 11_000_000,
                       [point(1, 32, 5.0), point(32, 128, 100.0)])
    return {
        "schema_version": 1, "created": "2026-11-22T08:00:00+00:00",
        "config": {"target_ci": 0.02, "batch_sizes": [1, 32], "seq_lens": [32, 128]},
        "dataset": {"source": "rt-snippets", "split": "test", "max_length": 128},
        "baseline": "teacher",
        "environment": {"cpu": {"model": "Test CPU", "arch": "x86_64", "logical_cores": 2, "isa": list(isa)},
                        "gpu": None, "device": "cpu", "memory_total_gb": 24.0, "threads_requested": 2,
                        "python": "3.11", "platform": "Linux", "versions": {"torch": "2.13.0"},
                        "compress_commit": "abc", "load_average_start": [load, 0.2, 0.1],
                        "load_average_end": [1.0, 0.5, 0.2], "shared_machine_note": "Shared."},
        "peak": {"device": "cpu", "n": 1024, "threads": 2, "fp32_gflops": 100.0, "bf16_gflops": 80.0,
                 "int8_gops": 400.0, "kernels": {"torch.matmul fp32": 100.0, "torch.matmul bf16": 80.0,
                                                 "torch._int_mm int8": 400.0}, "seconds": 1.0},
        "artifacts": [teacher, int8, student],
    }


@pytest.fixture
def results():
    return derive(sample_results())


# --------------------------------------------------------------------------- derived figures

def test_derived_figures(results):
    t, q, s = results["artifacts"]
    p = t["latency"][0]
    flops = 6 * (8 * 32 * 384**2 + 4 * 32 * 384 * 1536 + 4 * 32**2 * 384) + 2 * 384**2 + 2 * 384 * 2
    assert p["flops"] == flops
    assert p["achieved_gflops"] == round(flops / 0.010 / 1e9, 2)
    assert p["roofline"] == round(flops / 0.010 / 1e9 / 100.0, 4)  # fp32 peak
    assert q["latency"][1]["roofline"] == round(q["latency"][1]["flops"] / 0.1 / 1e9 / 400.0, 4)  # int8 peak
    assert q["parent_name"] == "teacher" and s["parent_name"] is None
    vs = dict(q["vs_baseline"])
    assert vs.pop("primary") == {"metric": "accuracy", "higher_is_better": True, "delta": -0.005, "delta_pts": -0.5,
                                 "ratio": 0.9938, "change_pct": -0.62}  # schema 2: the generic comparison
    assert vs == {"accuracy_delta_pts": -0.5, "macro_f1_delta_pts": -0.5, "size_ratio": 0.2556,
                  "params_ratio": 1.0, "memory_ratio": 1.0}
    assert [p["speedup_vs_baseline"] for p in s["latency"]] == [2.0, 2.0]
    assert [p["speedup_vs_baseline"] for p in q["latency"]] == [0.8, 2.0]


def test_quantized_slower_note_names_points_and_reasons(results):
    notes = [n for n in results["notes"] if n["kind"] == "quantized-slower"]
    assert len(notes) == 1 and notes[0]["artifact"] == "teacher-int8"
    text = notes[0]["text"]
    assert "slower than its parent teacher at b=1 s=32 (1.25x the latency)" in text
    assert "b=32" not in text  # faster there
    assert "no VNNI or AMX" in text and "small inputs (b=1 s=32)" in text and "not fused" in text
    assert "noise" not in text and "narrow" not in text and "bitsandbytes" not in text


def test_slower_reasons_follow_the_evidence():
    def note_for(**change):
        r = sample_results(isa=("AVX512-VNNI",))
        q = r["artifacts"][1]
        for key, value in change.items():
            if key == "p50":
                q["latency"][0]["p50_ms"] = value
            elif key == "hidden":
                q["arch"]["hidden"] = value
            else:
                q[key] = value
        return next(n["text"] for n in derive(r)["notes"] if n["kind"] == "quantized-slower")

    # 1% slower with +/-1% intervals on both medians: noise, said first.
    assert "Likely: the differences are within the measurement noise" in note_for(p50=10.1)
    assert "narrow (hidden size 64)" in note_for(hidden=64)
    bnb = note_for(format="bnb")
    assert "save memory, not time" in bnb and "small inputs" not in bnb and "on the CPU" in bnb
    bnb_gpu = note_for(format="bnb", device="cuda")
    assert "extra GPU kernels" in bnb_gpu and "on the CPU" not in bnb_gpu


def test_no_vnni_reason_on_a_vnni_cpu():
    r = derive(sample_results(isa=("AVX2", "AVX512-VNNI")))
    (note,) = [n for n in r["notes"] if n["kind"] == "quantized-slower"]
    assert "VNNI" not in note["text"] and "small inputs" in note["text"]


def test_busy_and_not_converged_notes():
    r = derive(sample_results(load=3.0))
    kinds = [n["kind"] for n in r["notes"]]
    assert "machine-busy" in kinds and "--threads 1" in next(n["text"] for n in r["notes"] if n["kind"] == "machine-busy")
    (nc,) = [n for n in r["notes"] if n["kind"] == "not-converged"]
    assert nc["artifact"] == "teacher-int8" and "1 of 2 points" in nc["text"]
    assert "machine-busy" not in [n["kind"] for n in derive(sample_results(load=0.3))["notes"]]


def test_pareto_front():
    assert pareto_front([(1, 0.8), (2, 0.9), (3, 0.85), (1, 0.7), (2, 0.9)]) == [True, True, False, False, True]
    assert headline_point(sample_results()) == (1, 32)  # the smallest batch at its longest sequence


@pytest.mark.parametrize("manifest,fmt,expected", [
    ({"stage": "quantize", "method": "ort-dynamic-int8", "format": "onnx"}, "onnx", "int8"),
    ({"stage": "quantize", "method": "bnb-nf4"}, "bnb", "int4"),
    ({"stage": "quantize", "method": "bf16", "dtype": "bf16"}, "pytorch-bf16", "bf16"),
    ({"stage": "export", "dtype": "fp32", "fused": True}, "onnx", "fp32"),
    ({"stage": "train"}, "pytorch", "fp32"),
    ({}, "torch-int8", "int8"),
    ({"precision": "int8", "dtype": "fp32"}, "onnx", "int8"),
])
def test_artifact_precision(manifest, fmt, expected):
    assert artifact_precision(manifest, fmt) == expected


# --------------------------------------------------------------------------- Markdown and HTML

def test_markdown_tables_and_notes(results):
    md = render_markdown(results)
    for heading in ("## Accuracy, size and memory", "## Latency", "## Compared with the baseline (teacher)",
                    "## Notes", "## Matmul peak", "## Environment"):
        assert heading in md
    assert "| Artifact " in md and "Speed-up b1 s32" in md
    assert "teacher-int8 (int8) is slower than its parent teacher" in md
    rows = [l for l in md.splitlines() if l.startswith("| teacher-int8 ")]
    assert len(rows) == 1 + 2 + 1  # models table, two latency points, baseline table
    # Terminal-readable: every line of a table has the same width.
    for block in re.findall(r"((?:^\|.*\|$\n?)+)", md, flags=re.M):
        assert len({len(l) for l in block.splitlines()}) == 1
    assert re.search(r"^\| teacher-int8 \|\s+1 \|\s+32 \|\s+12\.500 \|", md, flags=re.M)
    assert "0.80x" in md and "-0.50" in md


def test_html_is_self_contained_with_two_plots(results):
    html = render_html(results)
    assert html.count("<svg") == 2 and html.count("</svg>") == 2
    assert 'class="pareto"' in html and 'class="pareto-front"' in html and "Pareto front" in html
    assert "<script" not in html and "<link" not in html and "src=" not in html
    assert not re.search(r"(href|url)\(?=?[\"']?https?://", html)
    assert "<table>" in html and "teacher-int8" in html and "no VNNI or AMX" in html


def test_rendering_is_deterministic(results):
    again = derive(sample_results())
    assert render_markdown(results) == render_markdown(copy.deepcopy(again))
    assert render_html(results) == render_html(json.loads(json.dumps(again)))


def test_pareto_marks_in_tables(results):
    # At batch 1, seq 32: student (5 ms, 78%) and teacher (10 ms, 80%) are on the front; int8 is not.
    md = render_markdown(results)
    table = md.split("## Accuracy, size and memory")[1].split("\n\n")[1].splitlines()[2:]
    front = {cells[1].strip(): cells[-2].strip() == "yes" for cells in (row.split("|") for row in table)}
    assert front == {"teacher": True, "teacher-int8": False, "student": True}


# --------------------------------------------------------------------------- the report command

def test_report_cli_rerenders(results, tmp_path):
    src = tmp_path / "results.json"
    src.write_text(json.dumps(results))
    assert main(["report", str(src), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.md").read_text() == render_markdown(results)
    assert (tmp_path / "r" / "report.html").read_text() == render_html(results)
    assert main(["report", str(tmp_path)]) == 0  # a directory holding results.json
    assert (tmp_path / "report.md").is_file()


def test_report_bad_input_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing.json")]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["report", str(bad)]) == 2
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"schema_version": 0}))
    assert main(["report", str(old)]) == 2
    assert "schema_version" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_screenshot_of_report(results, tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from screenshot_report import png_size, screenshot
    finally:
        sys.path.pop(0)
    html = tmp_path / "report.html"
    html.write_text(render_html(results))
    png = screenshot(html, tmp_path / "report.png", width=1280, height=1400)
    assert png_size(png) == (1280, 1400)
    assert png.stat().st_size > 40_000  # a blank page of this size is ~10 kB


def test_plot_axes():
    from compress.bench.plots import log_ticks, nice_ticks

    assert log_ticks(0.85, 18.5) == [0.5, 1.0, 2.0, 5.0, 10.0, 20.0]
    assert nice_ticks(0.0, 13.0) == [0, 5, 10, 15]
    wide = derive(sample_results())
    wide["artifacts"][2]["latency"][0]["p50_ms"] = 0.5  # 0.5 .. 12.5 ms: a log axis
    assert "(log scale)" in render_html(wide) and "(log scale)" not in render_html(derive(sample_results()))


def test_flops_use_the_attention_width_left_by_head_pruning():
    from compress.bench.flops import flops_per_inference

    arch = {"layers": 3, "hidden": 384, "ff": 384, "heads": 12, "num_labels": 2}
    s, h, f, a = 128, 384, 384, 192
    full = flops_per_inference(arch, 1, s)
    half = flops_per_inference({**arch, "attention": a}, 1, s)
    assert full == 3 * (8 * s * h * h + 4 * s * h * f + 4 * s * s * h) + 2 * h * h + 2 * h * 2
    assert half == 3 * (8 * s * h * a + 4 * s * h * f + 4 * s * s * a) + 2 * h * h + 2 * h * 2
