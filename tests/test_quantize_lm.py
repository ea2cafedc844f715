"""`compress quantize` on a causal LM: MatMulNBits 4/8-bit (RTN, HQQ, GPTQ, embeddings),
GPT-2's Gemm trap, ONNX Runtime dynamic int8 of the decoder, the PyTorch methods, perplexity
gates (--max-drop as a relative perplexity increase) and eval/generate on every artifact."""

import json
import shutil
from collections import Counter

import numpy as np
import onnx
import pytest

from compress.artifacts import read_manifest
from compress.cli import main


def quantize(src, out, method: str, *extra: str) -> dict:
    assert main(["quantize", "--model", str(src), "--method", method, "--threads", "1", "--out", str(out), *extra]) == 0
    return read_manifest(out)


def ops(directory) -> Counter:
    m = read_manifest(directory)
    return Counter(n.op_type for n in onnx.load(str(directory / m["onnx_file"])).graph.node)


def layers_of(directory) -> int:
    return json.loads((directory / "config.json").read_text())["n_layer"]


def generates(directory) -> np.ndarray:
    from compress.runners import load_runner

    runner = load_runner(directory, threads=1)
    ids = np.asarray([runner.tokenizer("HAMLET. Speak", add_special_tokens=False)["input_ids"]], dtype=np.int64)
    out = runner.generate(ids, max_new_tokens=8, sampling={"temperature": 0.0})
    assert out.shape == (8,) or (0 < len(out) < 8 and out[-1] == runner.tokenizer.eos_token_id)
    return out


@pytest.fixture(scope="module")
def plain_onnx(tiny_lm, tmp_path_factory):
    """`tiny_lm` exported without ONNX Runtime's fusions (its Gemms as the exporter wrote them)."""
    from compress.export import ExportConfig, export

    from conftest import LM_EXPORT_FAST

    out = tmp_path_factory.mktemp("plain-lm") / "onnx"
    return export(ExportConfig(model=str(tiny_lm), out=str(out), optimize="none", **LM_EXPORT_FAST))


