"""Causal language models: text data, packing, sliding-window perplexity, GPT-2 and Llama
specs, local checkpoints, training, eval, generate, seeds, resume, and bad input."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from compress.cli import main
from compress.data import DataConfig

from conftest import TINY_LM_SPEC, hamlet_path, tiny_lm_train


# --------------------------------------------------------------------------- data


def test_text_file_splits_by_position_and_packs_blocks():
    from compress.lm_data import encode_text, load_text
    from compress.models import train_byte_bpe

    data = load_text(DataConfig(dataset=str(hamlet_path()), task="causal-lm"))
    text = hamlet_path().read_text()
    parts = [data[s]["text"][0] for s in ("train", "validation", "test")]
    assert "".join(parts) == text  # nothing lost, nothing repeated, in order
    assert 0.89 < len(parts[0]) / len(text) < 0.91
    tok = train_byte_bpe(parts[:1], vocab_size=500)
    enc = encode_text(data, tok, block=32)
    blocks = enc["train"].blocks
    assert blocks.shape[1] == 32 and len(blocks) == len(enc["train"])
    stream = np.concatenate([tok(parts[0], add_special_tokens=False)["input_ids"], [tok.eos_token_id]])
    assert np.array_equal(blocks.reshape(-1), stream[:blocks.size])  # packed in order, EOS at the end
    batch = enc["train"].collate(np.array([0, 3]))
    assert set(batch) == {"input_ids", "labels"} and tuple(batch["input_ids"].shape) == (2, 32)
    assert enc["test"].chars == len(parts[2]) + 1


def test_text_directory_and_jsonl_sources(tmp_path):
    from compress.lm_data import load_text

    d = tmp_path / "named"
    d.mkdir()
    for s in ("train", "validation", "test"):
        (d / f"{s}.txt").write_text(f"{s} text line one\nline two\n")
    data = load_text(DataConfig(dataset=str(d), task="causal-lm"))
    assert [data[s]["text"][0].split()[0] for s in ("train", "validation", "test")] == ["train", "validation", "test"]

    many = tmp_path / "many"
    many.mkdir()
    for i in range(40):
        (many / f"doc{i:02d}.txt").write_text(f"document {i}\n")
    data = load_text(DataConfig(dataset=str(many), task="causal-lm"))
    counts = [len(data[s]) for s in ("train", "validation", "test")]
    assert counts == [36, 2, 2]
    seen = [t for s in ("train", "validation", "test") for t in data[s]["text"]]
    assert len(set(seen)) == 40  # each document in exactly one split

    rows = tmp_path / "docs.jsonl"
    rows.write_text("".join(json.dumps({"body": f"row {i} " * 5}) + "\n" for i in range(30)))
    data = load_text(DataConfig(dataset=str(rows), task="causal-lm", text_column="body"))
    assert sum(len(data[s]) for s in ("train", "validation", "test")) == 30


def test_sliding_windows_score_every_token_once():
    from compress.lm_data import TokenStream

    for n, block, stride in [(100, 16, 8), (100, 16, 16), (17, 16, 4), (5, 16, 8), (64, 16, 1)]:
        windows = TokenStream(np.arange(n), chars=n, block=block, stride=stride).windows()
        scored = [t for b, e, first in windows for t in range(first, e)]
        assert scored == list(range(1, n)), (n, block, stride)
        for b, e, first in windows:
            assert e - b <= block and b <= first - 1
            assert first - b >= min(max(block - stride, 1), first)  # at least block - stride tokens of context


def test_perplexity_matches_the_models_own_loss(tiny_lm):
    """One window over a short text: our NLL is exactly the mean loss transformers computes."""
    import torch

    from compress.lm_data import TokenStream
    from compress.models import load_causal_lm
    from compress.tasks.causal_lm import score_stream, torch_nll_fn

    model, tok = load_causal_lm(tiny_lm)
    model.eval()
    ids = np.asarray(tok("Horatio: the king doth wake tonight and takes his rouse.")["input_ids"], dtype=np.int64)
    m = score_stream(torch_nll_fn(model), TokenStream(ids, chars=10, block=64, stride=32), batch_size=4)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)[None], labels=torch.from_numpy(ids)[None]).loss.item()
    assert m["nll"] == pytest.approx(ref, abs=1e-5) and m["tokens"] == len(ids) - 1
    assert m["perplexity"] == pytest.approx(math.exp(ref), rel=1e-4)
    assert m["bits_per_char"] == pytest.approx(ref * (len(ids) - 1) / math.log(2) / 10, rel=1e-4)


# --------------------------------------------------------------------------- models


def test_specs_build_gpt2_and_llama_with_gqa():
    from compress.models import causal_lm_config, parse_size_spec, train_byte_bpe

    tok = train_byte_bpe(["some text to learn a few merges from, some text."] * 20, vocab_size=300)
    spec = parse_size_spec("llama:layers=2,hidden=64,heads=4,kv_heads=2,ff=160")
    cfg = causal_lm_config("llama", spec, tok)
    assert (cfg.num_key_value_heads, cfg.num_attention_heads, cfg.intermediate_size) == (2, 4, 160)
    assert cfg.tie_word_embeddings and cfg.eos_token_id == tok.eos_token_id
    g = causal_lm_config("gpt2", parse_size_spec("gpt2:layers=3,hidden=96,heads=3"), tok)
    assert (g.n_layer, g.n_embd, g.n_head, g.n_inner) == (3, 96, 3, 384)
    from compress.errors import UserError

    with pytest.raises(UserError, match="kv_heads"):
        parse_size_spec("gpt2:layers=2,kv_heads=2")  # gpt2 has no grouped-query attention
    with pytest.raises(UserError, match="not divisible by kv_heads"):
        parse_size_spec("llama:heads=4,kv_heads=3")


def test_byte_bpe_is_deterministic_and_lossless():
    from compress.models import train_byte_bpe

    texts = [hamlet_path().read_text()[:20000]]
    a, b = train_byte_bpe(texts, 400), train_byte_bpe(texts, 400)
    assert a.get_vocab() == b.get_vocab()
    s = "Ophelia — «nymph», in thy orisons 😀"
    assert a.decode(a(s)["input_ids"]) == s  # byte-level: nothing is unknown


def test_llama_spec_trains_and_checkpoints_finetune(tmp_path):
    """A Llama spec (GQA) trains; its output directory fine-tunes as a local checkpoint."""
    out = tiny_lm_train(tmp_path / "llama", model="llama:layers=2,hidden=64,heads=4,kv_heads=2,vocab=600",
                        max_steps=6, eval_every=6)
    m = json.loads((out / "manifest.json").read_text())
    assert m["task"] == "causal-lm" and m["metrics"]["steps"] == 6
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_key_value_heads"] == 2
    tuned = tiny_lm_train(tmp_path / "tuned", model=str(out), task=None, max_steps=4, lr=1e-3)
    mt = json.loads((tuned / "manifest.json").read_text())
    assert mt["task"] == "causal-lm" and mt["parent"] == str(out)
    assert mt["metrics"]["test"]["perplexity"] < m["metrics"]["test"]["perplexity"]


def test_plain_hf_gpt2_directory_loads(tmp_path):
    """A save_pretrained GPT-2 (no manifest) is recognised as a causal LM by its architectures."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from compress.models import train_byte_bpe

    tok = train_byte_bpe([hamlet_path().read_text()[:50000]], 500)
    d = tmp_path / "hf-gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=128,
                               eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)).save_pretrained(d)
    tok.save_pretrained(d)
    out = tmp_path / "tuned"
    code = main(["train", "--model", str(d), "--dataset", str(hamlet_path()), "--max-length", "64",
                 "--max-steps", "3", "--no-progress", "--precision", "fp32", "--out", str(out)])
    assert code == 0 and json.loads((out / "manifest.json").read_text())["task"] == "causal-lm"


