"""Classifier distillation throughput over a whole distillation: compress (teacher outputs cached
once, then the one loop) against a transformers.Trainer subclass that runs the teacher on every
step, given group_by_length=True. Every epoch is run, on both sides; nothing is projected.

Students (--students), each trained the same way on both sides from the same initial weights:
- quickstart: the quickstart recipe's student: teacher layers 0, 2, 4, half their attention heads,
  a quarter of their feed-forward units and the pruned vocabulary (tokens seen twice in the
  training split), losses logits + hidden (hidden-state MSE on the uniform layer pairs), built
  by the same functions `compress distill` calls; the Trainer maps the student's token ids back to
  the teacher's, as compress's cache pass does.
- copy2: teacher layers 0 and 3 copied whole, logit KD only (the student of trainer_throughput.py).

Both sides: the first --examples training examples of rt-snippets, --epochs epochs, batch 32,
max_length 128, padding to a multiple of 8, T=2, alpha 0.5, AdamW lr 2e-4 (the quickstart's), no
warm-up, weight decay 0.01, grad clip 1.0, the same precision and thread count, no saving and no
evaluation during the run (compress's loop scores 64 validation examples once per epoch; its clock
keeps that). compress's clock covers its cache pass (logits and the mapped layers' hidden
states, at `compress distill`'s default --teacher-precision auto: bf16 where this CPU runs it
fast, whatever the student's precision; the Trainer's teacher runs at the student's) and every epoch; the Trainer's covers `Trainer.train()`. Student construction and
pruning are the same work on both sides and are not timed. Before the timed runs, both sides do
one short warm-up run (oneDNN builds its kernels per shape once per process), then --rounds
timed rounds alternate compress, Trainer, Trainer, compress, ...; medians are reported.
Augmentation is left out: both sides would run the teacher once on every perturbed copy.

    .venv/bin/python benchmarks/distill_throughput.py --examples 2560 --epochs 3

Writes benchmarks/results/distill_throughput{--tag}.json and .md (rendered from the JSON).
"""

from __future__ import annotations

import argparse
import copy
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
ALPHA, T, LR, BATCH = 0.5, 2.0, 2e-4, 32

STUDENTS = {
    "quickstart": {"layers": 3, "prune_heads": 6, "prune_ffn": 384, "min_token_count": 2,
                   "losses": ["logits", "hidden"]},
    "copy2": {"layers": [0, 3], "losses": ["logits"]},
}


class Student:
    """One student, built once; `fresh()` hands out copies with the same initial weights."""

    def __init__(self, name: str, teacher, t_tok, data, t_enc):
        from compress.data import encode, iterate
        from compress.distill.losses import layer_pairs
        from compress.distill.prune_ffn import prune_ffn
        from compress.distill.prune_heads import prune_heads
        from compress.distill.prune_vocab import prune_vocab
        from compress.distill.student import choose_layers, from_teacher_layers
        import torch

        spec = STUDENTS[name]
        self.name, self.losses = name, spec["losses"]
        n_teacher = teacher.config.num_hidden_layers
        layers = spec["layers"] if isinstance(spec["layers"], list) else choose_layers(f"layers={spec['layers']}",
                                                                                         n_teacher)
        torch.manual_seed(0)
        model = from_teacher_layers(teacher, t_tok, layers).model
        # Ranked on the first 512 training examples, as compress distill does (FFN_SAMPLE).
        sample = np.arange(512)
        batches = lambda: iterate(t_enc["train"], np.array_split(sample, 8), t_tok.pad_token_id)  # noqa: E731
        if "prune_heads" in spec:
            prune_heads(model, spec["prune_heads"], batches())
        if "prune_ffn" in spec:
            prune_ffn(model, spec["prune_ffn"], batches())
        self.tokenizer, self.teacher_ids, self.enc = t_tok, None, t_enc
        self._dir = tempfile.TemporaryDirectory()
        if "min_token_count" in spec:
            self.tokenizer, vocab = prune_vocab(model, t_tok, t_enc["train"].input_ids,
                                                min_count=spec["min_token_count"], directory=Path(self._dir.name))
            self.teacher_ids = vocab.kept
            self.enc = encode(data, self.tokenizer, 128, splits=("train", "validation"))
        self.pairs = layer_pairs("uniform", len(layers), n_teacher) if "hidden" in self.losses else []
        self.layers = layers
        self._model = model
        self.params = sum(p.numel() for p in model.parameters())

    def fresh(self):
        return copy.deepcopy(self._model).train()


def subset(split, n: int):
    """The first n examples of an EncodedSplit, as a new EncodedSplit."""
    out = copy.copy(split)
    out.input_ids = split.input_ids[:n]
    out.token_type_ids = split.token_type_ids[:n] if split.token_type_ids is not None else None
    out.labels, out.lengths = split.labels[:n], split.lengths[:n]
    return out


