"""The ONNX Runtime runner (`format: onnx`): an ONNX artifact or a plain optimum ONNX directory.

Export's parity gates, the ort-* quantize methods, eval and bench all run graphs through it.
The session settings an artifact's manifest records (`ort_session_config`) apply here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compress.artifacts import read_manifest
from compress.errors import UserError
from compress.ort_settings import session_options

ONNX_FILE = "model.onnx"


class OrtRunner:
    """ONNX Runtime inference on an ONNX artifact or a plain optimum ONNX directory."""

    format = "onnx"

    def __init__(self, directory: Path, device: str = "cpu", threads: int | None = None,
                 onnx_file: str | None = None, session_config: dict[str, str] | None = None, *,
                 trust_remote_code: bool = False):
        import onnxruntime as ort
        from transformers import AutoConfig

        from compress.models import load_tokenizer

        directory = Path(directory)
        manifest = read_manifest(directory)
        self.path = directory / (onnx_file or manifest.get("onnx_file") or find_onnx_file(directory))
        if not self.path.is_file():
            raise UserError(f"The ONNX file '{self.path}' that the artifact names is missing. "
                            "Re-run the stage that wrote the artifact.")
        self.session_config = dict(manifest.get("ort_session_config") or {}) if session_config is None else session_config
        options = session_options(threads, self.session_config)
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise UserError("--device cuda needs the onnxruntime-gpu package; this onnxruntime has only "
                                f"{', '.join(ort.get_available_providers())}. Install onnxruntime-gpu or use --device cpu.")
            # TF32 matmuls would add ~1e-3 relative error to an fp32 graph and fail the parity gate.
            providers = [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        if device == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise UserError(f"ONNX Runtime could not start CUDA for '{self.path}' (it fell back to "
                            f"{self.session.get_providers()}). Check the CUDA and cuDNN libraries onnxruntime-gpu needs.")
        self.inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        self.output = "logits" if "logits" in outputs else outputs[0]
        self.device = device
        self.tokenizer = load_tokenizer(directory, trust_remote_code)
        self.config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)

    def logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        # Graphs declare only the inputs the model uses: DistilBERT-like exports have no token_type_ids.
        feeds = {k: np.ascontiguousarray(v, dtype=np.int64) for k, v in batch.items() if k in self.inputs}
        if "token_type_ids" in self.inputs and "token_type_ids" not in feeds:
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        return self.session.run([self.output], feeds)[0].astype(np.float32, copy=False)


def find_onnx_file(directory: Path) -> str:
    """The name of the artifact's ONNX graph: model.onnx, else its only *.onnx file."""
    if (directory / ONNX_FILE).is_file():
        return ONNX_FILE
    found = sorted(p.name for p in directory.glob("*.onnx"))
    if len(found) != 1:
        raise UserError(f"'{directory}' holds {len(found)} .onnx files ({', '.join(found) or 'none'}) and no manifest "
                        "naming one. Keep one model.onnx there, or add a manifest.json with an 'onnx_file' key.")
    return found[0]
