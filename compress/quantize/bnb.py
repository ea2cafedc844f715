"""`bnb-int8`, `bnb-nf4`, `bnb-fp4`: bitsandbytes layers through transformers' BitsAndBytesConfig.

These save memory (weights in 8 or 4 bits) rather than time: on the CPU the layers run
slower than fp32. The output head (a classifier's head, a causal LM's LM head, which is tied to
the input embedding) and every Linear the kernels cannot take (4-bit
CPU kernels need out_features divisible by 32, see `_convert_weight_packed_for_cpu`) stay in
full precision through `llm_int8_skip_modules`; the manifest lists them with the reason.
The artifact is `save_pretrained` output whose config.json carries the quantization
config, so `from_pretrained` (and the `bnb` runner) load it directly. GPT-2's Conv1D layers
are quantized too (transformers transposes them into bitsandbytes Linear layers). On the CPU,
bitsandbytes' fast 4-bit path fetches kernels from the Hugging Face Hub at run time; offline
it dequantizes each weight and runs a float matmul (docs/quantize.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.artifacts import copy_support_files
from compress.errors import UserError
from compress.quantize.registry import Job, Method, register_method

CPU_4BIT_BLOCK_N = 32


def _load(job: Job):
    from compress.tasks.registry import task_for_artifact

    return task_for_artifact(job.source).load_model(job.source, job.cfg.trust_remote_code)


def _linears(model) -> list[tuple[str, Any]]:
    """(name, module) of every layer bitsandbytes replaces: nn.Linear, and GPT-2's Conv1D
    (transformers' bitsandbytes integration transposes it into a quantized Linear)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]


class Bnb(Method):
    input = "pytorch"
    # Not tried by --method auto: it saves memory, but its layers are slower than fp32 on the
    # CPU and than fp16 on most GPUs.
    auto_order = None
    bits: int
    quant_type: str | None = None

    def check(self, settings, device: str) -> None:
        try:
            import bitsandbytes  # noqa: F401
        except Exception as err:  # a broken native library raises more than ImportError
            raise UserError(f"--method {self.name} needs bitsandbytes, which cannot be imported here ({err}). "
                            "Install it with `pip install 'compress[bnb]'`, or use an int8 method.") from None
        import platform

        if device == "cpu" and platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64"):
            raise UserError(f"bitsandbytes has no CPU backend for {platform.machine()}. Use ort-dynamic-int8 or a CUDA GPU.")

    def _skipped(self, model, exclude: list[str]) -> list[dict[str, str]]:
        from compress.quantize.torch_int8 import head_names

        heads = head_names(model)
        skipped = []
        for name, m in _linears(model):
            out_features = m.out_features if hasattr(m, "out_features") else m.nf  # Conv1D keeps it as nf
            if name in heads:
                skipped.append({"module": name, "reason": "output head kept in full precision"})
            elif self.bits == 4 and out_features % CPU_4BIT_BLOCK_N:
                skipped.append({"module": name, "reason": f"out_features {out_features} not divisible by "
                                                           f"{CPU_4BIT_BLOCK_N} (4-bit kernel blocks)"})
            elif name in exclude:
                skipped.append({"module": name, "reason": "accuracy-aware fallback"})
        return skipped

    def layers(self, job: Job) -> list[str]:
        model, _ = _load(job)
        skipped = {s["module"] for s in self._skipped(model, [])}
        return [n for n, _ in _linears(model) if n not in skipped]

    def build(self, job: Job, out: Path, exclude: list[str]) -> dict[str, Any]:
        import torch
        from transformers import BitsAndBytesConfig

        from compress.runners.torch_int8 import model_class

        fp32, _ = _load(job)
        skipped = self._skipped(fp32, exclude)
        total = len(_linears(fp32))
        cls = model_class(fp32.config)
        del fp32
        compute = torch.float16 if job.device == "cuda" else torch.float32
        kwargs = ({"load_in_8bit": True} if self.bits == 8 else
                  {"load_in_4bit": True, "bnb_4bit_quant_type": self.quant_type, "bnb_4bit_compute_dtype": compute})
        qcfg = BitsAndBytesConfig(**kwargs, llm_int8_skip_modules=[s["module"] for s in skipped])
        model = cls.from_pretrained(
            str(job.source), quantization_config=qcfg, dtype=compute, device_map=job.device,
            trust_remote_code=job.cfg.trust_remote_code)
        model.save_pretrained(out, safe_serialization=True)
        copy_support_files(job.source, out)
        model.config.save_pretrained(out)  # the config that carries quantization_config
        return {"format": "bnb", "run_device": job.device,
                "scheme": {"weights": self.name.removeprefix("bnb-"), "compute_dtype": str(compute).removeprefix("torch.")},
                "quantized": {"Linear": total - len(skipped)}, "skipped": skipped}


@register_method("bnb-int8")
class BnbInt8(Bnb):
    bits = 8


@register_method("bnb-nf4")
class BnbNf4(Bnb):
    bits, quant_type = 4, "nf4"


@register_method("bnb-fp4")
class BnbFp4(Bnb):
    bits, quant_type = 4, "fp4"