# --------------------------------------------------------------------------- train, eval, generate


def test_trained_lm_artifact(tiny_lm):
    names = {p.name for p in tiny_lm.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "manifest.json", "loss.svg"} <= names
    m = json.loads((tiny_lm / "manifest.json").read_text())
    test = m["metrics"]["test"]
    assert m["task"] == "causal-lm" and set(test) == {"perplexity", "nll", "bits_per_char", "tokens", "chars"}
    # Better than uniform over the 1000-token vocabulary, and consistent with its own NLL.
    assert test["perplexity"] < 1000 and test["perplexity"] == pytest.approx(math.exp(test["nll"]), rel=1e-3)
    assert 0 < test["bits_per_char"] < 8 and m["metrics"]["train_tokens_per_s"] > 0
    svg = (tiny_lm / "loss.svg").read_text()
    assert svg.startswith("<svg") and "validation NLL" in svg and "<path" in svg


def test_eval_of_lm_matches_manifest_and_reports_json(tiny_lm, tmp_path, capsys):
    out = tmp_path / "m.json"
    code = main(["eval", "--model", str(tiny_lm), "--dataset", str(hamlet_path()), "--max-length", "64",
                 "--out", str(out)])
    assert code == 0
    r = json.loads(out.read_text())
    m = json.loads((tiny_lm / "manifest.json").read_text())["metrics"]["test"]
    assert r["task"] == "causal-lm" and r["perplexity"] == pytest.approx(m["perplexity"], rel=1e-4)
    assert r["tokens"] == m["tokens"]
    capsys.readouterr()
    # A different stride scores the same tokens with more context: same count, lower or equal NLL.
    main(["eval", "--model", str(tiny_lm), "--dataset", str(hamlet_path()), "--max-length", "64", "--stride", "16",
          "--out", str(out)])
    r16 = json.loads(out.read_text())
    assert r16["tokens"] == r["tokens"] and r16["nll"] < r["nll"] + 0.05


