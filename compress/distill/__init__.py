"""`compress distill`: train a smaller student to imitate a teacher (a classifier or a causal LM).

Distillation is the ordinary training loop (`compress.loop.fit`) with a different loss:
soft targets from the teacher (cached once, before training), optionally hidden-state and
attention matching between mapped layers. Unless `--no-baseline`, the same student (same
initial weights, same schedule) is also trained on hard labels only, so every report shows
what distillation bought. The teacher's task picks the flow: classifiers below, causal LMs in
`compress/distill/lm.py` (top-k teacher cache, token-level KL losses). See docs/distill.md.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from compress import distributed as dist
from compress.artifacts import weights_size
from compress.data import EncodedSplit, check_labels, encode, iterate, load_data, tokenize
from compress.distill.augment import augment_texts
from compress.distill.losses import (LOSS_NAMES, DistillLoss, TeacherCache, disable_attention_dropout, layer_pairs,
                                     make_projections)
from compress.anatomy import layer_list
from compress.distill.student import build_student
from compress.errors import UserError
from compress.lineage import inherits_data
from compress.loop import LoopConfig, fit, prepare_work_dir
from compress.tasks.classification import ClassificationTask, label_loss, predict_logits
from compress.tasks.lm_kd import LM_LOSSES
from compress.tasks.registry import task_for_artifact
from compress.metrics import classification_metrics
from compress.models import load_classifier
from compress.train import check_output, save_artifact

REPORT = "distill_report.md"
FFN_SAMPLE = 512  # training examples that rank the heads and feed-forward units for --prune-heads/--prune-ffn


class DistillConfig(LoopConfig):
    """Distil a teacher (a fine-tuned classifier or a causal LM) into a smaller student."""

    teacher: str = Field(..., description="directory of the teacher: a fine-tuned sequence classifier or a causal LM (e.g. made by compress train)")
    student: str = Field("layers=2", description="layers=K or layers=I,J (copy teacher layers), a size spec like bert:layers=2,hidden=256,heads=4,ff=1024 (classifier) or gpt2:layers=2,hidden=256,heads=4 / llama:... (causal LM), or a local model directory with the teacher's tokenizer")
    out: str = Field(..., description="output artifact directory")
    losses: list[str] | None = Field(None, description="comma-separated losses besides hard-label / next-token CE. Classifier: logits (soft targets), hidden (hidden-state MSE), attention (attention KL); default logits,hidden. Causal LM: forward_kl (= logits), reverse_kl, skew_kl, skew_reverse_kl, jsd, hidden, each optionally name:weight; default forward_kl")
    temperature: float | None = Field(None, gt=0, description="softmax temperature of the soft targets (the KL is scaled by T^2); default 2 for classifiers, 1 for causal LMs")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the soft-target KL; hard-label CE gets 1 - alpha")
    top_k: int = Field(32, ge=1, description="causal LM: keep the teacher's k most likely next tokens per position (plus the leftover mass) in the on-disk cache")
    tail_samples: int | None = Field(None, ge=0, description="causal LM: also cache this many ids per position drawn from the teacher's distribution outside its top k; forward KL then estimates the tail instead of matching only its mass (default 32 with the cache and forward_kl, else 0; 0 = off; docs/distill.md)")
    teacher_online: bool = Field(False, description="causal LM: run the teacher on every batch and distil from its full distribution instead of the top-k cache")
    skew: float = Field(0.1, gt=0, lt=1, description="causal LM: the mixing weight a of skew_kl = KL(p || a p + (1-a) q) and skew_reverse_kl")
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="causal LM: beta of the generalized JSD (jsd) between teacher p and student q")
    hidden_weight: float = Field(1.0, ge=0, description="weight of the hidden-state MSE")
    attention_weight: float = Field(1.0, ge=0, description="weight of the attention-distribution KL")
    layer_map: str = Field("uniform", description="student->teacher layers for hidden/attention losses: uniform, last, or pairs like 1:3,2:6 (1-based)")
    prune_heads: int | None = Field(None, ge=1, description="keep this many attention heads in every student layer, those whose output has the largest mean norm on 512 training examples, before training (docs/distill.md)")
    prune_ffn: int | None = Field(None, ge=1, description="narrow every student layer's feed-forward block to this many units, keeping those with the largest mean activation on 512 training examples times out-projection norm, before training (docs/distill.md)")
    prune_vocab: bool = Field(False, description="keep only the tokens of the training data (plus special tokens) in the student")
    min_token_count: int = Field(1, ge=1, description="with --prune-vocab, keep tokens seen at least this many times in training")
    augment: int = Field(0, ge=0, description="add this many perturbed copies of each training example (masked words, replaced words, short spans), labelled by the teacher (docs/distill.md)")
    baseline: bool = Field(True, description="also train the same student on hard labels only and report both")
    hidden_cache_gb: float = Field(4.0, ge=0, description="for the hidden loss, keep the teacher's hidden states of the mapped layers in memory (bf16) when they fit in this many GB, instead of running the teacher each step (0 = never)")
    teacher_precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="precision of the one teacher pass that caches its outputs (logits, hidden states, top-k): auto = bf16 where this CPU or GPU runs it fast (as --precision auto), else fp32; or fp32, bf16, fp16 (CUDA). Independent of the student's --precision: the targets are stored in bf16 or as log-probabilities anyway (docs/distill.md)")
    teacher_batch_size: int = Field(64, ge=1, description="examples per batch when caching the teacher's outputs (length-sorted, so nearly unpadded; larger batches ran slower on 2-core CPUs: docs/distill.md)")
    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    epochs: int = Field(3, ge=1, description="passes over the training split")


    @field_validator("losses")
    @classmethod
    def _known_losses(cls, value: list[str] | None) -> list[str] | None:
        known = LOSS_NAMES + tuple(n for n in LM_LOSSES if n not in LOSS_NAMES)
        unknown = [n for n in value or [] if n.partition(":")[0].strip() not in known]
        if unknown:
            raise ValueError(f"unknown loss {', '.join(map(repr, unknown))}; choose from {', '.join(LOSS_NAMES)} "
                             f"(classifiers) or {', '.join(LM_LOSSES)} (causal LMs)")
        return value


def load_teacher(path: str):
    """The teacher classifier and its tokenizer, or a UserError saying what is wrong."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"The teacher directory '{path}' does not exist. Pass --teacher DIR, a classifier made by "
                        "`compress train` (or any local sequence-classification model).")
    return load_classifier(p)


