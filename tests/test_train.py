"""The train stage and the training loop: artifact layout, manifest, seed determinism,
resume after kill -9, refusing existing output, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from compress.cli import main
from compress.eval import EvalConfig, evaluate

from conftest import TINY_SPEC, tiny_train


def test_artifact_layout_and_manifest(tiny_teacher):
    names = {p.name for p in tiny_teacher.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "manifest.json", "train_log.jsonl"} <= names
    m = json.loads((tiny_teacher / "manifest.json").read_text())
    assert m["stage"] == "train" and m["format"] == "pytorch"
    assert m["config"]["model"] == TINY_SPEC and m["data"]["fingerprint"]
    assert m["versions"]["torch"] and "compress_commit" in m
    assert 0.4 < m["metrics"]["test"]["accuracy"] <= 1.0 and m["metrics"]["train_samples_per_s"] > 0
    cfg = json.loads((tiny_teacher / "config.json").read_text())
    assert cfg["id2label"] == {"0": "negative", "1": "positive"}
    assert not tiny_teacher.with_name("teacher.work").exists()


def test_eval_matches_manifest(tiny_teacher):
    r = evaluate(EvalConfig(model=str(tiny_teacher), max_examples=400))
    m = json.loads((tiny_teacher / "manifest.json").read_text())
    assert r["accuracy"] == pytest.approx(m["metrics"]["test"]["accuracy"], abs=1e-6)
    assert r["n"] == 400 and 0 <= r["macro_f1"] <= 1


def test_same_seed_same_metrics(tmp_path):
    a = tiny_train(tmp_path / "a", max_examples=200, epochs=1)
    b = tiny_train(tmp_path / "b", max_examples=200, epochs=1)
    ma, mb = (json.loads((p / "manifest.json").read_text())["metrics"] for p in (a, b))
    assert ma["test"] == mb["test"] and ma["validation"] == mb["validation"]


def test_existing_output_is_refused_and_force_replaces(tiny_teacher, capsys):
    code = main(["train", "--model", TINY_SPEC, "--out", str(tiny_teacher), "--max-examples", "50"])
    assert code == 2 and "already exists" in capsys.readouterr().err


def test_bad_model_inputs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "empty").mkdir()
    cases = [
        (["--model", str(tmp_path / "empty")], "no config.json"),
        (["--model", "./does/not/exist"], "does not exist"),
        (["--model", "bert:layers=2,hidden=30,heads=4"], "not divisible"),
        (["--model", "someone/some-model"], "offline"),
        (["--model", TINY_SPEC, "--dataset", "nope-dataset"], "offline"),
        (["--model", TINY_SPEC, "--lr", "-1"], "lr"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        t = time.perf_counter()
        code = main(["train", *args, "--out", str(out), "--max-examples", "40"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (args, err)
        assert not out.exists() and time.perf_counter() - t < 10


def _train_cmd(out, *extra):
    return [sys.executable, "-m", "compress", "train", "--model", TINY_SPEC, "--max-examples", "640",
            "--epochs", "3", "--batch-size", "16", "--lr", "0.002", "--precision", "fp32", "--threads", "1",
            "--checkpoint-every", "5", "--no-progress", "--out", str(out), *extra]


def test_kill_9_then_resume_finishes_with_valid_artifact(tmp_path):
    out = tmp_path / "run"
    work = tmp_path / "run.work"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_train_cmd(out), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # Wait until epoch 2 has started and a checkpoint exists, then kill -9.
    deadline = time.time() + 240
    while time.time() < deadline:
        state = work / "checkpoint" / "state.json"
        if state.is_file():
            try:
                if json.loads(state.read_text())["epoch"] >= 1:
                    break
            except (ValueError, KeyError):
                pass
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("no checkpoint in epoch 2 within the time limit")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # a killed run never leaves a finished-looking output
    assert not (work / "manifest.json").exists()

    # Without --resume the unfinished run is not silently discarded.
    r = subprocess.run(_train_cmd(out), env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "--resume" in r.stderr

    r = subprocess.run(_train_cmd(out, "--resume"), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from step" in r.stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["metrics"]["steps"] == 3 * 40  # 640 train examples / 16 per step, 3 epochs: nothing lost or repeated
    assert not work.exists()


def test_fast_dropout_drops_at_rate_p_keeps_the_mean_and_masks_its_gradient():
    import torch

    from compress.anatomy import dropout_keep_mask, fast_kernels

    keep, scale = dropout_keep_mask((1000, 1000), 0.1)
    assert abs(float(keep.float().mean()) - 0.9) < 2e-3  # 1e6 draws: the std of the mean is 3e-4
    assert abs(scale - 1 / 0.9) < 1e-4
    # Every 16-bit slice of the 64-bit draws is used: the last column is not biased either.
    assert abs(float(keep[:, -1].float().mean()) - 0.9) < 0.03

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.25), torch.nn.Dropout(0.0))
    original = model[1]
    with fast_kernels(model):
        assert type(model[1]) is not torch.nn.Dropout and isinstance(model[1], torch.nn.Dropout)
        assert model[2].p == 0.0 and type(model[2]) is torch.nn.Dropout  # nothing to speed up
        x = torch.ones(4000, 500, requires_grad=True)
        torch.manual_seed(3)
        y = model[1](x)
        torch.manual_seed(3)
        assert torch.equal(model[1](x), y)  # the global seed makes the masks repeatable
        assert abs(float((y == 0).float().mean()) - 0.25) < 2e-3
        assert abs(float(y.mean()) - 1.0) < 5e-3  # inverted dropout: the mean is kept
        y.sum().backward()
        assert torch.equal(x.grad, y.detach())  # d/dx of x * mask * scale at x = 1
        model.eval()
        assert torch.equal(model[1](x), x)
    assert model[1] is original and not original.training  # put back, in the state it was left in


def test_fast_kernels_train_bert_sdpa_attention_through_its_eager_parent_and_put_it_back():
    import torch
    from transformers import BertConfig, BertForSequenceClassification
    from transformers.models.bert.modeling_bert import BertSdpaSelfAttention, BertSelfAttention

    from compress.anatomy import fast_kernels

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     attn_implementation="sdpa")
    model = BertForSequenceClassification(cfg).eval()
    ids = torch.randint(5, 100, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding: the mask prepared for SDPA must work in the eager path too
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        with fast_kernels(model):
            attn = model.bert.encoder.layer[0].attention.self
            assert type(attn) is BertSelfAttention and type(attn.dropout) is not torch.nn.Dropout
            during = model(input_ids=ids, attention_mask=mask).logits
            model.train()
            assert model(input_ids=ids, attention_mask=mask).logits.shape == (3, 2)
    assert torch.allclose(before, during, atol=1e-5)
    assert all(type(layer.attention.self) is BertSdpaSelfAttention for layer in model.bert.encoder.layer)
    assert type(model.bert.encoder.layer[0].attention.self.dropout) is torch.nn.Dropout