def test_generate_streams_and_is_seeded(tiny_lm, capsys):
    from compress.generate import GenerateConfig, generate

    base = dict(model=str(tiny_lm), prompt="To be, or not to be", max_new_tokens=12)
    greedy = [generate(GenerateConfig(**base, temperature=0, stream=False)) for _ in range(2)]
    assert greedy[0] == greedy[1] and greedy[0]
    a = generate(GenerateConfig(**base, seed=3, stream=False))
    b = generate(GenerateConfig(**base, seed=3, stream=False))
    assert a == b
    capsys.readouterr()
    code = main(["generate", "--model", str(tiny_lm), "--prompt", "HAMLET.", "--max-new-tokens", "8", "--seed", "1"])
    printed = capsys.readouterr().out
    assert code == 0 and printed.startswith("HAMLET.") and len(printed) > len("HAMLET.\n")


def test_same_seed_same_perplexity(tmp_path):
    a = tiny_lm_train(tmp_path / "a", max_steps=8)
    b = tiny_lm_train(tmp_path / "b", max_steps=8)
    ma, mb = (json.loads((p / "manifest.json").read_text())["metrics"] for p in (a, b))
    assert ma["test"] == mb["test"] and ma["validation"] == mb["validation"]


def _lm_cmd(out, *extra):
    return [sys.executable, "-m", "compress", "train", "--model", TINY_LM_SPEC, "--dataset", str(hamlet_path()),
            "--max-length", "64", "--batch-size", "8", "--max-steps", "60", "--eval-every", "30", "--lr", "0.003",
            "--precision", "fp32", "--threads", "1", "--checkpoint-every", "5", "--no-progress", "--out", str(out),
            *extra]


def test_kill_9_then_resume_equals_uninterrupted(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    r = subprocess.run(_lm_cmd(ref), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out, work = tmp_path / "run", tmp_path / "run.work"
    proc = subprocess.Popen(_lm_cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            if json.loads((work / "checkpoint" / "state.json").read_text())["step"] >= 35:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("no checkpoint past step 35 within the time limit")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    r = subprocess.run(_lm_cmd(out, "--resume"), env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "resuming from step" in r.stdout, r.stderr[-2000:]
    got, want = (json.loads((p / "manifest.json").read_text())["metrics"] for p in (out, ref))
    assert got["steps"] == want["steps"] == 60
    assert got["test"] == want["test"] and got["validation"] == want["validation"]


# --------------------------------------------------------------------------- bad input


def _bad(args, message, tmp_path, capsys, verb="train"):
    out = tmp_path / "out"
    code = main([verb, *args, "--out", str(out)] if verb != "generate" else [verb, *args])
    err = " ".join(capsys.readouterr().err.split())  # the CLI wraps its message at 100 columns
    assert code == 2 and message in err and "Traceback" not in err, (args, err)
    assert not out.exists()
    return err


def test_lm_bad_input(tmp_path, capsys, tiny_lm, tiny_teacher):
    short = tmp_path / "short.txt"
    short.write_text("".join(f"line {i} of a short text\n" for i in range(30)))
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"body": "x " * 20}) + "\n" for i in range(10)))
    lm = ["--model", TINY_LM_SPEC, "--task", "causal-lm", "--max-length", "64"]
    _bad([*lm[:-1], "1000", "--dataset", str(short)], "too short for one block", tmp_path, capsys)
    _bad([*lm, "--dataset", str(empty)], "is empty", tmp_path, capsys)
    err = _bad([*lm, "--dataset", str(rows)], "no column 'text'", tmp_path, capsys)
    assert "body" in err  # names the columns that exist
    _bad(["--model", str(tiny_teacher), "--task", "causal-lm", "--dataset", str(hamlet_path())],
         "sequence classifier", tmp_path, capsys)
    _bad(["--model", str(tiny_lm), "--task", "classification", "--max-examples", "20"], "causal language model",
         tmp_path, capsys)
    _bad(["--model", "bert:layers=1,hidden=32,heads=2", "--task", "causal-lm", "--dataset", str(hamlet_path())],
         "not a causal", tmp_path, capsys)
    _bad(["--model", "gpt2:layers=1,hidden=32,heads=2,max_len=32", "--dataset", str(hamlet_path()),
          "--max-length", "64"], "longer than the model's 32 positions", tmp_path, capsys)
    _bad(["--model", str(tiny_lm), "--prompt", "hi", "--max-new-tokens", "5000"], "positions", tmp_path, capsys,
         verb="generate")
    _bad(["--model", str(tiny_teacher), "--prompt", "hi"], "needs a causal language model", tmp_path, capsys,
         verb="generate")


def test_tokenizer_without_eos_is_refused(tmp_path, capsys, tiny_lm):
    import shutil

    d = tmp_path / "no-eos"
    shutil.copytree(tiny_lm, d)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        p = d / name
        cfg = json.loads(p.read_text())
        for key in ("eos_token", "bos_token", "unk_token", "pad_token"):
            cfg.pop(key, None)
        p.write_text(json.dumps(cfg))
    (d / "manifest.json").unlink()
    _bad(["--model", str(d), "--dataset", str(hamlet_path()), "--max-length", "64"], "no EOS token", tmp_path, capsys)
