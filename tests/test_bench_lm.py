"""compress bench on causal LMs: the task's plan, prefill / time to first token / cached decode
timing, perplexity in the quality block, FLOPs and bytes per decode step, the bandwidth
roofline, the decode-speed plot, and the notes on quantized LMs that are slower."""

import copy
import json
import math
import time
from types import SimpleNamespace

import numpy as np
import pytest

from compress.bench import BenchConfig, bench
from compress.bench.analysis import derive
from compress.bench.flops import kv_cache_bytes, lm_flops, onnx_weight_bytes
from compress.bench.measure import interleaved_samples, sampled_latency
from compress.bench.report import render_html, render_markdown
from compress.bench.workloads import prompt_ids
from compress.tasks.causal_lm import CausalLMTask

LM_FAST = dict(prompt_lens=[16, 48], decode_batch_sizes=[1, 2], new_tokens=4, budget_s=0.1, min_iters=5,
               warmup=1, threads=1, progress=False)


def cfg(**kw):
    base = dict(artifacts=["x"], out="o", **{**LM_FAST, "progress": False})
    base.update(kw)
    return BenchConfig(**base)


# --------------------------------------------------------------------------- the plan

def test_lm_plan_caps_lengths_at_the_positions():
    task = CausalLMTask()
    plan = task.bench_plan(cfg(prompt_lens=[128, 512], decode_batch_sizes=[1, 8], new_tokens=32),
                           SimpleNamespace(n_positions=256), "lm")
    got = [(p["kind"], p["batch_size"], p["seq_len"], p.get("capped_from")) for p in plan]
    assert got == [("prefill", 1, 128, None), ("prefill", 1, 256, 512), ("ttft", 1, 128, None),
                   ("ttft", 1, 255, 512), ("decode", 1, 128, None), ("decode", 8, 128, None)]
    assert all(p["new_tokens"] == 32 for p in plan if p["kind"] == "decode")
    # A short model: the decode context leaves room for the new tokens.
    short = task.bench_plan(cfg(prompt_lens=[128], new_tokens=32), SimpleNamespace(n_positions=64), "lm")
    assert [(p["kind"], p["seq_len"], p.get("capped_from")) for p in short] == \
        [("prefill", 64, 128), ("ttft", 63, 128), ("decode", 32, 128), ("decode", 32, 128)]
    from compress.errors import UserError

    with pytest.raises(UserError, match="--new-tokens 64 leaves no room"):
        task.bench_plan(cfg(new_tokens=64), SimpleNamespace(n_positions=64), "lm")


def test_prompts_are_consecutive_windows_of_the_stream():
    ids = prompt_ids(np.arange(10), 2, 3)
    assert ids.tolist() == [[0, 1, 2], [3, 4, 5]] and ids.dtype == np.int64
    assert prompt_ids(np.arange(4), 2, 3).tolist() == [[0, 1, 2], [3, 0, 1]]  # repeated when too short


# --------------------------------------------------------------------------- samplers

