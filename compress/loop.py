"""The one training loop. `compress train` and `compress distill` both call `fit`;
distillation only plugs in a different loss and extra trainable modules.

What it does: AdamW with warm-up and linear/cosine decay, weight decay, gradient
clipping and accumulation; bf16/fp16 autocast where the hardware supports it;
evaluation on the validation split each epoch (or every N steps), best weights kept,
early stopping; a progress bar with loss, samples/s and ETA; a JSONL log; atomic
checkpoints so that Ctrl-C or kill -9 can continue with `--resume`; DDP under torchrun;
multi-kernel activations (GPT-2's gelu_new) run as one fused kernel.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from pydantic import Field

from compress import distributed as dist
from compress.anatomy import fast_kernels
from compress.config import RuntimeConfig
from compress.data import DataConfig, bucketed_batches
from compress.errors import UserError
from compress.hardware import autocast, resolve_device, resolve_precision

LossFn = Callable[[Any, dict], tuple[Any, dict[str, float]]]
EvalFn = Callable[..., dict[str, float]]  # (model, device=, precision=) -> {metric: value}


class LoopConfig(RuntimeConfig, DataConfig):
    """Optimisation settings shared by train and distill (plus the runtime group and the data)."""

    epochs: int = Field(3, ge=1, description="passes over the training split")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (overrides epochs)")
    batch_size: int = Field(32, ge=1, description="examples per optimizer step across all processes, before accumulation")
    grad_accum: int = Field(1, ge=1, description="micro-batches accumulated per optimizer step")
    lr: float = Field(5e-5, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not applied to biases and LayerNorm)")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="share of steps spent warming up the learning rate")
    schedule: Literal["linear", "cosine", "constant"] = Field("linear", description="learning-rate decay after warm-up")
    grad_clip: float = Field(1.0, ge=0, description="clip the gradient norm to this (0 = off)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="autocast precision; auto = bf16 on CUDA, on AMX CPUs and where a bf16 matmul measures 1.5x faster than fp32, else fp32")
    seed: int = Field(0, description="seed for initialisation, shuffling and dropout")
    eval_every: int = Field(0, ge=0, description="evaluate every N optimizer steps (0 = at the end of each epoch)")
    patience: int = Field(0, ge=0, description="stop after this many evaluations without improvement (0 = never)")
    checkpoint_every: int = Field(100, ge=0, description="save a resumable checkpoint every N optimizer steps (0 = each epoch)")
    resume: bool = Field(False, description="continue an interrupted run from its last checkpoint")
    progress: bool = Field(True, description="show a progress bar")
    compile: bool = Field(False, description="run the training forward and backward through torch.compile (fastest with fixed shapes, e.g. causal-LM blocks; the first steps pay the compilation)")


@dataclass
class FitResult:
    best_metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds_per_epoch: float = 0.0
    train_samples_per_s: float = 0.0
    train_tokens_per_s: float = 0.0
    steps: int = 0


def _param_groups(modules: list, weight_decay: float) -> list[dict]:
    decay, no_decay, seen = [], [], set()
    for m in modules:
        for name, p in m.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _Checkpoint:
    """An atomic, resumable snapshot of the run in `<work>/checkpoint`."""

    def __init__(self, work: Path):
        self.dir = work / "checkpoint"

    def exists(self) -> bool:
        return (self.dir / "state.json").is_file()

    def save(self, model, extra, optimizer, scheduler, scaler, state: dict) -> None:
        import torch
        from safetensors.torch import save_model

        tmp = self.dir.with_name("checkpoint.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(model, str(tmp / "model.safetensors"))
        if extra is not None:
            save_model(extra, str(tmp / "extra.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "rng": torch.get_rng_state()}, tmp / "optim.pt")
        (tmp / "state.json").write_text(json.dumps(state))
        old = self.dir.with_name("checkpoint.old")
        shutil.rmtree(old, ignore_errors=True)
        if self.dir.exists():
            os.replace(self.dir, old)
        os.replace(tmp, self.dir)
        shutil.rmtree(old, ignore_errors=True)

    def load(self, model, extra, optimizer, scheduler, scaler) -> dict:
        import torch
        from safetensors.torch import load_model

        load_model(model, str(self.dir / "model.safetensors"))
        if extra is not None:
            load_model(extra, str(self.dir / "extra.safetensors"))
        blob = torch.load(self.dir / "optim.pt", weights_only=True)
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        if scaler is not None and blob["scaler"] is not None:
            scaler.load_state_dict(blob["scaler"])
        torch.set_rng_state(blob["rng"])
        return json.loads((self.dir / "state.json").read_text())


class _DeferredInterrupt:
    """Ctrl-C takes effect at the next optimizer-step boundary, where the run's state (weights,
    optimizer, scheduler, position in the epoch) is consistent and can be checkpointed; a
    second Ctrl-C stops at once. Only in a single process's main thread: under torchrun the
    ranks could see the signal at different steps, so there Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread() and dist.world_size() == 1:
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


class _StopAtBoundary(Exception):
    pass


