"""Bad input never ends in a traceback: a table of bad inputs for every verb, run through the
real CLI, and interrupts that must leave nothing that looks finished.

Each row of CASES runs `compress ARGV` and asserts the exit status, that the message names
the offending thing, that no traceback is printed, that nothing appears at `--out` and that
no file the user already had (the scene directory, the teacher) is touched. Most rows call
`compress.cli.main` in this process with file-descriptor capture (which also sees library
log lines and C-level prints); rows with `process=True` run `python -m compress` for real.
To add a row, append a `Case`; placeholders: {d} the scene directory (see `scene`), {teacher}
a trained tiny classifier, {lm} a trained tiny causal LM, {csv} a directory of train/validation/test CSVs, {out} a fresh
path for this row that must not exist afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from compress.cli import main
from conftest import TINY_SPEC

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}


@dataclass
class Case:
    name: str
    argv: list[str]
    exit: int
    says: str | tuple[str, ...]  # substrings the message must contain
    out: str = "{out}"  # must not exist afterwards (unless it is part of the scene, then untouched)
    process: bool = False  # run `python -m compress` in a subprocess instead of cli.main


TAG_RECIPE = """\
description: a recipe that tries to run a shell command
stages:
  teacher:
    type: train
    model: !!python/object/apply:os.system ["touch pwned"]
