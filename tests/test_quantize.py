"""compress quantize on the tiny teacher: every method, the artifact formats, bad input."""

import json

import numpy as np
import pytest

from compress.artifacts import read_manifest, weights_size
from compress.cli import main
from compress.quantize import QuantizeConfig, quantize

SMALL = dict(max_examples=100, threads=2)
CALIB = dict(calib_samples=32)  # a setting of ort-static-int8 only (also taken by auto, which tries it)


def run(model, out, method, **kw):
    return quantize(QuantizeConfig(model=str(model), out=str(out), method=method, **{**SMALL, **kw}))


def after(out):
    return read_manifest(out)["metrics"]["validation"]["after"]


@pytest.fixture(scope="module")
def onnx_plain(tiny_teacher, tmp_path_factory):
    """The tiny teacher exported without graph fusion (what static QDQ quantizes)."""
    from compress.export import ExportConfig, export

    return export(ExportConfig(model=str(tiny_teacher), out=str(tmp_path_factory.mktemp("onnx") / "plain"),
                               optimize="none", max_examples=100))


def test_torch_dynamic_int8_is_small_and_round_trips(tiny_teacher, tmp_path):
    import torch

    from compress.models import load_classifier
    from compress.quantize.torch_int8 import quantize_model
    from compress.runners import load_runner

    out = run(tiny_teacher, tmp_path / "q", "torch-dynamic-int8")
    m = read_manifest(out)
    assert m["format"] == "torch-int8" and m["method"] == "torch-dynamic-int8"
    # 2 layers x 6 Linear + pooler; the classifier head stays fp32.
    assert m["quantization"]["quantized"] == {"Linear": 13, "Embedding": 1}
    assert any(s["module"] == "classifier" for s in m["quantization"]["skipped"])
    assert weights_size(out) < 0.5 * weights_size(tiny_teacher)
    assert after(out)["agreement"] >= 0.9

    runner = load_runner(out)
    assert runner.format == "torch-int8"
    model, tok = load_classifier(tiny_teacher)
    quantize_model(model, [], per_channel=True)  # the default scheme
    batch = tok(["a fine film", "dull, flat and far too long"], padding=True, return_tensors="np")
    batch = {k: v.astype(np.int64) for k, v in batch.items()}
    with torch.inference_mode():
        expected = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
    np.testing.assert_allclose(runner.logits(batch), expected, atol=1e-6)


def test_ort_dynamic_int8_from_pytorch_quantizes_matmul_attention_and_embeddings(tiny_teacher, tmp_path):
    from compress.runners import load_runner

    # The fused graph (QAttention, QEmbedLayerNormalization) needs DefaultTensorType to quantize.
    out = run(tiny_teacher, tmp_path / "q", "ort-dynamic-int8", per_channel=True, optimize="transformer")
    m = read_manifest(out)
    assert m["format"] == "onnx" and m["onnx_file"] == "model_int8.onnx"
    assert m["quantization"]["source_graph"]["fused"] is True
    # Fused graph: 2 attention blocks, the embedding block, 2 x 3 dense MatMuls + pooler.
    assert m["quantization"]["quantized"] == {"Attention": 2, "EmbedLayerNormalization": 1, "MatMul": 7}
    # 3.5x on the real teacher; on this 0.8 MB model the nodes of split LayerNorms (a few KB) show.
    assert m["metrics"]["compression"] >= 3.4
    assert after(out)["agreement"] >= 0.9
    assert load_runner(out).format == "onnx"


def test_ort_dynamic_int8_on_unfused_graph_quantizes_gathers(onnx_plain, tmp_path):
    out = run(onnx_plain, tmp_path / "q", "ort-dynamic-int8")
    m = read_manifest(out)
    # word, position and token-type embedding tables; 12 weight MatMuls + pooler (Gemm -> MatMul).
    assert m["quantization"]["quantized"] == {"Gather": 3, "MatMul": 13}
    # Less than the fused graph's 3.5x: on a 64-wide model biases, LayerNorms and shape
    # constants of the unfused graph are a visible share of the bytes.
    assert weights_size(onnx_plain) / weights_size(out) >= 2.9
    assert after(out)["agreement"] >= 0.9


@pytest.fixture(scope="module")
def static_int8(onnx_plain, tmp_path_factory):
    """The tiny export quantized with each calibration method."""
    root = tmp_path_factory.mktemp("static")
    return {c: run(onnx_plain, root / c, "ort-static-int8", calib_method=c, **CALIB)
            for c in ("minmax", "entropy", "percentile")}


@pytest.mark.parametrize("calib", ["minmax", "entropy", "percentile"])
def test_ort_static_int8_calibration_methods(static_int8, calib):
    out = static_int8[calib]
    m = read_manifest(out)
    # 12 weight MatMuls + 4 attention MatMuls, 3 embedding Gathers, the pooler Gemm.
    assert m["quantization"]["quantized"] == {"Gather": 3, "Gemm": 1, "MatMul": 16}
    cal = m["calibration"]
    assert cal["n"] == 32 and cal["method"] == calib and cal["split"] == "train" and len(cal["fingerprint"]) == 16
    assert after(out)["agreement"] >= 0.9