def prepare_work_dir(work: Path, resume: bool, force: bool) -> None:
    """Refuse to silently mix a new run with an unfinished one."""
    if dist.is_main() and work.exists() and not resume:
        if not force and _Checkpoint(work).exists():
            raise UserError(
                f"An unfinished run of this output exists in '{work}'. Pass --resume to continue it, or "
                "--force to discard it and start again."
            )
        shutil.rmtree(work, ignore_errors=True)
    if dist.is_main():
        work.mkdir(parents=True, exist_ok=True)
    dist.barrier()


def fit(model, *, train, cfg: LoopConfig, work: Path, loss_fn: LossFn, evaluate: EvalFn, metric: str,
        higher_is_better: bool, extra=None) -> FitResult:
    """Train `model` (and the trainable `extra` modules) in place; load the best weights at the end.

    Args:
        model: the model to train; the one whose best weights are kept.
        train: the tokenised training split: `lengths` (real tokens per example), `len()` and
            `collate(idx)` -> a batch of tensors. Any task's split has them.
        cfg: optimisation settings.
        work: run directory for checkpoints and the JSONL log (`<out>.work`).
        loss_fn: (model, batch) -> (loss, {name: value}); the task's loss, or distillation's.
        evaluate: (model, device=, precision=) -> {metric: value} on the validation split.
        metric, higher_is_better: the validation metric that selects the best weights, and its direction.
        extra: an nn.Module of additional trainable parameters (e.g. projections).
    Returns:
        FitResult with the best validation metrics, the evaluation history and speed figures.
    """
    # GPT-2's multi-kernel GELU and torch's CPU dropout train as faster equals (anatomy.fast_kernels):
    # swapped before DDP and torch.compile wrap the model, and back before fit returns (what is
    # saved is what was loaded).
    with fast_kernels(model, extra):
        return _fit(model, train=train, cfg=cfg, work=work, loss_fn=loss_fn, evaluate=evaluate, metric=metric,
                    higher_is_better=higher_is_better, extra=extra)


