"""Building the student: a subset of the teacher's layers, a new size spec, or a local model.

`layers=2` / `layers=0,5` copies the teacher's embeddings, the chosen Transformer layers,
the pooler and the classifier (DistilBERT-style initialisation). A size spec such as
`bert:layers=2,hidden=256,heads=4,ff=1024` is randomly initialised but uses the teacher's
tokenizer, so the teacher's and the student's token ids agree. A local directory is loaded
with a fresh head and must share the teacher's vocabulary.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.anatomy import PER_LAYER_CONFIG_KEYS, embeddings_tied, layer_list
from compress.errors import UserError
from compress.models import SPEC_ARCHS, builtin_model_dir, BUILTIN_MODELS, check_model_dir, load_tokenizer, parse_size_spec


@dataclass
class Student:
    model: Any
    tokenizer: Any
    kind: str  # "teacher-layers" | "spec" | "dir"
    layers: list[int] = field(default_factory=list)  # teacher layers copied (0-based), for "teacher-layers"


def choose_layers(spec: str, n_teacher: int) -> list[int]:
    """`layers=3` -> evenly spaced 0-based teacher layers; `layers=0,5` -> those layers."""
    body = spec.split("=", 1)[1].strip()
    try:
        values = [int(v) for v in body.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"Bad student spec '{spec}': use layers=K (a count) or layers=I,J,... (0-based teacher "
                        "layer indices).") from None
    if not values:
        raise UserError(f"Bad student spec '{spec}': no layers given.")
    if len(values) == 1 and "," not in body:
        k = values[0]
        if not 1 <= k <= n_teacher:
            raise UserError(f"Student spec '{spec}' asks for {k} layers but the teacher has {n_teacher}. "
                            f"Use layers=1..{n_teacher}.")
        # Stride n/k from the bottom, as DistilBERT did: 3 of 6 -> 0,2,4; 2 of 6 -> 0,3.
        return [i * n_teacher // k for i in range(k)]
    bad = [v for v in values if not 0 <= v < n_teacher]
    if bad:
        raise UserError(f"Student spec '{spec}': layer index {bad[0]} is out of range; the teacher's layers are "
                        f"0..{n_teacher - 1}.")
    if len(set(values)) != len(values) or values != sorted(values):
        raise UserError(f"Student spec '{spec}': list each teacher layer once, in increasing order.")
    return values


def from_teacher_layers(teacher, tokenizer, layers: list[int], same_class: bool = False) -> Student:
    """A copy of the teacher keeping only `layers`; every kept tensor is copied exactly.

    With `same_class` the student is built as the teacher's own class (a causal LM: GPT-2,
    Llama, Qwen2, ...), else as a sequence classifier. Embeddings, final norm and head are
    copied; tied input and output embeddings stay one tensor.
    """
    from transformers import AutoModelForSequenceClassification

    prefix, _ = layer_list(teacher)
    config = copy.deepcopy(teacher.config)
    n_teacher = config.num_hidden_layers
    config.num_hidden_layers = len(layers)
    for key in PER_LAYER_CONFIG_KEYS:  # e.g. Qwen2's layer_types: one entry per layer
        value = getattr(config, key, None)
        if isinstance(value, list) and len(value) == n_teacher:
            setattr(config, key, [value[i] for i in layers])
    student = type(teacher)(config) if same_class else AutoModelForSequenceClassification.from_config(config)
    new_pos = {old: new for new, old in enumerate(layers)}
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    state = {}
    for key, tensor in teacher.state_dict().items():
        m = pattern.match(key)
        if m is None:
            state[key] = tensor.clone()
        elif int(m.group(1)) in new_pos:
            state[f"{prefix}.{new_pos[int(m.group(1))]}.{m.group(2)}"] = tensor.clone()
    student.load_state_dict(state, strict=True)
    if getattr(config, "tie_word_embeddings", False) and student.get_output_embeddings() is not None:
        student.tie_weights()
        if not embeddings_tied(student):
            raise AssertionError("the student's LM head lost its tie to the input embedding")
    return Student(student, tokenizer, "teacher-layers", list(layers))


def from_size_spec(spec: str, teacher, tokenizer) -> Student:
    """A randomly initialised BERT of the given size that reads the teacher's tokens."""
    from transformers import BertConfig, BertForSequenceClassification

    sizes = parse_size_spec(spec)
    if "vocab_size" in sizes and sizes["vocab_size"] != len(tokenizer):
        raise UserError(f"Student spec '{spec}' sets vocab={sizes['vocab_size']}, but the student shares the "
                        f"teacher's tokenizer ({len(tokenizer)} tokens). Drop 'vocab=' (use --prune-vocab to shrink "
                        "the vocabulary).")
    hidden = sizes.get("hidden_size", 256)
    tc = teacher.config
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                        num_hidden_layers=sizes.get("num_hidden_layers", 4),
                        num_attention_heads=sizes.get("num_attention_heads", 4),
                        intermediate_size=sizes.get("intermediate_size", 4 * hidden),
                        max_position_embeddings=sizes.get("max_position_embeddings",
                                                          getattr(tc, "max_position_embeddings", 512)),
                        type_vocab_size=getattr(tc, "type_vocab_size", 2), pad_token_id=tokenizer.pad_token_id,
                        num_labels=tc.num_labels, id2label=tc.id2label, label2id=tc.label2id)
    return Student(BertForSequenceClassification(config), tokenizer, "spec")