def check_teacher_labels(data, config) -> list[int] | None:
    """Dataset label id -> teacher label id, refusing label sets that differ."""
    names = [config.id2label[i] for i in range(config.num_labels)]
    if all(n.startswith("LABEL_") for n in names):
        if data.num_labels != config.num_labels:
            raise UserError(f"The teacher predicts {config.num_labels} labels but the dataset '{data.source}' has "
                            f"{data.num_labels} ({', '.join(data.label_names)}). Distil on the data the teacher "
                            "was trained for.")
        return None
    if set(names) != set(data.label_names):
        raise UserError(f"The teacher's labels ({', '.join(names)}) differ from the labels of '{data.source}' "
                        f"({', '.join(data.label_names)}). Distil on the data the teacher was trained for.")
    return check_labels(data, config.label2id, config.num_labels)


def _saved_size(model) -> int:
    """Bytes of the safetensors weights `model` would ship with."""
    with tempfile.TemporaryDirectory(prefix="size-") as d:
        model.save_pretrained(d, safe_serialization=True)
        return weights_size(d)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def render_report(rows: list[dict], vocab: dict | None, settings: str) -> str:
    """distill_report.md: a pure function of what the manifest records."""
    lines = ["# Distillation report", "", settings, "",
             "| model | test accuracy | of teacher | macro-F1 | parameters | size on disk |",
             "|---|---|---|---|---|---|"]
    teacher_acc = rows[0]["test_accuracy"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['test_accuracy']:.4f} | {r['test_accuracy'] / teacher_acc:.1%} | "
                     f"{r['test_macro_f1']:.4f} | {r['parameters'] / 1e6:.2f} M | {r['size_bytes'] / 1e6:.1f} MB |")
    if vocab:
        lines += ["", "## Vocabulary pruning", "",
                  f"- tokens: {vocab['tokens_before']} -> {vocab['tokens_after']} (min count {vocab['min_count']})",
                  f"- embedding parameters: {vocab['embedding_params_before'] / 1e6:.2f} M -> "
                  f"{vocab['embedding_params_after'] / 1e6:.2f} M",
                  f"- student size on disk: {vocab['size_bytes_before'] / 1e6:.1f} MB -> {vocab['size_bytes_after'] / 1e6:.1f} MB",
                  f"- [UNK] share of validation tokens: {vocab['unk_share_before']['validation']:.3%} -> "
                  f"{vocab['unk_share_after']['validation']:.3%}; test: {vocab['unk_share_before']['test']:.3%} -> "
                  f"{vocab['unk_share_after']['test']:.3%}"]
    return "\n".join(lines) + "\n"