def activation_scales(out) -> dict[str, float]:
    """Scale of every activation QuantizeLinear in a QDQ model (weights are stored pre-quantized)."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(out / "model_int8.onnx")).graph
    init = {i.name: i for i in g.initializer}
    return {n.input[0]: float(numpy_helper.to_array(init[n.input[1]]).ravel()[0]) for n in g.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in init}


def test_the_three_calibration_methods_choose_different_ranges(static_int8):
    # quantize_static's own entropy calibrator (128 bins) returns minmax's ranges; ours must not.
    scales = {c: activation_scales(out) for c, out in static_int8.items()}
    assert scales["minmax"].keys() == scales["entropy"].keys() == scales["percentile"].keys()
    names = sorted(scales["minmax"])
    mm, en, pc = (np.array([scales[c][n] for n in names]) for c in ("minmax", "entropy", "percentile"))
    # Entropy and percentile clip outliers: never wider than minmax, and narrower for some tensors
    # (before the fix, entropy's ranges were minmax's, bit for bit). Which tensors entropy clips
    # varies between runs on this tiny model (its KL curves are flat), so only that is asserted.
    assert np.all(en <= mm * (1 + 1e-6)) and np.any(en < mm * 0.99)
    assert np.all(pc <= mm * (1 + 1e-6)) and np.any(pc < mm * 0.99)
    assert not np.allclose(en, pc)


@pytest.mark.parametrize("method", ["bnb-int8", "bnb-nf4", "bnb-fp4"])
def test_bnb_skips_the_head_and_loads(tiny_teacher, tmp_path, method):
    pytest.importorskip("bitsandbytes")
    from compress.runners import load_runner

    out = run(tiny_teacher, tmp_path / "q", method, device="cpu")
    m = read_manifest(out)
    assert m["format"] == "bnb" and m["quantization"]["quantized"] == {"Linear": 13}
    assert [s["module"] for s in m["quantization"]["skipped"]] == ["classifier"]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"
    assert load_runner(out).format == "bnb"
    assert after(out)["agreement"] >= 0.9


def test_bf16_cast(tiny_teacher, tmp_path):
    from compress.runners import load_runner

    out = run(tiny_teacher, tmp_path / "q", "bf16", device="cpu")
    m = read_manifest(out)
    assert m["format"] == "pytorch" and m["dtype"] == "bf16"
    assert weights_size(out) < 0.55 * weights_size(tiny_teacher)
    assert load_runner(out).format == "pytorch-bf16"
    assert after(out)["agreement"] >= 0.9


def test_auto_keeps_the_fastest_that_meets_the_tolerance(onnx_plain, tmp_path):
    out = run(onnx_plain, tmp_path / "q", "auto", max_drop="100", **CALIB)
    m = read_manifest(out)
    rows = [r for r in m["tuning"]["auto"] if r["method"] != "fp32"]
    assert {r["method"] for r in rows} == {"ort-dynamic-int8", "ort-static-int8"}  # ONNX input: ORT methods only
    assert m["method"] == min(rows, key=lambda r: r["p50_ms"])["method"]
    assert m["metrics"]["latency"]["p50_ms"] > 0 and (out / "tuning.md").is_file()


# --------------------------------------------------------------------------- bad input

def _fails(argv, out, code=2):
    assert main(argv + ["--out", str(out)]) == code
    assert not out.exists()


def test_unknown_method_lists_the_known_ones(tiny_teacher, tmp_path, capsys):
    _fails(["quantize", "--model", str(tiny_teacher), "--method", "int3"], tmp_path / "q")
    err = capsys.readouterr().err
    assert "int3" in err and "ort-dynamic-int8" in err and "torch-dynamic-int8" in err


def test_calibration_set_too_small_or_too_large(onnx_plain, tmp_path, capsys):
    _fails(["quantize", "--model", str(onnx_plain), "--method", "ort-static-int8", "--calib-samples", "4"], tmp_path / "a")
    assert "too small" in capsys.readouterr().err
    _fails(["quantize", "--model", str(onnx_plain), "--method", "ort-static-int8", "--calib-samples", "500",
            "--max-examples", "100"], tmp_path / "b")
    assert "more examples than the training split" in capsys.readouterr().err


def test_method_needs_matching_input_and_device(onnx_plain, tiny_teacher, tmp_path, capsys):
    import torch

    _fails(["quantize", "--model", str(onnx_plain), "--method", "torch-dynamic-int8"], tmp_path / "a")
    assert "ONNX artifact" in capsys.readouterr().err
    if not torch.cuda.is_available():
        _fails(["quantize", "--model", str(tiny_teacher), "--method", "fp16"], tmp_path / "b")
        assert "CUDA" in capsys.readouterr().err


def test_bad_max_drop(tiny_teacher, tmp_path, capsys):
    _fails(["quantize", "--model", str(tiny_teacher), "--method", "bf16", "--max-drop", "a lot"], tmp_path / "q")
    assert "max_drop" in capsys.readouterr().err


# --------------------------------------------------------------------------- CUDA

@pytest.mark.gpu
@pytest.mark.parametrize("method", ["fp16", "bnb-nf4", "bnb-int8"])
def test_cuda_methods(tiny_teacher, tmp_path, method):
    from compress.runners import load_runner

    out = run(tiny_teacher, tmp_path / "q", method, device="cuda")
    m = read_manifest(out)
    assert m["format"] == ("pytorch" if method == "fp16" else "bnb")
    assert load_runner(out, device="cuda").device == "cuda"
    assert after(out)["agreement"] >= 0.9
