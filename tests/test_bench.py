"""compress bench: measurement primitives, the results schema, ratios, runners, bad input."""

import itertools
import json
import math
import shutil
import time

import numpy as np
import pytest

from compress.bench import BenchConfig, bench, parse_artifacts
from compress.bench.flops import count_parameters, file_parameters, flops_per_inference
from compress.bench.measure import latency, make_batch, median_ci_rel
from compress.bench.peak import matmul_peak
from compress.cli import main

FAST = dict(batch_sizes=[1, 4], seq_lens=[16, 32], budget_s=0.15, min_iters=5, warmup=1, threads=1,
            max_examples=120, progress=False)


def fixed_timer(values):
    """A timer that calls fn and reports the next of `values` seconds: deterministic statistics."""
    it = itertools.cycle(values)

    def timer(fn):
        fn()
        return next(it)

    return timer


# --------------------------------------------------------------------------- latency statistics

def test_latency_constant_times_converges_at_min_iters():
    calls = []
    r = latency(lambda: calls.append(1), warmup=2, budget_s=10, min_iters=7, timer=fixed_timer([0.010]))
    assert r["p50_ms"] == r["p90_ms"] == r["p99_ms"] == r["mean_ms"] == pytest.approx(10.0)
    assert r["iters"] == 7 and r["converged"] and r["ci95_rel"] == 0.0
    assert len(calls) == 2 + 7  # warm-up calls are made but not timed
    # No interval from fewer than 6 calls reaches 95% coverage, so the check waits for 6.
    assert latency(lambda: None, warmup=0, min_iters=3, timer=fixed_timer([0.01]))["iters"] == 6


def test_latency_stops_at_budget_when_noisy():
    # Alternating 1 s and 3 s never gives a 2% interval; a 5 s budget allows 3 calls (1+3+1).
    r = latency(lambda: None, warmup=0, budget_s=5.0, min_iters=10, timer=fixed_timer([1.0, 3.0]))
    assert r["iters"] == 3 and not r["converged"]
    assert r["p50_ms"] == pytest.approx(1000.0) and r["mean_ms"] == pytest.approx(5000 / 3, rel=1e-4)


def test_latency_percentiles_of_known_sequence():
    r = latency(lambda: None, warmup=0, budget_s=1e9, min_iters=100, max_iters=100, target_rel=1e-9,
                timer=fixed_timer([i / 1000 for i in range(1, 101)]))
    assert r["iters"] == 100
    assert r["p50_ms"] == pytest.approx(50.5) and r["p90_ms"] == pytest.approx(90.1)
    assert r["p99_ms"] == pytest.approx(99.01) and r["min_ms"] == pytest.approx(1.0)


def test_latency_of_real_sleep():
    r = latency(lambda: time.sleep(0.004), warmup=1, budget_s=0.5, min_iters=10)
    # A sleep never returns early; a busy shared machine may add a little.
    assert 4.0 <= r["p50_ms"] <= 6.0
    assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
    assert r["iters"] >= 10


def test_median_ci():
    assert median_ci_rel([1.0, 1.0]) == math.inf
    assert median_ci_rel([2.0] * 50) == 0.0
    # 1..101: ranks floor(50.5 - 9.85) = 40 and ceil(50.5 + 9.85) = 61 around the median 51.
    assert median_ci_rel(list(range(1, 102))) == pytest.approx((61 - 40) / 2 / 51)


def test_make_batch_exact_shape(tiny_teacher):
    from compress.models import load_tokenizer

    tok = load_tokenizer(tiny_teacher)
    texts = ["a short one", "a much longer review that keeps going " * 20]
    b = make_batch(tok, texts, batch_size=5, seq_len=24)
    assert set(b) >= {"input_ids", "attention_mask"}
    for v in b.values():
        assert v.shape == (5, 24) and v.dtype == np.int64
    lens = b["attention_mask"].sum(1)
    assert lens[1] == 24 and lens[3] == 24  # the long text is truncated, repeated at rows 1 and 3
    assert 3 < lens[0] < 24 and np.array_equal(b["input_ids"][0], b["input_ids"][2])


# --------------------------------------------------------------------------- peak probe, FLOPs, params

