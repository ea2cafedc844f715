"""The real pretrained MiniLM on the real data, through train -> export -> int8 -> eval.
A couple of minutes on 2 cores: `bash scripts/test.sh -m slow`."""

import json

import pytest

pytestmark = pytest.mark.slow


def test_minilm_chain_on_real_data(tmp_path):
    from compress.artifacts import weights_size
    from compress.eval import EvalConfig, evaluate
    from compress.export import ExportConfig, export
    from compress.quantize import QuantizeConfig, quantize
    from compress.train import TrainConfig, train

    teacher = train(TrainConfig(model="minilm-l6", max_examples=1000, epochs=3, batch_size=32, lr=1e-4,
                                precision="fp32", progress=False, out=str(tmp_path / "teacher")))
    fp32 = json.loads((teacher / "manifest.json").read_text())["metrics"]["test"]
    assert fp32["accuracy"] > 0.72  # majority class is 0.59; measured 0.78 on 1,000 examples, 3 epochs

    onnx = export(ExportConfig(model=str(teacher), out=str(tmp_path / "onnx"), optimize="transformer",
                               parity_examples=32, max_examples=200))
    parity = json.loads((onnx / "manifest.json").read_text())["parity"]
    assert all(g["max_abs_diff"] <= 1e-4 and g["label_disagreements"] == 0 for g in parity.values())

    int8 = quantize(QuantizeConfig(model=str(onnx), method="ort-dynamic-int8", out=str(tmp_path / "int8"),
                                   max_examples=1000))
    assert weights_size(onnx) / weights_size(int8) >= 3.5
    q = evaluate(EvalConfig(model=str(int8), max_examples=1000))
    assert q["n"] == fp32["n"] and q["accuracy"] >= fp32["accuracy"] - 0.015
