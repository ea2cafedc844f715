"""ONNX Runtime session settings that travel with an ONNX artifact, chosen by measurement.

Some of ONNX Runtime's speed depends on how a session is opened, not on the graph: which
graph optimizers run at load, and whether denormal floats are flushed. The export stage
decides these settings, records them in the manifest as `ort_session_config` (session config
entries), and every runner applies them (docs/export.md#skiplayernormalization).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

# A session config entry ONNX Runtime reads when a session starts: a comma-separated list of
# graph optimizers to skip. It travels in the manifest (`ort_session_config`) so that every
# runner, and a user's own InferenceSession or optimum ORTModel, can apply it.
DISABLE_OPTIMIZERS = "optimization.disable_specified_optimizers"
SKIP_LAYER_NORM_FUSION = "SkipLayerNormFusion"
# Flush denormal floats to zero in ONNX Runtime's CPU threads. Softmax over padded positions
# produces them, and x86 computes on them ~100x slower: a 2-layer int8 MiniLM on one review
# padded to 128 tokens took 3.31 ms without it and 2.56 ms with it (2.20 ms unpadded).
DENORMAL_AS_ZERO = "session.set_denormal_as_zero"
# "split" must beat the fused kernel by this margin to be chosen: timing noise should not flip it.
SPLIT_MARGIN = 0.9


def session_options(threads: int | None = None, config: dict[str, str] | None = None):
    """ONNX Runtime session options as compress runs an artifact: every graph optimisation,
    `threads` intra-op threads, and the artifact's session config entries."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Errors only: on CUDA every session warns that shape operators stay on the CPU and that
    # inputs are copied to the device, which is how compress feeds it (numpy in, numpy out).
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, str(value))
    return options


def time_skip_layer_norm(hidden: int, threads: int | None = None, seq_len: int = 128,
                         calls: int = 300) -> dict[str, float]:
    """Median microseconds of ONNX Runtime's SkipLayerNormalization kernel and of the
    Add + LayerNormalization pair it replaces, on one [1, seq_len, hidden] fp32 activation.

    The fused kernel is meant to be the fast one, but in ONNX Runtime 1.31 on AVX-512 CPUs it
    is 3-6x slower than the pair at MiniLM's width (docs/export.md), so it is measured, not assumed.
    """
    import time

    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    def graph(fused: bool) -> bytes:
        io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, seq_len, hidden]) for n in ("x", "skip", "y")]
        weights = [numpy_helper.from_array(np.ones(hidden, np.float32), "gamma"),
                   numpy_helper.from_array(np.zeros(hidden, np.float32), "beta")]
        if fused:
            nodes = [helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta"], ["y"],
                                      domain="com.microsoft", epsilon=1e-12)]
        else:
            nodes = [helper.make_node("Add", ["x", "skip"], ["sum"]),
                     helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12)]
        model = helper.make_model(helper.make_graph(nodes, "ln", io[:2], io[2:], weights), ir_version=9,
                                  opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        return model.SerializeToString()

    rng = np.random.default_rng(0)
    feed = {k: rng.standard_normal((1, seq_len, hidden), dtype=np.float32) for k in ("x", "skip")}
    options = session_options(threads, {DISABLE_OPTIMIZERS: SKIP_LAYER_NORM_FUSION})
    sessions = {name: ort.InferenceSession(graph(name == "fused"), options, providers=["CPUExecutionProvider"])
                for name in ("fused", "split")}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(3):  # interleaved rounds, so a burst of load hits both
        for name, session in sessions.items():
            for _ in range(10):
                session.run(None, feed)
            for _ in range(calls // 3):
                start = time.perf_counter()
                session.run(None, feed)
                times[name].append(time.perf_counter() - start)
    return {f"{name}_us": round(float(np.median(t)) * 1e6, 1) for name, t in times.items()}


def choose_skip_layer_norm(setting: str, hidden: int, device: str, threads: int | None) -> tuple[bool, dict]:
    """(fuse?, what the manifest records) for --skip-layer-norm on this device."""
    if setting != "auto":
        return setting == "fuse", {"choice": setting, "how": "--skip-layer-norm"}
    if device == "cuda":
        return True, {"choice": "fuse", "how": "auto: the fused kernel on CUDA"}
    timing = time_skip_layer_norm(hidden, threads)
    fuse = timing["split_us"] > SPLIT_MARGIN * timing["fused_us"]
    return fuse, {"choice": "fuse" if fuse else "split", "how": f"auto: timed at [1, 128, {hidden}] on this CPU",
                  **timing}


def time_interleaved(calls: dict[str, Callable[[], object]], rounds: int = 5, per_round: int = 20,
                     warmup: int = 3) -> dict[str, float]:
    """Median milliseconds per call of each function, timed in interleaved rounds.

    Each round runs every function `warmup` times untimed (so the previous one's thread pool
    has settled) and then `per_round` times timed; a burst of load on a busy machine hits
    every candidate, so their ratio survives it. Used where a stage picks the faster of two
    graphs or settings on this machine (LM fusion, MatMulNBits accuracy_level).
    """
    import time

    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            for _ in range(warmup):
                fn()
            for _ in range(per_round):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: round(float(np.median(t)) * 1e3, 4) for name, t in times.items()}