def teacher_task(cfg: DistillConfig):
    """The task of the teacher artifact (its manifest, else its config); `--task` must agree, and a
    causal-LM student spec needs a causal-LM teacher."""
    from compress.models import SPEC_ARCHS, check_model_dir

    p = Path(cfg.teacher)
    if not p.exists():
        raise UserError(f"The teacher directory '{cfg.teacher}' does not exist. Pass --teacher DIR, a classifier or "
                        "causal LM made by `compress train` (or any local sequence-classification or causal-LM model).")
    check_model_dir(p)
    task = task_for_artifact(p, cfg.task)
    arch = cfg.student.split(":", 1)[0] if ":" in cfg.student else None
    if arch in SPEC_ARCHS and SPEC_ARCHS[arch] != task.name:
        raise UserError(f"The student spec '{cfg.student}' builds a {SPEC_ARCHS[arch]} model, but the teacher "
                        f"'{cfg.teacher}' is a {task.name} model. Distil a {SPEC_ARCHS[arch]} student from a "
                        f"{SPEC_ARCHS[arch]} teacher (compress train --task {SPEC_ARCHS[arch]} ...), or give a "
                        f"{task.name} student.")
    return task


@inherits_data("teacher")
def distill(cfg: DistillConfig) -> Path:
    """Distil `cfg.teacher` into the student `cfg.student` on `cfg.dataset`; write it to `cfg.out`.

    The teacher's task picks the flow (FLOWS): classifiers here, causal LMs in `distill.lm`.

    Returns:
        The student artifact directory (save_pretrained layout, manifest.json with test metrics of
        teacher, student and hard-label baseline, and distill_report.md).
    """
    import torch

    from compress.hardware import resolve_device

    out = Path(cfg.out)
    work = check_output(out, cfg.force)
    device = dist.setup(resolve_device(cfg.device))  # before any rank touches the work directory
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # the cache passes run before fit() would set it
    task = teacher_task(cfg)
    return FLOWS[task.name](cfg, task, out, work, device)


