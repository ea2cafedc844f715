"""The ONNX Runtime runner (`format: onnx`): an ONNX artifact or a plain optimum ONNX directory.

Export's parity gates, the ort-* quantize methods, eval and bench all run graphs through it.
The session settings an artifact's manifest records (`ort_session_config`) apply here.

A causal-LM graph in optimum's `text-generation-with-past` layout (inputs `input_ids`,
`attention_mask`, `position_ids` where the model takes them, `past_key_values.{i}.key|value`
[b, kv_heads, past, head_dim]; outputs `logits`, `present.{i}.key|value`) is run by the
decode loop in `OrtDecoder`: `logits` feeds an empty cache, `start` runs the prompt and keeps
the presents, `step` feeds one token and the previous presents. On CUDA the cache stays in
ONNX Runtime's device buffers between steps (I/O binding); on the CPU it goes through numpy,
which measured as fast (benchmarks/results/lm_decode_io.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compress.artifacts import read_manifest
from compress.errors import UserError
from compress.onnx_graph import KEEP_INPUT
from compress.ort_settings import session_options
from compress.runners import decode

ONNX_FILE = "model.onnx"
PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."
# ONNX tensor element types of a KV cache -> numpy.
CACHE_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": np.float32}


class OrtDecoder:
    """Mixin for `OrtRunner`: the decode loop over a graph with past key values.

    Needs `self.session`, `self.inputs`, `self.device`, `self.tokenizer` and `self.io_binding`.
    """

    def _init_cache(self) -> None:
        meta = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in self.inputs if n.startswith(PAST_PREFIX)]
        self.present_names = [PRESENT_PREFIX + n[len(PAST_PREFIX):] for n in self.past_names]
        outputs = {o.name for o in self.session.get_outputs()}
        missing = [n for n in self.present_names if n not in outputs]
        if missing:
            raise UserError(f"The graph '{self.path}' takes past key values but has no outputs {', '.join(missing[:3])}: "
                            "it is not in optimum's text-generation-with-past layout. Export it with compress export.")
        self.cache_dtype = {n: CACHE_DTYPES.get(meta[n].type, np.float32) for n in self.past_names}
        # [batch, kv_heads, past_length, head_dim]: the heads and head size are fixed numbers in the graph.
        self.cache_dims = {}
        for n in self.past_names:
            shape = meta[n].shape
            heads, dim = shape[1], shape[3]
            if not isinstance(heads, int) or not isinstance(dim, int):
                heads, dim = self._cache_dims_from_config()
            self.cache_dims[n] = (heads, dim)

    def _cache_dims_from_config(self) -> tuple[int, int]:
        c = self.config
        heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head")
        kv = getattr(c, "num_key_value_heads", None) or heads
        dim = getattr(c, "head_dim", None) or (getattr(c, "hidden_size", None) or c.n_embd) // heads
        return int(kv), int(dim)

    def _feeds(self, ids: np.ndarray, past_length: int) -> dict[str, np.ndarray]:
        b, t = ids.shape
        feeds = {"input_ids": np.ascontiguousarray(ids, dtype=np.int64)}
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = np.ones((b, past_length + t), dtype=np.int64)
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.broadcast_to(np.arange(past_length, past_length + t, dtype=np.int64), (b, t)).copy()
        return feeds

    def _empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        return {n: np.zeros((batch, *self.cache_dims[n][:1], 0, self.cache_dims[n][1]), dtype=self.cache_dtype[n])
                for n in self.past_names}

    def _lm_logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        ids = np.asarray(batch["input_ids"])
        feeds = self._feeds(ids, 0)
        if "attention_mask" in batch and "attention_mask" in feeds:
            mask = np.ascontiguousarray(batch["attention_mask"], dtype=np.int64)
            feeds["attention_mask"] = mask
            if "position_ids" in feeds:  # right padding: real tokens count 0, 1, ...; padding gets 1 (as optimum does)
                feeds["position_ids"] = np.where(mask == 1, np.cumsum(mask, -1) - 1, 1).astype(np.int64)
        feeds.update(self._empty_cache(len(ids)))
        return self.session.run([self.output], feeds)[0].astype(np.float32, copy=False)

    def _run_cached(self, ids: np.ndarray, past: dict, past_length: int):
        """(logits of the last position [b, vocab], presents by past-input name)."""
        feeds = self._feeds(ids, past_length)
        if not self.io_binding:
            if self.keep_last:
                feeds[KEEP_INPUT] = np.ones(1, dtype=np.int64)
            result = self.session.run([self.output, *self.present_names], {**feeds, **past})
            return result[0][:, -1].astype(np.float32), dict(zip(self.past_names, result[1:]))
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name, value in past.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output(self.output, "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.cache_device)
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return values[0].numpy()[:, -1].astype(np.float32), dict(zip(self.past_names, values[1:]))

    def start(self, input_ids: np.ndarray):
        """Run the prompts [b, t] (equal lengths): (logits of the last position [b, vocab], state).

        The state (the presents and the length) is never modified: `step` returns a new one.
        """
        ids = np.asarray(input_ids)
        logits, past = self._run_cached(ids, self._empty_cache(len(ids)), 0)
        return logits, {"past": past, "length": int(ids.shape[1])}

    def step(self, token_ids: np.ndarray, state):
        """One cached decode step for tokens [b]: (logits [b, vocab], new state)."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1, 1)
        logits, past = self._run_cached(ids, state["past"], state["length"])
        return logits, {"past": past, "length": state["length"] + 1}

    def generate(self, input_ids: np.ndarray, *, max_new_tokens: int, sampling: dict, on_token=None) -> np.ndarray:
        """Continue `input_ids` [b, t] with the KV cache (`compress.runners.decode.generate`)."""
        if not self.past_names:
            raise UserError(f"The graph '{self.path}' has no past key values, so it cannot generate with a cache. "
                            "Export the causal LM with compress export (optimum's text-generation-with-past layout).")
        return decode.generate(self, input_ids, max_new_tokens=max_new_tokens, sampling=sampling, on_token=on_token,
                               eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)


class OrtRunner(OrtDecoder):
    """ONNX Runtime inference on an ONNX artifact or a plain optimum ONNX directory."""

    format = "onnx"

    def __init__(self, directory: Path, device: str = "cpu", threads: int | None = None,
                 onnx_file: str | None = None, session_config: dict[str, str] | None = None, *,
                 trust_remote_code: bool = False, io_binding: bool | None = None):
        import onnxruntime as ort
        from transformers import AutoConfig

        from compress.models import load_tokenizer
        from compress.tasks.registry import task_for_artifact

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
        self.task = task_for_artifact(directory)
        # The KV cache through numpy on the CPU: binding it as OrtValues measured no faster there
        # (benchmarks/results/lm_decode_io.md); on CUDA binding keeps it on the device.
        self.io_binding = (device == "cuda") if io_binding is None else io_binding
        self.cache_device = "cuda" if device == "cuda" else "cpu"
        self.past_names: list[str] = []
        # Graphs from compress export project only the last position in a prefill when asked. I/O
        # binding cannot bind an overridable initializer (onnxruntime 1.31: "Failed to find
        # NodeArg"), so a bound (CUDA) prefill still projects every position.
        self.keep_last = KEEP_INPUT in {i.name for i in self.session.get_overridable_initializers()}
        if any(n.startswith(PAST_PREFIX) for n in self.inputs):
            if self.tokenizer.pad_token_id is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            self._init_cache()

    def logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Logits of a right-padded batch: [b, classes] for a classifier, [b, t, vocab] for a causal LM."""
        if self.past_names:
            return self._lm_logits(batch)
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