def run_compress(teacher, student: Student, n: int, epochs: int, precision: str) -> dict:
    from compress.distill import DistillConfig
    from compress.hardware import resolve_precision
    from compress.distill.losses import DistillLoss, TeacherCache
    from compress.loop import LoopConfig, fit
    from compress.tasks.classification import ClassificationTask

    task = ClassificationTask()
    train, val = subset(student.enc["train"], n), subset(student.enc["validation"], 64)
    model = student.fresh()
    cfg = LoopConfig(epochs=epochs, batch_size=BATCH, lr=LR, warmup_ratio=0.0, weight_decay=0.01, grad_clip=1.0,
                     precision=precision, checkpoint_every=0, progress=False, seed=0)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        # As `compress distill` makes it: its default batch and teacher precision (auto).
        defaults = DistillConfig.model_fields
        cache = TeacherCache(teacher, train, student.tokenizer.pad_token_id, layers=sorted({t for _, t in student.pairs}),
                             batch_size=defaults["teacher_batch_size"].default, device="cpu",
                             precision=resolve_precision(defaults["teacher_precision"].default, "cpu"),
                             teacher_ids=student.teacher_ids)
        cache_seconds = time.perf_counter() - t0
        loss = DistillLoss(teacher, cache.logits, losses=student.losses, temperature=T, alpha=ALPHA, hidden_weight=1.0,
                           attention_weight=0.0, pairs=student.pairs or [(1, 1)], teacher_ids=student.teacher_ids,
                           hidden_cache=cache if student.pairs else None)
        assert not loss.needs_teacher_forward
        result = fit(model, train=train, cfg=cfg, work=Path(d), loss_fn=loss, evaluate=task.validator(val, 64),
                     metric=task.primary_metric, higher_is_better=True)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "cache_seconds": cache_seconds, "samples_per_s": n * epochs / seconds,
            "loop_seconds_per_epoch": result.seconds_per_epoch, "steps": result.steps}


