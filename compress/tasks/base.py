"""The `Task` interface: the only place that knows what a task's data, model, loss and
quality mean. Stages (train, eval, distill, export, bench) call these methods."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar


class Task:
    """What differs between tasks. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    #: optimum's export task name for the ONNX graph.
    export_task: ClassVar[str]
    #: the metric that selects the best checkpoint and heads reports, and its direction.
    primary_metric: ClassVar[str]
    higher_is_better: ClassVar[bool]
    #: the built-in dataset used when a stage names none.
    default_dataset: ClassVar[str]
    #: distillation: the loss names `--losses` takes, the ones used when none are given, and the
    #: default softmax temperature of the soft targets.
    distill_losses: ClassVar[tuple[str, ...]] = ()
    default_distill_losses: ClassVar[tuple[str, ...]] = ()
    default_temperature: ClassVar[float] = 1.0

    def load_data(self, cfg) -> Any:
        """The three splits `cfg` (a DataConfig) names, as a `compress.data.Data`."""
        raise NotImplementedError

    def build_model(self, source, data, cfg) -> tuple[Any, Any]:
        """(model, tokenizer) to train: from a size spec (tokenizer trained on `data`) or a checkpoint."""
        raise NotImplementedError

    def load_model(self, directory: str | Path, trust_remote_code: bool = False) -> tuple[Any, Any]:
        """(model, tokenizer) of a PyTorch artifact of this task."""
        raise NotImplementedError

    def encode(self, data, tokenizer, cfg, *, model_config=None, splits=("train", "validation", "test")) -> dict:
        """Tokenised splits. Training splits have `lengths`, `__len__` and `collate(idx, pad_id)`."""
        raise NotImplementedError

    def loss(self, model, batch: dict) -> tuple[Any, dict[str, float]]:
        """The training loss of one collated batch, and named parts to log."""
        raise NotImplementedError

    def evaluate(self, model, split, *, batch_size: int, device: str = "cpu", precision: str = "fp32",
                 shard: bool = False) -> dict[str, float]:
        """{metric: value} of a PyTorch model on an encoded split (under DDP with `shard`, every rank gets all)."""
        raise NotImplementedError

    def evaluate_runner(self, runner, split, batch_size: int) -> dict[str, float]:
        """The same metrics through a runner (any artifact format)."""
        raise NotImplementedError

    def validator(self, split, batch_size: int):
        """The evaluation hook `loop.fit` calls: (model, device=, precision=) -> metrics on `split`."""

        def run(model, *, device: str, precision: str) -> dict[str, float]:
            return self.evaluate(model, split, batch_size=batch_size, device=device, precision=precision, shard=True)

        return run

    def teacher_targets(self, teacher, split, *, top_k: int, temperature: float, batch_size: int, device: str,
                        precision: str, directory: Path, key: dict | None = None, progress: bool = True,
                        **options) -> Any:
        """The teacher's soft targets for every training example of `split`, computed once before
        distillation and kept in `directory` (a finished set with the same `key` is reused);
        `progress` shows a progress bar; `options` are the task's own (a causal LM's tail samples)."""
        raise NotImplementedError

    def distill_loss(self, teacher, targets, settings, projections=None):
        """Distillation's (model, batch) -> (loss, parts) for `loop.fit`: soft targets from `targets`
        (None: the teacher runs on every batch), mixed as `settings` say."""
        raise NotImplementedError

    def bench_plan(self, cfg, model_config, name: str) -> list[dict]:
        """What `compress bench` times for an artifact of this task: its latency points.

        Args:
            cfg: the BenchConfig (batch sizes, sequence or prompt lengths, ...).
            model_config: the artifact's transformers config (its position limit).
            name: the artifact's display name, for messages.

        Returns:
            [{kind, batch_size, seq_len, ...}], where kind is a workload `compress.bench.workloads`
            times: `forward` (one logits call on a padded batch), `prefill`, `ttft`, `decode`.
        """
        raise NotImplementedError

    def preload(self) -> None:
        """Load what scoring needs before the benchmark's memory baseline, so that its first-import
        cost is not billed to the artifact."""

    def summary(self, metrics: dict[str, float]) -> str:
        """One line for the console."""
        return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
