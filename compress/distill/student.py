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

from compress.anatomy import layer_list
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


def from_teacher_layers(teacher, tokenizer, layers: list[int]) -> Student:
    """A copy of the teacher keeping only `layers`; every kept tensor is copied exactly."""
    from transformers import AutoModelForSequenceClassification

    prefix, _ = layer_list(teacher)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    student = AutoModelForSequenceClassification.from_config(config)
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
