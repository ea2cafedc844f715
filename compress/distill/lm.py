"""Distilling a causal LM: the flow `compress distill` runs when the teacher is a causal LM.

Everything task-specific is asked of the task (`compress.tasks.causal_lm.CausalLMTask`): how
the teacher loads, how text is encoded, the teacher's targets (a top-k cache), the KD loss,
the evaluation and its direction. This module only orders the steps: teacher, student (its
layers, a size spec or a directory), optional head/MLP pruning ranked on training text, the
top-k cache pass (timed, sized), `loop.fit` with the KD loss, and the no-KD baseline (the same
initial student trained on next-token loss only for the same number of steps).
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from pathlib import Path

from compress import distributed as dist
from compress.anatomy import fast_kernels
from compress.artifacts import weights_size
from compress.curves import loss_curve_svg
from compress.distill.losses import layer_pairs, make_projections
from compress.distill.student import build_lm_student
from compress.errors import UserError
from compress.loop import fit, prepare_work_dir
from compress.tasks.causal_lm import window_batch
from compress.tasks.lm_kd import DIVERGENCES, LOSS_ALIASES, LMDistillSettings
from compress.train import save_artifact

REPORT = "distill_report.md"
RANK_TOKENS = 16384  # training tokens that rank heads and MLP units for --prune-heads/--prune-ffn
# Tail draws per position in the top-k cache for forward KL (--tail-samples): with 32, the cached
# student's perplexity matched the --teacher-online one to 0.03 % (benchmarks/results/distill_lm-tail.md).
DEFAULT_TAIL_SAMPLES = 32


def parse_losses(items: list[str], allowed: tuple[str, ...]) -> dict[str, float]:
    """`["forward_kl:0.5", "reverse_kl:0.5", "hidden"]` -> {name: weight} (weight 1 when not given)."""
    out: dict[str, float] = {}
    for item in items:
        name, colon, weight = item.partition(":")
        name = LOSS_ALIASES.get(name.strip(), name.strip())
        if name not in allowed:
            raise UserError(f"Unknown loss '{item}' for a causal-LM teacher. Choose from {', '.join(allowed)}, each "
                            "optionally with a weight (forward_kl:0.5,reverse_kl:0.5); next-token cross-entropy is "
                            "always mixed in with 1 - alpha.")
        try:
            value = float(weight) if colon else 1.0
        except ValueError:
            value = -1.0
        if not value >= 0:
            raise UserError(f"Bad weight in loss '{item}': use name:weight with a number >= 0, e.g. forward_kl:0.5.")
        out[name] = value
    return out


def _saved_size(model) -> int:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="size-") as d:
        model.save_pretrained(d, safe_serialization=True)
        return weights_size(d)


def _row(name: str, metrics: dict, model, size: int) -> dict:
    return {"name": name, "test_perplexity": metrics["perplexity"], "test_nll": metrics["nll"],
            "test_bits_per_char": metrics["bits_per_char"],
            "parameters": sum(p.numel() for p in model.parameters()), "size_bytes": size, "test": metrics}


def render_report(rows: list[dict], settings: str, cache: dict | None, speed: dict) -> str:
    """distill_report.md of a causal-LM distillation: a pure function of what the manifest records."""
    teacher = rows[0]["test_perplexity"]
    lines = ["# Distillation report (causal LM)", "", settings, "",
             "| model | test perplexity | of teacher | NLL (nats/token) | bits/char | parameters | size on disk |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['test_perplexity']:.2f} | {r['test_perplexity'] / teacher:.1%} | "
                     f"{r['test_nll']:.4f} | {r['test_bits_per_char']:.4f} | {r['parameters'] / 1e6:.2f} M | "
                     f"{r['size_bytes'] / 1e6:.1f} MB |")
    lines += ["", "## Teacher targets", ""]
    if cache:
        lines += [f"- top-{cache['k']} cache of {cache['positions']:,} training positions: "
                  f"{cache['bytes_on_disk'] / 1e6:.1f} MB on disk, built in {cache['seconds']:.1f} s "
                  f"(one teacher pass; {cache['bytes_per_position']} bytes per position)",
                  f"- teacher probability mass outside the top {cache['k']} (first blocks): "
                  f"{cache['mean_rest_mass']:.4f}"]
        if cache.get("tail_samples"):
            lines.append(f"- {cache['tail_samples']} draws per position from the teacher's distribution outside the "
                         "top k: forward KL estimates the tail from them")
    else:
        lines += ["- `--teacher-online`: the teacher ran on every batch, on the full vocabulary"]
    lines += ["", "## Speed", ""]
    lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in speed.items()]
    return "\n".join(lines) + "\n"


def distill_causal_lm(cfg, task, out: Path, work: Path, device: str) -> Path:
    """Distil the causal-LM teacher `cfg.teacher` into `cfg.student`; write the artifact to `out`.

    Returns:
        The student artifact directory: save_pretrained layout, manifest.json with the test
        metrics of teacher, student and no-KD baseline, the cache's size and time, and
        distill_report.md.
    """
    import torch

    from compress.hardware import resolve_precision

    if cfg.prune_vocab or cfg.augment:
        raise UserError(f"{'--prune-vocab' if cfg.prune_vocab else '--augment'} is implemented for classifiers only; a "
                        "byte-level BPE vocabulary has no unknown token to fall back on, and text augmentation is "
                        "not built for causal LMs. Drop the flag.")
    teacher, t_tok = task.load_model(cfg.teacher, cfg.trust_remote_code)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    temperature = cfg.temperature if cfg.temperature is not None else task.default_temperature
    losses = parse_losses(cfg.losses if cfg.losses is not None else list(task.default_distill_losses),
                          task.distill_losses)
    divergences = {k: v for k, v in losses.items() if k in DIVERGENCES}
    vocab = teacher.config.vocab_size
    if not cfg.teacher_online and divergences and not 1 <= cfg.top_k <= vocab:
        raise UserError(f"--top-k {cfg.top_k} is larger than the teacher's vocabulary ({vocab} ids): the cache keeps "
                        f"the k most likely next tokens out of {vocab}. Use --top-k {min(64, vocab)} or less (32 is "
                        "the default), or --teacher-online for the full distribution.")
    uses_cache = divergences and not cfg.teacher_online
    tail_samples = cfg.tail_samples if cfg.tail_samples is not None else (
        DEFAULT_TAIL_SAMPLES if uses_cache and "forward_kl" in divergences else 0)
    if cfg.tail_samples and (cfg.teacher_online or "forward_kl" not in divergences):
        raise UserError(f"--tail-samples {cfg.tail_samples} adds draws from the teacher's tail to the top-k cache for "
                        "the forward_kl loss, but " + ("--teacher-online uses no cache" if cfg.teacher_online else
                                                       "forward_kl is not among the losses") +
                        ". Drop --tail-samples, or use the cache with forward_kl.")
    torch.manual_seed(cfg.seed)
    student = build_lm_student(cfg.student, teacher, t_tok, cfg.trust_remote_code)
    n_student, n_teacher = student.model.config.num_hidden_layers, teacher.config.num_hidden_layers
    hidden_weight = losses.get("hidden", 0.0) * cfg.hidden_weight
    pairs = layer_pairs(cfg.layer_map, n_student, n_teacher) if "hidden" in losses else []
    data = task.load_data(cfg)
    enc = task.encode(data, t_tok, cfg, model_config=teacher.config)
    task.check_fits(student.model.config, t_tok, cfg)
    train = enc["train"]
    head_stats = ffn_stats = None
    if cfg.prune_heads or cfg.prune_ffn:
        from compress.distill.prune_decoder import prune_decoder_heads, prune_decoder_mlp

        n_rank = max(1, min(len(train), math.ceil(RANK_TOKENS / train.blocks.shape[1])))

        def sample_batches():
            return [{"input_ids": torch.from_numpy(train.blocks[i:min(i + 8, n_rank)])} for i in range(0, n_rank, 8)]

        if cfg.prune_heads:
            head_stats = prune_decoder_heads(student.model, cfg.prune_heads, sample_batches())
        if cfg.prune_ffn:
            ffn_stats = prune_decoder_mlp(student.model, cfg.prune_ffn, sample_batches())
        if dist.is_main():
            for what, st, a, b in (("attention heads", head_stats, "heads_before", "heads_after"),
                                   ("MLP units", ffn_stats, "width_before", "width_after")):
                if st:
                    print(f"{what} pruned: {st[a]} -> {st[b]} per layer (ranked on {n_rank} training blocks); "
                          f"{st['params_before'] / 1e6:.2f} M -> {st['params_after'] / 1e6:.2f} M params")
    precision = resolve_precision(cfg.precision, device.split(":")[0])  # fp16 on a CPU is refused here
    cache_precision = resolve_precision(cfg.teacher_precision, device.split(":")[0], "--teacher-precision")
    prepare_work_dir(work, cfg.resume, cfg.force)  # after every check above: bad input leaves nothing behind
    baseline_model = copy.deepcopy(student.model) if cfg.baseline else None

    targets, cache = None, None
    if divergences and not cfg.teacher_online:
        if dist.is_main():
            print(f"caching the teacher's top-{cfg.top_k} next-token log-probabilities for {train.blocks.size:,} "
                  "training positions")
        t0 = time.perf_counter()
        targets = task.teacher_targets(teacher, train, top_k=cfg.top_k, temperature=temperature,
                                       batch_size=window_batch(cfg.teacher_batch_size, train.blocks.shape[1], vocab),
                                       device=device, precision=cache_precision,
                                       directory=work / "teacher_topk", progress=cfg.progress,
                                       tail_samples=tail_samples, seed=cfg.seed,
                                       key={"teacher": str(Path(cfg.teacher).resolve()),
                                            "blocks_sha256": hashlib.sha256(train.blocks.tobytes()).hexdigest()})
        cache = {"k": targets.k, "positions": int(train.blocks.size), "bytes_on_disk": targets.bytes_on_disk,
                 "bytes_per_position": round(targets.bytes_on_disk / train.blocks.size, 1),
                 "seconds": round(targets.meta.get("seconds", time.perf_counter() - t0), 2),
                 "mean_rest_mass": targets.meta.get("mean_rest_mass"), "temperature": temperature,
                 "tail_samples": targets.tail_samples, "precision": cache_precision}
    settings = LMDistillSettings(divergences=divergences, temperature=temperature, alpha=cfg.alpha, skew=cfg.skew,
                                 beta=cfg.jsd_beta, hidden_weight=hidden_weight, pairs=pairs)
    projections = (make_projections(pairs, student.model.config.hidden_size, teacher.config.hidden_size)
                   if hidden_weight > 0 else None)
    loss = task.distill_loss(teacher, targets, settings, projections)
    teacher.to(device if loss.needs_teacher_forward else "cpu")
    calls = {"n": 0}
    hook = teacher.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    selection = {"evaluate": task.validator(enc["validation"], cfg.eval_batch_size), "metric": task.primary_metric,
                 "higher_is_better": task.higher_is_better}
    with fast_kernels(teacher if loss.needs_teacher_forward else None):  # the student's are fit's
        result = fit(student.model, train=train, cfg=cfg, work=work, loss_fn=loss, extra=projections, **selection)
    hook.remove()

    def test_metrics(model):
        model.to(device)
        return task.evaluate(model, enc["test"], batch_size=cfg.eval_batch_size, device=device, precision="fp32",
                             shard=True)

    rows = [_row("teacher", test_metrics(teacher), teacher, weights_size(cfg.teacher)),
            _row("student (KD)", test_metrics(student.model), student.model, _saved_size(student.model.to("cpu")))]
    teacher.to("cpu")
    if dist.is_main():
        print(f"teacher test perplexity {rows[0]['test_perplexity']:.2f}, student (KD) {rows[1]['test_perplexity']:.2f}"
              + ("; now the no-KD baseline" if baseline_model is not None else ""))
    baseline = None
    if baseline_model is not None:
        (work / "baseline").mkdir(parents=True, exist_ok=True)
        baseline = fit(baseline_model, train=train, cfg=cfg, work=work / "baseline", loss_fn=task.loss, **selection)
        rows.append(_row("student (no KD)", test_metrics(baseline_model), baseline_model,
                         _saved_size(baseline_model.to("cpu"))))
    speed = {"student_seconds_per_epoch": round(result.seconds_per_epoch, 2),
             "student_tokens_per_s": round(result.train_tokens_per_s, 1),
             "teacher_forward_calls_in_training": calls["n"]}
    if cache:
        speed["cache_seconds"] = cache["seconds"]
    if baseline is not None:
        speed["baseline_seconds_per_epoch"] = round(baseline.seconds_per_epoch, 2)
    steps_per_epoch = max(1, math.ceil(math.ceil(len(train) / cfg.batch_size) / cfg.grad_accum))
    kd_text = (", ".join(f"{k}x{v:g}" for k, v in divergences.items()) or "none")
    described = (f"Teacher `{cfg.teacher}`, student `{cfg.student}` ({student.kind}, {n_student} layers"
                 + (f": teacher layers {student.layers}" if student.layers else "")
                 + (f", heads {head_stats['heads_before']} -> {head_stats['heads_after']}" if head_stats else "")
                 + (f", MLP {ffn_stats['width_before']} -> {ffn_stats['width_after']} units" if ffn_stats else "")
                 + f"). KD: {kd_text} at T={temperature} with weight alpha={cfg.alpha}, next-token CE "
                 f"{1 - cfg.alpha:g}" + (f", hidden-state MSE x{hidden_weight:g} on layer pairs {pairs}" if pairs else "")
                 + f"; targets: {'the teacher online (full vocabulary)' if targets is None else f'top-{cfg.top_k} cache'}"
                 + (f" + {tail_samples} tail draws" if targets is not None and tail_samples else "")
                 + f". {result.steps} steps ({result.steps / steps_per_epoch:.2f} epochs, batch {cfg.batch_size} blocks "
                 f"of {cfg.max_length} "
                 f"tokens), lr {cfg.lr}, {precision}, seed {cfg.seed}. Dataset `{data.source}`; test split, "
                 "sliding windows, fp32. The no-KD baseline is the same initial student trained with the same "
                 "schedule on next-token loss only; only its metrics are kept.")
    report = render_report(rows, described, cache, speed)
    metrics = {"validation": result.best_metrics, "test": rows[1]["test"],
               "seconds_per_epoch": round(result.seconds_per_epoch, 2),
               "train_tokens_per_s": round(result.train_tokens_per_s, 1), "steps": result.steps}
    files = {REPORT: report}
    if dist.is_main() and (work / "log.jsonl").is_file():
        files["loss.svg"] = loss_curve_svg(work / "log.jsonl", title=f"distill: {cfg.student}")
    student.model.to("cpu")
    save_artifact(student.model, t_tok, out, work, force=cfg.force, stage="distill", task=task.name,
                  config=cfg.model_dump(), parent=cfg.teacher, metrics=metrics, files=files,
                  comparison=[{k: v for k, v in r.items() if k != "test"} for r in rows],
                  baseline={"validation": baseline.best_metrics, "test": rows[2]["test"], "steps": baseline.steps,
                            "seconds_per_epoch": round(baseline.seconds_per_epoch, 2)} if baseline else None,
                  student={"kind": student.kind, "teacher_layers": student.layers, "layer_pairs": pairs},
                  distillation={"divergences": divergences, "temperature": temperature, "alpha": cfg.alpha,
                                "hidden_weight": hidden_weight, "targets": "online" if targets is None else "top-k"},
                  teacher_cache=cache, heads=head_stats, ffn=ffn_stats,
                  teacher_forward_calls={"training": calls["n"]},
                  data={"source": data.source, "fingerprint": data.fingerprint, "counts": data.counts},
                  history=result.history)
    if dist.is_main():
        print(report)
    return out
