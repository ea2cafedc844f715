"""`compress train`: fine-tune a checkpoint or train a size spec; this makes the teacher."""

from __future__ import annotations

import shutil
from pathlib import Path

from pydantic import Field

from compress import distributed as dist
from compress import artifacts
from compress.artifacts import atomic_output, work_dir, write_manifest
from compress.curves import loss_curve_svg
from compress.lineage import inherits_data
from compress.loop import LoopConfig, fit, prepare_work_dir
from compress.models import resolve_model
from compress.tasks.registry import task_for_source


class TrainConfig(LoopConfig):
    """Fine-tune or train a sequence classifier or a causal language model."""

    model: str = Field(..., description="local HF directory, built-in name (minilm-l6), hub id, or size spec like bert:layers=4,hidden=256,heads=4,ff=1024 (classifier), gpt2:layers=4,hidden=256,heads=4 or llama:layers=4,hidden=256,heads=4,kv_heads=2 (causal LM)")
    out: str = Field(..., description="output artifact directory")


def check_output(out: Path, force: bool) -> Path:
    """Fail before any work when `out` cannot be written (`artifacts.check_output`); return
    the run's work directory, `<out>.work`."""
    return work_dir(artifacts.check_output(out, force))


def save_artifact(model, tokenizer, out: Path, work: Path, *, force: bool, stage: str, config: dict,
                  parent: str | None, metrics: dict, files: dict[str, str] | None = None, **extra) -> None:
    """Write the final artifact atomically (rank 0 only) and remove the run directory.

    `files` are extra text files (name -> content) written into the artifact, e.g. a report.
    """
    if dist.is_main():
        with atomic_output(out, force=force) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if (work / "log.jsonl").is_file():
                shutil.copy2(work / "log.jsonl", tmp / "train_log.jsonl")
            for name, text in (files or {}).items():
                (tmp / name).write_text(text)
            write_manifest(tmp, stage=stage, config=config, parent=parent, metrics=metrics, **extra)
        shutil.rmtree(work, ignore_errors=True)
    dist.barrier()


@inherits_data("model")
def train(cfg: TrainConfig) -> Path:
    """Train the model `cfg.model` names on `cfg.dataset` for its task and write it to `cfg.out`.

    Returns:
        The artifact directory: save_pretrained layout plus manifest.json with validation
        and test metrics (test in fp32, as shipped), speed and the data fingerprint.
    """
    import torch

    from compress.hardware import resolve_device

    out = Path(cfg.out)
    work = check_output(out, cfg.force)
    dist.setup(resolve_device(cfg.device))  # before any rank touches the work directory
    source = resolve_model(cfg.model)
    task = task_for_source(cfg.task, source)
    data = task.load_data(cfg)
    torch.manual_seed(cfg.seed)
    model, tokenizer = task.build_model(source, data, cfg)
    enc = task.encode(data, tokenizer, cfg)
    prepare_work_dir(work, cfg.resume, cfg.force)
    result = fit(model, train=enc["train"], cfg=cfg, work=work, loss_fn=task.loss,
                 evaluate=task.validator(enc["validation"], cfg.eval_batch_size),
                 metric=task.primary_metric, higher_is_better=task.higher_is_better)
    device = next(model.parameters()).device.type
    metrics = {"validation": result.best_metrics,
               "test": task.evaluate(model, enc["test"], batch_size=cfg.eval_batch_size, device=device,
                                     precision="fp32", shard=True),
               "seconds_per_epoch": round(result.seconds_per_epoch, 2),
               "train_samples_per_s": round(result.train_samples_per_s, 1),
               "train_tokens_per_s": round(result.train_tokens_per_s, 1), "steps": result.steps}
    model.to("cpu")
    files = {}
    if dist.is_main() and (work / "log.jsonl").is_file():
        files["loss.svg"] = loss_curve_svg(work / "log.jsonl", title=f"{task.name}: {cfg.model}")
    save_artifact(model, tokenizer, out, work, force=cfg.force, stage="train", task=task.name,
                  config=cfg.model_copy(update={"task": task.name}).model_dump(),
                  parent=source.value if source.kind != "spec" else None,
                  metrics=metrics, data={"source": data.source, "fingerprint": data.fingerprint, "counts": data.counts},
                  history=result.history, files=files)
    if dist.is_main():
        speed = (f"{metrics['train_tokens_per_s']:.0f} tokens/s" if task.name == "causal-lm"
                 else f"{metrics['train_samples_per_s']:.0f} samples/s")
        print(f"test {task.summary(metrics['test'])}  ({metrics['seconds_per_epoch']:.1f} s/epoch, {speed}) -> {out}")
    return out
