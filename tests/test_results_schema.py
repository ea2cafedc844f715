"""results.json schema 2: quality blocks for any task, v1 files rendering as before, LM reports.

The v1 snapshots in tests/data/report-v1/ are the reports that compress rendered from two
real results.json files (benchmarks/results/recipes/) before the schema carried a quality
block; the inputs are copied beside them so that a re-run of a recipe does not move them.
"""

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from compress.bench.analysis import derive, pareto_front
from compress.bench.report import models_table, render_html, render_markdown
from compress.bench.schema import SCHEMA_VERSION, normalise, quality_block, quality_fields
from compress.cli import main

V1 = Path(__file__).resolve().parent / "data" / "report-v1"
V1_RUNS = ("quickstart", "gpu-quickstart")


# --------------------------------------------------------------------------- schema 1 files render as before

@pytest.mark.parametrize("run", V1_RUNS)
def test_v1_results_render_exactly_as_before(run):
    results = json.loads((V1 / f"{run}-results.json").read_text())
    assert results["schema_version"] == 1 and "quality" not in results["artifacts"][0]
    assert render_markdown(results) == (V1 / f"{run}-report.md").read_text()
    assert render_html(results) == (V1 / f"{run}-report.html").read_text()


def test_report_cli_on_a_v1_file(tmp_path):
    shutil.copy(V1 / "quickstart-results.json", tmp_path / "results.json")
    assert main(["report", str(tmp_path / "results.json"), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.md").read_text() == (V1 / "quickstart-report.md").read_text()
    assert (tmp_path / "r" / "report.html").read_text() == (V1 / "quickstart-report.html").read_text()


def test_normalise_v1_gives_the_v2_shape():
    v1 = json.loads((V1 / "quickstart-results.json").read_text())
    v2 = normalise(v1)
    assert v2["schema_version"] == SCHEMA_VERSION == 2 and v2["read_from_schema_version"] == 1
    assert v1["schema_version"] == 1 and "quality" not in v1["artifacts"][0]  # the input is left alone
    teacher, student, int8 = v2["artifacts"]
    assert int8["quality"] == {"task": "classification", "primary": "accuracy", "higher_is_better": True,
                               "metrics": {"accuracy": int8["accuracy"], "macro_f1": int8["macro_f1"],
                                           "n": int8["n"]}}
    cmp = int8["vs_baseline"]["primary"]
    assert cmp["metric"] == "accuracy" and cmp["delta_pts"] == int8["vs_baseline"]["accuracy_delta_pts"]
    assert cmp["ratio"] == round(int8["accuracy"] / teacher["accuracy"], 4)
    assert normalise(v2) == v2  # idempotent


def test_quality_block_and_legacy_keys():
    q = quality_block("classification", {"accuracy": 0.8, "macro_f1": 0.78, "n": 100})
    assert q == {"task": "classification", "metrics": {"accuracy": 0.8, "macro_f1": 0.78, "n": 100},
                 "primary": "accuracy", "higher_is_better": True}
    assert quality_fields(q) == {"accuracy": 0.8, "macro_f1": 0.78, "n": 100, "quality": q}
    lm = quality_block("causal-lm", lm_metrics(30.0, 1000))
    assert lm["primary"] == "perplexity" and lm["higher_is_better"] is False
    assert quality_fields(lm) == {"quality": lm}  # no classification keys on an LM
    custom = quality_block("my-task", {"bleu": 0.3}, primary="bleu", higher_is_better=True)
    assert custom["primary"] == "bleu"
    with pytest.raises(ValueError, match="no known primary"):
        quality_block("my-task", {"bleu": 0.3})
    with pytest.raises(ValueError, match="not among the metrics"):
        quality_block("causal-lm", {"nll": 3.0})


def test_pareto_front_respects_direction():
    items = [(1.0, 50.0), (2.0, 30.0), (3.0, 40.0), (2.0, 60.0)]
    assert pareto_front(items, higher_is_better=False) == [True, True, False, False]
    assert pareto_front(items) == [True, False, False, True]  # the same points when higher is better


# --------------------------------------------------------------------------- a causal-LM report

def lm_metrics(ppl, tokens, chars=50_000):
    nll = math.log(ppl)
    return {"perplexity": ppl, "nll": round(nll, 6), "bits_per_char": round(nll * tokens / chars / math.log(2), 6),
            "tokens": tokens, "chars": chars}


def point(b, s, p50):
    return {"batch_size": b, "seq_len": s, "p50_ms": p50, "p90_ms": p50 * 1.1, "p99_ms": p50 * 1.3,
            "mean_ms": p50 * 1.05, "min_ms": p50 * 0.9, "iters": 50, "ci95_rel": 0.01, "converged": True,
            "total_s": 1.0, "throughput_sps": round(b / (p50 / 1e3), 2)}


def lm_artifact(name, fmt, precision, ppl, tokens, size, p50, stage="train", parent=None):
    return {"name": name, "path": f"/runs/{name}", "resolved_path": f"/runs/{name}", "format": fmt,
            "device": "cpu", "precision": precision, "stage": stage, "parent": parent,
            "quality": quality_block("causal-lm", lm_metrics(ppl, tokens)),
            "size_bytes": size, "params": size // 4, "params_method": "module", "arch": None, "fused": None,
            "ort_session_config": None, "threads": {"torch_intra_op": 2, "ort_intra_op": None}, "load_s": 0.5,
            "memory": {"method": "subprocess", "rss_before_load_mb": 500.0, "peak_rss_mb": 600.0,
                       "rss_delta_mb": 100.0, "model_memory_mb": 100.0, "peak_reset": True},
            "latency": [point(1, 128, p50), point(8, 128, p50 * 4)]}


def lm_results():
    """A GPT-2 teacher, its student and the student's int8 copy, and a tiny model with its own tokenizer.

    At batch 1: teacher 10 ms / ppl 30, student 5 ms / 40, student-int8 6 ms / 42 (slower and
    worse than the student: dominated), tiny 2 ms / 400 (fastest). Read with "higher is
    better", the front would be the tiny model alone.
    """
    arts = [lm_artifact("teacher", "pytorch", "fp32", 30.0, 12_000, 500_000_000, 10.0),
            lm_artifact("student", "pytorch", "fp32", 40.0, 12_000, 120_000_000, 5.0, stage="distill",
                        parent="/runs/teacher"),
            lm_artifact("student-int8", "onnx", "int8", 42.0, 12_000, 30_000_000, 6.0, stage="quantize",
                        parent="/runs/student"),
            lm_artifact("tiny", "pytorch", "fp32", 400.0, 15_000, 4_000_000, 2.0)]
    return {"schema_version": 2, "created": "2026-12-01T08:00:00+00:00", "config": {"target_ci": 0.02},
            "dataset": {"source": "austen", "split": "test", "max_length": 128}, "baseline": "teacher",
            "environment": {"cpu": {"model": "Test CPU", "arch": "x86_64", "logical_cores": 2, "isa": ["AVX2"]},
                            "gpu": None, "device": "cpu", "threads_requested": 2,
                            "load_average_start": [0.1, 0.1, 0.1], "load_average_end": [1.0, 0.5, 0.2]},
            "peak": None, "artifacts": arts}


@pytest.fixture
def lm():
    return derive(lm_results())


def _front_column(md: str) -> dict[str, str]:
    table = md.split("## Perplexity, size and memory")[1].split("\n\n")[1].splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    rows = [[c.strip() for c in r.strip("|").split("|")] for r in table[2:]]
    return {r[0]: dict(zip(header, r)) for r in rows}


def test_lm_vs_baseline_is_a_perplexity_ratio(lm):
    teacher, student, int8, tiny = lm["artifacts"]
    vs = student["vs_baseline"]
    assert vs["primary"] == {"metric": "perplexity", "higher_is_better": False, "delta": 10.0, "delta_pts": None,
                             "ratio": 1.3333, "change_pct": 33.33}
    assert "accuracy_delta_pts" not in vs and "macro_f1_delta_pts" not in vs
    assert teacher["vs_baseline"]["primary"]["ratio"] == 1.0
    assert tiny["vs_baseline"]["primary"]["change_pct"] == 1233.33
    assert all("accuracy" not in a for a in lm["artifacts"])


def test_lm_markdown_has_perplexity_columns_and_no_accuracy(lm):
    md = render_markdown(lm)
    assert "accuracy" not in md.lower() and "macro-f1" not in md.lower()
    assert "## Perplexity, size and memory" in md
    rows = _front_column(md)
    assert list(rows["teacher"])[3:7] == ["Perplexity", "NLL nats/token", "Bits/char", "Tokens"]
    assert rows["student"]["Perplexity"] == "40.00" and rows["student"]["NLL nats/token"] == "3.6889"
    # Tokens differ (the tiny model has its own tokenizer): a column. Characters agree: the summary.
    assert rows["tiny"]["Tokens"] == "15000" and "Characters" not in rows["tiny"]
    assert "(50000 characters, max_length 128)" in md
    # Lower perplexity is better: the int8 copy (slower and worse than its parent) is the only one off the front.
    assert {name: r["Pareto front"] for name, r in rows.items()} == \
        {"teacher": "yes", "student": "yes", "student-int8": "", "tiny": "yes"}
    assert "perplexity ratio = artifact / baseline (below 1 is better)" in md
    assert "(perplexity against p50 latency; lower perplexity is better)" in md
    base = md.split("## Compared with the baseline (teacher)")[1]
    assert "| Perplexity ratio | Δ perplexity % |" in re.sub(r" +", " ", base.splitlines()[2])
    assert re.search(r"^\| student +\| +1\.333 \| +\+33\.33 \|", base, flags=re.M)
    for block in re.findall(r"((?:^\|.*\|$\n?)+)", md, flags=re.M):
        assert len({len(line) for line in block.splitlines()}) == 1


def test_lm_html_plots_perplexity_lower_is_better(lm):
    html = render_html(lm)
    assert "accuracy" not in html.lower()
    assert "Perplexity vs latency" in html and "perplexity (lower is better) (log scale)" in html
    assert "Down and to the left is better" in html and "at least as low in perplexity" in html
    assert html.count('class="pareto"') == 3 + 1  # three front markers and the legend's


def test_classification_columns_unchanged():
    """A classification table still has exactly its v1 columns after the generic rewrite."""
    from test_report import sample_results

    headers = models_table(derive(sample_results()))[0]
    assert headers[3:5] == ["Accuracy %", "Macro-F1 %"] and "Examples" not in headers


def test_report_cli_on_a_v2_lm_file(lm, tmp_path):
    src = tmp_path / "results.json"
    src.write_text(json.dumps(lm))
    assert main(["report", str(src)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert md == render_markdown(lm) and "Perplexity" in md and "Accuracy" not in md
    assert (tmp_path / "report.html").read_text() == render_html(json.loads(json.dumps(lm)))
    future = tmp_path / "future.json"
    future.write_text(json.dumps({**lm, "schema_version": 3}))
    assert main(["report", str(future)]) == 2
