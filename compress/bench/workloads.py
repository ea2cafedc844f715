"""How each kind of latency point is timed: the samplers behind `compress bench`.

The artifact's Task says what to time (`Task.bench_plan`: a list of points, each with a
`kind`); this module says how, one sampler factory per kind in `WORKLOADS`. A sampler is a
callable that does one unit of work, times the part that counts with the benchmark's timer,
and returns the durations (`compress.bench.measure.interleaved_samples` rounds them up):

- `forward`: one `runner.logits(batch)` on a batch of real texts padded to exactly
  `seq_len` tokens (classifiers).
- `prefill`: one `runner.start(ids)` on `batch_size` prompts of `seq_len` real tokens: the
  prompt's forward pass that fills the KV cache and gives the last position's logits.
- `ttft`: time to first token as the issue defines it: the prefill, the greedy choice of
  the first new token, and the first cached decode step that feeds it back.
- `decode`: an untimed prefill, then `new_tokens` cached decode steps, each timed on its own
  (the step and the greedy choice of the next token): one sample per generated token.

Prompts are windows of the evaluation split's token stream (real text, the artifact's own
tokenizer): row i of a batch is tokens [i*s, (i+1)*s), the stream repeated when too short.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from compress.bench.measure import Sampler, Timer, make_batch
from compress.errors import UserError


@dataclass
class Inputs:
    """What the samplers draw their inputs from.

    Attributes:
        texts: the split's raw texts (or pairs), longest first (for `forward`).
        tokens: the split's token stream under the artifact's tokenizer (for the LM kinds), or None.
    """

    texts: list
    tokens: np.ndarray | None = None


def split_texts(data, split: str) -> list:
    """The split's texts (or text pairs), longest first, so a batch carries the most real tokens."""
    ds = data[split]
    texts = list(ds["text"])
    if "text_pair" in ds.column_names:
        texts = list(zip(texts, ds["text_pair"]))
    return sorted(texts, key=lambda t: -len(t[0] + t[1]) if isinstance(t, tuple) else -len(t))


def prompt_ids(tokens: np.ndarray, batch_size: int, seq_len: int) -> np.ndarray:
    """[batch_size, seq_len] int64 prompts: consecutive windows of `tokens` (repeated if too short)."""
    need = batch_size * seq_len
    stream = np.asarray(tokens, dtype=np.int64)
    if stream.size == 0:
        raise UserError("The evaluation split has no tokens to make prompts from. Pass a dataset with text in it.")
    if stream.size < need:
        stream = np.tile(stream, -(-need // stream.size))
    return np.ascontiguousarray(stream[:need].reshape(batch_size, seq_len))


def _greedy(logits) -> np.ndarray:
    return np.asarray(logits).argmax(-1).astype(np.int64)


def check_generation(runner, name: str) -> None:
    """Fail with a message when the runner cannot run cached decoding (start/step)."""
    missing = [m for m in ("start", "step") if not callable(getattr(runner, m, None))]
    if missing:
        raise UserError(f"'{name}' ({runner.format}) cannot be timed as a causal LM: its runner has no "
                        f"{' and no '.join(missing)} (prefill and cached decode step). Benchmark an artifact "
                        "whose format runs generation, or export it to ONNX with `compress export`.")


def forward(runner, point: dict, inputs: Inputs, timer: Timer) -> tuple[Sampler, Callable[[], Any]]:
    batch = make_batch(runner.tokenizer, inputs.texts, point["batch_size"], point["seq_len"])

    def call():
        return runner.logits(batch)

    return (lambda: [timer(call)]), call


def prefill(runner, point: dict, inputs: Inputs, timer: Timer) -> tuple[Sampler, Callable[[], Any]]:
    ids = prompt_ids(inputs.tokens, point["batch_size"], point["seq_len"])

    def call():
        return runner.start(ids)

    return (lambda: [timer(call)]), call


def ttft(runner, point: dict, inputs: Inputs, timer: Timer) -> tuple[Sampler, Callable[[], Any]]:
    ids = prompt_ids(inputs.tokens, point["batch_size"], point["seq_len"])

    def call():
        logits, state = runner.start(ids)
        return runner.step(_greedy(logits), state)

    return (lambda: [timer(call)]), call


def decode(runner, point: dict, inputs: Inputs, timer: Timer) -> tuple[Sampler, Callable[[], Any]]:
    ids = prompt_ids(inputs.tokens, point["batch_size"], point["seq_len"])
    steps = point["new_tokens"]

    def run(timed: bool) -> list[float]:
        logits, state = runner.start(ids)
        cell = {"token": _greedy(logits), "state": state}

        def one_step():
            logits, cell["state"] = runner.step(cell["token"], cell["state"])
            cell["token"] = _greedy(logits)

        out = []
        for _ in range(steps):
            if timed:
                out.append(timer(one_step))
            else:
                one_step()
        return out

    return (lambda: run(True)), (lambda: run(False))


# kind -> factory(runner, point, inputs, timer) -> (sampler, the same work untimed)
WORKLOADS: dict[str, Callable[..., tuple[Sampler, Callable[[], Any]]]] = {
    "forward": forward, "prefill": prefill, "ttft": ttft, "decode": decode,
}
# Sampler calls per artifact per interleaved round: a decode run already yields new_tokens samples.
BLOCK = {"forward": 4, "prefill": 4, "ttft": 4, "decode": 1}
GENERATION_KINDS = ("prefill", "ttft", "decode")


def kind_of(point: dict) -> str:
    """A point's workload; points of schema 2 before LMs were benchmarked carry none (forward)."""
    return point.get("kind", "forward")


def build(runner, point: dict, inputs: Inputs, timer: Timer, name: str) -> tuple[Sampler, Callable[[], Any]]:
    """(sampler, untimed call) for one point of one artifact."""
    kind = kind_of(point)
    if kind not in WORKLOADS:
        raise ValueError(f"no workload '{kind}'; known: {', '.join(WORKLOADS)}")
    if kind in GENERATION_KINDS:
        check_generation(runner, name)
        if inputs.tokens is None:
            raise UserError(f"'{name}' is timed as a causal LM, but its evaluation split is not a token stream. "
                            "Benchmark it on plain text (--task causal-lm, --dataset austen or a .txt file).")
    return WORKLOADS[kind](runner, point, inputs, timer)


def finish_point(point: dict, stats: dict) -> dict:
    """A point of results.json: the plan's point, its timing statistics and its throughput."""
    out = {**point, **stats}
    kind, b = kind_of(point), point["batch_size"]
    if kind == "forward":
        out["throughput_sps"] = round(b / (stats["p50_ms"] / 1e3), 2)
    elif kind == "decode":
        out["tokens_per_s"] = round(b / (stats["p50_ms"] / 1e3), 2)  # generated tokens, all sequences
    else:
        out["tokens_per_s"] = round(b * point["seq_len"] / (stats["p50_ms"] / 1e3), 2)  # prompt tokens
    return out
