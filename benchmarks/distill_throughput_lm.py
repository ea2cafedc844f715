"""Causal-LM distillation throughput: compress (top-k cache + the one loop) against a
transformers.Trainer subclass that runs the teacher on every step, in one run.

Both sides distil the same teacher (default runs/austen-gpt) into the same student (its layers
0 and 2, copied: the same initial weights on both sides) on the same packed Austen blocks,
with the same loss mix (alpha 0.5 forward KL at T=1 + 0.5 next-token CE), batch, AdamW
(fused), lr 1e-3 without warm-up, grad clip 1.0, precision (--precision), thread count, and no evaluation or
saving during the run.

- compress: `CausalLMTask.teacher_targets` (one teacher pass: top-k log-probs + leftover mass,
  memory-mapped) then `loop.fit` with `CausalLMTask.distill_loss`; the clock covers both.
- Trainer: `compute_loss` runs the frozen teacher under no_grad each step and takes the KL on
  the full vocabulary (the usual KD Trainer recipe); the clock covers `Trainer.train()`.

Each side runs eager and with torch.compile (`--compile` / `torch_compile=True`); the faster
of each is the comparison, as in trainer_throughput_lm.py. Tokens/s = block tokens x epochs /
wall seconds, compilation included.

    .venv/bin/python benchmarks/distill_throughput_lm.py --blocks 768 --epochs 1

Writes benchmarks/results/distill_throughput_lm{--tag}.json and .md (rendered from the JSON).
`--precision bf16` runs both sides in bf16 autocast (the Trainer with `bf16=True`).
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
ALPHA, T = 0.5, 1.0


def student_of(teacher, layers):
    from compress.distill.student import from_teacher_layers

    model = from_teacher_layers(teacher, None, layers, same_class=True).model
    model.loss_type = "ForCausalLM"
    return model.train()


def cache_targets(task, teacher, blocks, args, directory: Path):
    """compress's teacher pass over `blocks`, as `compress distill` makes it (top-k and tail draws)."""
    from compress.lm_data import TokenBlocks

    return task.teacher_targets(teacher, TokenBlocks(blocks), top_k=args.top_k, temperature=T, batch_size=16,
                                device="cpu", precision=args.precision, directory=directory / "topk", progress=False,
                                tail_samples=args.tail_samples)


def run_compress(teacher, layers, blocks, val, args, compile_: bool) -> dict:
    from compress.lm_data import TokenBlocks
    from compress.loop import LoopConfig, fit
    from compress.tasks.causal_lm import CausalLMTask
    from compress.tasks.lm_kd import LMDistillSettings

    task = CausalLMTask()
    student = student_of(teacher, layers)
    cfg = LoopConfig(epochs=args.epochs, batch_size=args.batch_size, lr=1e-3, warmup_ratio=0.0, weight_decay=0.01,
                     grad_clip=1.0, precision=args.precision, checkpoint_every=0, progress=False, seed=0,
                     compile=compile_)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        targets = cache_targets(task, teacher, blocks, args, Path(d))
        cache_seconds = time.perf_counter() - t0
        (Path(d) / "work").mkdir()
        loss = task.distill_loss(teacher, targets, LMDistillSettings(divergences={"forward_kl": 1.0}, temperature=T,
                                                                       alpha=ALPHA))
        result = fit(student, train=TokenBlocks(blocks), cfg=cfg, work=Path(d) / "work", loss_fn=loss,
                     evaluate=task.validator(val, 8), metric=task.primary_metric, higher_is_better=False)
        seconds = time.perf_counter() - t0
        cache_bytes = targets.bytes_on_disk
    return {"tokens_per_s": blocks.size * args.epochs / seconds, "seconds": seconds, "cache_seconds": cache_seconds,
            "cache_bytes": cache_bytes, "steps": result.steps, "compile": compile_,
            "loop_seconds_per_epoch": result.seconds_per_epoch}