def test_peak_probe_positive():
    peak = matmul_peak(threads=1, budget_s=0.05)
    assert peak["fp32_gflops"] > 0 and peak["int8_gops"] > 0
    assert peak["bf16_gflops"] is None or peak["bf16_gflops"] > 0
    assert peak["int8_gops"] == max(v for k, v in peak["kernels"].items() if "int8" in k and v)
    assert peak["seconds"] < 10


def test_flops_formula():
    arch = {"layers": 2, "hidden": 64, "ff": 128, "num_labels": 2}
    s = 32
    per_layer = 8 * s * 64 * 64 + 4 * s * 64 * 128 + 4 * s * s * 64
    assert flops_per_inference(arch, 3, s) == 3 * (2 * per_layer + 2 * 64 * 64 + 2 * 64 * 2)
    assert flops_per_inference(None, 1, 8) is None


def test_parameter_count(tiny_teacher):
    from compress.runners import load_runner

    runner = load_runner(tiny_teacher)
    expected = sum(p.numel() for p in runner.model.parameters())
    assert count_parameters(runner, tiny_teacher) == (expected, "module")
    assert file_parameters(tiny_teacher) == expected  # safetensors header count agrees


# --------------------------------------------------------------------------- the bench stage

@pytest.fixture(scope="module")
def two_artifact_run(tiny_teacher, tmp_path_factory):
    """The tiny teacher measured in-process under two names, the first as baseline."""
    out = tmp_path_factory.mktemp("bench") / "run"
    cfg = BenchConfig(artifacts=[f"ref={tiny_teacher}", f"copy={tiny_teacher}"], baseline="ref", out=str(out),
                      isolate=False, peak_probe=True, **FAST)
    return bench(cfg), out


def test_results_schema(two_artifact_run):
    results, out = two_artifact_run
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert {"report.md", "report.html", "results.json"} <= {p.name for p in out.iterdir()}
    assert results["schema_version"] == 2 and results["baseline"] == "ref"
    env = results["environment"]
    assert isinstance(env["cpu"]["isa"], list) and env["cpu"]["logical_cores"] >= 1
    assert len(env["load_average_start"]) == 3 and len(env["load_average_end"]) == 3
    assert "torch" in env["versions"] and env["shared_machine_note"]
    assert results["peak"]["fp32_gflops"] > 0
    assert [a["name"] for a in results["artifacts"]] == ["ref", "copy"]
    for a in results["artifacts"]:
        assert a["format"] == "pytorch" and a["precision"] == "fp32" and a["stage"] == "train"
        assert 0 <= a["accuracy"] <= 1 and 0 <= a["macro_f1"] <= 1 and a["n"] == 120
        assert a["quality"] == {"task": "classification", "primary": "accuracy", "higher_is_better": True,
                                "metrics": {k: a[k] for k in ("accuracy", "macro_f1", "n")}}
        assert a["size_bytes"] > 100_000 and a["params"] > 100_000
        assert a["arch"] == {"layers": 2, "hidden": 64, "ff": 128, "heads": 4, "num_labels": 2, "vocab": a["arch"]["vocab"]}
        assert a["threads"]["torch_intra_op"] == 1
        assert a["memory"]["method"] == "in-process" and a["memory"]["peak_rss_mb"] > 0
        assert [(p["batch_size"], p["seq_len"]) for p in a["latency"]] == [(1, 16), (1, 32), (4, 16), (4, 32)]
        for p in a["latency"]:
            assert 0 < p["p50_ms"] <= p["p90_ms"] <= p["p99_ms"] and p["iters"] >= 3
            assert p["throughput_sps"] == pytest.approx(p["batch_size"] / (p["p50_ms"] / 1e3), rel=1e-3)
            assert p["flops"] == flops_per_inference(a["arch"], p["batch_size"], p["seq_len"])
            assert p["achieved_gflops"] == pytest.approx(p["flops"] / (p["p50_ms"] / 1e3) / 1e9, abs=0.01)
            assert p["roofline"] == pytest.approx(p["achieved_gflops"] / results["peak"]["fp32_gflops"], abs=1e-3)


def test_accuracy_matches_compress_eval(two_artifact_run, tiny_teacher):
    from compress.eval import EvalConfig, evaluate

    results, _ = two_artifact_run
    ref = evaluate(EvalConfig(model=str(tiny_teacher), max_examples=120))
    a = results["artifacts"][0]
    assert (a["accuracy"], a["macro_f1"], a["n"]) == (ref["accuracy"], ref["macro_f1"], ref["n"])


