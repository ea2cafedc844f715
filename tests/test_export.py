"""`compress export`: ONNX graphs that match PyTorch on real padded batches, fused or not."""

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from compress.cli import main
from compress.errors import GateFailed
from compress.export import ExportConfig, check_parity, convert_to_fp16, export, parity_cases
from compress.ort_settings import (DENORMAL_AS_ZERO, DISABLE_OPTIMIZERS, SKIP_LAYER_NORM_FUSION, choose_skip_layer_norm,
                                   session_options)
from compress.runners import load_runner
from compress.runners.ort import OrtRunner

# Small slices keep each export to a few seconds; the gate still sees every batch shape. One
# thread: tiny models gain nothing from more, and OpenMP threads stall on a busy machine.
FAST = dict(max_examples=120, parity_examples=40, threads=1)


@pytest.fixture(scope="module")
def plain(tiny_teacher, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "plain"
    return export(ExportConfig(model=str(tiny_teacher), out=str(out), optimize="none", **FAST))


@pytest.fixture(scope="module")
def fused(tiny_teacher, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "fused"
    return export(ExportConfig(model=str(tiny_teacher), out=str(out), optimize="transformer", skip_layer_norm="fuse",
                               **FAST))


@pytest.fixture(scope="module")
def split(tiny_teacher, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "split"
    return export(ExportConfig(model=str(tiny_teacher), out=str(out), optimize="transformer", skip_layer_norm="split",
                               flush_denormals=False, **FAST))


@pytest.fixture(scope="module")
def cases(tiny_teacher):
    """The gate's batches with the PyTorch logits they must reproduce."""
    from compress.data import DataConfig, encode, load_data
    from compress.runners import TorchRunner

    torch_runner = TorchRunner(tiny_teacher, threads=1)
    split = encode(load_data(DataConfig(max_examples=120)), torch_runner.tokenizer, 128,
                   splits=("validation",))["validation"]
    result = parity_cases(split, torch_runner.tokenizer, 40, 128)
    for case in result:
        case.reference = torch_runner.logits(case.batch).astype(np.float64)
    return result


def manifest(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def test_plain_export_is_self_contained_with_dynamic_axes(plain):
    m = manifest(plain)
    assert m["format"] == "onnx" and m["onnx_file"] == "model.onnx" and m["exporter"] == "optimum"
    assert m["opset"] == 18 and m["optimize"] == "none" and m["fused"] is False
    assert m["ort_session_config"][DENORMAL_AS_ZERO] == "1"
    assert {"model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in plain.iterdir()}
    gate = m["parity"]["exported"]
    assert gate["max_abs_diff"] <= 1e-4 and gate["label_disagreements"] == 0 and "optimized" not in m["parity"]
    # 40 examples at batch sizes 32, 8 and 1, plus a length-1 batch of 8 and a max-length batch of 8.
    assert gate["rows"] == 3 * 40 + 8 + 8
    assert set(gate["worst_by_batch_size"]) == {"batch32", "batch8", "batch1", "length1", "max_length128"}
    graph = onnx.load(str(plain / "model.onnx")).graph
    for inp in graph.input:
        assert [d.dim_param for d in inp.type.tensor_type.shape.dim] == ["batch_size", "sequence_length"]
    assert m["fused_operators"]["after"] == m["fused_operators"]["before"]
    assert "Attention" not in m["fused_operators"]["after"]


def test_transformer_fusion_counts_match_layers(fused, tiny_teacher):
    layers = json.loads((tiny_teacher / "config.json").read_text())["num_hidden_layers"]
    m = manifest(fused)
    assert m["optimize"] == "transformer" and m["fused"] is True
    after = m["fused_operators"]["after"]
    assert after["Attention"] == layers
    assert after["SkipLayerNormalization"] == 2 * layers  # after attention and after the feed-forward block
    assert after["EmbedLayerNormalization"] == 1
    assert m["fused_operators"]["before"].get("Attention", 0) == 0
    for name in ("exported", "optimized"):
        assert m["parity"][name]["max_abs_diff"] <= 1e-4
        assert m["parity"][name]["label_disagreements"] == 0
    graph_ops = {n.op_type for n in onnx.load(str(fused / "model.onnx")).graph.node}
    assert {"Attention", "SkipLayerNormalization"} <= graph_ops


def runtime_ops(path: Path, config: dict, tmp_path: Path) -> Counter:
    """The operators of the graph ONNX Runtime actually runs, after its session-time fusions."""
    import onnxruntime as ort

    options = session_options(1, config)
    options.optimized_model_filepath = str(tmp_path / "runtime.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(tmp_path / "runtime.onnx")).graph.node)


def test_split_skip_layer_norm_stays_split_at_run_time(split, fused, tiny_teacher, cases, tmp_path):
    layers = json.loads((tiny_teacher / "config.json").read_text())["num_hidden_layers"]
    m = manifest(split)
    assert m["skip_layer_norm"]["choice"] == "split"
    assert m["ort_session_config"] == {DISABLE_OPTIMIZERS: SKIP_LAYER_NORM_FUSION}  # and no denormal flushing
    after = m["fused_operators"]["after"]
    assert "SkipLayerNormalization" not in after and after["LayerNormalization"] == 2 * layers
    assert after["Attention"] == layers and m["parity"]["optimized"]["max_abs_diff"] <= 1e-4
    # ONNX Runtime would fuse them again when the session starts; the manifest's config stops it.
    assert runtime_ops(split / "model.onnx", {}, tmp_path)["SkipLayerNormalization"] == 2 * layers
    kept = runtime_ops(split / "model.onnx", m["ort_session_config"], tmp_path)
    assert kept["SkipLayerNormalization"] == 0 and kept["LayerNormalization"] == 2 * layers
    runner = load_runner(split, threads=1)
    assert runner.session_config == m["ort_session_config"]
    np.testing.assert_allclose(runner.logits(cases[0].batch), load_runner(fused, threads=1).logits(cases[0].batch),
                               atol=1e-5)
    assert manifest(fused)["ort_session_config"] == {DENORMAL_AS_ZERO: "1"}


def test_auto_skip_layer_norm_times_both_kernels():
    fuse, info = choose_skip_layer_norm("auto", 64, "cpu", 1)
    assert info["fused_us"] > 0 and info["split_us"] > 0
    assert fuse == (info["choice"] == "fuse") == (info["split_us"] > 0.9 * info["fused_us"])
    assert choose_skip_layer_norm("auto", 64, "cuda", 1) == (True, {"choice": "fuse", "how": "auto: the fused kernel on CUDA"})
    assert choose_skip_layer_norm("split", 64, "cpu", 1)[0] is False


def test_optimum_ort_model_agrees_with_our_runner(fused, cases):
    import torch
    from optimum.onnxruntime import ORTModelForSequenceClassification

    ort_model = ORTModelForSequenceClassification.from_pretrained(fused)
    runner = load_runner(fused, threads=1)
    assert isinstance(runner, OrtRunner) and runner.format == "onnx"
    for case in cases[:1] + cases[-2:]:  # batch32, length1, max_length
        ours = runner.logits(case.batch)
        theirs = ort_model(**{k: torch.from_numpy(v) for k, v in case.batch.items()}).logits.numpy()
        np.testing.assert_allclose(ours, theirs, atol=1e-6)
        assert (ours.argmax(-1) == case.reference.argmax(-1)).all()


def test_tiny_atol_fails_the_gate_and_leaves_nothing(tiny_teacher, tmp_path):
    out = tmp_path / "strict"
    with pytest.raises(GateFailed) as info:
        export(ExportConfig(model=str(tiny_teacher), out=str(out), optimize="transformer", atol=1e-12, **FAST))
    message = str(info.value)
    assert "atol 1e-12" in message and "largest |logit difference|" in message and "row" in message
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_corrupted_weight_fails_the_gate_with_label_disagreements(plain, cases, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(plain, broken)
    model = onnx.load(str(broken / "model.onnx"))
    # Swapping the classifier's two output rows flips every prediction.
    weight = next(t for t in model.graph.initializer if "classifier.weight" in t.name)
    values = onnx.numpy_helper.to_array(weight)
    weight.CopyFrom(onnx.numpy_helper.from_array(values[::-1].copy(), weight.name))
    onnx.save(model, str(broken / "model.onnx"))
    with pytest.raises(GateFailed) as info:
        check_parity(OrtRunner(broken, threads=1), cases, 1e-4, "corrupted")
    assert "predicted labels differ" in str(info.value)
    assert check_parity(OrtRunner(plain, threads=1), cases, 1e-4, "intact")["label_disagreements"] == 0


def test_runner_honours_manifest_file_and_plain_optimum_dirs(plain, cases, tmp_path):
    renamed = tmp_path / "renamed"
    shutil.copytree(plain, renamed)
    (renamed / "model.onnx").rename(renamed / "model_int8.onnx")
    m = manifest(renamed)
    m["onnx_file"] = "model_int8.onnx"
    (renamed / "manifest.json").write_text(json.dumps(m))
    bare = tmp_path / "bare"
    shutil.copytree(plain, bare)
    (bare / "manifest.json").unlink()
    batch = dict(cases[0].batch, labels=np.zeros(len(cases[0].reference)))  # extra keys are not fed
    for directory in (renamed, bare):
        runner = load_runner(directory, threads=1)
        assert runner.path.name == ("model_int8.onnx" if directory == renamed else "model.onnx")
        assert runner.config.num_labels == 2 and runner.tokenizer.pad_token_id == 0
        np.testing.assert_allclose(runner.logits(batch), cases[0].reference, atol=1e-4)


def test_fp16_conversion_keeps_fp32_io(plain, cases, tmp_path):
    # The CUDA gate is tested under the gpu marker; this checks the conversion itself on the CPU.
    half = tmp_path / "half"
    shutil.copytree(plain, half)
    convert_to_fp16(onnx.load(str(half / "model.onnx"))).save_model_to_file(str(half / "model.onnx"))
    graph = onnx.load(str(half / "model.onnx")).graph
    assert {i.type.tensor_type.elem_type for i in graph.input} == {onnx.TensorProto.INT64}
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert sum(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer) > 10
    assert check_parity(OrtRunner(half, threads=1), cases[:2], 1e-2, "fp16")["max_abs_diff"] <= 1e-2


def test_architecture_optimum_lacks_falls_back_to_torch_export(tiny_teacher, tmp_path):
    from transformers import AutoTokenizer, ErnieConfig, ErnieForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    src = tmp_path / "ernie"
    ErnieForSequenceClassification(ErnieConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=64,
                                               num_labels=2)).save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = export(ExportConfig(model=str(src), out=str(tmp_path / "out"), max_examples=60, parity_examples=16, threads=1))
    m = manifest(out)
    assert m["exporter"] == "torch.onnx" and m["optimize"] == "extended"  # no ORT fusion family for ernie
    assert m["parity"]["optimized"]["max_abs_diff"] <= 1e-4


def test_pruned_vocabulary_exports(tiny_teacher, tmp_path):
    from compress.data import DataConfig, load_data
    from compress.models import load_classifier
    from compress.distill.prune_vocab import prune_vocab

    model, tokenizer = load_classifier(tiny_teacher)
    texts = list(load_data(DataConfig(max_examples=60))["train"]["text"])
    src = tmp_path / "pruned"
    pruned, vocab = prune_vocab(model, tokenizer, tokenizer(texts)["input_ids"], directory=src)
    model.save_pretrained(src)
    out = export(ExportConfig(model=str(src), out=str(tmp_path / "out"), **FAST))
    assert vocab.new_size < 1000 and json.loads((out / "config.json").read_text())["vocab_size"] == vocab.new_size
    assert manifest(out)["parity"]["optimized"]["max_abs_diff"] <= 1e-4
    runner = load_runner(out, threads=1)
    assert runner.tokenizer(texts[:3])["input_ids"] == pruned(texts[:3])["input_ids"]


@pytest.mark.parametrize("extra, expected", [
    (["--opset", "9"], "opset"),
    (["--dtype", "fp16"], "fp16"),
    (["--atol", "0"], "atol"),
])
def test_bad_options_exit_2(tiny_teacher, tmp_path, capsys, extra, expected):
    out = tmp_path / "out"
    assert main(["export", "--model", str(tiny_teacher), "--out", str(out), *extra]) == 2
    assert expected in capsys.readouterr().err
    assert not out.exists()


def test_existing_output_needs_force(tiny_teacher, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert main(["export", "--model", str(tiny_teacher), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and list(out.iterdir()) == []


def test_source_that_is_not_a_model_exits_2(tmp_path, capsys):
    src = tmp_path / "notes"
    src.mkdir()
    (src / "readme.txt").write_text("not a model")
    assert main(["export", "--model", str(src), "--out", str(tmp_path / "out")]) == 2
    assert "not an artifact" in capsys.readouterr().err
    assert main(["export", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_onnx_source_and_unsupported_architecture_exit_2(plain, tiny_teacher, tmp_path, capsys):
    assert main(["export", "--model", str(plain), "--out", str(tmp_path / "out")]) == 2
    assert "fp32 PyTorch" in capsys.readouterr().err
    from transformers import AutoTokenizer, FNetConfig, FNetForSequenceClassification

    src = tmp_path / "fnet"
    FNetForSequenceClassification(FNetConfig(vocab_size=1500, hidden_size=32, num_hidden_layers=1,
                                             intermediate_size=64, num_labels=2)).save_pretrained(src)
    AutoTokenizer.from_pretrained(tiny_teacher).save_pretrained(src)
    assert main(["export", "--model", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "'fnet'" in err and "bert" in err and "roberta" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
def test_fp16_export_on_cuda(tiny_teacher, tmp_path):
    import onnxruntime as ort
    import torch

    if not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs a CUDA GPU and onnxruntime-gpu")
    out = export(ExportConfig(model=str(tiny_teacher), out=str(tmp_path / "fp16"), dtype="fp16", device="cuda",
                              optimize="transformer", **FAST))
    m = manifest(out)
    assert m["dtype"] == "fp16" and m["device"] == "cuda"
    assert m["parity"]["fp16"]["max_abs_diff"] <= 1e-2 and m["parity"]["fp16"]["label_disagreements"] == 0
    assert m["parity"]["optimized"]["max_abs_diff"] <= 1e-4
    graph = onnx.load(str(out / "model.onnx")).graph
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)
    runner = load_runner(out, device="cuda")
    assert runner.session.get_providers()[0] == "CUDAExecutionProvider"
    assert m["versions"]["onnxruntime"] == ort.__version__

    from compress.bench import BenchConfig, bench

    results = bench(BenchConfig(artifacts=[str(out)], device="cuda", out=str(tmp_path / "b"), batch_sizes=[1],
                                seq_lens=[16], budget_s=0.15, min_iters=5, warmup=1, max_examples=120,
                                peak_probe=False, progress=False))
    (a,) = results["artifacts"]
    # onnxruntime's CUDA arena is invisible to torch's allocator; the device-wide figure is used.
    assert a["format"] == "onnx" and a["memory"]["model_memory_mb"] == a["memory"]["cuda_used_delta_mb"] > 0


def test_manifest_names_the_onnxruntime_that_runs(monkeypatch):
    # onnxruntime and onnxruntime-gpu can both be installed; the imported module decides.
    import types
    from importlib import metadata

    from compress.artifacts import library_versions

    other = types.ModuleType("onnxruntime")
    other.__version__ = "9.9.9"
    monkeypatch.setitem(sys.modules, "onnxruntime", other)
    assert library_versions()["onnxruntime"] == "9.9.9"
    monkeypatch.delitem(sys.modules, "onnxruntime")
    assert library_versions()["onnxruntime"] == metadata.version("onnxruntime")