def test_gpt2_gemms_must_become_matmuls_for_matmulnbits(plain_onnx, tmp_path):
    """The trap: GPT-2's Conv1D projections export as Gemm, which MatMulNBitsQuantizer skips
    silently. Rewritten as MatMul + Add they compute the same logits and do get quantized."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from compress.onnx_graph import gemm_to_matmul
    from compress.quantize.onnx_int8 import load_graph
    from compress.runners.ort import OrtRunner

    tiny_lm_onnx = plain_onnx
    projections = 4 * layers_of(tiny_lm_onnx)  # c_attn, attn.c_proj, c_fc, mlp.c_proj per layer
    raw = load_graph(tiny_lm_onnx)
    assert Counter(n.op_type for n in raw.graph.node)["Gemm"] == projections
    quantizer = MatMulNBitsQuantizer(raw, bits=4, block_size=32, op_types_to_quantize=("MatMul",))
    quantizer.process()
    made = Counter(n.op_type for n in quantizer.model.model.graph.node)["MatMulNBits"]
    assert made <= 1  # at most the LM head: every projection was left in fp32

    rewritten = load_graph(tiny_lm_onnx)
    assert gemm_to_matmul(rewritten) == projections
    assert not any(n.op_type == "Gemm" for n in rewritten.graph.node)
    d = tmp_path / "rewritten"
    shutil.copytree(tiny_lm_onnx, d)
    onnx.save(rewritten, str(d / "model.onnx"))
    ids = np.arange(1, 41, dtype=np.int64)[None] * 7 % 900
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    a, b = OrtRunner(tiny_lm_onnx, threads=1).logits(batch), OrtRunner(d, threads=1).logits(batch)
    assert np.abs(a - b).max() < 1e-4


def test_ort_int4_with_embeddings_quantizes_every_projection_and_table(tiny_lm_onnx, tmp_path):
    m = quantize(tiny_lm_onnx, tmp_path / "int4", "ort-int4", "--quantize-embeddings")
    q, layers = m["quantization"], layers_of(tiny_lm_onnx)
    # What ONNX Runtime's GPT-2 fusion left as Gemm (it turns some into MatMul + Add itself) is rewritten.
    assert m["task"] == "causal-lm" and q["gemm_rewritten_as_matmul"] == ops(tiny_lm_onnx)["Gemm"] > 0
    assert q["quantized"] == {"MatMul": 4 * layers + 1, "Gather": 2}  # + the LM head; token and position tables
    counts = ops(tmp_path / "int4")
    assert counts["MatMulNBits"] == 4 * layers + 1 and counts["GatherBlockQuantized"] == 2 and not counts["Gemm"]
    assert m["metrics"]["compression"] > 4
    level = q["accuracy_level"]
    assert level["choice"] in (0, 4) and {"level0_prefill", "level4_step"} <= set(level["ms"])
    v = m["metrics"]["validation"]
    assert v["primary"] == "perplexity" and v["after"]["tokens"] == v["before"]["tokens"]
    assert v["before"]["perplexity"] <= v["after"]["perplexity"] < 1.5 * v["before"]["perplexity"]
    assert v["perplexity_increase_pct"] == pytest.approx(100 * (v["after"]["perplexity"] / v["before"]["perplexity"] - 1),
                                                         abs=1e-3)
    generates(tmp_path / "int4")
    from compress.eval import EvalConfig, evaluate

    r = evaluate(EvalConfig(model=str(tmp_path / "int4"), split="validation", threads=1))
    assert r["perplexity"] == pytest.approx(v["after"]["perplexity"], rel=1e-6)


@pytest.mark.parametrize("symmetric", [False, True])
def test_8bit_tables_dequantize_to_the_table_in_onnxruntime(symmetric):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from compress.quantize.embeddings import quantize_gathers_8bit

    table = np.random.default_rng(0).normal(size=(50, 64)).astype(np.float32)
    table[3] = 0.0  # an all-zero row (scale 0) must not divide by zero
    node = helper.make_node("Gather", ["table", "ids"], ["out"], name="emb")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    assert quantize_gathers_8bit(model, ["emb"], 32, symmetric) == 1
    (q,) = [n for n in model.graph.node]
    attrs = {a.name: helper.get_attribute_value(a) for a in q.attribute}
    assert q.op_type == "GatherBlockQuantized" and attrs["bits"] == 8 and attrs["block_size"] == 32
    assert len(q.input) == (3 if symmetric else 4) and "table" not in {t.name for t in model.graph.initializer}
    ids = np.array([0, 3, 17, 49])
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    step = np.abs(table[ids]).reshape(4, 2, 32).max(-1) / (127 if symmetric else 127.5)
    assert np.all(np.abs(got - table[ids]).reshape(4, 2, 32) <= step[..., None] * 0.51 + 1e-7)
    assert np.array_equal(got[1], table[3])


def test_int4_body_with_8bit_tables_and_head(tiny_lm_onnx, tmp_path):
    m = quantize(tiny_lm_onnx, tmp_path / "mixed", "ort-int4", "--quantize-embeddings", "--embedding-bits", "8",
                 "--block-size", "32")
    layers = layers_of(tiny_lm_onnx)
    graph = onnx.load(str(tmp_path / "mixed" / m["onnx_file"])).graph
    bits = Counter((n.op_type, next(a.i for a in n.attribute if a.name == "bits")) for n in graph.node
                   if n.op_type in ("MatMulNBits", "GatherBlockQuantized"))
    assert bits == {("MatMulNBits", 4): 4 * layers, ("MatMulNBits", 8): 1, ("GatherBlockQuantized", 8): 2}
    assert m["quantization"]["scheme"]["embeddings"].startswith("8-bit blocks of 32")
    four = quantize(tiny_lm_onnx, tmp_path / "four", "ort-int4", "--quantize-embeddings", "--block-size", "32")
    v8, v4 = m["metrics"]["validation"], four["metrics"]["validation"]
    # Both lose next to nothing on this tiny model (the Austen GPT is where 4-bit tables cost:
    # benchmarks/results/lm_vs_optimum.md); 8-bit tables cost more bytes.
    assert abs(v8["perplexity_increase_pct"]) < 0.5 and abs(v4["perplexity_increase_pct"]) < 2
    assert four["metrics"]["size_bytes"] < m["metrics"]["size_bytes"] < m["metrics"]["parent_size_bytes"] / 2
    generates(tmp_path / "mixed")
    assert main(["quantize", "--model", str(tiny_lm_onnx), "--method", "ort-int4", "--embedding-bits", "8",
                 "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


def test_int4_by_default_keeps_the_head_and_embeddings_and_gptq_calibrates(tiny_lm_onnx, tmp_path):
    rtn = quantize(tiny_lm_onnx, tmp_path / "rtn", "ort-int4", "--accuracy-level", "0")
    layers = layers_of(tiny_lm_onnx)
    assert rtn["quantization"]["quantized"] == {"MatMul": 4 * layers, "Gather": 0}
    assert any(s["reason"].startswith("output head") for s in rtn["quantization"]["skipped"])
    assert rtn["quantization"]["accuracy_level"] == {"choice": 0, "how": "--accuracy-level"}
    assert not any(n.op_type == "MatMulNBits" and any(a.name == "accuracy_level" for a in n.attribute)
                   for n in onnx.load(str(tmp_path / "rtn" / "model_nbits.onnx")).graph.node)
    gptq = quantize(tiny_lm_onnx, tmp_path / "gptq", "ort-int4", "--algorithm", "gptq", "--calib-samples", "8",
                    "--accuracy-level", "0")
    assert gptq["calibration"]["n"] == 8 and gptq["calibration"]["split"] == "train"
    assert gptq["quantization"]["quantized"]["MatMul"] == 4 * layers
    hqq = quantize(tiny_lm_onnx, tmp_path / "hqq", "ort-int4", "--algorithm", "hqq", "--accuracy-level", "0")
    assert hqq["quantization"]["quantized"]["MatMul"] == 4 * layers
    base = rtn["metrics"]["validation"]["before"]["perplexity"]
    for m in (rtn, gptq, hqq):
        assert m["metrics"]["validation"]["after"]["perplexity"] < 1.3 * base
    generates(tmp_path / "gptq")


def test_int8_weight_only_and_dynamic_int8_of_the_decoder(tiny_lm_onnx, tmp_path):
    w8 = quantize(tiny_lm_onnx, tmp_path / "w8", "ort-int8-weight-only", "--accuracy-level", "0")
    v = w8["metrics"]["validation"]
    assert w8["quantization"]["quantized"]["MatMul"] == 4 * layers_of(tiny_lm_onnx)
    assert abs(v["perplexity_increase_pct"]) < 1.0  # 8-bit weights are near lossless
    dyn = quantize(tiny_lm_onnx, tmp_path / "dyn", "ort-dynamic-int8")
    assert dyn["quantization"]["quantized"]["MatMul"] >= 4 * layers_of(tiny_lm_onnx)
    assert dyn["metrics"]["validation"]["perplexity_increase_pct"] < 10
    generates(tmp_path / "w8")
    generates(tmp_path / "dyn")
    # Dynamic int8 projections with the head and tables as 4-bit blocks (the LM quickstart's int8).
    mixed = quantize(tiny_lm_onnx, tmp_path / "mixed", "ort-dynamic-int8", "--quantize-embeddings",
                     "--embedding-bits", "4", "--block-size", "32")
    counts = ops(tmp_path / "mixed")
    assert counts["MatMulNBits"] == 1 and counts["GatherBlockQuantized"] == 2
    assert counts["DynamicQuantizeLinear"] + counts["DynamicQuantizeMatMul"] + counts["MatMulInteger"] > 0
    q = mixed["quantization"]
    assert q["tables"]["bits"] == 4 and len(q["tables"]["gathers"]) == 2 and q["scheme"]["embeddings"].startswith("4-bit")
    assert mixed["metrics"]["size_bytes"] < dyn["metrics"]["size_bytes"]
    assert mixed["metrics"]["validation"]["perplexity_increase_pct"] < 10
    generates(tmp_path / "mixed")
    # The same with 8-bit tables (its default): between the two in size.
    eight = quantize(tiny_lm_onnx, tmp_path / "eight", "ort-dynamic-int8", "--quantize-embeddings")
    assert eight["quantization"]["tables"]["bits"] == 8
    assert mixed["metrics"]["size_bytes"] < eight["metrics"]["size_bytes"]


def test_pytorch_methods_on_the_lm(tiny_lm, tmp_path):
    t8 = quantize(tiny_lm, tmp_path / "t8", "torch-dynamic-int8")
    layers = layers_of(tiny_lm)
    # Conv1D projections become Linear and are quantized; the LM head stays fp32, the embedding is uint8.
    assert t8["quantization"]["quantized"] == {"Linear": 4 * layers, "Embedding": 1}
    assert t8["metrics"]["validation"]["perplexity_increase_pct"] < 10
    assert [s["module"] for s in t8["quantization"]["skipped"]] == ["lm_head"]
    generates(tmp_path / "t8")
    bf16 = quantize(tiny_lm, tmp_path / "bf16", "bf16")
    assert bf16["metrics"]["validation"]["perplexity_increase_pct"] < 5
    generates(tmp_path / "bf16")


def test_bnb_nf4_on_the_lm(tiny_lm, tmp_path):
    pytest.importorskip("bitsandbytes")
    m = quantize(tiny_lm, tmp_path / "nf4", "bnb-nf4")
    layers = layers_of(tiny_lm)
    assert m["quantization"]["quantized"]["Linear"] == 4 * layers  # GPT-2's Conv1Ds, not the tied head
    assert "lm_head" in [s["module"] for s in m["quantization"]["skipped"]]
    assert m["metrics"]["validation"]["perplexity_increase_pct"] < 30
    generates(tmp_path / "nf4")


def test_max_drop_is_a_relative_perplexity_increase(tiny_lm_onnx, tmp_path, capsys):
    out = tmp_path / "unreachable"
    code = main(["quantize", "--model", str(tiny_lm_onnx), "--method", "ort-int4", "--accuracy-level", "0",
                 "--max-drop", "0%", "--max-fallback", "2", "--sensitivity-samples", "8", "--threads", "1",
                 "--out", str(out)])
    assert code == 3
    m = read_manifest(out)  # the best candidate is still written
    t = m["tuning"]
    assert t["goal_met"] is False and len(t["steps"]) == 3
    assert len(t["sensitivity"]) == 4 * layers_of(tiny_lm_onnx)
    assert all("perplexity_increase" in s for s in t["sensitivity"])
    ranked = sorted(t["sensitivity"], key=lambda s: -s["perplexity_increase"])
    assert [f["layer"] for f in m["fallback_layers"]] == [s["layer"] for s in ranked[:len(m["fallback_layers"])]]
    text = (out / "tuning.md").read_text()
    assert "fp32 validation perplexity" in text and "Goal NOT met" in text and ranked[0]["layer"] in text
    assert "could not keep the validation perplexity" in capsys.readouterr().err
    met = quantize(tiny_lm_onnx, tmp_path / "met", "ort-int4", "--accuracy-level", "0", "--max-drop", "50%")
    assert met["tuning"]["goal_met"] and met["fallback_layers"] == [] and len(met["tuning"]["steps"]) == 1