def test_baseline_ratios(two_artifact_run):
    results, _ = two_artifact_run
    base, other = results["artifacts"]
    assert base["vs_baseline"]["size_ratio"] == 1.0 and base["vs_baseline"]["accuracy_delta_pts"] == 0.0
    for b, o in zip(base["latency"], other["latency"]):
        assert b["speedup_vs_baseline"] == 1.0
        assert o["speedup_vs_baseline"] == pytest.approx(b["p50_ms"] / o["p50_ms"], abs=1e-4)
    vs = other["vs_baseline"]
    assert vs["size_ratio"] == round(other["size_bytes"] / base["size_bytes"], 4) == 1.0
    assert vs["accuracy_delta_pts"] == round((other["accuracy"] - base["accuracy"]) * 100, 2) == 0.0
    assert vs["params_ratio"] == 1.0


def test_runners_through_generic_interface(tiny_teacher, tmp_path):
    """Every backend that can be built here is measured by the same code."""
    from compress.runners import RUNNERS

    arts = [f"pt={tiny_teacher}"]
    if "onnx" in RUNNERS:
        from compress.export import ExportConfig, export

        export(ExportConfig(model=str(tiny_teacher), out=str(tmp_path / "onnx"), max_examples=40, parity_examples=8,
                            optimize="none", threads=1))
        arts.append(f"ort={tmp_path / 'onnx'}")
    results = bench(BenchConfig(artifacts=arts, baseline="pt", out=str(tmp_path / "b"), isolate=False,
                                peak_probe=False, **{**FAST, "batch_sizes": [2], "seq_lens": [16]}))
    by = {a["name"]: a for a in results["artifacts"]}
    assert by["pt"]["format"] == "pytorch"
    if "ort" in by:
        ort = by["ort"]
        assert ort["format"] == "onnx" and ort["params_method"] == "files"
        assert ort["threads"]["ort_intra_op"] == 1
        assert abs(ort["params"] - by["pt"]["params"]) <= 0.01 * by["pt"]["params"]
        assert ort["accuracy"] == by["pt"]["accuracy"]  # parity-gated export: same predictions
        assert ort["parent_name"] == "pt"


def test_cli_isolated_run_and_refuses_existing_out(tiny_teacher, tmp_path):
    out = tmp_path / "iso"
    args = ["bench", str(tiny_teacher), "--out", str(out), "--batch-sizes", "2", "--seq-lens", "16",
            "--budget-s", "0.1", "--max-examples", "60", "--threads", "1", "--no-peak-probe", "--no-progress"]
    assert main(args) == 0
    r = json.loads((out / "results.json").read_text())
    (a,) = r["artifacts"]
    assert a["name"] == tiny_teacher.name and r["peak"] is None
    mem = a["memory"]
    assert mem["method"] == "subprocess"
    assert mem["peak_rss_mb"] >= mem["rss_before_load_mb"] > 50 and 0 <= mem["model_memory_mb"] == mem["run_delta_mb"] <= mem["rss_delta_mb"]
    assert main(args) == 2  # exists, no --force


# --------------------------------------------------------------------------- names and bad input

def test_display_names(tiny_teacher, tmp_path):
    other = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, other)
    arts, base = parse_artifacts([str(tiny_teacher), str(other), f"x={other}"], baseline=str(other))
    assert tiny_teacher.name == "teacher"
    assert [n for n, _ in arts] == ["teacher", "teacher-2", "x"]
    assert base == arts[1][0]
    arts, base = parse_artifacts([str(tiny_teacher)], baseline=f"ref={other}")
    assert [n for n, _ in arts] == ["ref", tiny_teacher.name] and base == "ref"


def test_unrecognised_artifact_exits_2(tmp_path, capsys):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a model")
    assert main(["bench", str(junk), "--out", str(tmp_path / "o")]) == 2
    assert "not an artifact compress recognises" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "o").exists()


