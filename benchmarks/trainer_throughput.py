"""Training throughput: compress's loop against transformers.Trainer, on the same data and settings.

(a) fine-tuning minilm-l6: `compress.loop.fit` (length-bucketed batches) vs `transformers.Trainer`
    given `group_by_length=True` (its LengthGroupedSampler: the length grouping a Trainer user
    turns on) and dynamic padding via DataCollatorWithPadding; its default random sampler is
    measured too, for reference.
(b) distillation with logit KD into a 2-layer student copied from the teacher: compress (teacher
    logits cached in one pass before training, looked up per batch) vs the usual recipe, a Trainer
    subclass whose compute_loss runs the teacher on every step. One epoch, projected to three;
    benchmarks/distill_throughput.py runs every epoch, and the quickstart's own student too.

Both sides: the same first N training examples of rt-snippets (one epoch over them), batch size,
max_length 128, padding to a multiple of 8, the same precision (bf16 autocast where the CPU has
AMX/AVX512-BF16, else fp32), AdamW, lr 5e-5, no warm-up, grad clip 1.0, no evaluation or saving
during the timed run, the same thread count. Samples/s = examples / seconds of the training loop;
for compress distillation it is also given with the cache pass included.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python benchmarks/trainer_throughput.py --examples 1280

Writes benchmarks/results/trainer_throughput.json and .md (the .md is rendered from the JSON).
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
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def padding_efficiency(lengths: np.ndarray, batches: list[np.ndarray], multiple: int = 8) -> float:
    """Share of real tokens among all tokens the batches compute on."""
    real = padded = 0
    for idx in batches:
        width = -(-int(lengths[idx].max()) // multiple) * multiple
        real += int(lengths[idx].sum())
        padded += width * len(idx)
    return real / padded


def trainer_args(out: str, batch_size: int, bf16: bool, seed: int, group_by_length: bool = True,
                 torch_compile: bool = False):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=out, per_device_train_batch_size=batch_size, num_train_epochs=1,
                             learning_rate=5e-5, warmup_ratio=0.0, weight_decay=0.01, max_grad_norm=1.0,
                             bf16=bf16, use_cpu=True, eval_strategy="no", save_strategy="no", logging_strategy="no",
                             report_to=[], dataloader_num_workers=0, seed=seed, disable_tqdm=True,
                             group_by_length=group_by_length, torch_compile=torch_compile)


def run_trainer(model, tokenizer, ds, batch_size: int, bf16: bool, teacher=None, temperature: float = 2.0,
                group_by_length: bool = True, torch_compile: bool = False) -> dict:
    """transformers.Trainer; with a teacher, the usual KD subclass that runs it on every step."""
    import torch
    import torch.nn.functional as F
    from transformers import DataCollatorWithPadding, Trainer

    class DistillTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(**inputs)
            with torch.no_grad():
                t_logits = teacher(**{k: v for k, v in inputs.items() if k in INPUTS}).logits
            kd = F.kl_div(F.log_softmax(out.logits.float() / temperature, -1),
                          F.log_softmax(t_logits.float() / temperature, -1), log_target=True,
                          reduction="batchmean") * temperature ** 2
            loss = 0.5 * kd + 0.5 * out.loss
            return (loss, out) if return_outputs else loss

    with tempfile.TemporaryDirectory() as d:
        cls = DistillTrainer if teacher is not None else Trainer
        trainer = cls(model=model, args=trainer_args(d, batch_size, bf16, 0, group_by_length, torch_compile),
                      train_dataset=ds,
                      data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8))
        t0 = time.perf_counter()
        metrics = trainer.train().metrics
        seconds = time.perf_counter() - t0
    return {"samples_per_s": len(ds) / seconds, "seconds": seconds, "trainer_reported_samples_per_s":
            metrics.get("train_samples_per_second")}


def run_floor(model, train, batch_size: int) -> dict:
    """The same bucketed batches as compress, through the bare loop of benchmarks/floor.py."""
    from floor import floor_seconds

    from compress.data import bucketed_batches

    batches = [{k: v for k, v in train.collate(idx).items()}
               for idx in bucketed_batches(train.lengths, batch_size, shuffle=True)]
    seconds = floor_seconds(model, batches, lr=5e-5)
    return {"samples_per_s": len(train) / seconds, "seconds": seconds}


def run_compress(model, train, val, batch_size: int, precision: str, loss_fn=None, extra_seconds=0.0,
                 compile_: bool = False):
    from compress.loop import LoopConfig, fit
    from compress.tasks.classification import ClassificationTask

    task = ClassificationTask()
    cfg = LoopConfig(epochs=1, batch_size=batch_size, lr=5e-5, warmup_ratio=0.0, weight_decay=0.01, grad_clip=1.0,
                     precision=precision, checkpoint_every=0, progress=False, seed=0, compile=compile_)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        result = fit(model, train=train, cfg=cfg, work=Path(d), loss_fn=loss_fn or task.loss,
                     evaluate=task.validator(val, 64), metric=task.primary_metric, higher_is_better=True)
        wall = time.perf_counter() - t0
    # The whole call, as for the Trainer (its final evaluation and checkpoint included); fit's own
    # figure, the training loop alone, is kept beside it.
    out = {"samples_per_s": len(train) / wall, "seconds": wall, "loop_samples_per_s": result.train_samples_per_s,
           "steps": result.steps}
    if extra_seconds:
        out["samples_per_s_with_cache"] = len(train) / (out["seconds"] + extra_seconds)
        out["cache_seconds"] = extra_seconds
    return out


def main() -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    from compress.data import DataConfig, EncodedSplit, bucketed_batches, load_data, tokenize
    from compress.distill.losses import DistillLoss, TeacherCache
    from compress.distill.student import from_teacher_layers
    from compress.hardware import cpu_info, resolve_precision
    from compress.models import builtin_model_dir, load_tokenizer
    from compress.artifacts import library_versions

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=1280, help="training examples (one epoch over them)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--teacher", default=None, help="fine-tuned teacher dir for (b) (default: runs/teacher if it "
                    "exists, else minilm-l6 with a new head: the speed is the same)")
    ap.add_argument("--student-layers", default="0,3")
    ap.add_argument("--compile", action="store_true", help="compress's loop with compile on")
    ap.add_argument("--trainer-compile", action="store_true", help="also time the Trainer with torch_compile=True")
    ap.add_argument("--runs", default="train,distill", help="which parts to run")
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds of (a); the first warms up, the median "
                    "of the others is reported")
    args = ap.parse_args()

    precision = resolve_precision("auto", "cpu")
    bf16 = precision == "bf16"
    base = str(builtin_model_dir("minilm-l6"))
    teacher_dir = args.teacher or ("runs/teacher" if Path("runs/teacher/manifest.json").is_file() else base)
    tokenizer = load_tokenizer(base)
    data = load_data(DataConfig())
    ds = data["train"].shuffle(seed=0).select(range(args.examples))
    tok_ds = tokenize(ds, tokenizer, 128).remove_columns(["length"])
    train = EncodedSplit(tokenize(ds, tokenizer, 128))
    val = EncodedSplit(tokenize(data["validation"].select(range(64)), tokenizer, 128))
    train.pad_id = val.pad_id = tokenizer.pad_token_id
    rng = np.random.default_rng(0)
    random_batches = np.array_split(rng.permutation(len(train)), -(-len(train) // args.batch_size))
    from transformers.trainer_pt_utils import LengthGroupedSampler

    grouped = list(LengthGroupedSampler(args.batch_size, lengths=train.lengths.tolist(),
                                        generator=torch.Generator().manual_seed(0)))
    grouped_batches = [np.asarray(grouped[i:i + args.batch_size]) for i in range(0, len(grouped), args.batch_size)]
    results = {"padding_efficiency": {
        "compress_bucketed": padding_efficiency(train.lengths, bucketed_batches(train.lengths, args.batch_size,
                                                                                shuffle=True)),
        "trainer_group_by_length": padding_efficiency(train.lengths, grouped_batches),
        "trainer_random_sampler": padding_efficiency(train.lengths, random_batches)}}
    runs = args.runs.split(",")

    def fresh(path):
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    print("(a) fine-tuning minilm-l6")
    if "train" in runs:
        plan = {"train_floor": lambda: run_floor(fresh(base), train, args.batch_size),
                "train_compress": lambda: run_compress(fresh(base), train, val, args.batch_size, precision,
                                                       compile_=args.compile),
                "train_trainer": lambda: run_trainer(fresh(base), tokenizer, tok_ds, args.batch_size, bf16),
                "train_trainer_random": lambda: run_trainer(fresh(base), tokenizer, tok_ds, args.batch_size, bf16,
                                                            group_by_length=False)}
        if args.trainer_compile:
            plan["train_trainer_compiled"] = lambda: run_trainer(fresh(base), tokenizer, tok_ds, args.batch_size,
                                                                 bf16, torch_compile=True)
        # Alternating rounds: the first warms oneDNN's per-shape kernel caches and the allocator for
        # the whole process (whichever side ran first paid for every later one), so it is not counted.
        rounds: dict[str, list[dict]] = {name: [] for name in plan}
        for rnd in range(args.repeats):
            for name, run in plan.items():
                rounds[name].append(run())
                print(f"   round {rnd + 1} {name}:", rounds[name][-1], flush=True)
        for name, runs_ in rounds.items():
            timed = runs_[1:] or runs_
            results[name] = {"samples_per_s": float(np.median([r["samples_per_s"] for r in timed])),
                             "seconds": float(np.median([r["seconds"] for r in timed])), "rounds": runs_}

    layers = [int(x) for x in args.student_layers.split(",")]
    if "distill" in runs:
        print("(b) logit distillation into a 2-layer student")
        teacher = fresh(teacher_dir).eval()
        t0 = time.perf_counter()
        from compress.distill import DistillConfig

        defaults = DistillConfig.model_fields  # the cache pass as `compress distill` runs it
        cache = TeacherCache(teacher, train, tokenizer.pad_token_id, batch_size=defaults["teacher_batch_size"].default,
                             device="cpu", precision=resolve_precision(defaults["teacher_precision"].default,
                                                                       "cpu")).logits
        cache_seconds = time.perf_counter() - t0
        loss = DistillLoss(teacher, cache, losses=["logits"], temperature=2.0, alpha=0.5, hidden_weight=0,
                           attention_weight=0, pairs=[(1, 1)])
        student = from_teacher_layers(teacher, tokenizer, layers).model
        results["distill_compress"] = run_compress(student, train, val, args.batch_size, precision, loss_fn=loss,
                                                   extra_seconds=cache_seconds)
        print("   compress:", results["distill_compress"])
        student = from_teacher_layers(teacher, tokenizer, layers).model
        results["distill_trainer"] = run_trainer(student, tokenizer, tok_ds, args.batch_size, bf16, teacher=teacher)
        print("   Trainer: ", results["distill_trainer"])

    speedup = {}
    if "train_compress" in results:
        speedup["train"] = results["train_compress"]["samples_per_s"] / results["train_trainer"]["samples_per_s"]
        speedup["train_vs_default_sampler"] = (results["train_compress"]["samples_per_s"]
                                               / results["train_trainer_random"]["samples_per_s"])
        if "train_trainer_compiled" in results:
            speedup["train_vs_compiled_trainer"] = (results["train_compress"]["samples_per_s"]
                                                    / results["train_trainer_compiled"]["samples_per_s"])
    if "distill_compress" in results:
        speedup["distill"] = results["distill_compress"]["samples_per_s"] / results["distill_trainer"]["samples_per_s"]
        speedup["distill_with_cache"] = (results["distill_compress"]["samples_per_s_with_cache"]
                                         / results["distill_trainer"]["samples_per_s"])
    results["speedup"] = speedup
    report = {"benchmark": "trainer_throughput",
              "settings": {"examples": args.examples, "batch_size": args.batch_size, "precision": precision,
                           "max_length": 128, "pad_to_multiple_of": 8, "lr": 5e-5, "epochs": 1,
                           "threads": torch.get_num_threads(), "model": "minilm-l6", "teacher": teacher_dir,
                           "student_layers": layers, "temperature": 2.0, "alpha": 0.5, "compress_compile": args.compile,
                           "repeats": args.repeats,
                           "trainer_sampler": "group_by_length=True (LengthGroupedSampler); the default "
                                              "RandomSampler for reference", "collator": "DataCollatorWithPadding"},
              "environment": {"cpu": cpu_info(), "python": platform.python_version(), "versions": library_versions(),
                              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
              "results": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "trainer_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "trainer_throughput.md").write_text(render(report))
    print(render(report))


def render(report: dict) -> str:
    """Markdown table from the JSON (never from logs)."""
    r, s = report["results"], report["settings"]
    sp = r["speedup"]
    rows = []
    if "train_compress" in r:
        rows += [("(a) fine-tune minilm-l6", "the floor: forward, backward, clip, AdamW only (benchmarks/floor.py)",
                  r["train_floor"]["samples_per_s"], "") if "train_floor" in r else None,
                 ("" if "train_floor" in r else "(a) fine-tune minilm-l6",
                  "compress fit" + (", compile on" if s.get("compress_compile") else ""),
                  r["train_compress"]["samples_per_s"], ""),
                 ("", "transformers.Trainer, group_by_length=True", r["train_trainer"]["samples_per_s"],
                  f"**{sp['train']:.2f}x**")]
        if "train_trainer_compiled" in r:
            rows.append(("", "transformers.Trainer, group_by_length=True, torch_compile=True",
                         r["train_trainer_compiled"]["samples_per_s"], f"{sp['train_vs_compiled_trainer']:.2f}x"))
        rows.append(("", "transformers.Trainer, default sampler", r["train_trainer_random"]["samples_per_s"],
                     f"{sp['train_vs_default_sampler']:.2f}x"))
    if "distill_compress" in r:
        rows += [("(b) logit KD, 2-layer student", "compress (cached teacher logits)",
                  r["distill_compress"]["samples_per_s"], ""),
                 ("", "  same, cache pass included", r["distill_compress"]["samples_per_s_with_cache"], ""),
                 ("", "Trainer subclass, teacher every step, group_by_length=True", r["distill_trainer"]["samples_per_s"],
                  f"{sp['distill']:.2f}x ({sp['distill_with_cache']:.2f}x with cache)")]
    pe = r["padding_efficiency"]
    lines = ["# Training throughput: compress vs transformers.Trainer", "",
             f"{s['examples']} rt-snippets training examples, one epoch, batch {s['batch_size']}, {s['precision']}, "
             f"max_length {s['max_length']}, padding to a multiple of {s['pad_to_multiple_of']}, "
             f"{s['threads']} threads, CPU {report['environment']['cpu']['model']}. (a): median of rounds "
             f"2-{s.get('repeats', 1)} of alternating runs (round 1 warms up).", "",
             "| task | trainer | samples/s | compress speed-up |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c:.1f} | {d} |" for a, b, c, d in filter(None, rows)]
    if "train_floor" in r:
        floor = r["train_floor"]["samples_per_s"]
        lines += ["", "Share of the floor's speed: compress " f"{r['train_compress']['samples_per_s'] / floor:.0%}, "
                  f"Trainer with group_by_length {r['train_trainer']['samples_per_s'] / floor:.0%}."]
    lines += ["", f"Real tokens among computed tokens: compress length-bucketed batches "
                  f"{pe['compress_bucketed']:.1%}, Trainer's group_by_length "
                  f"{pe.get('trainer_group_by_length', float('nan')):.1%}, its random batches "
                  f"{pe['trainer_random_sampler']:.1%}."]
    if "distill_compress" in r:
        # The cache pass is paid once per run, not per epoch: what a 3-epoch distillation costs each way.
        d, t = r["distill_compress"], r["distill_trainer"]
        ours, theirs = d["cache_seconds"] + 3 * d["seconds"], 3 * t["seconds"]
        lines += ["", f"Over a 3-epoch distillation (cache pass once, then 3 epochs): compress {ours:.1f} s, the "
                      f"Trainer subclass {theirs:.1f} s: **{theirs / ours:.2f}x**."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