def _distill_classifier(cfg: DistillConfig, task, out: Path, work: Path, device: str) -> Path:
    import torch

    from compress.hardware import resolve_precision
    from compress.distill.prune_ffn import prune_ffn
    from compress.distill.prune_heads import prune_heads
    from compress.distill.prune_vocab import prune_vocab, unk_share

    cfg = cfg.model_copy(update={"losses": cfg.losses if cfg.losses is not None else list(task.default_distill_losses),
                                 "temperature": cfg.temperature or task.default_temperature})
    if cfg.teacher_online:
        raise UserError("--teacher-online applies to causal-LM teachers; a classifier's logits are always cached "
                        "(they are one vector per example). Drop --teacher-online.")
    teacher, t_tok = load_teacher(cfg.teacher)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    # Everything that can be checked without the data is checked first, so bad specs fail fast.
    torch.manual_seed(cfg.seed)
    student = build_student(cfg.student, teacher, t_tok, cfg.trust_remote_code)
    n_student = student.model.config.num_hidden_layers
    n_teacher = len(layer_list(teacher)[1])
    pairs = layer_pairs(cfg.layer_map, n_student, n_teacher)
    if "attention" in cfg.losses:
        if student.model.config.num_attention_heads != teacher.config.num_attention_heads:
            raise UserError(f"The attention loss compares attention maps head by head, but the student has "
                            f"{student.model.config.num_attention_heads} heads and the teacher "
                            f"{teacher.config.num_attention_heads}. Give the student the teacher's head count, or "
                            "drop 'attention' from --losses.")
        if cfg.prune_heads:
            raise UserError("The attention loss compares attention maps head by head, so it cannot train a student "
                            "with pruned heads. Drop 'attention' from --losses or drop --prune-heads.")
        disable_attention_dropout(student.model)
    data = load_data(cfg)
    label_map = check_teacher_labels(data, teacher.config)

    t_enc = encode(data, t_tok, cfg.max_length, label_map)
    vocab_stats, teacher_ids, ffn_stats, head_stats = None, None, None, None
    s_tok, s_enc = student.tokenizer, t_enc
    if student.kind == "dir":
        s_enc = encode(data, s_tok, cfg.max_length, label_map)
    # Heads and units are ranked by what they do on the training text (the first FFN_SAMPLE examples).
    sample = np.arange(min(FFN_SAMPLE, len(s_enc["train"])))

    def sample_batches():
        return iterate(s_enc["train"], np.array_split(sample, max(1, len(sample) // 64)), s_tok.pad_token_id)

    def say_pruned(what: str, before: int, after: int, stats: dict):
        if dist.is_main():
            print(f"{what} pruned: {before} -> {after} per layer (ranked on {len(sample)} training examples); "
                  f"{stats['params_before'] / 1e6:.2f} M -> {stats['params_after'] / 1e6:.2f} M params")

    if cfg.prune_heads:
        head_stats = prune_heads(student.model, cfg.prune_heads, sample_batches())
        say_pruned("attention heads", head_stats["heads_before"], head_stats["heads_after"], head_stats)
    if cfg.prune_ffn:
        ffn_stats = prune_ffn(student.model, cfg.prune_ffn, sample_batches())
        say_pruned("feed-forward units", ffn_stats["width_before"], ffn_stats["width_after"], ffn_stats)
    precision = resolve_precision(cfg.precision, device.split(":")[0])  # fp16 on a CPU is refused here
    cache_precision = resolve_precision(cfg.teacher_precision, device.split(":")[0], "--teacher-precision")
    prepare_work_dir(work, cfg.resume, cfg.force)  # after the checks above: bad input leaves nothing behind
    if cfg.prune_vocab:
        size_before, emb_before = _saved_size(student.model), student.model.get_input_embeddings().weight.numel()
        s_tok, vocab = prune_vocab(student.model, s_tok, s_enc["train"].input_ids, min_count=cfg.min_token_count,
                                   directory=work / "tokenizer")
        teacher_ids = vocab.kept  # new id -> teacher id, so the per-step teacher sees the student's tokens
        s_enc = encode(data, s_tok, cfg.max_length, label_map)
        vocab_stats = {
            "tokens_before": vocab.old_size, "tokens_after": vocab.new_size, "min_count": cfg.min_token_count,
            "embedding_params_before": emb_before,
            "embedding_params_after": student.model.get_input_embeddings().weight.numel(),
            "size_bytes_before": size_before, "size_bytes_after": _saved_size(student.model),
            "unk_share_before": {s: unk_share(t_enc[s].input_ids, t_tok.unk_token_id) for s in ("validation", "test")},
            "unk_share_after": {s: unk_share(s_enc[s].input_ids, s_tok.unk_token_id) for s in ("validation", "test")},
        }
        if dist.is_main():
            print(f"vocabulary pruned: {vocab.old_size} -> {vocab.new_size} tokens; "
                  f"embedding {emb_before / 1e6:.2f} M -> {vocab_stats['embedding_params_after'] / 1e6:.2f} M params")
    baseline_model = copy.deepcopy(student.model) if cfg.baseline else None
    train = s_enc["train"]
    if cfg.augment:
        train = augmented_split(data, s_tok, cfg, label_map)
        if dist.is_main():
            print(f"augmented the training split: {len(s_enc['train'])} -> {len(train)} examples")

    pad_id = s_tok.pad_token_id
    calls = {"n": 0}
    teacher.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    projections = (make_projections(pairs, student.model.config.hidden_size, teacher.config.hidden_size)
                   if "hidden" in cfg.losses else None)
    cache_layers = sorted({t for _, t in pairs}) if "hidden" in cfg.losses else []
    need = TeacherCache.hidden_bytes(train, teacher.config.hidden_size, len(cache_layers))
    if need > cfg.hidden_cache_gb * 1e9:
        if dist.is_main():
            print(f"teacher hidden states need {need / 1e9:.1f} GB > --hidden-cache-gb {cfg.hidden_cache_gb}: "
                  "the teacher runs on every step instead")
        cache_layers = []
    cache, cache_stats = None, None
    if "logits" in cfg.losses or cache_layers or cfg.augment:
        if dist.is_main():
            print(f"caching teacher outputs for {len(train)} training examples"
                  + (f" (logits, hidden states of layers {cache_layers})" if cache_layers else " (logits)")
                  + f", {cache_precision}")
        t0 = time.perf_counter()
        cache = TeacherCache(teacher, train, pad_id, layers=cache_layers, batch_size=cfg.teacher_batch_size,
                             device=device, precision=cache_precision, teacher_ids=teacher_ids)
        cache_stats = {"precision": cache_precision, "seconds": round(time.perf_counter() - t0, 2),
                       "examples": len(train), "hidden_layers": cache_layers}
    cache_calls = calls["n"]
    if cfg.augment:
        # A perturbed copy may no longer carry its source's label: train it toward the teacher's.
        n = len(s_enc["train"])
        train.labels[n:] = cache.logits[n:].argmax(-1)
    loss = DistillLoss(teacher, cache.logits if cache is not None else None, losses=cfg.losses,
                       temperature=cfg.temperature, alpha=cfg.alpha, hidden_weight=cfg.hidden_weight,
                       attention_weight=cfg.attention_weight, pairs=pairs, projections=projections,
                       teacher_ids=teacher_ids, hidden_cache=cache if cache_layers else None)
    if not loss.needs_teacher_forward:
        teacher.to("cpu")  # not needed again: free accelerator memory
    result = fit(student.model, train=train, cfg=cfg, work=work, loss_fn=loss, extra=projections,
                 **_selection(s_enc["validation"], cfg))
    train_calls = calls["n"] - cache_calls

    def test_metrics(model, enc, pad):
        model.to(device)
        logits = predict_logits(model, enc["test"], pad, batch_size=cfg.eval_batch_size, device=device,
                                precision="fp32", shard=True)
        return classification_metrics(logits, enc["test"].labels, data.num_labels)

    rows = [{"name": "teacher", **_row(test_metrics(teacher, t_enc, t_tok.pad_token_id), teacher,
                                       weights_size(cfg.teacher))},
            {"name": "student (KD)", **_row(test_metrics(student.model, s_enc, pad_id), student.model,
                                            _saved_size(student.model.to("cpu")))}]
    if dist.is_main():
        print(f"teacher test accuracy {rows[0]['test_accuracy']:.4f}, student (KD) {rows[1]['test_accuracy']:.4f}"
              + ("; now the no-KD baseline" if baseline_model is not None else ""))
    baseline = None
    if baseline_model is not None:
        (work / "baseline").mkdir(parents=True, exist_ok=True)
        # With augmentation the student took (1 + augment) times the steps per epoch; the baseline gets
        # as many steps over the original split, so the comparison is not about training length.
        base_cfg = cfg.model_copy(update={"epochs": cfg.epochs * (1 + cfg.augment)})
        baseline = fit(baseline_model, train=s_enc["train"], cfg=base_cfg, work=work / "baseline", loss_fn=label_loss,
                       **_selection(s_enc["validation"], cfg))
        rows.append({"name": "student (no KD)", **_row(test_metrics(baseline_model, s_enc, pad_id), baseline_model,
                                                       _saved_size(baseline_model.to("cpu")))})
    settings = (f"Teacher `{cfg.teacher}`, student `{cfg.student}` ({student.kind}, {n_student} layers"
                + (f": teacher layers {student.layers}" if student.layers else "")
                + (f", heads {head_stats['heads_before']} -> {head_stats['heads_after']}" if head_stats else "")
                + (f", feed-forward {ffn_stats['width_before']} -> {ffn_stats['width_after']} units" if ffn_stats else "")
                + f"), losses {cfg.losses}, "
                f"T={cfg.temperature}, alpha={cfg.alpha}, layer pairs {pairs}, {cfg.epochs} epochs, lr {cfg.lr}, "
                f"batch {cfg.batch_size}, {precision}. Dataset `{data.source}`; test split, fp32. "
                "The no-KD baseline is the same initial student trained with the same schedule on hard labels "
                "only" + (f" (original examples only, {cfg.epochs * (1 + cfg.augment)} epochs: as many steps)"
                          if cfg.augment else "") + "; only its metrics are kept." +
                (f" Training data: {len(s_enc['train'])} examples + {cfg.augment} teacher-labelled perturbed "
                 f"copies of each ({len(train)})." if cfg.augment else ""))
    report = render_report(rows, vocab_stats, settings)
    metrics = {"validation": result.best_metrics, "test": rows[1]["test"],
               "seconds_per_epoch": round(result.seconds_per_epoch, 2),
               "train_samples_per_s": round(result.train_samples_per_s, 1), "steps": result.steps}
    student.model.to("cpu")
    save_artifact(student.model, s_tok, out, work, force=cfg.force, stage="distill", config=cfg.model_dump(),
                  parent=cfg.teacher, metrics=metrics, files={REPORT: report},
                  comparison=[{k: v for k, v in r.items() if k != "test"} for r in rows],
                  baseline={"validation": baseline.best_metrics, "test": rows[2]["test"],
                            "steps": baseline.steps} if baseline else None,
                  student={"kind": student.kind, "teacher_layers": student.layers, "layer_pairs": pairs},
                  vocab=vocab_stats, heads=head_stats, ffn=ffn_stats, teacher_forward_calls={"cache": cache_calls, "training": train_calls},
                  teacher_cache=cache_stats,
                  data={"source": data.source, "fingerprint": data.fingerprint, "counts": data.counts,
                        "augmented_train_examples": len(train) if cfg.augment else None},
                  history=result.history)
    if dist.is_main():
        print(report)
    return out


def augmented_split(data, tokenizer, cfg: DistillConfig, label_map) -> EncodedSplit:
    """The training split followed by `cfg.augment` perturbed copies of it (labels fixed later)."""
    from datasets import Dataset

    ds = data["train"]
    texts, source = augment_texts(list(ds["text"]), cfg.augment, seed=cfg.seed, mask_token=tokenizer.mask_token)
    columns = {"text": list(ds["text"]) + texts, "label": list(ds["label"]) * (cfg.augment + 1)}
    if data.has_pair:  # only the first text is perturbed
        pairs = list(ds["text_pair"])
        columns["text_pair"] = pairs + [pairs[i] for i in source]
    split = EncodedSplit(tokenize(Dataset.from_dict(columns), tokenizer, cfg.max_length, data.has_pair, label_map))
    split.pad_id = tokenizer.pad_token_id or 0
    return split


def _selection(val: EncodedSplit, cfg: DistillConfig) -> dict:
    """fit's evaluation hook and the metric that keeps the best student."""
    task = ClassificationTask()
    return {"evaluate": task.validator(val, cfg.eval_batch_size), "metric": task.primary_metric,
            "higher_is_better": task.higher_is_better}


def _row(metrics: dict, model, size: int) -> dict:
    return {"test_accuracy": metrics["accuracy"], "test_macro_f1": metrics["macro_f1"],
            "parameters": _params(model), "size_bytes": size, "test": metrics}


def _distill_causal_lm(cfg: DistillConfig, task, out: Path, work: Path, device: str) -> Path:
    from compress.distill.lm import distill_causal_lm

    return distill_causal_lm(cfg, task, out, work, device)


# The teacher's task -> its distillation flow.
FLOWS = {"classification": _distill_classifier, "causal-lm": _distill_causal_lm}