def from_directory(path: str, teacher, teacher_tokenizer, trust_remote_code: bool = False) -> Student:
    """A local model with a new head for the teacher's labels; its vocabulary must be the teacher's."""
    from transformers import AutoModelForSequenceClassification

    check_model_dir(Path(path))
    tokenizer = load_tokenizer(path, trust_remote_code)
    if tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise UserError(
            f"The student '{path}' has a different vocabulary ({len(tokenizer)} tokens) from the teacher "
            f"({len(teacher_tokenizer)} tokens). Distillation compares both models on the same token ids: "
            "pick a student with the teacher's tokenizer, or use a size spec (bert:layers=...), which shares it."
        )
    tc = teacher.config
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=tc.num_labels, id2label=tc.id2label, label2id=tc.label2id,
            ignore_mismatched_sizes=True, trust_remote_code=trust_remote_code)
    except ValueError as err:
        raise UserError(f"The student '{path}' cannot be loaded as a sequence classifier: {err}") from None
    return Student(model, tokenizer, "dir")


def build_student(spec: str, teacher, tokenizer, trust_remote_code: bool = False) -> Student:
    """Dispatch on the form of `spec` (see the module docstring)."""
    if spec.startswith("layers="):
        _, layers = layer_list(teacher)
        return from_teacher_layers(teacher, tokenizer, choose_layers(spec, len(layers)))
    if spec.split(":", 1)[0] in SPEC_ARCHS and ":" in spec:
        return from_size_spec(spec, teacher, tokenizer)
    if spec in BUILTIN_MODELS:
        return from_directory(str(builtin_model_dir(spec)), teacher, tokenizer, trust_remote_code)
    if Path(spec).exists():
        return from_directory(spec, teacher, tokenizer, trust_remote_code)
    raise UserError(
        f"Unknown student '{spec}'. Use layers=K or layers=I,J (layers copied from the teacher), a size spec "
        "such as bert:layers=2,hidden=256,heads=4,ff=1024, or a local model directory."
    )


# --------------------------------------------------------------------------- causal-LM students

def lm_from_size_spec(spec: str, teacher, tokenizer) -> Student:
    """A randomly initialised gpt2:/llama: decoder that reads the teacher's tokens."""
    from transformers import AutoModelForCausalLM

    from compress.models import causal_lm_config

    arch = spec.split(":", 1)[0]
    if SPEC_ARCHS.get(arch) != "causal-lm":
        raise UserError(f"The student spec '{spec}' builds a {SPEC_ARCHS.get(arch, arch)} model, but the teacher is a "
                        "causal language model. Use a gpt2:... or llama:... spec, layers=K, or a causal-LM directory.")
    sizes = parse_size_spec(spec)
    vocab = teacher.config.vocab_size
    if "vocab_size" in sizes and sizes["vocab_size"] != vocab:
        raise UserError(f"Student spec '{spec}' sets vocab={sizes['vocab_size']}, but the student reads the teacher's "
                        f"tokens ({vocab} ids). Drop 'vocab=': the student shares the teacher's tokenizer.")
    sizes.pop("vocab_size", None)
    depth = sizes.get("num_hidden_layers", 4)
    if depth > teacher.config.num_hidden_layers:
        raise UserError(f"Student spec '{spec}' has {depth} layers, more than the teacher's "
                        f"{teacher.config.num_hidden_layers}: a student is smaller than its teacher. Ask for at most "
                        f"layers={teacher.config.num_hidden_layers}.")
    config = causal_lm_config(arch, sizes, tokenizer)
    config.vocab_size = vocab
    limit = getattr(teacher.config, "n_positions", None) or getattr(teacher.config, "max_position_embeddings", None)
    if "max_position_embeddings" not in sizes and limit:
        setattr(config, "n_positions" if arch == "gpt2" else "max_position_embeddings", int(limit))
    model = AutoModelForCausalLM.from_config(config)
    model.loss_type = "ForCausalLM"
    return Student(model, tokenizer, "spec")


def lm_from_directory(path: str, teacher, teacher_tokenizer, trust_remote_code: bool = False) -> Student:
    """A local causal LM as the student; it must read the teacher's tokens (the same vocabulary)."""
    from compress.models import load_causal_lm

    model, tokenizer = load_causal_lm(path, trust_remote_code)
    if tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise UserError(
            f"The student '{path}' has a different tokenizer ({len(tokenizer)} tokens) from the teacher "
            f"({len(teacher_tokenizer)} tokens). Token-level distillation compares both models' next-token "
            "distributions id by id, so they must share one tokenizer: pick a student trained with the teacher's "
            "tokenizer, or use layers=K or a gpt2:/llama: size spec, which read the teacher's.")
    return Student(model, tokenizer, "dir")


def build_lm_student(spec: str, teacher, tokenizer, trust_remote_code: bool = False) -> Student:
    """The causal-LM student `spec` names: layers=K / layers=I,J, a gpt2:/llama: spec, or a directory."""
    student = None
    if spec.startswith("layers="):
        _, layers = layer_list(teacher)
        student = from_teacher_layers(teacher, tokenizer, choose_layers(spec, len(layers)), same_class=True)
    elif ":" in spec and spec.split(":", 1)[0] in SPEC_ARCHS:
        student = lm_from_size_spec(spec, teacher, tokenizer)
    elif Path(spec).exists():
        student = lm_from_directory(spec, teacher, tokenizer, trust_remote_code)
    if student is not None:
        # transformers picks the loss from the class name and GPT2LMHeadModel's matches none: name it.
        if getattr(student.model, "loss_type", None) is None:
            student.model.loss_type = "ForCausalLM"
        return student
    raise UserError(f"Unknown student '{spec}'. Use layers=K or layers=I,J (layers copied from the teacher), a size "
                    "spec such as gpt2:layers=2,hidden=256,heads=4, or a local causal-LM directory.")
