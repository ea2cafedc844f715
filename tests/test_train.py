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