def run_trainer(teacher, layers, blocks, args, compile_: bool) -> dict:
    import datasets
    import torch
    import torch.nn.functional as F
    from transformers import Trainer, TrainingArguments, default_data_collator

    class KDTrainer(Trainer):
        """Runs the teacher every step; KL on the full vocabulary mixed with next-token CE."""

        def __init__(self, *a, teacher=None, **kw):
            super().__init__(*a, **kw)
            self.teacher = teacher.eval()

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(input_ids=inputs["input_ids"])
            with torch.no_grad():
                t_logits = self.teacher(input_ids=inputs["input_ids"]).logits
            s = out.logits.float()
            vocab = s.shape[-1]
            kd = F.kl_div(F.log_softmax(s.reshape(-1, vocab) / T, -1), F.log_softmax(t_logits.reshape(-1, vocab) / T, -1),
                          log_target=True, reduction="batchmean") * T * T
            ce = F.cross_entropy(s[:, :-1].reshape(-1, vocab), inputs["labels"][:, 1:].reshape(-1))
            loss = ALPHA * kd + (1 - ALPHA) * ce
            return (loss, out) if return_outputs else loss

    student = student_of(teacher, layers)
    ds = datasets.Dataset.from_dict({"input_ids": blocks.tolist(), "labels": blocks.tolist()})
    with tempfile.TemporaryDirectory() as d:
        targs = TrainingArguments(output_dir=d, per_device_train_batch_size=args.batch_size,
                                  num_train_epochs=args.epochs, learning_rate=1e-3, warmup_ratio=0.0, weight_decay=0.01,
                                  max_grad_norm=1.0, use_cpu=True, eval_strategy="no", save_strategy="no",
                                  logging_strategy="no", report_to=[], dataloader_num_workers=0, seed=0,
                                  disable_tqdm=True, torch_compile=compile_, bf16=args.precision == "bf16")
        trainer = KDTrainer(model=student, args=targs, train_dataset=ds, data_collator=default_data_collator,
                            teacher=teacher)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    return {"tokens_per_s": blocks.size * args.epochs / seconds, "seconds": seconds, "optimizer": str(targs.optim),
            "torch_compile": compile_}


def interleaved_steps(teacher, layers, blocks, args) -> dict:
    """Cached vs --teacher-online training steps, alternated (A B B A ...) on one student, so load
    that changes during the run hits both alike. Eager, at --precision; the first two steps of each are warm-up."""
    import statistics

    import torch

    from compress.hardware import autocast
    from compress.tasks.causal_lm import CausalLMTask
    from compress.tasks.lm_kd import LMDistillSettings

    task = CausalLMTask()
    student = student_of(teacher, layers)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=True)
    settings = LMDistillSettings(divergences={"forward_kl": 1.0}, temperature=T, alpha=ALPHA)
    n = args.batch_size * (args.steps + 2)
    sub = blocks[:n]
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        targets = cache_targets(task, teacher, sub, args, Path(d))
        cache_seconds = time.perf_counter() - t0
        losses = {"cached": task.distill_loss(teacher, targets, settings),
                  "online": task.distill_loss(teacher, None, settings)}
        times = {"cached": [], "online": []}
        for i in range(args.steps + 2):
            idx = np.arange(i * args.batch_size, (i + 1) * args.batch_size)
            batch = {"input_ids": torch.from_numpy(sub[idx]), "labels": torch.from_numpy(sub[idx]),
                     "index": torch.from_numpy(idx)}
            for mode in (("cached", "online") if i % 2 == 0 else ("online", "cached")):
                t0 = time.perf_counter()
                with autocast("cpu", args.precision):
                    loss, _ = losses[mode](student, batch)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i >= 2:
                    times[mode].append(time.perf_counter() - t0)
    med = {m: statistics.median(v) for m, v in times.items()}
    return {"steps_each": args.steps, "median_step_seconds": med, "step_seconds": times,
            "online_over_cached": med["online"] / med["cached"],
            "cache_seconds_per_block": cache_seconds / len(sub)}


