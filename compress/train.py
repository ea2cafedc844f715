"""`compress train`: fine-tune a checkpoint or train a size spec; this makes the teacher."""

from __future__ import annotations

import shutil
from pathlib import Path

from pydantic import Field

from compress import distributed as dist
from compress import artifacts
from compress.artifacts import atomic_output, work_dir, write_manifest
from compress.data import encode, load_data
from compress.loop import LoopConfig, fit, predict_logits, prepare_work_dir
from compress.metrics import classification_metrics
from compress.models import build_classifier, resolve_model


class TrainConfig(LoopConfig):
    """Fine-tune or train a sequence classifier."""

    model: str = Field(..., description="local HF directory, built-in name (minilm-l6), hub id, or size spec like bert:layers=4,hidden=256,heads=4,ff=1024")
    out: str = Field(..., description="output artifact directory")
    force: bool = Field(False, description="replace an existing output directory")
    trust_remote_code: bool = Field(False, description="allow model code from the checkpoint (only for sources you trust)")


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


def train(cfg: TrainConfig) -> Path:
    """Train a classifier on `cfg.dataset` and write it to `cfg.out`.

    Returns:
        The artifact directory: save_pretrained layout plus manifest.json with validation
        and test metrics (test in fp32, as shipped), speed and the data fingerprint.
    """
    import torch

    from compress.hardware import resolve_device

    out = Path(cfg.out)
    work = check_output(out, cfg.force)
    dist.setup(resolve_device(cfg.device))  # before any rank touches the work directory
    data = load_data(cfg)
    source = resolve_model(cfg.model)
    torch.manual_seed(cfg.seed)
    model, tokenizer = build_classifier(source, label_names=data.label_names,
                                        train_texts=list(data["train"]["text"]) if source.kind == "spec" else None,
                                        trust_remote_code=cfg.trust_remote_code)
    enc = encode(data, tokenizer, cfg.max_length)
    prepare_work_dir(work, cfg.resume, cfg.force)
    result = fit(model, train=enc["train"], val=enc["validation"], pad_id=tokenizer.pad_token_id, cfg=cfg,
                 work=work, num_labels=data.num_labels)
    device = next(model.parameters()).device.type
    test_logits = predict_logits(model, enc["test"], tokenizer.pad_token_id, batch_size=cfg.eval_batch_size,
                                 device=device, precision="fp32", shard=True)
    metrics = {"validation": result.best_metrics,
               "test": classification_metrics(test_logits, enc["test"].labels, data.num_labels),
               "seconds_per_epoch": round(result.seconds_per_epoch, 2),
               "train_samples_per_s": round(result.train_samples_per_s, 1), "steps": result.steps}
    model.to("cpu")
    save_artifact(model, tokenizer, out, work, force=cfg.force, stage="train",
                  config=cfg.model_dump(), parent=source.value if source.kind != "spec" else None,
                  metrics=metrics, data={"source": data.source, "fingerprint": data.fingerprint, "counts": data.counts},
                  history=result.history)
    if dist.is_main():
        t = metrics["test"]
        print(f"test accuracy {t['accuracy']:.4f}  macro-F1 {t['macro_f1']:.4f}  "
              f"({metrics['seconds_per_epoch']:.1f} s/epoch, {metrics['train_samples_per_s']:.0f} samples/s) -> {out}")
    return out
