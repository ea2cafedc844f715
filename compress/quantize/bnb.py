"""`bnb-int8`, `bnb-nf4`, `bnb-fp4`: bitsandbytes layers through transformers' BitsAndBytesConfig.

These save memory (weights in 8 or 4 bits) rather than time: on the CPU the layers run
slower than fp32. The classifier head and every Linear the kernels cannot take (4-bit
CPU kernels need out_features divisible by 32, see `_convert_weight_packed_for_cpu`) stay
in full precision through `llm_int8_skip_modules`; the manifest lists them with the reason.
The artifact is `save_pretrained` output whose config.json carries the quantization
config, so `from_pretrained` (and the `bnb` runner) load it directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.anatomy import is_head
from compress.artifacts import copy_support_files
from compress.errors import UserError
from compress.quantize.registry import Job, Method, register_method

CPU_4BIT_BLOCK_N = 32


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
        import torch

        skipped = []
        for name, m in model.named_modules():
            if not isinstance(m, torch.nn.Linear):
                continue
            if is_head(name):
                skipped.append({"module": name, "reason": "output head kept in full precision"})
            elif self.bits == 4 and m.out_features % CPU_4BIT_BLOCK_N:
                skipped.append({"module": name, "reason": f"out_features {m.out_features} not divisible by "
                                                           f"{CPU_4BIT_BLOCK_N} (4-bit kernel blocks)"})
            elif name in exclude:
                skipped.append({"module": name, "reason": "accuracy-aware fallback"})
        return skipped

    def layers(self, job: Job) -> list[str]:
        import torch

        from compress.models import load_classifier

        model, _ = load_classifier(job.source, job.cfg.trust_remote_code)
        skipped = {s["module"] for s in self._skipped(model, [])}
        return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in skipped]

    def build(self, job: Job, out: Path, exclude: list[str]) -> dict[str, Any]:
        import torch
        from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

        from compress.models import load_classifier

        fp32, _ = load_classifier(job.source, job.cfg.trust_remote_code)
        skipped = self._skipped(fp32, exclude)
        total = sum(1 for m in fp32.modules() if isinstance(m, torch.nn.Linear))
        del fp32
        compute = torch.float16 if job.device == "cuda" else torch.float32
        kwargs = ({"load_in_8bit": True} if self.bits == 8 else
                  {"load_in_4bit": True, "bnb_4bit_quant_type": self.quant_type, "bnb_4bit_compute_dtype": compute})
        qcfg = BitsAndBytesConfig(**kwargs, llm_int8_skip_modules=[s["module"] for s in skipped])
        model = AutoModelForSequenceClassification.from_pretrained(
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
