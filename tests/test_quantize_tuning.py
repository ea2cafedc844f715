"""Accuracy-aware quantization: a deliberately sensitive model where one layer breaks in int8.

The fixture plants an outlier row (weights of 40) in layer 0's intermediate dense layer and
zeroes the matching column of the next layer, so the fp32 function is unchanged, but a
per-tensor int8 scale for that layer rounds every ordinary weight to zero. The row's bias of
-1e5 keeps its GELU output at 0: otherwise the next layer's input would carry an activation
outlier that breaks its own dynamic int8 scale too, by an amount that varies from one run of
the (thread-nondeterministic) tiny teacher to the next. The head is
re-centred and the data relabelled with the fp32 model's own predictions (fp32 accuracy
100%), so every prediction int8 flips is a lost accuracy point.
"""


import numpy as np
import pytest

from compress.artifacts import read_manifest
from compress.cli import main

BROKEN = "bert.encoder.layer.0.intermediate.dense"


@pytest.fixture(scope="module")
def sensitive(tiny_teacher, tmp_path_factory):
    import torch
    from transformers import AutoModelForSequenceClassification

    from compress.data import DataConfig, encode, load_data
    from compress.models import load_tokenizer
    from compress.runners import TorchRunner, score

    root = tmp_path_factory.mktemp("sensitive")
    model_dir, data_dir = root / "model", root / "data"
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_teacher)).eval()
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight[:, 0] = 0
        model.get_submodule(BROKEN).weight[0, :] = 40.0
        model.get_submodule(BROKEN).bias[0] = -1e5
    model.save_pretrained(model_dir)
    load_tokenizer(tiny_teacher).save_pretrained(model_dir)
    data = load_data(DataConfig(max_examples=100))
    enc = encode(data, TorchRunner(model_dir).tokenizer, 128)
    diff = np.concatenate([(lambda l: l[:, 1] - l[:, 0])(score(TorchRunner(model_dir), enc[s])) for s in enc])
    # Centre the decision boundary in the data and give the logits a spread of ~4.
    k, centre = 4.0 / float(diff.std()), float(np.median(diff))
    with torch.no_grad():
        model.classifier.weight.mul_(k)
        model.classifier.bias.mul_(k)
        model.classifier.bias[1] -= k * centre
    model.save_pretrained(model_dir)
    runner = TorchRunner(model_dir)
    data_dir.mkdir()
    for split, e in enc.items():
        df = data[split].to_pandas()
        df["label"] = np.where(score(runner, e).argmax(-1) == 1, "positive", "negative")
        df.to_csv(data_dir / f"{split}.csv", index=False)
    return model_dir, data_dir


def test_sensitive_layer_falls_back_and_is_explained(sensitive, tmp_path):
    model, data = sensitive
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(model), "--dataset", str(data), "--method", "torch-dynamic-int8",
                 "--no-per-channel", "--max-drop", "5", "--sensitivity-samples", "64", "--threads", "2", "--out", str(out)]) == 0
    m = read_manifest(out)
    steps = m["tuning"]["steps"]
    assert steps[0]["drop_points"] > 20  # plain per-tensor int8 breaks the planted layer
    assert m["fallback_layers"][0]["layer"] == BROKEN  # the planted layer is the first to fall back
    assert len(m["fallback_layers"]) <= 3 and steps[1]["drop_points"] < 20
    ranked = sorted(m["tuning"]["sensitivity"], key=lambda s: -s["logit_mse"])
    assert ranked[0]["layer"] == BROKEN and ranked[0]["logit_mse"] > 100 * ranked[1]["logit_mse"]
    assert m["tuning"]["goal_met"] and m["metrics"]["validation"]["drop_points"] <= 5
    assert BROKEN not in m["quantization"]["quantized_modules"]
    text = (out / "tuning.md").read_text()
    assert BROKEN in text and "Goal met." in text


def test_unreachable_goal_keeps_best_candidate_and_exits_3(sensitive, tmp_path, capsys):
    model, data = sensitive
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(model), "--dataset", str(data), "--method", "torch-dynamic-int8",
                 "--no-per-channel", "--max-drop", "1", "--max-fallback", "0", "--threads", "2", "--out", str(out)]) == 3
    m = read_manifest(out)  # the best candidate is still written
    assert m["tuning"]["goal_met"] is False and m["fallback_layers"] == []
    assert "Goal NOT met" in (out / "tuning.md").read_text()
    assert "could not keep the validation accuracy" in capsys.readouterr().err