def main() -> None:
    import torch

    from compress.artifacts import library_versions
    from compress.data import DataConfig
    from compress.distill.student import choose_layers
    from compress.hardware import cpu_info
    from compress.lm_data import TokenStream, encode_text, load_text
    from compress.models import load_causal_lm

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="runs/austen-gpt")
    ap.add_argument("--student-layers", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=768, help="training blocks (the first ones of Austen's train split)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12, help="timed steps of each kind in the interleaved comparison")
    ap.add_argument("--only", default="", help="comma-separated subset of runs (debugging)")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="both sides: compress's loop and cache pass, the Trainer's bf16=True, the interleaved steps")
    ap.add_argument("--tag", default="", help="suffix of the result files (e.g. -bf16)")
    ap.add_argument("--tail-samples", type=int, default=32,
                    help="tail draws per position in the cache (compress distill's default for forward KL)")
    args = ap.parse_args()

    teacher, tokenizer = load_causal_lm(args.teacher)
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval()
    manifest = json.loads((Path(args.teacher) / "manifest.json").read_text())
    block = int(manifest["config"]["max_length"])
    data = load_text(DataConfig(dataset="austen", task="causal-lm"))
    enc = encode_text(data, tokenizer, block, splits=("train", "validation"))
    blocks = enc["train"].blocks[:args.blocks]
    v = enc["validation"]
    val = TokenStream(v.tokens[:4 * block], chars=1, block=block, stride=block)
    layers = choose_layers(f"layers={args.student_layers}", teacher.config.num_hidden_layers)
    runs = {"compress_compiled": lambda: run_compress(teacher, layers, blocks, val, args, True),
            "trainer_compiled": lambda: run_trainer(teacher, layers, blocks, args, True),
            "trainer_eager": lambda: run_trainer(teacher, layers, blocks, args, False),
            "compress_eager": lambda: run_compress(teacher, layers, blocks, val, args, False),
            "interleaved_steps": lambda: interleaved_steps(teacher, layers, enc["train"].blocks, args)}
    wanted = [r for r in runs if not args.only or r in args.only.split(",")]
    results = {}
    for name in wanted:
        print(name, "...", flush=True)
        results[name] = runs[name]()
        print("  ", results[name], flush=True)
    steps = results.pop("interleaved_steps", None)
    best = {side: max((results[k] for k in (f"{side}_compiled", f"{side}_eager") if k in results),
                      key=lambda r: r["tokens_per_s"], default=None) for side in ("compress", "trainer")}
    speedup = {}
    if best["compress"] and best["trainer"]:
        speedup["best_vs_best"] = best["compress"]["tokens_per_s"] / best["trainer"]["tokens_per_s"]
        for mode in ("compiled", "eager"):
            if f"compress_{mode}" in results and f"trainer_{mode}" in results:
                speedup[mode] = results[f"compress_{mode}"]["tokens_per_s"] / results[f"trainer_{mode}"]["tokens_per_s"]
    report = {"benchmark": "distill_throughput_lm",
              "settings": {"teacher": args.teacher, "teacher_params": sum(p.numel() for p in teacher.parameters()),
                           "student_layers": layers,
                           "student_params": sum(p.numel() for p in student_of(teacher, layers).parameters()),
                           "blocks": len(blocks), "block": block, "epochs": args.epochs, "batch_size": args.batch_size,
                           "top_k": args.top_k, "tail_samples": args.tail_samples, "alpha": ALPHA, "temperature": T,
                           "precision": args.precision,
                           "threads": torch.get_num_threads(), "dataset": "austen (first blocks of train)"},
              "environment": {"cpu": cpu_info(), "python": platform.python_version(), "versions": library_versions(),
                              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
              "results": results, "speedup": speedup, "interleaved_steps": steps,
              "austen_train_blocks": len(enc["train"].blocks)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"distill_throughput_lm{args.tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"distill_throughput_lm{args.tag}.md").write_text(render(report))
    print(render(report))


def render(report: dict) -> str:
    """Markdown from the JSON (never from logs)."""
    s, r, sp = report["settings"], report["results"], report["speedup"]
    names = {"compress_compiled": "compress: top-k cache + `fit`, compile on",
             "compress_eager": "compress: top-k cache + `fit`, eager",
             "trainer_compiled": "Trainer subclass, teacher every step, torch_compile=True",
             "trainer_eager": "Trainer subclass, teacher every step, eager"}
    lines = ["# Causal-LM distillation throughput: compress vs a transformers.Trainer that runs the teacher", "",
             f"Teacher `{s['teacher']}` ({s['teacher_params'] / 1e6:.1f} M parameters) -> student of its layers "
             f"{s['student_layers']} ({s['student_params'] / 1e6:.1f} M), {s['blocks']} Austen blocks of {s['block']} "
             f"tokens, {s['epochs']} epoch(s), batch {s['batch_size']}, top-k {s['top_k']} + {s.get('tail_samples', 0)} tail draws, {s['precision']}, "
             f"{s['threads']} threads, CPU {report['environment']['cpu'].get('model')}. Wall time of the whole call "
             "(compress: cache pass + training), compilation included.",
             "", "| run | tokens/s | seconds | of which cache pass |", "|---|---|---|---|"]
    for k, v in r.items():
        cache = f"{v['cache_seconds']:.1f} s" if "cache_seconds" in v else "-"
        lines.append(f"| {names[k]} | {v['tokens_per_s']:.0f} | {v['seconds']:.1f} | {cache} |")
    lines += [""] + [f"- {k.replace('_', ' ')}: **{v:.2f}x**" for k, v in sp.items()]
    st = report.get("interleaved_steps")
    if st:
        n = report["austen_train_blocks"]
        steps = -(-n // s["batch_size"])
        med = st["median_step_seconds"]
        cache = st["cache_seconds_per_block"] * n
        lines += ["", "## Top-k cache vs --teacher-online, interleaved steps", "",
                  f"{st['steps_each']} training steps of each, alternated on one student (eager, {s['precision']}, batch "
                  f"{s['batch_size']}); medians. An Austen epoch is {steps} steps ({n} blocks).", "",
                  "| targets | s/step | s/epoch (projected) |", "|---|---|---|",
                  f"| top-k cache | {med['cached']:.3f} | {med['cached'] * steps:.0f} (+ {cache:.0f} s cache pass, once) |",
                  f"| teacher online | {med['online']:.3f} | {med['online'] * steps:.0f} |", "",
                  f"- epoch speed-up of the cache: **{st['online_over_cached']:.2f}x**; counting the cache pass over one "
                  f"epoch: {med['online'] * steps / (med['cached'] * steps + cache):.2f}x, over three: "
                  f"{3 * med['online'] * steps / (3 * med['cached'] * steps + cache):.2f}x"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