def test_interleaved_samples_count_every_sample_of_a_run():
    runs = {"a": 0, "b": 0}

    def run(name, seconds, steps):
        def sampler():
            runs[name] += 1
            out = []
            for _ in range(steps):
                t = time.perf_counter()
                time.sleep(seconds)
                out.append(time.perf_counter() - t)
            return out
        return sampler

    stats = interleaved_samples({"a": run("a", 0.001, 5), "b": run("b", 0.003, 5)}, warmup=1, budget_s=0.2,
                                min_iters=10, target_rel=0.5, settle=0, settle_s=0.0, block=1)
    assert stats["a"]["iters"] == stats["b"]["iters"] and stats["a"]["iters"] % 5 == 0 and stats["a"]["iters"] >= 10
    assert runs["a"] == runs["b"] == 1 + stats["a"]["iters"] // 5  # one warm-up run each, then one per round
    assert 2.0 < stats["b"]["p50_ms"] / stats["a"]["p50_ms"] < 4.5
    # Three equal samples per call: the interval is checked once 6 are in, and is exact.
    single = sampled_latency(lambda: [0.001] * 3, warmup=0, budget_s=10, min_iters=6)
    assert single["iters"] == 6 and single["converged"] and single["p50_ms"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- arithmetic

ARCH = {"layers": 2, "hidden": 64, "ff": 256, "heads": 4, "num_labels": 2, "vocab": 1000}


def test_lm_flops_and_kv_bytes():
    h, ff, v, L = 64, 256, 1000, 2

    def token(ctx, head=True):
        return L * (8 * h * h + 4 * h * ff + 4 * ctx * h) + (2 * h * v if head else 0)

    # A prefill projects the last position only (logits_to_keep).
    prefill = 16 * token(16, head=False) + 2 * h * v
    assert lm_flops(ARCH, {"kind": "prefill", "batch_size": 2, "seq_len": 16}) == 2 * prefill
    assert lm_flops(ARCH, {"kind": "ttft", "batch_size": 1, "seq_len": 16}) == prefill + token(17)
    decode = {"kind": "decode", "batch_size": 3, "seq_len": 16, "new_tokens": 5}
    assert lm_flops(ARCH, decode) == 3 * token(16 + 3)  # mean context of steps at 16..20
    assert kv_cache_bytes(ARCH, decode, 4) == 3 * 2 * L * 19 * h * 4
    # Grouped-query attention and a gated feed-forward (Llama): narrower K/V, three matrices.
    llama = {**ARCH, "kv": 32, "ff_matrices": 3}
    per_layer = 4 * h * h + 4 * h * 32 + 3 * 2 * h * ff + 4 * 16 * h
    assert lm_flops(llama, {"kind": "prefill", "batch_size": 1, "seq_len": 16}) == 16 * L * per_layer + 2 * h * v
    assert kv_cache_bytes(llama, decode, 2) == 3 * 2 * L * 19 * 32 * 2


def test_onnx_weight_bytes_leave_out_lookup_tables(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.zeros((100, 8), np.float32), "table")  # only gathered: one row a step
    weight = numpy_helper.from_array(np.zeros((8, 8), np.float32), "w")
    packed = numpy_helper.from_array(np.zeros((8, 4), np.uint8), "w4")  # read whole
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("MatMul", ["e", "w"], ["y"]),
         helper.make_node("Identity", ["w4"], ["z"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("z", TensorProto.UINT8, None)], initializer=[table, weight, packed])
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    assert onnx_weight_bytes(tmp_path / "m.onnx") == 8 * 8 * 4 + 8 * 4


def test_module_weight_bytes_count_the_tied_head_once(tiny_lm):
    from compress.bench.flops import decode_weight_bytes
    from compress.runners import load_runner

    runner = load_runner(tiny_lm, threads=1)
    model = runner.model
    total = sum(p.numel() * 4 for p in model.parameters())  # parameters() lists a tied weight once
    wpe = model.transformer.wpe.weight.numel() * 4
    assert model.lm_head.weight is model.transformer.wte.weight
    assert decode_weight_bytes(runner, tiny_lm) == (total - wpe, "module")


# --------------------------------------------------------------------------- the stage, on a real tiny LM

@pytest.fixture(scope="module")
def lm_run(tiny_lm, tmp_path_factory):
    """The tiny LM benched in one process under two names, the first as baseline."""
    out = tmp_path_factory.mktemp("bench-lm") / "run"
    results = bench(BenchConfig(artifacts=[f"ref={tiny_lm}", f"copy={tiny_lm}"], baseline="ref", out=str(out),
                                isolate=False, **LM_FAST))
    return results, out


def test_lm_results(lm_run, tiny_lm):
    from compress.eval import EvalConfig, evaluate

    results, out = lm_run
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    ref = evaluate(EvalConfig(model=str(tiny_lm)))
    assert results["dataset"]["max_length"] == 64  # the LM's own block, from its manifest
    memory = results["peak"]["memory"]
    assert memory["read_gbs"] > 0 and memory["copy_gbs"] > 0
    for a in results["artifacts"]:
        q = a["quality"]
        assert q["task"] == "causal-lm" and q["primary"] == "perplexity" and q["higher_is_better"] is False
        assert q["metrics"] == {k: ref[k] for k in ("perplexity", "nll", "bits_per_char", "tokens", "chars")}
        assert "accuracy" not in a
        kinds = [(p["kind"], p["batch_size"], p["seq_len"]) for p in a["latency"]]
        assert kinds == [("prefill", 1, 16), ("prefill", 1, 48), ("ttft", 1, 16), ("ttft", 1, 48),
                         ("decode", 1, 16), ("decode", 2, 16)]
        by = {(p["kind"], p["batch_size"], p["seq_len"]): p for p in a["latency"]}
        for p in a["latency"]:
            assert 0 < p["p50_ms"] <= p["p90_ms"] <= p["p99_ms"] and p["iters"] >= 3
            assert p["flops"] == lm_flops(a["arch"], p)
        # A longer prompt is more work; TTFT is a prefill plus a step. (Their times are not
        # compared: on a 2-layer, 64-wide model both are a fraction of a millisecond of overhead.)
        assert by[("prefill", 1, 48)]["flops"] > by[("prefill", 1, 16)]["flops"]
        assert by[("ttft", 1, 16)]["flops"] > by[("prefill", 1, 16)]["flops"]
        d1 = by[("decode", 1, 16)]
        assert d1["new_tokens"] == 4 and d1["iters"] % 4 == 0  # every step of a run is a sample
        assert d1["tokens_per_s"] == pytest.approx(1 / (d1["p50_ms"] / 1e3), rel=1e-3)
        assert by[("decode", 2, 16)]["tokens_per_s"] == pytest.approx(2 / (by[("decode", 2, 16)]["p50_ms"] / 1e3),
                                                                       rel=1e-3)
        assert d1["roofline"] is None and d1["bytes_per_step"] == a["decode_weight_bytes"] + kv_cache_bytes(
            a["arch"], d1, 4)
        assert d1["bandwidth_roofline"] == pytest.approx(d1["achieved_gbs"] / memory["read_gbs"], abs=1e-3)
        assert by[("prefill", 1, 48)]["roofline"] == pytest.approx(
            by[("prefill", 1, 48)]["achieved_gflops"] / results["peak"]["fp32_gflops"], abs=1e-3)
    copy_ = results["artifacts"][1]
    assert copy_["vs_baseline"]["primary"]["ratio"] == 1.0 and copy_["vs_baseline"]["size_ratio"] == 1.0
    assert all(p["speedup_vs_baseline"] is not None for p in copy_["latency"])


def test_lm_report(lm_run):
    results, out = lm_run
    md = (out / "report.md").read_text()
    assert "## Prefill and time to first token" in md and "## Decode with the KV cache" in md
    assert "## Latency\n" not in md and "Samples/s" not in md and "accuracy" not in md.lower()
    assert "## Memory bandwidth" in md
    assert "cached decode at batch 1, context 16 (perplexity against decode tokens/s; lower perplexity is better)" in md
    assert "Speed-up decode b1" in md and "Speed-up TTFT s16" in md and "Speed-up prefill s48" in md
    html = (out / "report.html").read_text()
    assert "Perplexity vs decode speed" in html and "tokens/s (cached decode at batch 1, context 16)" in html
    assert "Down and to the right is better" in html
    assert md == render_markdown(results) and html == render_html(results)


# --------------------------------------------------------------------------- notes and plot, hand-built

def lm_point(kind, b, s, p50, **extra):
    p = {"kind": kind, "batch_size": b, "seq_len": s, "p50_ms": p50, "p90_ms": p50 * 1.1, "p99_ms": p50 * 1.2,
         "mean_ms": p50, "min_ms": p50 * 0.9, "iters": 64, "ci95_rel": 0.01, "converged": True, "total_s": 1.0}
    if kind == "decode":
        p.update(new_tokens=32, tokens_per_s=round(b / (p50 / 1e3), 2))
    else:
        p["tokens_per_s"] = round(b * s / (p50 / 1e3), 2)
    return {**p, **extra}


def lm_art(name, fmt, precision, ppl, size, decode_ms, prefill_ms, stage="train", parent=None, quantization=None):
    art = {"name": name, "path": f"/runs/{name}", "resolved_path": f"/runs/{name}", "format": fmt, "device": "cpu",
           "precision": precision, "stage": stage, "parent": parent,
           "quality": {"task": "causal-lm", "primary": "perplexity", "higher_is_better": False,
                       "metrics": {"perplexity": ppl, "nll": math.log(ppl), "bits_per_char": 1.0,
                                   "tokens": 1000, "chars": 4000}},
           "size_bytes": size, "params": size // 4, "params_method": "module",
           "arch": {"layers": 4, "hidden": 256, "ff": 1024, "heads": 4, "num_labels": 2, "vocab": 8192},
           "fused": None, "ort_session_config": None, "threads": {"torch_intra_op": 2, "ort_intra_op": 2},
           "load_s": 0.1, "memory": {"method": "subprocess", "peak_rss_mb": 500.0, "model_memory_mb": 50.0},
           "decode_weight_bytes": size,
           "latency": [lm_point("prefill", 1, 128, prefill_ms), lm_point("ttft", 1, 128, prefill_ms + decode_ms),
                       lm_point("decode", 1, 128, decode_ms), lm_point("decode", 8, 128, decode_ms * 2)]}
    if quantization:
        art["quantization"] = quantization
    return art


def lm_results(isa=("AVX2", "AVX512-VNNI")):
    """A teacher, its ONNX export, an int4 MatMulNBits copy that decodes slower than the export, and a
    bitsandbytes nf4 teacher."""
    arts = [lm_art("teacher", "pytorch", "fp32", 30.0, 24_000_000, 2.0, 10.0),
            lm_art("onnx", "onnx", "fp32", 30.0, 24_000_000, 0.5, 5.0, stage="export", parent="/runs/teacher"),
            lm_art("int4", "onnx", "int4", 31.0, 4_000_000, 0.6, 6.0, stage="quantize", parent="/runs/onnx",
                   quantization={"method": "ort-int4", "settings": {"bits": 4, "accuracy_level": None}}),
            lm_art("nf4", "bnb", "int4", 30.5, 8_000_000, 9.0, 40.0, stage="quantize", parent="/runs/teacher",
                   quantization={"method": "bnb-nf4", "settings": {}})]
    return {"schema_version": 2, "created": "2026-12-01T08:00:00+00:00", "config": {"target_ci": 0.02},
            "dataset": {"source": "austen", "split": "test", "max_length": 256}, "baseline": "teacher",
            "environment": {"cpu": {"model": "Test CPU", "arch": "x86_64", "logical_cores": 2, "isa": list(isa)},
                            "gpu": None, "device": "cpu", "threads_requested": 2,
                            "load_average_start": [0.1, 0.1, 0.1], "load_average_end": [1.0, 0.5, 0.2]},
            "peak": {"device": "cpu", "n": 1024, "threads": 2, "fp32_gflops": 100.0, "bf16_gflops": None,
                     "int8_gops": 400.0, "kernels": {"torch.matmul fp32": 100.0},
                     "memory": {"device": "cpu", "bytes": 2**28, "read_gbs": 20.0, "copy_gbs": 15.0}},
            "artifacts": arts}


def test_decode_bandwidth_roofline_and_notes():
    r = derive(lm_results())
    teacher, onnx_, int4, nf4 = r["artifacts"]
    d = onnx_["latency"][2]
    step = 24_000_000 + kv_cache_bytes(onnx_["arch"], d, 4)
    assert d["bytes_per_step"] == step and d["achieved_gbs"] == round(step / 0.0005 / 1e9, 2)
    assert d["bandwidth_roofline"] == round(step / 0.0005 / 1e9 / 20.0, 4)
    notes = {n["artifact"]: n["text"] for n in r["notes"] if n["kind"] == "quantized-slower"}
    assert set(notes) == {"int4", "nf4"}
    text = notes["int4"]
    assert "slower than its parent onnx at prefill b=1 s=128 (1.20x the latency), TTFT b=1 s=128" in text
    assert "decode b=1 (context 128) (1.20x the latency)" in text
    assert "accuracy_level unset" in text and "bitsandbytes" not in text
    # The export reads 24 MB per step in 0.5 ms: 2.5x the measured bandwidth, so its weights are in cache.
    assert "sit in the CPU's caches" in text
    assert "save memory, not time" in notes["nf4"] and "on the CPU" in notes["nf4"]

    slow_parent = lm_results()
    # 1 MB of weights and 1.2 MB of cache in 0.55 ms: 20 % of the bandwidth, so overhead-bound.
    slow_parent["artifacts"][1]["latency"][2]["p50_ms"] = 0.55
    slow_parent["artifacts"][1]["decode_weight_bytes"] = 1_000_000
    slow_parent["artifacts"][1]["latency"][3]["p50_ms"] = 1.3
    text = next(n["text"] for n in derive(slow_parent)["notes"] if n["artifact"] == "int4")
    assert "bound by per-operator and per-call overhead" in text and "sit in the CPU's caches" not in text

    level4 = lm_results(isa=("AVX2",))
    level4["artifacts"][2]["quantization"]["settings"]["accuracy_level"] = 4
    text = next(n["text"] for n in derive(level4)["notes"] if n["artifact"] == "int4")
    assert "accuracy_level 4" in text and "no VNNI or AMX" in text and "quantizing activations" in text


def test_lm_plot_and_front_use_decode_speed():
    r = derive(lm_results())
    md = render_markdown(r)
    table = md.split("## Perplexity, size and memory")[1].split("\n\n")[1].splitlines()
    rows = {row.split("|")[1].strip(): row.split("|")[-2].strip() for row in table[2:]}
    # onnx: as good as the teacher and faster; int4: slower and worse than onnx; nf4: the slowest.
    assert rows == {"teacher": "", "onnx": "yes", "int4": "", "nf4": ""}
    html = render_html(r)
    assert "Perplexity vs decode speed" in html and "Down and to the right is better" in html
    # Higher tokens/s is better: a front of two points steps down first, then right.
    fronted = copy.deepcopy(lm_results())
    fronted["artifacts"][2]["latency"][2]["p50_ms"] = 0.25  # int4 now the fastest: on the front
    html = render_html(derive(fronted))
    path = html.split('class="pareto-front" d="')[1].split('"')[0]
    assert path.count("V") == 1 and path.index("V") < path.index("H")
    assert "## Decode with the KV cache" in render_markdown(derive(fronted))


@pytest.mark.gpu
def test_lm_cuda_timing(tiny_lm, tmp_path):
    """Not run here (no GPU): the LM workloads on CUDA, CUDA-event timing, the bandwidth probe on the device."""
    results = bench(BenchConfig(artifacts=[str(tiny_lm)], device="cuda", out=str(tmp_path / "g"), isolate=False,
                                **{**LM_FAST, "threads": None}))
    (a,) = results["artifacts"]
    assert a["device"] == "cuda" and a["memory"]["cuda_max_allocated_mb"] > 0
    assert {p["kind"] for p in a["latency"]} == {"prefill", "ttft", "decode"}
    assert all(p["p50_ms"] > 0 for p in a["latency"])
    assert results["peak"]["memory"]["device"] == "cuda" and results["peak"]["memory"]["read_gbs"] > 0
