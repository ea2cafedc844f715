"""`bf16` and `fp16`: the whole model cast to 16-bit floats.

Weights are saved in the 16-bit dtype (half the size on disk) in the ordinary
`save_pretrained` layout with `format: pytorch` and `dtype` in the manifest, which
`TorchRunner` reads to cast the model after loading. bf16 is fast on CPUs with AMX or
AVX512-BF16 and on recent GPUs; fp16 exists only on CUDA. There is no per-layer fallback:
a cast that loses accuracy is a reason to pick another method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.artifacts import copy_support_files
from compress.errors import UserError
from compress.quantize.registry import Job, Method, register_method


class Cast(Method):
    input = "pytorch"
    can_fall_back = False
    dtype: str

    def build(self, job: Job, out: Path, exclude: list[str]) -> dict[str, Any]:
        import torch

        from compress.tasks.registry import task_for_artifact

        model, _ = task_for_artifact(job.source).load_model(job.source, job.cfg.trust_remote_code)
        model.to(torch.bfloat16 if self.dtype == "bf16" else torch.float16)
        model.save_pretrained(out, safe_serialization=True)
        copy_support_files(job.source, out)
        # save_pretrained rewrote config.json with the new dtype; keep that one.
        model.config.save_pretrained(out)
        n = sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear))
        return {"format": "pytorch", "dtype": self.dtype, "run_device": job.device,
                "quantized": {"Linear": n, "all parameters": sum(p.numel() for p in model.parameters())},
                "skipped": []}


@register_method("bf16")
class Bf16(Cast):
    dtype = "bf16"
    auto_order = 3

    def worth_trying(self, device: str) -> bool:
        # Without AMX, bf16 on the CPU is slower than fp32 (docs/decisions.md): it runs, but never wins.
        from compress.hardware import has_fast_bf16_cpu

        return device != "cpu" or has_fast_bf16_cpu()

    def check(self, settings, device: str) -> None:
        import torch

        if device == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("This GPU does not support bf16. Use --method fp16 on it.")


@register_method("fp16")
class Fp16(Cast):
    dtype = "fp16"
    auto_order = 4

    def check(self, settings, device: str) -> None:
        if device != "cuda":
            raise UserError("--method fp16 needs a CUDA GPU (fp16 matmuls on the CPU are emulated and slow). "
                            "On the CPU use an int8 method, or bf16 on a CPU with AMX; on a GPU pass --device cuda.")