def test_cuda_without_gpu_exits_2(tiny_teacher, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["bench", str(tiny_teacher), "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    assert "no CUDA GPU" in " ".join(capsys.readouterr().err.split())


def test_label_mismatch_exits_2(tiny_teacher, tiny_csv_dir, tmp_path, capsys):
    rc = main(["bench", str(tiny_teacher), "--dataset", str(tiny_csv_dir), "--text-column", "review",
               "--label-column", "sentiment", "--out", str(tmp_path / "o"), "--no-isolate", "--no-peak-probe"])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and "do not match the model's" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.gpu
def test_cuda_timing(tiny_teacher, tmp_path):
    results = bench(BenchConfig(artifacts=[str(tiny_teacher)], device="cuda", out=str(tmp_path / "g"),
                                **{**FAST, "threads": None}))
    (a,) = results["artifacts"]
    assert a["device"] == "cuda" and results["environment"]["gpu"]["name"]
    assert a["memory"]["cuda_max_allocated_mb"] > 0
    assert all(p["p50_ms"] > 0 for p in a["latency"])
    assert results["peak"]["device"] == "cuda" and results["peak"]["fp32_gflops"] > 0


def test_interleaved_latency_times_all_callables_in_the_same_rounds():
    import time

    from compress.bench.measure import interleaved_latency

    calls = []

    def sleeper(name, seconds):
        def fn():
            calls.append(name)
            time.sleep(seconds)
        return fn

    stats = interleaved_latency({"a": sleeper("a", 0.002), "b": sleeper("b", 0.002), "slow": sleeper("slow", 0.006)},
                                warmup=1, budget_s=0.3, min_iters=6, target_rel=0.5, settle=0, block=1)
    assert set(stats) == {"a", "b", "slow"}
    assert stats["a"]["iters"] == stats["b"]["iters"] == stats["slow"]["iters"] >= 6  # one call each per round
    assert calls[3:6] != calls[6:9]  # the order rotates between rounds
    assert abs(stats["a"]["p50_ms"] - stats["b"]["p50_ms"]) / stats["a"]["p50_ms"] < 0.5
    assert 2.0 < stats["slow"]["p50_ms"] / stats["a"]["p50_ms"] < 4.0


def test_interleaved_latency_does_not_time_the_first_call_after_a_switch():
    import time

    from compress.bench.measure import interleaved_latency

    last = {"name": None}

    def runtime(name, seconds):
        # The first call after another runtime ran is slow (ONNX Runtime's threads still spinning).
        def fn():
            slow = last["name"] not in (None, name)
            last["name"] = name
            time.sleep(seconds * (5 if slow else 1))
        return fn

    fns = {"torch": runtime("torch", 0.002), "ort": runtime("ort", 0.002)}
    naive = interleaved_latency(fns, warmup=1, budget_s=0.2, min_iters=8, target_rel=0.5, settle=0, block=1)
    settled = interleaved_latency(fns, warmup=1, budget_s=0.2, min_iters=8, target_rel=0.5)
    assert naive["torch"]["p50_ms"] > 8  # every timed call followed a switch
    assert settled["torch"]["p50_ms"] < 6 and settled["ort"]["p50_ms"] < 6  # 2 ms calls, with scheduler slack
    assert settled["torch"]["iters"] == settled["ort"]["iters"] and settled["torch"]["iters"] % 4 == 0


def test_interleaved_latency_waits_out_the_other_runtime_s_spinning_threads():
    import time

    from compress.bench.measure import interleaved_latency

    last = {"name": None, "until": 0.0}

    def runtime(name, seconds):
        # Calls are slow for 40 ms after the other runtime ran (its idle threads still spinning).
        def fn():
            now = time.perf_counter()
            if last["name"] not in (None, name):
                last["until"] = now + 0.04
            last["name"] = name
            time.sleep(seconds * (5 if now < last["until"] else 1))
        return fn

    fns = {"torch": runtime("torch", 0.002), "ort": runtime("ort", 0.002)}
    one_call = interleaved_latency(fns, warmup=1, budget_s=0.2, min_iters=8, target_rel=0.5, settle_s=0.0)
    settled = interleaved_latency(fns, warmup=1, budget_s=0.2, min_iters=8, target_rel=0.5, settle_s=0.05)
    # After one untimed 10 ms call, 3 of the 4 timed calls of a block that follows a switch are
    # slow (with two callables, every other block follows one), so about 3 calls in 8 take 10 ms.
    assert one_call["torch"]["mean_ms"] > 4.5 and one_call["torch"]["p90_ms"] > 8
    assert settled["torch"]["mean_ms"] < 4 and settled["ort"]["mean_ms"] < 4