"""

CASES = [
    # train
    Case("train: --out under a file", ["train", "--model", TINY_SPEC, "--out", "{d}/somefile/x"], 2,
         ("{d}/somefile/x", "'{d}/somefile' is a file"), out="{d}/somefile/x", process=True),
    Case("train: --out exists", ["train", "--model", TINY_SPEC, "--out", "{d}/existing"], 2,
         ("{d}/existing", "already exists", "--force"), out="{d}/existing"),
    Case("train: model dir without weights and tokenizer", ["train", "--model", "{d}/config-only", "--out", "{out}"], 2,
         ("{d}/config-only", "no weights", "no tokenizer", "A complete model directory")),
    Case("train: pickled weights only", ["train", "--model", "{d}/pickled", "--out", "{out}"], 2,
         ("pytorch_model.bin", "safetensors only", "save_file")),
    Case("train: model dir without config.json", ["train", "--model", "{d}/notes", "--out", "{out}"], 2,
         "no config.json"),
    Case("train: malformed JSONL line", ["train", "--model", TINY_SPEC, "--dataset", "{d}/bad.jsonl", "--out", "{out}"],
         2, ("{d}/bad.jsonl", "line 2", "ends before its object is complete"), process=True),
    Case("train: malformed JSON document", ["train", "--model", TINY_SPEC, "--dataset", "{d}/bad.json", "--out", "{out}"],
         2, ("{d}/bad.json", "line 2", "Expecting ',' delimiter")),
    Case("train: JSONL line that is not an object",
         ["train", "--model", TINY_SPEC, "--dataset", "{d}/list.jsonl", "--out", "{out}"], 2, ("line 3", "not an object")),
    Case("train: CSV with a ragged row", ["train", "--model", TINY_SPEC, "--dataset", "{d}/ragged.csv", "--out", "{out}"],
         2, ("{d}/ragged.csv", "line 3")),
    Case("train: not UTF-8", ["train", "--model", TINY_SPEC, "--dataset", "{d}/latin1.csv", "--out", "{out}"], 2,
         ("{d}/latin1.csv", "not UTF-8")),
    Case("train: empty data file", ["train", "--model", TINY_SPEC, "--dataset", "{d}/empty.csv", "--out", "{out}"], 2,
         ("{d}/empty.csv", "no rows")),
    Case("train: unknown data file type", ["train", "--model", TINY_SPEC, "--dataset", "{d}/data.xml", "--out", "{out}"],
         2, ("data.xml", "unknown file type")),
    Case("train: missing text column", ["train", "--model", TINY_SPEC, "--dataset", "{csv}", "--out", "{out}"], 2,
         ("'text'", "review")),
    Case("train: impossible size spec", ["train", "--model", "bert:layers=2,hidden=30,heads=4", "--out", "{out}"], 2,
         "not divisible"),
    Case("train: negative learning rate", ["train", "--model", TINY_SPEC, "--lr", "-1", "--out", "{out}"], 2, "lr"),
    # train, causal LMs ({lm}: a tiny trained GPT-2 with 64 positions used, 1024 in its config)
    Case("train LM: text too short for one block", ["train", "--task", "causal-lm", "--model", "gpt2:layers=1,hidden=32,heads=2",
                                                    "--dataset", "{d}/short.txt", "--max-length", "1000", "--out", "{out}"],
         2, ("{d}/short.txt", "too short for one block", "--max-length")),
    Case("train LM: empty text file", ["train", "--task", "causal-lm", "--model", "gpt2:layers=1,hidden=32,heads=2",
                                       "--dataset", "{d}/blank.txt", "--out", "{out}"], 2, ("{d}/blank.txt", "is empty")),
    Case("train LM: no text column", ["train", "--task", "causal-lm", "--model", "gpt2:layers=1,hidden=32,heads=2",
                                      "--dataset", "{d}/body.jsonl", "--out", "{out}"], 2, ("no column 'text'", "body")),
    Case("train LM: a classifier given --task causal-lm", ["train", "--task", "causal-lm", "--model", "{teacher}",
                                                           "--dataset", "{d}/hamlet.txt", "--out", "{out}"], 2,
         ("sequence classifier", "--task classification")),
    Case("train LM: a causal LM given --task classification", ["train", "--task", "classification", "--model", "{lm}",
                                                               "--out", "{out}"], 2,
         ("causal language model", "--task causal-lm")),
    Case("train LM: a bert spec for a causal LM", ["train", "--task", "causal-lm", "--model", "bert:layers=1,hidden=32,heads=2",
                                                   "--dataset", "{d}/hamlet.txt", "--out", "{out}"], 2,
         ("not a causal language model", "gpt2:")),
    Case("train LM: a gpt2 spec for a classifier", ["train", "--task", "classification", "--model",
                                                    "gpt2:layers=1,hidden=32,heads=2", "--out", "{out}"], 2,
         ("builds a causal language model", "--task causal-lm")),
    Case("train LM: block beyond the positions", ["train", "--model", "gpt2:layers=1,hidden=32,heads=2,max_len=32",
                                                  "--dataset", "{d}/hamlet.txt", "--max-length", "64", "--out", "{out}"],
         2, ("--max-length 64", "32 positions")),
    Case("train LM: llama kv_heads not dividing heads", ["train", "--model", "llama:layers=1,hidden=32,heads=4,kv_heads=3",
                                                         "--dataset", "{d}/hamlet.txt", "--out", "{out}"], 2,
         "not divisible by kv_heads=3"),
    Case("train LM: stride longer than the window", ["train", "--model", "gpt2:layers=1,hidden=32,heads=2",
                                                     "--dataset", "{d}/hamlet.txt", "--max-length", "32", "--stride", "64",
                                                     "--out", "{out}"], 2, ("--stride 64", "at most the window")),
    # distill
    Case("distill: teacher missing", ["distill", "--teacher", "{d}/nope", "--out", "{out}"], 2, ("{d}/nope", "does not exist")),
    Case("distill: teacher without weights", ["distill", "--teacher", "{d}/config-only", "--out", "{out}"], 2,
         ("{d}/config-only", "no weights")),
    Case("distill: --out under a file", ["distill", "--teacher", "{teacher}", "--out", "{d}/somefile/s"], 2,
         "'{d}/somefile' is a file", out="{d}/somefile/s"),
    Case("distill: --out exists", ["distill", "--teacher", "{teacher}", "--out", "{d}/existing"], 2, "already exists",
         out="{d}/existing"),
    Case("distill: --teacher-precision fp16 on the CPU", ["distill", "--teacher", "{teacher}", "--teacher-precision",
                                                           "fp16", "--out", "{out}"], 2,
         ("--teacher-precision fp16", "CUDA")),
    Case("distill: student deeper than the teacher", ["distill", "--teacher", "{teacher}", "--student", "layers=9",
                                                       "--out", "{out}"], 2, "layers"),
    # distill, causal LMs ({lm}: a tiny trained GPT-2 with 2 layers and 1000 token ids)
    Case("distill: LM student with another tokenizer", ["distill", "--teacher", "{lm}", "--student", "{d}/other-lm",
                                                         "--out", "{out}"], 2, ("{d}/other-lm", "different tokenizer")),
    Case("distill: LM student spec deeper than the teacher",
         ["distill", "--teacher", "{lm}", "--student", "gpt2:layers=3,hidden=64,heads=4", "--out", "{out}"], 2,
         ("gpt2:layers=3,hidden=64,heads=4", "more than the teacher's 2")),
    Case("distill: LM student layers beyond the teacher", ["distill", "--teacher", "{lm}", "--student", "layers=5",
                                                            "--out", "{out}"], 2, ("asks for 5 layers", "teacher has 2")),
    Case("distill: --top-k larger than the vocabulary", ["distill", "--teacher", "{lm}", "--top-k", "5000",
                                                         "--out", "{out}"], 2, ("--top-k 5000", "vocabulary")),
    Case("distill: --tail-samples without the cache", ["distill", "--teacher", "{lm}", "--teacher-online",
                                                       "--tail-samples", "8", "--out", "{out}"], 2,
         ("--tail-samples 8", "--teacher-online")),
    Case("distill: temperature 0 for an LM", ["distill", "--teacher", "{lm}", "--temperature", "0", "--out", "{out}"], 2,
         ("temperature", "greater than 0")),
    Case("distill: a classifier as the teacher of an LM student",
         ["distill", "--teacher", "{teacher}", "--student", "gpt2:layers=1,hidden=64,heads=4", "--out", "{out}"], 2,
         ("is a classification model", "causal-lm teacher")),
    # export
    Case("export: model missing", ["export", "--model", "{d}/nope", "--out", "{out}"], 2, "{d}/nope"),
    Case("export: not a model", ["export", "--model", "{d}/notes", "--out", "{out}"], 2, ("{d}/notes", "not an artifact")),
    Case("export: --out exists", ["export", "--model", "{teacher}", "--out", "{d}/existing"], 2, "already exists",
         out="{d}/existing"),
    Case("export: --out under a file", ["export", "--model", "{teacher}", "--out", "{d}/somefile/o"], 2,
         "'{d}/somefile' is a file", out="{d}/somefile/o"),
    Case("export: opset too old", ["export", "--model", "{teacher}", "--opset", "9", "--out", "{out}"], 2, "opset"),
    Case("export: LM with fewer than 16 cached steps", ["export", "--model", "{lm}", "--parity-steps", "8",
                                                        "--out", "{out}"], 2, "parity_steps"),
    Case("export: a classifier told it is an LM", ["export", "--model", "{teacher}", "--task", "causal-lm",
                                                   "--out", "{out}"], 2, ("is a classification artifact", "--task causal-lm")),
    # quantize
    Case("quantize: unknown method", ["quantize", "--model", "{teacher}", "--method", "int3", "--out", "{out}"], 2,
         ("int3", "torch-dynamic-int8")),
    Case("quantize: model without weights", ["quantize", "--model", "{d}/config-only", "--method", "torch-dynamic-int8",
                                             "--out", "{out}"], 2, ("{d}/config-only", "no weights")),
    Case("quantize: --out exists", ["quantize", "--model", "{teacher}", "--method", "torch-dynamic-int8",
                                    "--out", "{d}/existing"], 2, "already exists", out="{d}/existing"),
    Case("quantize: --out under a file", ["quantize", "--model", "{teacher}", "--method", "torch-dynamic-int8",
                                          "--out", "{d}/somefile/q"], 2, "'{d}/somefile' is a file", out="{d}/somefile/q"),
    Case("quantize: bad --max-drop", ["quantize", "--model", "{teacher}", "--method", "torch-dynamic-int8",
                                      "--max-drop", "lots", "--out", "{out}"], 2, "lots"),
    # quantize, causal LMs
    Case("quantize: LM --max-drop without a percent sign", ["quantize", "--model", "{lm}", "--method", "ort-int4",
                                                            "--max-drop", "1.0", "--out", "{out}"], 2,
         ("relative increase of its perplexity", "--max-drop 5%", "'1.0' has no '%'")),
    Case("quantize: static int8 on an LM", ["quantize", "--model", "{lm}", "--method", "ort-static-int8",
                                            "--out", "{out}"], 2, ("ort-static-int8 quantizes classification", "ort-int4")),
    Case("quantize: --method auto on an LM", ["quantize", "--model", "{lm}", "--method", "auto", "--out", "{out}"], 2,
         ("--method auto", "causal-lm", "ort-int4")),
    Case("quantize: GPTQ at 8 bits", ["quantize", "--model", "{lm}", "--method", "ort-int8-weight-only",
                                      "--algorithm", "gptq", "--out", "{out}"], 2, ("--algorithm gptq", "4-bit")),
    Case("quantize: embedding bits without the embeddings", ["quantize", "--model", "{lm}", "--method", "ort-int4",
                                                             "--embedding-bits", "8", "--out", "{out}"], 2,
         ("--embedding-bits 8", "--quantize-embeddings")),
    Case("quantize: embedding bits not 4 or 8", ["quantize", "--model", "{lm}", "--method", "ort-int4",
                                                 "--quantize-embeddings", "--embedding-bits", "6", "--out", "{out}"], 2,
         ("embedding_bits", "4 or 8")),
    Case("quantize: block size not a power of two", ["quantize", "--model", "{lm}", "--method", "ort-int4",
                                                     "--block-size", "48", "--out", "{out}"], 2, ("block_size", "power of two")),
    Case("quantize: int4 on a graph without MatMul", ["quantize", "--model", "{d}/no-matmul", "--method", "ort-int4",
                                                      "--out", "{out}"], 2, ("{d}/no-matmul", "no MatMul or Gemm")),
    Case("quantize: int4 setting for an int8 method", ["quantize", "--model", "{lm}", "--method", "torch-dynamic-int8",
                                                       "--block-size", "64", "--out", "{out}"], 2,
         ("torch-dynamic-int8 does not take block_size")),
    # eval
    Case("eval: model missing", ["eval", "--model", "{d}/nope"], 2, "{d}/nope"),
    Case("eval: --out under a file", ["eval", "--model", "{teacher}", "--out", "{d}/somefile/m.json"], 2,
         "'{d}/somefile' is a file", out="{d}/somefile/m.json"),
    Case("eval: --out is a directory", ["eval", "--model", "{teacher}", "--out", "{d}/existing"], 2,
         ("{d}/existing", "is a directory"), out="{d}/existing"),
    Case("eval LM: no text column", ["eval", "--model", "{lm}", "--dataset", "{d}/body.jsonl"], 2,
         ("no column 'text'", "body", "--text-column")),
    Case("eval LM: --task classification on a causal LM", ["eval", "--model", "{lm}", "--task", "classification"], 2,
         ("is a causal-lm artifact", "--task classification")),
    # generate
    Case("generate: model missing", ["generate", "--model", "{d}/nope", "--prompt", "hi"], 2, "{d}/nope", out="{d}/nope"),
    Case("generate: a classifier", ["generate", "--model", "{teacher}", "--prompt", "hi"], 2,
         ("is a classification artifact", "needs a causal language model"), out="{d}/nope"),
    Case("generate: empty prompt", ["generate", "--model", "{lm}", "--prompt", ""], 2, "prompt is empty", out="{d}/nope"),
    Case("generate: beyond the positions", ["generate", "--model", "{lm}", "--prompt", "To be", "--max-new-tokens", "5000"],
         2, ("--max-new-tokens 5000", "positions"), out="{d}/nope"),
    Case("generate: negative temperature", ["generate", "--model", "{lm}", "--prompt", "hi", "--temperature", "-1"], 2,
         "temperature", out="{d}/nope"),
    Case("eval: malformed JSONL line", ["eval", "--model", "{teacher}", "--dataset", "{d}/bad.jsonl"], 2,
         ("{d}/bad.jsonl", "line 2")),
    Case("eval: labels the model does not know", ["eval", "--model", "{teacher}", "--dataset", "{csv}",
                                                  "--text-column", "review", "--label-column", "sentiment"], 2,
         ("neg", "pos")),
    # bench
    Case("bench: artifact missing", ["bench", "{d}/nope", "--out", "{out}"], 2, "{d}/nope"),
    Case("bench: not an artifact", ["bench", "{d}/notes", "--out", "{out}"], 2, ("{d}/notes", "not an artifact")),
    Case("bench: --out exists", ["bench", "{teacher}", "--out", "{d}/existing"], 2, "already exists", out="{d}/existing"),
    Case("bench: --out under a file", ["bench", "{teacher}", "--out", "{d}/somefile/b"], 2, "'{d}/somefile' is a file",
         out="{d}/somefile/b"),
    Case("bench: zero batch size", ["bench", "{teacher}", "--batch-sizes", "0", "--out", "{out}"], 2, "batch"),
    Case("bench: a classifier beside a causal LM", ["bench", "{teacher}", "{lm}", "--out", "{out}"], 2,
         ("different tasks", "(classification)", "(causal-lm)", "once per task")),
    Case("bench: --new-tokens fill the LM's positions", ["bench", "{lm}", "--new-tokens", "1024", "--no-isolate",
                                                         "--no-peak-probe", "--out", "{out}"], 2,
         ("--new-tokens 1024", "1024 positions", "--new-tokens 256 or fewer")),
    Case("bench: zero prompt length", ["bench", "{lm}", "--prompt-lens", "0", "--out", "{out}"], 2, "prompt"),
    # report
    Case("report: results missing", ["report", "{d}/nope.json", "--out", "{out}"], 2, ("{d}/nope.json", "results.json")),
    Case("report: results not JSON", ["report", "{d}/broken.json", "--out", "{out}"], 2, ("{d}/broken.json", "not valid JSON")),
    Case("report: unknown schema version", ["report", "{d}/future.json", "--out", "{out}"], 2, ("schema_version", "99")),
    # run
    Case("run: YAML tag", ["run", "{d}/tag.yaml"], 2,
         ("{d}/tag.yaml:5", "tag !!python/object/apply:os.system is not allowed"), out="{d}/runs/tag", process=True),
    Case("run: recipe missing", ["run", "{d}/nope.yaml"], 2, ("{d}/nope.yaml", "does not exist")),
    Case("run: output_dir under a file", ["run", "{d}/outfile.yaml"], 2, "'somefile' is a file", out="{d}/somefile/x"),
    Case("run: --from an unknown stage", ["run", "{d}/ok.yaml", "--from", "nope"], 2, ("nope", "no such stage"),
         out="{d}/runs/ok"),
    Case("run: --set without a stage", ["run", "{d}/ok.yaml", "--set", "epochs=3"], 2, "stage.key=value", out="{d}/runs/ok"),
    Case("run: --set with a YAML tag", ["run", "{d}/ok.yaml", "--set", "t.epochs=!!python/name:os.system x"], 2,
         "tag !!python/name:os.system is not allowed", out="{d}/runs/ok"),
    # validate
    Case("validate: YAML tag", ["validate", "{d}/tag.yaml"], 2, ("{d}/tag.yaml:5", "is not allowed in a recipe")),
    Case("validate: invalid YAML", ["validate", "{d}/syntax.yaml"], 2, ("{d}/syntax.yaml:4", "not valid YAML")),
    Case("validate: unknown key", ["validate", "{d}/typo.yaml"], 2, ("{d}/typo.yaml:5", "stages.t.epocs", "epochs")),
    Case("validate: reference to a later stage", ["validate", "{d}/later.yaml"], 2, ("{d}/later.yaml:4", "later stage")),
    Case("validate: unknown stage type", ["validate", "{d}/prune.yaml"], 2, ("{d}/prune.yaml:3", "allowed types")),
    Case("validate: recursive alias", ["validate", "{d}/loop.yaml"], 2, ("{d}/loop.yaml:1", "recursive")),
    # the command itself
    Case("unknown command", ["compile", "--out", "{out}"], 2, "unknown command"),
]


@pytest.fixture(scope="module")
def scene(tmp_path_factory, tiny_teacher, tiny_lm):
    """Bad inputs as a new user makes them, and directories the user owns."""
    import torch
    from safetensors.torch import load_file

    d = tmp_path_factory.mktemp("bad-input")
    (d / "somefile").write_text("a file where a directory is expected\n")
    (d / "existing").mkdir()
    (d / "existing" / "mine.txt").write_text("the user's own file\n")
    (d / "config-only").mkdir()
    shutil.copy2(tiny_teacher / "config.json", d / "config-only" / "config.json")
    pickled = d / "pickled"
    pickled.mkdir()
    for p in tiny_teacher.iterdir():
        if p.is_file() and p.name not in ("model.safetensors", "manifest.json", "train_log.jsonl"):
            shutil.copy2(p, pickled / p.name)
    torch.save(load_file(str(tiny_teacher / "model.safetensors")), pickled / "pytorch_model.bin")
    (d / "notes").mkdir()
    (d / "notes" / "readme.txt").write_text("not a model\n")
    import onnx
    from onnx import TensorProto, helper

    no_matmul = d / "no-matmul"  # an ONNX classifier directory whose graph has nothing to quantize
    no_matmul.mkdir()
    for p in tiny_teacher.iterdir():
        if p.is_file() and p.name not in ("model.safetensors", "manifest.json", "train_log.jsonl"):
            shutil.copy2(p, no_matmul / p.name)
    io = [helper.make_tensor_value_info(n, TensorProto.INT64, ["b", "t"]) for n in ("input_ids", "logits")]
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "g", io[:1], io[1:])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(no_matmul / "model.onnx"))
    from transformers import GPT2Config, GPT2LMHeadModel

    from compress.models import train_byte_bpe

    other = train_byte_bpe(["entirely other words, in another text altogether"] * 20, vocab_size=300)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(other), n_embd=16, n_layer=1, n_head=2)).save_pretrained(d / "other-lm")
    other.save_pretrained(d / "other-lm")
    (d / "bad.jsonl").write_text('{"text": "a fine film", "label": 1}\n{"text": "a dull one", "label": 0\n'
                                 '{"text": "more", "label": 1}\n')
    (d / "bad.json").write_text('[{"text": "a fine film", "label": 1},\n {"text": "a dull one" "label": 0}]\n')
    (d / "list.jsonl").write_text('{"text": "a", "label": 1}\n\n["b", 0]\n')
    (d / "ragged.csv").write_text("text,label\ngood,1\nbad,0,extra\nfine,1\n")
    (d / "latin1.csv").write_bytes("text,label\ncaf\xe9 cr\xe8me,1\n".encode("latin-1"))
    (d / "empty.csv").write_text("")
    (d / "data.xml").write_text("<rows/>\n")
    from conftest import hamlet_path

    shutil.copy2(hamlet_path(), d / "hamlet.txt")
    (d / "short.txt").write_text("".join(f"line {i} of a short text\n" for i in range(30)))
    (d / "blank.txt").write_text("  \n\n")
    (d / "body.jsonl").write_text("".join(json.dumps({"body": f"row {i} " * 8}) + "\n" for i in range(20)))
    (d / "broken.json").write_text('{"schema_version": 1, "artifacts": [\n')
    (d / "future.json").write_text('{"schema_version": 99}\n')
    (d / "tag.yaml").write_text(TAG_RECIPE)
    (d / "syntax.yaml").write_text("stages:\n  t:\n    type: train\n   model: x\n")
    (d / "typo.yaml").write_text("stages:\n  t:\n    type: train\n    model: x\n    epocs: 3\n")
    (d / "later.yaml").write_text("stages:\n  e:\n    type: eval\n    model: ${t}\n  t:\n    type: train\n    model: x\n")
    (d / "prune.yaml").write_text("stages:\n  t:\n    type: prune\n")
    (d / "loop.yaml").write_text("stages: &s\n  t: *s\n")
    (d / "outfile.yaml").write_text(f"output_dir: somefile/x\nstages:\n  t:\n    type: train\n    model: {TINY_SPEC}\n")
    (d / "ok.yaml").write_text(f"stages:\n  t:\n    type: train\n    model: {TINY_SPEC}\n")
    return d


def _tree(*roots: Path) -> dict[str, tuple]:
    """Every path under `roots` with its size and modification time: what 'untouched' means."""
    found = {}
    for root in roots:
        for p in [root, *root.rglob("*")]:
            st = p.lstat()
            found[str(p)] = (p.is_dir(), st.st_size, st.st_mtime_ns)
    return found


def _fill(text: str, places: dict[str, str]) -> str:
    for key, value in places.items():
        text = text.replace("{" + key + "}", value)
    return text


def _run(case: Case, argv: list[str], cwd: Path, capfd) -> tuple[int, str, str]:
    if case.process:
        r = subprocess.run([sys.executable, "-m", "compress", *argv], cwd=cwd, env=ENV, capture_output=True,
                           text=True, timeout=120)
        return r.returncode, r.stdout, r.stderr
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    captured = capfd.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, scene, tiny_teacher, tiny_csv_dir, tiny_lm, tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(scene)  # recipes put their default output_dir under the working directory
    places = {"d": str(scene), "teacher": str(tiny_teacher), "csv": str(tiny_csv_dir), "lm": str(tiny_lm),
              "out": str(tmp_path / "out")}
    argv = [_fill(a, places) for a in case.argv]
    out = Path(_fill(case.out, places))
    before = _tree(scene, tiny_teacher, tiny_csv_dir, tiny_lm)
    capfd.readouterr()

    code, stdout, stderr = _run(case, argv, scene, capfd)

    assert "Traceback" not in stderr + stdout, stderr
    assert code == case.exit, (code, stderr)
    verb = argv[0] if argv[0] != "compile" else ""
    assert stderr.startswith(f"compress {verb}".rstrip() + ":"), stderr  # nothing printed before the message
    paragraph = stderr.strip().split("\n\n")[0] if not verb else stderr.strip()
    assert "\n\n" not in paragraph, stderr  # one paragraph
    for says in [case.says] if isinstance(case.says, str) else case.says:
        assert _fill(says, places) in " ".join(stderr.split()), stderr  # the message is wrapped at 100 columns
    assert _tree(scene, tiny_teacher, tiny_csv_dir, tiny_lm) == before, "a file the user had was changed"
    if not str(out).startswith(str(scene)) or str(out) not in before:
        assert not out.exists() and not out.is_symlink(), f"{out} was left behind"
        work = out.with_name(out.name + ".work")
        assert not work.exists(), f"{work} was left behind"
    assert not (scene / "pwned").exists()


def test_table_covers_every_verb():
    from compress.cli import COMMANDS

    verbs = {c.argv[0] for c in CASES}
    assert set(COMMANDS) <= verbs, set(COMMANDS) - verbs
    assert len(CASES) >= 40


def test_a_full_disk_is_one_message_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from compress import artifacts
    from compress.errors import UserError

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "artifact"
    with pytest.raises(UserError, match="No space left on device") as info:
        with artifacts.atomic_output(out) as tmp:
            (tmp / "model.safetensors").write_bytes(b"x")
            full()
    assert str(out) in str(info.value)
    assert list(tmp_path.iterdir()) == []

    target = tmp_path / "metrics.json"
    target.write_text("old\n")
    monkeypatch.setattr(artifacts.os, "replace", full)
    with pytest.raises(UserError, match="metrics.json.*No space left on device"):
        artifacts.atomic_write(target, "new\n")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


# --------------------------------------------------------------------------- interrupts

def _start(argv: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "compress", *argv], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(proc: subprocess.Popen, ready, what: str, limit: float = 120) -> None:
    deadline = time.time() + limit
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the process ended (exit {proc.returncode}) before {what}:\n{proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"no {what} within {limit} s")
        time.sleep(0.05)


def _partials(parent: Path, name: str) -> list[Path]:
    return sorted(p for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_sigint_during_train_leaves_nothing_finished_and_resume_completes(tmp_path, capfd):
    out, work = tmp_path / "teacher", tmp_path / "teacher.work"
    argv = ["train", "--model", TINY_SPEC, "--max-examples", "640", "--epochs", "2", "--batch-size", "16",
            "--lr", "0.002", "--precision", "fp32", "--threads", "1", "--checkpoint-every", "5", "--no-progress",
            "--out", str(out)]
    proc = _start(argv, tmp_path)
    _wait_for(proc, lambda: (work / "checkpoint" / "state.json").is_file(), "a checkpoint")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    # The loop saves a checkpoint on Ctrl-C and says how to continue (a UserError: exit 2).
    assert proc.returncode in (2, 130) and "--resume" in stderr and "Traceback" not in stderr, stderr
    assert not out.exists() and not (work / "manifest.json").exists()

    assert main(argv + ["--resume"]) == 0
    captured = capfd.readouterr()
    assert "resuming from step" in captured.out, captured.out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 2 * 40  # 640 examples / 16 per step, 2 epochs: none lost or repeated
    assert not work.exists()


def test_kill_9_during_export_and_quantize_leaves_no_artifact(tiny_teacher, tmp_path, capfd):
    from compress.runners import detect_format
    from compress.errors import UserError

    onnx_out = tmp_path / "onnx"
    proc = _start(["export", "--model", str(tiny_teacher), "--out", str(onnx_out)], tmp_path)
    # Killed once the graph is being written into the temporary directory.
    _wait_for(proc, lambda: any((p / "model.onnx").exists() for p in _partials(tmp_path, "onnx")), "an ONNX file")
    proc.kill()
    proc.wait()

    int8_out = tmp_path / "int8"
    proc = _start(["quantize", "--model", str(tiny_teacher), "--method", "ort-dynamic-int8", "--out", str(int8_out)],
                  tmp_path)
    _wait_for(proc, lambda: bool(_partials(tmp_path, "int8")), "a quantize work directory")
    proc.kill()
    proc.wait()

    for out in (onnx_out, int8_out):
        assert not out.exists()
        for partial in _partials(tmp_path, out.name):  # hidden, and never with a manifest
            assert not (partial / "manifest.json").exists()
        with pytest.raises(UserError):
            detect_format(out)
        assert main(["bench", str(out), "--out", str(tmp_path / "bench")]) == 2
        assert str(out) in capfd.readouterr().err
    assert not (tmp_path / "bench").exists()
