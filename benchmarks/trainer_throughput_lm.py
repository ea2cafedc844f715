"""Causal-LM training throughput: compress's loop against transformers.Trainer, one run.

Both sides train the same randomly initialised GPT-2 (the LM quickstart teacher's shape by
default) on the same packed blocks of the built-in Austen corpus: the first N blocks of
`--block` tokens, one epoch, the same batch size, fp32 (bf16 autocast is slower than fp32 on
CPUs without AMX, see docs/decisions.md), AdamW (fused on both: it is the Trainer's default
optimizer), lr 1e-3, no warm-up, grad clip 1.0, the same thread count, no evaluation or
saving during the run.

The Trainer gets the settings its documentation offers for this job: the blocks as
`run_clm.py` packs them (`input_ids` = `labels`, `default_data_collator`; `group_by_length`
has nothing to group when every block has the same length), its fused AdamW, and
`torch_compile=True` (with `--compile`, which also times compress's `fit` with `compile`
on); the faster Trainer is the comparison.

Tokens/s = block tokens / wall seconds of the whole training call (`Trainer.train()`,
`compress.loop.fit`), compilation included on both sides.

    .venv/bin/python benchmarks/trainer_throughput_lm.py --blocks 1536 [--compile]

Writes benchmarks/results/trainer_throughput_lm.json and .md (rendered from the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"


def fresh_model(spec: str, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from compress.models import causal_lm_config, parse_size_spec

    torch.manual_seed(0)
    arch = spec.split(":", 1)[0]
    params = parse_size_spec(spec)
    params.pop("vocab_size", None)
    model = AutoModelForCausalLM.from_config(causal_lm_config(arch, params, tokenizer))
    model.loss_type = "ForCausalLM"
    return model


def run_trainer(model, blocks, batch_size: int, compile_: bool) -> dict:
    import datasets
    from transformers import Trainer, TrainingArguments, default_data_collator

    ds = datasets.Dataset.from_dict({"input_ids": blocks.tolist(), "labels": blocks.tolist()})
    with tempfile.TemporaryDirectory() as d:
        args = TrainingArguments(output_dir=d, per_device_train_batch_size=batch_size, num_train_epochs=1,
                                 learning_rate=1e-3, warmup_ratio=0.0, weight_decay=0.01, max_grad_norm=1.0,
                                 use_cpu=True, eval_strategy="no", save_strategy="no", logging_strategy="no",
                                 report_to=[], dataloader_num_workers=0, seed=0, disable_tqdm=True,
                                 torch_compile=compile_)
        trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=default_data_collator)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    return {"tokens_per_s": blocks.size / seconds, "seconds": seconds, "optimizer": str(args.optim),
            "torch_compile": compile_}


def run_floor(model, blocks, batch_size: int) -> dict:
    import torch

    from floor import floor_seconds

    batches = [{"input_ids": torch.from_numpy(blocks[i:i + batch_size]), "labels": torch.from_numpy(blocks[i:i + batch_size])}
               for i in range(0, len(blocks), batch_size)]
    seconds = floor_seconds(model, batches, lr=1e-3)
    return {"tokens_per_s": blocks.size / seconds, "seconds": seconds}


def run_compress(model, train, val, batch_size: int, compile_: bool) -> dict:
    from compress.loop import LoopConfig, fit
    from compress.tasks.causal_lm import CausalLMTask

    task = CausalLMTask()
    cfg = LoopConfig(epochs=1, batch_size=batch_size, lr=1e-3, warmup_ratio=0.0, weight_decay=0.01, grad_clip=1.0,
                     precision="fp32", checkpoint_every=0, progress=False, seed=0, compile=compile_)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        result = fit(model, train=train, cfg=cfg, work=Path(d), loss_fn=task.loss, evaluate=task.validator(val, 8),
                     metric=task.primary_metric, higher_is_better=False)
        seconds = time.perf_counter() - t0
    return {"tokens_per_s": train.blocks.size / seconds, "seconds": seconds, "steps": result.steps,
            "loop_tokens_per_s": result.train_tokens_per_s, "compile": compile_}


def main() -> None:
    import torch

    from compress.artifacts import library_versions
    from compress.data import DataConfig
    from compress.hardware import cpu_info
    from compress.lm_data import TokenBlocks, TokenStream, encode_text, load_text
    from compress.models import train_byte_bpe

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default="gpt2:layers=4,hidden=256,heads=4,vocab=8192")
    ap.add_argument("--blocks", type=int, default=1536, help="training blocks (one epoch over them)")
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--only", default="", help="comma-separated subset of runs (debugging)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds of every run; the first warms up, the "
                    "median of the others is reported")
    ap.add_argument("--compile", action="store_true", help="also time both sides with torch.compile")
    args = ap.parse_args()

    data = load_text(DataConfig(dataset="austen", task="causal-lm"))
    vocab = int(args.spec.split("vocab=")[1].split(",")[0]) if "vocab=" in args.spec else 8000
    tokenizer = train_byte_bpe(list(data["train"]["text"]), vocab)
    enc = encode_text(data, tokenizer, args.block, splits=("train", "validation"))
    blocks = enc["train"].blocks[:args.blocks]
    train = TokenBlocks(blocks)
    v = enc["validation"]
    val = TokenStream(v.tokens[:4 * args.block], chars=1, block=args.block, stride=args.block)
    runs = {"floor": lambda: run_floor(fresh_model(args.spec, tokenizer), blocks, args.batch_size),
            "compress_eager": lambda: run_compress(fresh_model(args.spec, tokenizer), train, val, args.batch_size, False),
            "trainer_eager": lambda: run_trainer(fresh_model(args.spec, tokenizer), blocks, args.batch_size, False),
            "compress_compiled": lambda: run_compress(fresh_model(args.spec, tokenizer), train, val, args.batch_size, True),
            "trainer_compiled": lambda: run_trainer(fresh_model(args.spec, tokenizer), blocks, args.batch_size, True)}
    wanted = [r for r in runs if (args.compile or "compiled" not in r) and (not args.only or r in args.only.split(","))]
    # Alternating order, repeated: the machine's drift (and any other load) falls on both sides.
    results: dict[str, dict] = {name: {"runs": []} for name in wanted}
    for rep in range(args.repeats):
        for name in wanted:
            print(f"{name} (run {rep + 1}/{args.repeats}) ...", flush=True)
            r = runs[name]()
            results[name]["runs"].append(r)
            print("  ", r, flush=True)
    for name, entry in results.items():
        # The first round warms oneDNN's kernel caches and the allocator for the whole process
        # (whichever side ran first paid for both); it is kept in the JSON but not counted.
        timed = entry["runs"][1:] or entry["runs"]
        entry["tokens_per_s"] = float(np.median([r["tokens_per_s"] for r in timed]))
        entry["seconds"] = float(np.median([r["seconds"] for r in timed]))
    best_trainer = max((results[k] for k in ("trainer_compiled", "trainer_eager") if k in results),
                       key=lambda r: r["tokens_per_s"], default=None)
    best_ours = max((results[k] for k in ("compress_compiled", "compress_eager") if k in results),
                    key=lambda r: r["tokens_per_s"], default=None)
    speedup = {}
    if best_trainer and best_ours:
        speedup["best_vs_best"] = best_ours["tokens_per_s"] / best_trainer["tokens_per_s"]
        for mode in ("compiled", "eager"):
            if f"compress_{mode}" in results and f"trainer_{mode}" in results:
                speedup[mode] = results[f"compress_{mode}"]["tokens_per_s"] / results[f"trainer_{mode}"]["tokens_per_s"]
    n_params = sum(p.numel() for p in fresh_model(args.spec, tokenizer).parameters())
    report = {"benchmark": "trainer_throughput_lm",
              "settings": {"spec": args.spec, "params": n_params, "blocks": len(blocks), "block": args.block,
                           "batch_size": args.batch_size, "precision": "fp32", "lr": 1e-3, "epochs": 1,
                           "repeats": args.repeats,
                           "threads": torch.get_num_threads(), "dataset": "austen (first blocks of train)"},
              "environment": {"cpu": cpu_info(), "python": platform.python_version(), "versions": library_versions(),
                              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
              "results": results, "speedup": speedup}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "trainer_throughput_lm.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "trainer_throughput_lm.md").write_text(render(report))
    print(render(report))


def render(report: dict) -> str:
    """Markdown from the JSON (never from logs)."""
    s, r, sp = report["settings"], report["results"], report["speedup"]
    names = {"floor": "the floor: forward, backward, clip, AdamW step only (benchmarks/floor.py)",
             "compress_compiled": "compress `fit`, compile on", "compress_eager": "compress `fit`, eager",
             "trainer_compiled": "transformers.Trainer, torch_compile=True", "trainer_eager": "transformers.Trainer, eager"}
    lines = ["# Causal-LM training throughput: compress vs transformers.Trainer", "",
             f"`{s['spec']}` ({s['params'] / 1e6:.1f} M parameters), {s['blocks']} Austen blocks of {s['block']} tokens, "
             f"one epoch, batch {s['batch_size']}, {s['precision']}, {s['threads']} threads, "
             f"CPU {report['environment']['cpu']['model']}. Wall time of the whole training call, compilation included; "
             f"median of rounds 2-{s['repeats']} of alternating runs (round 1 warms up).",
             "", "| trainer | tokens/s | seconds |", "|---|---|---|"]
    lines += [f"| {names[k]} | {v['tokens_per_s']:.0f} | {v['seconds']:.1f} |" for k, v in r.items()]
    lines += [""] + [f"- {k.replace('_', ' ')}: **{v:.2f}x**" for k, v in sp.items()]
    if "floor" in r:
        lines += [f"- share of the floor's speed: " + ", ".join(f"{names[k].split(',')[0]} {v['tokens_per_s'] / r['floor']['tokens_per_s']:.0%}"
                                                           for k, v in r.items() if k != "floor")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
