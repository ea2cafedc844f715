"""Training under torchrun: 2 CPU processes (gloo) reach the same result as one process
with the same seed and global batch, and only rank 0 writes the artifact."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SPEC = "bert:layers=2,hidden=32,heads=2,ff=64,vocab=800,dropout=0"


def _train(out: Path, nproc: int, args: list[str] | None = None) -> subprocess.CompletedProcess:
    args = (args or ["train", "--model", SPEC, "--max-examples", "192", "--epochs", "1", "--batch-size", "32",
                     "--lr", "0.002"]) + ["--precision", "fp32", "--device", "cpu", "--threads", "1", "--out",
                                          str(out), "--no-progress", "--checkpoint-every", "0"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "compress", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "compress", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _losses(out: Path) -> list[float]:
    lines = (out / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if json.loads(line)["event"] == "epoch"]


def test_two_processes_match_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = _train(one, 1)
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = _train(two, 2)
    assert r2.returncode == 0, r2.stderr[-3000:]

    # Same structure; no stray run directories from either rank.
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    assert not list(tmp_path.glob("*.work")) and not list(tmp_path.glob(".*partial*"))

    l1, l2 = _losses(one), _losses(two)
    assert len(l1) == len(l2) >= 1
    # The global-batch loss agrees to float noise. (Raw weights are not compared: Adam moves a
    # weight by ~lr*sign(g) for a near-zero gradient, so noise of 1e-9 in g shows up as lr.)
    assert l2[-1] == pytest.approx(l1[-1], abs=1e-4), (l1, l2)

    m1 = json.loads((one / "manifest.json").read_text())["metrics"]
    m2 = json.loads((two / "manifest.json").read_text())["metrics"]
    assert m1["test"]["n"] == m2["test"]["n"] == 192  # every test example scored once across ranks
    assert abs(m1["test"]["accuracy"] - m2["test"]["accuracy"]) <= 0.02


def test_two_processes_match_one_causal_lm(tmp_path):
    """The same for a causal LM: packed blocks split across ranks, sliding-window scoring sharded."""
    from conftest import TINY_LM_SPEC, hamlet_path

    args = ["train", "--model", TINY_LM_SPEC, "--dataset", str(hamlet_path()), "--max-length", "64",
            "--max-steps", "12", "--batch-size", "16", "--lr", "0.003"]
    one, two = tmp_path / "one", tmp_path / "two"
    r1, r2 = _train(one, 1, args), _train(two, 2, args)
    assert r1.returncode == 0 and r2.returncode == 0, (r1.stderr[-2000:], r2.stderr[-3000:])
    assert (two / "tokenizer.json").read_text() == (one / "tokenizer.json").read_text()  # rank 0's, broadcast
    l1, l2 = _losses(one), _losses(two)
    assert l2[-1] == pytest.approx(l1[-1], abs=1e-4), (l1, l2)
    t1, t2 = (json.loads((d / "manifest.json").read_text())["metrics"]["test"] for d in (one, two))
    assert t1["tokens"] == t2["tokens"] and t2["perplexity"] == pytest.approx(t1["perplexity"], rel=1e-3)


def test_two_processes_match_one_lm_distillation(tmp_path, tiny_lm):
    """LM distillation under torchrun: each rank scores its share of the top-k cache into the
    shared memory maps, trains on its slice of each batch, and the result matches one process."""
    from conftest import hamlet_path

    args = ["distill", "--teacher", str(tiny_lm), "--student", "layers=1", "--dataset", str(hamlet_path()),
            "--max-length", "64", "--max-steps", "8", "--batch-size", "16", "--lr", "0.003", "--top-k", "16"]
    one, two = tmp_path / "one", tmp_path / "two"
    r1, r2 = _train(one, 1, args), _train(two, 2, args)
    assert r1.returncode == 0 and r2.returncode == 0, (r1.stderr[-2000:], r2.stderr[-3000:])
    l1, l2 = _losses(one), _losses(two)
    assert l2[-1] == pytest.approx(l1[-1], abs=1e-4), (l1, l2)
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (one, two))
    assert m1["teacher_cache"]["bytes_on_disk"] == m2["teacher_cache"]["bytes_on_disk"]
    assert m1["teacher_forward_calls"] == m2["teacher_forward_calls"] == {"training": 0}
    for key in ("metrics", "baseline"):
        t1, t2 = m1[key]["test"], m2[key]["test"]
        assert t1["tokens"] == t2["tokens"] and t2["perplexity"] == pytest.approx(t1["perplexity"], rel=1e-3)
    assert not list(tmp_path.glob("*.work"))