def run_trainer(teacher, student: Student, n: int, epochs: int, precision: str) -> dict:
    import datasets
    import torch
    import torch.nn.functional as F
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    ids_map = torch.from_numpy(student.teacher_ids) if student.teacher_ids is not None else None
    pairs = student.pairs

    class KDTrainer(Trainer):
        """The usual KD Trainer: the frozen teacher runs under no_grad on every batch."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(**inputs, output_hidden_states=bool(pairs))
            t_in = {k: v for k, v in inputs.items() if k in INPUTS}
            if ids_map is not None:
                t_in["input_ids"] = ids_map[t_in["input_ids"]]
            with torch.no_grad():
                t_out = teacher(**t_in, output_hidden_states=bool(pairs))
            kd = F.kl_div(F.log_softmax(out.logits.float() / T, -1), F.log_softmax(t_out.logits.float() / T, -1),
                          log_target=True, reduction="batchmean") * T * T
            loss = ALPHA * kd + (1 - ALPHA) * out.loss
            if pairs:
                m = inputs["attention_mask"].unsqueeze(-1).float()
                h = sum((((out.hidden_states[s].float() - t_out.hidden_states[t].float()) ** 2) * m).sum()
                        / (m.sum() * m.new_tensor(out.hidden_states[s].shape[-1])) for s, t in pairs) / len(pairs)
                loss = loss + h
            return (loss, out) if return_outputs else loss

    split = student.enc["train"]
    columns = {"input_ids": split.input_ids[:n], "labels": split.labels[:n].tolist()}
    if split.token_type_ids is not None:
        columns["token_type_ids"] = split.token_type_ids[:n]
    ds = datasets.Dataset.from_dict(columns)
    model = student.fresh()
    with tempfile.TemporaryDirectory() as d:
        args = TrainingArguments(output_dir=d, per_device_train_batch_size=BATCH, num_train_epochs=epochs,
                                 learning_rate=LR, warmup_ratio=0.0, weight_decay=0.01, max_grad_norm=1.0,
                                 bf16=precision == "bf16", use_cpu=True, eval_strategy="no", save_strategy="no",
                                 logging_strategy="no", report_to=[], dataloader_num_workers=0, seed=0,
                                 disable_tqdm=True, group_by_length=True)
        trainer = KDTrainer(model=model, args=args, train_dataset=ds,
                            data_collator=DataCollatorWithPadding(student.tokenizer, pad_to_multiple_of=8))
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "samples_per_s": n * epochs / seconds, "optimizer": str(args.optim)}


def main() -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    from compress.artifacts import library_versions
    from compress.data import DataConfig, encode, load_data
    from compress.hardware import cpu_info, resolve_precision
    from compress.models import builtin_model_dir, load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=2560, help="training examples (the first ones of rt-snippets)")
    ap.add_argument("--epochs", type=int, default=3, help="the quickstart distils for 3")
    ap.add_argument("--students", default="quickstart,copy2", help=f"comma-separated, from {', '.join(STUDENTS)}")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="both sides; auto: bf16 where this CPU runs it fast (compress.hardware), else fp32")
    ap.add_argument("--teacher", default=None, help="fine-tuned teacher dir (default: runs/quickstart/teacher or "
                    "runs/teacher if present, else minilm-l6 with a new head: the speed is the same)")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds of each side, alternating; medians reported")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    args = ap.parse_args()

    args.precision = resolve_precision(args.precision, "cpu")
    base = str(builtin_model_dir("minilm-l6"))
    teacher_dir = args.teacher or next((p for p in ("runs/quickstart/teacher", "runs/teacher")
                                        if Path(p, "manifest.json").is_file()), base)
    torch.manual_seed(0)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir, num_labels=2).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    t_tok = load_tokenizer(base)
    data = load_data(DataConfig())
    t_enc = encode(data, t_tok, 128, splits=("train", "validation"))
    results = {}
    for name in args.students.split(","):
        student = Student(name, teacher, t_tok, data, t_enc)
        print(f"{name}: layers {student.layers}, {student.params / 1e6:.2f} M parameters", flush=True)
        run_compress(teacher, student, 256, 1, args.precision)  # warm-up, both sides, not counted
        run_trainer(teacher, student, 256, 1, args.precision)
        rounds = {"compress": [], "trainer": []}
        for r in range(args.rounds):  # alternating order, so drift in the machine's speed hits both
            for side in (("compress", "trainer") if r % 2 == 0 else ("trainer", "compress")):
                run = run_compress if side == "compress" else run_trainer
                rounds[side].append(run(teacher, student, args.examples, args.epochs, args.precision))
                print(f"   round {r + 1} {side}:", rounds[side][-1], flush=True)
        med = {side: float(np.median([x["seconds"] for x in runs])) for side, runs in rounds.items()}
        results[name] = {"layers": student.layers, "params": student.params, "losses": student.losses,
                         "vocab": len(student.tokenizer), "rounds": rounds,
                         "compress_seconds": med["compress"], "trainer_seconds": med["trainer"],
                         "cache_seconds": float(np.median([x["cache_seconds"] for x in rounds["compress"]])),
                         "speedup": med["trainer"] / med["compress"]}
    report = {"benchmark": "distill_throughput",
              "settings": {"examples": args.examples, "epochs": args.epochs, "batch_size": BATCH, "lr": LR,
                           "temperature": T, "alpha": ALPHA, "precision": args.precision, "max_length": 128,
                           "teacher": teacher_dir, "threads": torch.get_num_threads(), "rounds": args.rounds,
                           "compress_cache_precision": resolve_precision("auto", "cpu"),
                           "trainer": "KD subclass, group_by_length=True, DataCollatorWithPadding(pad_to_multiple_of=8)"},
              "environment": {"cpu": cpu_info(), "python": platform.python_version(), "versions": library_versions(),
                              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
              "results": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"distill_throughput{args.tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"distill_throughput{args.tag}.md").write_text(render(report))
    print(render(report))


def render(report: dict) -> str:
    """Markdown from the JSON (never from logs)."""
    s, r = report["settings"], report["results"]
    lines = ["# Classifier distillation throughput: compress vs a transformers.Trainer that runs the teacher", "",
             f"{s['examples']} rt-snippets training examples, {s['epochs']} epochs (all run), batch {s['batch_size']}, "
             f"{s['precision']}, max_length {s['max_length']}, {s['threads']} threads, CPU "
             f"{report['environment']['cpu']['model']}. Trainer: {s['trainer']}. compress's time includes its cache "
             f"pass (teacher in {s.get('compress_cache_precision', s['precision'])}).", "",
             "| student | losses | parameters | vocabulary | compress s (cache s) | Trainer s | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for name, x in r.items():
        lines.append(f"| {name} (teacher layers {x['layers']}) | {' + '.join(x['losses'])} | {x['params'] / 1e6:.2f} M | "
                     f"{x['vocab']} | {x['compress_seconds']:.1f} ({x['cache_seconds']:.1f}) | {x['trainer_seconds']:.1f} | "
                     f"**{x['speedup']:.2f}x** |")
    lines += ["", f"Seconds are medians of {s['rounds']} alternating rounds per side, after a short warm-up run of each."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