def _fit(model, *, train, cfg: LoopConfig, work: Path, loss_fn: LossFn, evaluate: EvalFn, metric: str,
         higher_is_better: bool, extra=None) -> FitResult:
    import torch
    from safetensors.torch import load_model, save_model
    from transformers import get_scheduler

    device = dist.setup(resolve_device(cfg.device))
    precision = resolve_precision(cfg.precision, device.split(":")[0])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world, rank = dist.world_size(), dist.rank()
    if cfg.batch_size % world:
        raise UserError(f"batch_size={cfg.batch_size} must be divisible by the number of processes ({world}).")
    model.to(device)
    if extra is not None:
        extra.to(device)
    model.train()
    ddp_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp_model = DistributedDataParallel(model, device_ids=[int(device.split(":")[1])] if ":" in device else None)
    if cfg.compile:
        # Only the training step is compiled; evaluation and checkpoints use `model`, whose
        # parameters the compiled module shares.
        ddp_model = torch.compile(ddp_model)

    modules = [model] + ([extra] if extra is not None else [])
    groups = _param_groups(modules, cfg.weight_decay)
    try:
        # The fused kernel exists on CPU too (torch >= 2.4): 4x faster than foreach for MiniLM's
        # 22.7 M parameters here, where the optimizer step was a quarter of each training step.
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
    except (RuntimeError, TypeError):
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, foreach=True)
    n_batches = math.ceil(len(train) / cfg.batch_size)
    steps_per_epoch = math.ceil(n_batches / cfg.grad_accum)
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = get_scheduler(cfg.schedule if cfg.schedule != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    ckpt = _Checkpoint(work)
    state = {"epoch": 0, "batch_in_epoch": 0, "step": 0, "best": None, "best_metrics": {},
             "bad_evals": 0, "history": [], "train_seconds": 0.0, "train_samples": 0, "train_tokens": 0}
    if cfg.resume and ckpt.exists():
        state = ckpt.load(model, extra, optimizer, scheduler, scaler)
        if dist.is_main():
            print(f"resuming from step {state['step']} (epoch {state['epoch'] + 1}, batch {state['batch_in_epoch']})")
    log_path = work / "log.jsonl"

    def log(record: dict) -> None:
        if dist.is_main():
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def evaluate_now() -> bool:
        """Evaluate, keep the best weights; return True when early stopping triggers."""
        metrics = evaluate(model, device=device, precision=precision)
        record = {"step": state["step"], "epoch": state["epoch"] + state["batch_in_epoch"] / n_batches,
                  **{f"val_{k}": v for k, v in metrics.items()}}
        state["history"].append(record)
        log({"event": "eval", **record})
        best = state["best"]
        if best is None or math.isinf(best) or (metrics[metric] > best if higher_is_better else metrics[metric] < best):
            state.update(best=metrics[metric], best_metrics=metrics, bad_evals=0)
            if dist.is_main():
                save_model(model, str(work / "best.safetensors"))
        else:
            state["bad_evals"] += 1
        if dist.is_main() and cfg.progress:
            print(f"  step {state['step']}: val {metric} {metrics[metric]:.4f} (best {state['best']:.4f}, "
                  f"{'higher' if higher_is_better else 'lower'} is better)")
        return bool(cfg.patience and state["bad_evals"] >= cfg.patience)

    def save_checkpoint() -> None:
        if dist.is_main():
            ckpt.save(model, extra, optimizer, scheduler, scaler, state)
        dist.barrier()

    from tqdm.auto import tqdm

    stop = False
    interrupt = _DeferredInterrupt()
    t0, seen, tokens = time.perf_counter(), 0, 0
    interrupt.install()
    try:
        while state["epoch"] < epochs and not stop:
            epoch = state["epoch"]
            batches = bucketed_batches(train.lengths, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch)
            start_batch = state["batch_in_epoch"]
            bar = tqdm(total=len(batches), initial=start_batch, desc=f"epoch {epoch + 1}/{epochs}",
                       disable=not (cfg.progress and dist.is_main()), unit="batch", dynamic_ncols=True,
                       mininterval=2.0)
            t0, seen, tokens, running = time.perf_counter(), 0, 0, []
            for b in range(start_batch, len(batches)):
                idx = batches[b][rank::world]
                batch = {k: v.to(device) for k, v in train.collate(idx).items()}
                batch["index"] = torch.from_numpy(idx)
                micro = (b % cfg.grad_accum) != cfg.grad_accum - 1 and b != len(batches) - 1
                sync = ddp_model.no_sync() if (world > 1 and micro) else contextlib.nullcontext()
                with sync:
                    with autocast(device.split(":")[0], precision):
                        loss, parts = loss_fn(ddp_model, batch)
                    scaled = loss / cfg.grad_accum
                    (scaler.scale(scaled) if scaler else scaled).backward()
                running.append(float(loss.detach()))
                seen += len(idx) * world
                tokens += int(train.lengths[idx].sum()) * world
                state["batch_in_epoch"] = b + 1
                bar.update(1)
                if micro:
                    continue
                if scaler:
                    scaler.unscale_(optimizer)
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                elapsed = time.perf_counter() - t0
                bar.set_postfix(loss=f"{np.mean(running[-20:]):.4f}", samples_s=f"{seen / max(elapsed, 1e-9):.0f}",
                                tokens_s=f"{tokens / max(elapsed, 1e-9):.0f}", refresh=False)
                if state["step"] % 10 == 0:
                    # The mean over ranks is the loss of the global batch (a collective: every rank logs).
                    log({"event": "train", "step": state["step"], "epoch": epoch + (b + 1) / len(batches),
                         "loss": dist.mean(float(np.mean(running[-10 * cfg.grad_accum:]))), "lr": scheduler.get_last_lr()[0],
                         "samples_per_s": seen / max(elapsed, 1e-9), "tokens_per_s": tokens / max(elapsed, 1e-9),
                         **parts})
                if interrupt.requested:
                    raise _StopAtBoundary
                if cfg.eval_every and state["step"] % cfg.eval_every == 0:
                    stop = evaluate_now()
                if state["step"] >= total_steps or stop:
                    break
                if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0:
                    state["train_seconds"] += time.perf_counter() - t0
                    state["train_samples"] += seen
                    state["train_tokens"] = state.get("train_tokens", 0) + tokens
                    t0, seen, tokens = time.perf_counter(), 0, 0
                    save_checkpoint()
            bar.close()
            if running:
                log({"event": "epoch", "step": state["step"], "epoch": epoch + 1,
                     "loss": dist.mean(float(np.mean(running)))})
            state["train_seconds"] += time.perf_counter() - t0
            state["train_samples"] += seen
            state["train_tokens"] = state.get("train_tokens", 0) + tokens
            finished_epoch = state["batch_in_epoch"] >= len(batches)
            if finished_epoch:
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
            if not cfg.eval_every or not state["history"] or state["history"][-1]["step"] != state["step"]:
                stop = evaluate_now() or stop
            if state["step"] >= total_steps:
                stop = True
            save_checkpoint()
    except _StopAtBoundary:
        state["train_seconds"] += time.perf_counter() - t0
        state["train_samples"] += seen
        state["train_tokens"] = state.get("train_tokens", 0) + tokens
        save_checkpoint()
        raise UserError(
            f"Interrupted at step {state['step']}. The run is saved in '{work}'; run the same command "
            "with --resume to continue."
        ) from None
    except KeyboardInterrupt:
        if dist.is_main():
            raise UserError(
                f"Stopped at once at step {state['step']}. The last checkpoint in '{work}' is kept (a "
                "checkpoint written in the middle of a step would not resume exactly); run the same command "
                "with --resume to continue from it."
            ) from None
        raise
    finally:
        interrupt.restore()

    if (work / "best.safetensors").is_file():
        dist.barrier()
        load_model(model, str(work / "best.safetensors"))
    epochs_done = max(state["step"] / steps_per_epoch, 1e-9)
    return FitResult(best_metrics=state["best_metrics"], history=state["history"],
                     seconds_per_epoch=state["train_seconds"] / epochs_done,
                     train_samples_per_s=state["train_samples"] / max(state["train_seconds"], 1e-9),
                     train_tokens_per_s=state.get("train_tokens", 0) / max(state["train_seconds"], 1e-9),
                     steps=state["step"])

