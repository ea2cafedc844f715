"""`compress report`: render report.md and report.html from results.json.

Rendering is a pure function of the results dict (schema: docs/results-schema.md): the
same JSON always gives the same bytes, and nothing is re-measured. Both formats are
built from the same table definitions, so they cannot disagree. Every renderer reads the
current shape (`schema.normalise`): the quality columns are the metrics the artifacts'
quality blocks hold, so a language model's report has perplexity columns and no accuracy.
"""

from __future__ import annotations

import json
import os
from html import escape
from pathlib import Path

from pydantic import Field

from compress.artifacts import atomic_write, make_dir
from compress.bench import plots
from compress.bench.analysis import headline_key, headline_speed, pareto_front, point_key, point_kind
from compress.bench.schema import READABLE_VERSIONS, SCHEMA_VERSION, metric_info, normalise, report_primary
from compress.config import StageConfig
from compress.errors import UserError

Table = tuple[list[str], list[list[str]], str]  # headers, rows, alignment per column ("l"/"r")


class ReportConfig(StageConfig):
    """Re-render the reports of a benchmark from its results.json."""

    positional = ("results",)

    results: str = Field(..., description="results.json written by compress bench")
    out: str | None = Field(None, description="directory for report.md and report.html (default: beside results.json)")


# --------------------------------------------------------------------------- formatting

def _f(v, digits: int = 2, suffix: str = "") -> str:
    return "–" if v is None else f"{v:.{digits}f}{suffix}"


def _pct(v) -> str:
    return "–" if v is None else f"{v * 100:.2f}"


def _mib(n_bytes) -> str:
    return "–" if n_bytes is None else f"{n_bytes / 2**20:.2f}"


def _count(n) -> str:
    if n is None:
        return "–"
    for div, unit in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _signed(v) -> str:
    return "–" if v is None else f"{v:+.2f}"


def _ci(v) -> str:
    return "–" if v is None else f"±{v * 100:.1f}%"


def _times(v) -> str:
    return "–" if v is None else f"{v:.2f}x"


def _metric(v, name: str) -> str:
    """A metric value as the reports show it: fractions as percentages, counts whole."""
    info = metric_info(name)
    if v is None:
        return "–"
    if info.fraction:
        return _pct(v)
    if info.count or isinstance(v, int):
        return str(v)
    return _f(v, info.digits)


def _primary_values(results: dict) -> list[tuple[dict, float]]:
    """(artifact, value of the report's primary metric) for artifacts that rank by it."""
    primary = report_primary(results)
    out = []
    for a in results["artifacts"]:
        q = a.get("quality")
        if primary and q and q["primary"] == primary[0] and q["metrics"].get(primary[0]) is not None:
            out.append((a, q["metrics"][primary[0]]))
    return out


def _on_front(results: dict) -> dict[str, bool]:
    """Which artifacts are on the quality/latency Pareto front at the headline point (for a
    decode point, per-token latency: the same order as tokens/s reversed)."""
    head = headline_key(results)
    primary = report_primary(results)
    items, names = [], []
    for a, value in _primary_values(results):
        p = next((p for p in a["latency"] if point_key(p) == head), None)
        if p is not None:
            items.append((p["p50_ms"], value))
            names.append(a["name"])
    return dict(zip(names, pareto_front(items, primary[1] if primary else True)))


def _point_words(key: tuple) -> str:
    """A headline point in words, for the summary and the plot's axis."""
    kind, b, s = key
    if kind == "decode":
        return f"cached decode at batch {b}, context {s}"
    return f"batch {b}, sequence {s}"


def _metric_names(results: dict) -> list[str]:
    """Every metric some artifact's quality block holds, in the order they first appear."""
    names: dict[str, None] = {}
    for a in results["artifacts"]:
        names.update(dict.fromkeys(((a.get("quality") or {}).get("metrics") or {})))
    return list(names)


def _shared_counts(results: dict) -> dict[str, int]:
    """Count metrics (examples, tokens) on which every artifact that has them agrees: said
    once in the summary. A count that differs (tokens under two tokenizers) gets a column."""
    out = {}
    for name in _metric_names(results):
        if not metric_info(name).count:
            continue
        values = {((a.get("quality") or {}).get("metrics") or {}).get(name) for a in results["artifacts"]} - {None}
        if len(values) == 1:
            out[name] = values.pop()
    return out


def _metric_columns(results: dict) -> list[str]:
    shared = _shared_counts(results)
    return [m for m in _metric_names(results) if m not in shared]


def _primary_label(results: dict) -> str:
    primary = report_primary(results)
    return metric_info(primary[0]).label if primary else "quality"


# --------------------------------------------------------------------------- tables (shared by both formats)

def models_table(results: dict) -> Table:
    front = _on_front(results)
    metrics = _metric_columns(results)
    rows = []
    for a in results["artifacts"]:
        mem = a.get("memory") or {}
        values = (a.get("quality") or {}).get("metrics") or {}
        rows.append([a["name"], a["format"], a["precision"], *(_metric(values.get(m), m) for m in metrics),
                     _mib(a["size_bytes"]), _count(a["params"]), _f(mem.get("peak_rss_mb"), 1),
                     _f(mem.get("model_memory_mb"), 1), "yes" if front.get(a["name"]) else ""])
    headers = ["Artifact", "Format", "Precision", *(metric_info(m).header for m in metrics), "Size MiB", "Params",
               "Peak RSS MiB", "Model memory MiB", "Pareto front"]
    return headers, rows, "lll" + "r" * len(metrics) + "rrrrl"


def latency_table(results: dict) -> Table:
    """The forward points (classifiers): one row per artifact and (batch, sequence)."""
    rows = []
    for a in results["artifacts"]:
        for p in a["latency"]:
            if point_kind(p) != "forward":
                continue
            rows.append([a["name"], str(p["batch_size"]), str(p["seq_len"]), _f(p["p50_ms"], 3), _f(p["p90_ms"], 3),
                         _f(p["p99_ms"], 3), _f(p["mean_ms"], 3), _ci(p.get("ci95_rel")), str(p["iters"]),
                         _f(p.get("throughput_sps"), 1), _f(p.get("achieved_gflops"), 1),
                         _f(None if p.get("roofline") is None else p["roofline"] * 100, 1),
                         _times(p.get("speedup_vs_baseline"))])
    headers = ["Artifact", "Batch", "Seq", "p50 ms", "p90 ms", "p99 ms", "Mean ms", "CI95 of p50", "Iters",
               "Samples/s", "GFLOP/s", "% of peak", "Speed-up"]
    return headers, rows, "lrrrrrrrrrrrr"


def has_forward(results: dict) -> bool:
    return any(point_kind(p) == "forward" for a in results["artifacts"] for p in a["latency"])


def _length(p: dict) -> str:
    s = str(p["seq_len"])
    return f"{s} (asked {p['capped_from']})" if p.get("capped_from") else s


def prompt_table(results: dict) -> Table | None:
    """Prefill and time to first token (LMs): latency of a prompt, prompt tokens/s, share of the matmul peak."""
    rows = []
    for kind in ("prefill", "ttft"):
        for a in results["artifacts"]:
            for p in a["latency"]:
                if point_kind(p) != kind:
                    continue
                rows.append([a["name"], "prefill" if kind == "prefill" else "time to first token",
                             str(p["batch_size"]), _length(p), _f(p["p50_ms"], 3), _f(p["p90_ms"], 3),
                             _f(p["p99_ms"], 3), _ci(p.get("ci95_rel")), str(p["iters"]),
                             _f(p.get("tokens_per_s"), 0), _f(p.get("achieved_gflops"), 1),
                             _f(None if p.get("roofline") is None else p["roofline"] * 100, 1),
                             _times(p.get("speedup_vs_baseline"))])
    if not rows:
        return None
    headers = ["Artifact", "What", "Batch", "Prompt tokens", "p50 ms", "p90 ms", "p99 ms", "CI95 of p50", "Iters",
               "Prompt tokens/s", "GFLOP/s", "% of matmul peak", "Speed-up"]
    return headers, rows, "llrrrrrrrrrrr"


def decode_table(results: dict) -> Table | None:
    """Cached decode (LMs): per-token latency, tokens/s, bytes read per step against the bandwidth."""
    rows = []
    for a in results["artifacts"]:
        for p in a["latency"]:
            if point_kind(p) != "decode":
                continue
            step = p.get("bytes_per_step")
            rows.append([a["name"], str(p["batch_size"]), _length(p), str(p.get("new_tokens", "–")),
                         _f(p["p50_ms"], 3), _f(p["p90_ms"], 3), _f(p["p99_ms"], 3), _ci(p.get("ci95_rel")),
                         str(p["iters"]), _f(p.get("tokens_per_s"), 1),
                         _mib(step), _f(p.get("achieved_gbs"), 1),
                         _f(None if p.get("bandwidth_roofline") is None else p["bandwidth_roofline"] * 100, 1),
                         _times(p.get("speedup_vs_baseline"))])
    if not rows:
        return None
    headers = ["Artifact", "Batch", "Context", "New tokens", "p50 ms/token", "p90 ms/token", "p99 ms/token",
               "CI95 of p50", "Tokens timed", "Tokens/s", "MiB read/step", "GB/s", "% of bandwidth", "Speed-up"]
    return headers, rows, "lrrrrrrrrrrrrr"


def _speedup_header(key: tuple) -> str:
    kind, b, s = key
    if kind == "forward":
        return f"Speed-up b{b} s{s}"
    if kind == "decode":
        return f"Speed-up decode b{b}"
    return f"Speed-up {'TTFT' if kind == 'ttft' else 'prefill'} s{s}"


KIND_ORDER = {"forward": 0, "prefill": 1, "ttft": 2, "decode": 3}


def baseline_table(results: dict) -> Table | None:
    base = results.get("baseline")
    if not base:
        return None
    keys = sorted({point_key(p) for a in results["artifacts"] for p in a["latency"]},
                  key=lambda k: (KIND_ORDER.get(k[0], 9), k[1], k[2]))
    # Fraction metrics (accuracy) compare as differences in points; any other primary metric
    # (perplexity) as a ratio and a relative change.
    pts = [m for m in _metric_names(results) if metric_info(m).fraction]
    primary = report_primary(results)
    ratio_of = primary[0] if primary and not metric_info(primary[0]).fraction else None
    rows = []
    for a in results["artifacts"]:
        vs = a.get("vs_baseline") or {}
        cmp = (vs.get("primary") or {}) if ratio_of else {}
        cmp = cmp if cmp.get("metric") == ratio_of else {}
        speed = {point_key(p): p.get("speedup_vs_baseline") for p in a["latency"]}
        rows.append([a["name"], *(_signed(vs.get(f"{m}_delta_pts")) for m in pts)]
                    + ([_f(cmp.get("ratio"), 3), _signed(cmp.get("change_pct"))] if ratio_of else [])
                    + [_f(vs.get("size_ratio"), 3), _f(vs.get("params_ratio"), 3), _f(vs.get("memory_ratio"), 3)]
                    + [_times(speed.get(k)) for k in keys])
    label = metric_info(ratio_of).label if ratio_of else ""
    headers = (["Artifact", *(f"Δ {metric_info(m).label} pts" for m in pts)]
               + ([f"{label[:1].upper() + label[1:]} ratio", f"Δ {label} %"] if ratio_of else [])
               + ["Size ratio", "Params ratio", "Memory ratio"] + [_speedup_header(k) for k in keys])
    return headers, rows, "l" + "r" * (len(headers) - 1)


def peak_table(results: dict) -> Table | None:
    peak = results.get("peak")
    if not peak:
        return None
    rows = [[k, _f(v, 1)] for k, v in sorted(peak["kernels"].items())]
    return ["Kernel", "GFLOP/s (GOP/s for int8)"], rows, "lr"


def bandwidth_table(results: dict) -> Table | None:
    memory = (results.get("peak") or {}).get("memory")
    if not memory:
        return None
    rows = [["read (sum of an fp32 buffer)", _f(memory.get("read_gbs"), 1)],
            ["copy (bytes read + written)", _f(memory.get("copy_gbs"), 1)]]
    return [f"Probe ({_mib(memory.get('bytes'))} MiB buffer)", "GB/s"], rows, "lr"


def environment_items(results: dict) -> list[tuple[str, str]]:
    env = results.get("environment") or {}
    cpu = env.get("cpu") or {}
    gpu = env.get("gpu")
    threads = sorted({json.dumps(a.get("threads"), sort_keys=True) for a in results["artifacts"]})
    load_s, load_e = env.get("load_average_start"), env.get("load_average_end")
    versions = env.get("versions") or {}
    return [
        ("CPU", f"{cpu.get('model', '?')} ({cpu.get('arch', '?')}), {cpu.get('logical_cores', '?')} logical cores"),
        ("ISA", ", ".join(cpu.get("isa") or []) or "none of the tracked extensions"),
        ("GPU", f"{gpu['name']} ({gpu.get('memory_gb')} GB, CUDA {gpu.get('cuda')})" if gpu else "none used"),
        ("Device", str(env.get("device", "?"))),
        ("Threads", f"requested {env.get('threads_requested')}; measured per artifact: " + "; ".join(threads)),
        ("Memory", f"{env.get('memory_total_gb')} GiB total"),
        ("Load average (1/5/15 min)", f"start {load_s}, end {load_e} (the end value includes this benchmark's own load)"),
        ("Shared machine", env.get("shared_machine_note", "")),
        ("compress commit", str(env.get("compress_commit"))),
        ("Python", f"{env.get('python')} on {env.get('platform')}"),
        ("Libraries", ", ".join(f"{k} {v}" for k, v in versions.items())),
    ]


def memory_method(results: dict) -> str:
    methods = {(a.get("memory") or {}).get("method") for a in results["artifacts"]}
    if methods == {"subprocess"} and any("run_delta_mb" in (a.get("memory") or {}) for a in results["artifacts"]):
        return ("Peak RSS is the high-water resident memory of a fresh process that measured only this "
                "artifact (interpreter, libraries, data and scoring included). Model memory is the high-water "
                "mark after loading the artifact and running each latency point once (the longest prompt, the "
                "largest decode batch with its KV cache), before scoring, minus the resident memory just before "
                "the artifact was loaded; on CUDA it is torch's peak allocation, or for ONNX Runtime the device "
                "memory in use after the run.")
    if methods == {"subprocess"}:
        return ("Peak RSS is the high-water resident memory of a fresh process that measured only this "
                "artifact (interpreter, libraries and data included). Model memory is that peak minus the "
                "resident memory just before the artifact was loaded; on CUDA it is torch's peak allocation, "
                "or for ONNX Runtime the device memory in use after the run.")
    return ("Artifacts were measured in one process: the high-water mark was reset before each artifact, but "
            "memory an earlier artifact freed may be reused, so per-artifact memory figures are approximate. "
            "Run with --isolate for honest per-artifact peaks.")


def _summary(results: dict) -> list[str]:
    ds = results.get("dataset") or {}
    counts = "".join(f"{v} {metric_info(k).count}, " for k, v in _shared_counts(results).items())
    head = headline_key(results)
    primary = report_primary(results)
    label = _primary_label(results)
    version = results.get("read_from_schema_version", results.get("schema_version"))
    lines = [f"Dataset `{ds.get('source')}`, {ds.get('split')} split ({counts}max_length {ds.get('max_length')}); "
             f"created {results.get('created')}; schema version {version}."]
    if results.get("baseline"):
        if primary and not metric_info(primary[0]).fraction:
            better = "above" if primary[1] else "below"
            quality = f"{label} ratio = artifact / baseline ({better} 1 is better)."
        else:
            quality = f"{label} deltas in percentage points."
        lines.append(f"Baseline: `{results['baseline']}`. Speed-up = baseline p50 / artifact p50; size ratio = "
                     f"artifact / baseline; {quality}")
    if head:
        direction = "" if not primary or primary[1] else f"; lower {label} is better"
        against = "decode tokens/s" if head[0] == "decode" else "p50 latency"
        lines.append(f"The Pareto front is taken at {_point_words(head)} "
                     f"({label} against {against}{direction}).")
    return lines


def _models_heading(results: dict) -> str:
    label = _primary_label(results)
    return f"{label[:1].upper() + label[1:]}, size and memory"


PROMPT_NOTE = ("Prefill = one forward pass over the prompt that fills the KV cache (real test text, the "
               "artifact's tokenizer). Time to first token = the prefill, the greedy choice of the first new "
               "token and the first cached decode step that feeds it back. GFLOP/s = FLOPs of the call "
               "(docs/results-schema.md) / p50; % of matmul peak compares it with the peak of the artifact's "
               "precision measured at the start of the run.")
DECODE_NOTE = ("Each sample is one cached decode step (and the greedy choice of the next token) of a run of "
               "New tokens steps after the prompt; Tokens/s = batch / p50. MiB read/step = the weights one "
               "step reads (embedding tables that are only looked up left out) plus every sequence's KV cache "
               "at the run's mean context; % of bandwidth compares that traffic at the p50 with the read "
               "bandwidth measured at the start of the run. Above 100 % the weights are served from the CPU's "
               "caches.")


# --------------------------------------------------------------------------- Markdown

def _md_cell(s: str) -> str:
    return s.replace("|", "\\|")


def md_table(table: Table) -> str:
    """A GitHub table whose columns are also aligned for reading in a terminal."""
    headers, rows, align = table
    cells = [[_md_cell(h) for h in headers]] + [[_md_cell(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "| " + " | ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(r, widths, align)) + " |"

    rule = "|" + "|".join((":" + "-" * (w + 1) if a == "l" else "-" * (w + 1) + ":") for w, a in zip(widths, align)) + "|"
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def render_markdown(results: dict) -> str:
    """report.md for a results dict of any readable schema version."""
    results = normalise(results)
    parts = ["# Benchmark report", "", *_summary(results), "", f"## {_models_heading(results)}", "",
             md_table(models_table(results)), "", memory_method(results), ""]
    if has_forward(results):
        parts += ["## Latency", "", md_table(latency_table(results)), "",
                  "GFLOP/s = FLOPs per inference (docs/results-schema.md) / p50; % of peak compares it with the "
                  "matmul peak of the artifact's precision measured at the start of the run.", ""]
    prompt, decode = prompt_table(results), decode_table(results)
    if prompt:
        parts += ["## Prefill and time to first token", "", md_table(prompt), "", PROMPT_NOTE, ""]
    if decode:
        parts += ["## Decode with the KV cache", "", md_table(decode), "", DECODE_NOTE, ""]
    base = baseline_table(results)
    if base:
        parts += [f"## Compared with the baseline ({results['baseline']})", "", md_table(base), ""]
    parts += ["## Notes", ""]
    notes = results.get("notes") or []
    parts += [f"- {n['text']}" for n in notes] or ["- None: no compressed artifact was slower than its reference."]
    parts.append("")
    peak = peak_table(results)
    if peak:
        parts += ["## Matmul peak", "", md_table(peak), ""]
    bandwidth = bandwidth_table(results)
    if bandwidth:
        parts += ["## Memory bandwidth", "", md_table(bandwidth), ""]
    parts += ["## Environment", ""]
    parts += [f"- **{k}**: {v}" for k, v in environment_items(results)]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:#222;background:#fff;
  max-width:1180px;margin:2rem auto;padding:0 1.5rem;line-height:1.5;font-size:15px}
h1{font-size:1.7rem;margin-bottom:.3rem}h2{font-size:1.25rem;margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
p.summary{margin:.2rem 0;color:#444}
table{border-collapse:collapse;margin:.8rem 0;font-size:13.5px;font-variant-numeric:tabular-nums}
th,td{padding:.3rem .6rem;border-bottom:1px solid #e3e3e3;white-space:nowrap}
th{background:#f4f5f7;font-weight:600;text-align:left;white-space:normal;vertical-align:bottom}td.r,th.r{text-align:right}
tbody tr:nth-child(even){background:#fafbfc}
.plots{display:flex;flex-wrap:wrap;gap:1.5rem;align-items:flex-start;margin-top:1rem}
.plots figure{margin:0;flex:1 1 460px;min-width:0}.plots figcaption{font-size:13px;color:#555}
svg.plot{width:100%;height:auto;border:1px solid #eee;border-radius:4px;background:#fff}
ul.notes li{margin:.35rem 0}.env dt{font-weight:600;float:left;clear:left;width:13rem}
.env dd{margin:0 0 .3rem 13.5rem}.scroll{overflow-x:auto}.muted{color:#666;font-size:13px}
"""


def html_table(table: Table) -> str:
    headers, rows, align = table
    cls = ['r' if a == 'r' else 'l' for a in align]
    head = "".join(f'<th class="{c}">{escape(h)}</th>' for h, c in zip(headers, cls))
    body = "".join("<tr>" + "".join(f'<td class="{c}">{escape(v)}</td>' for v, c in zip(r, cls)) + "</tr>"
                   for r in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _plots(results: dict) -> str:
    head = headline_key(results)
    decode = bool(head) and head[0] == "decode"
    front = _on_front(results)
    primary = report_primary(results)
    name, higher = primary if primary else ("accuracy", True)
    info = metric_info(name)
    ranked = {a["name"]: value for a, value in _primary_values(results)}
    scatter_items, bar_items = [], []
    for i, a in enumerate(results["artifacts"]):
        p = next((p for p in a["latency"] if point_key(p) == head), None)
        if p is not None and a["name"] in ranked:
            y = ranked[a["name"]] * 100 if info.fraction else ranked[a["name"]]
            scatter_items.append({"name": a["name"], "x": headline_speed(p), "y": y,
                                  "colour": plots.colour(i), "front": front.get(a["name"], False)})
        bar_items.append({"name": a["name"], "value": None if a.get("size_bytes") is None else a["size_bytes"] / 2**20,
                          "colour": plots.colour(i)})
    where = _point_words(head) if head else "no latency point"
    speed = "decode speed" if decode else "latency"
    title = f"{info.label[:1].upper() + info.label[1:]} vs {speed}"
    y_label = f"{info.label}, %" if info.fraction else f"{info.label} ({'higher' if higher else 'lower'} is better)"
    x_label = f"tokens/s ({where})" if decode else f"p50 latency, ms ({where})"
    scatter = plots.scatter(scatter_items, title=title, x_label=x_label, y_label=y_label,
                            log_y_allowed=not info.fraction, x_higher_is_better=decode)
    size = plots.bars(bar_items, title="Size on disk", unit="MiB")
    side = "right" if decode else "left"
    where_better = f"Up and to the {side}" if higher else f"Down and to the {side}"
    as_good = ("at least as accurate" if name == "accuracy" else
               f"at least as {'high' if higher else 'low'} in {info.label}")
    return ('<div class="plots">'
            f'<figure>{scatter}<figcaption>{where_better} is better. Diamonds joined by the dashed line are '
            f'on the Pareto front: no other artifact is both at least as fast and {escape(as_good)}.'
            '</figcaption></figure>'
            f'<figure>{size}<figcaption>Bytes of the weight files (what you ship).</figcaption></figure></div>')


def render_html(results: dict) -> str:
    """report.html for a results dict of any readable schema version: self-contained, plots as inline SVG."""
    results = normalise(results)
    body = ["<h1>Benchmark report</h1>"]
    body += [f'<p class="summary">{escape(line).replace("`", "")}</p>' for line in _summary(results)]
    body += [_plots(results), f"<h2>{escape(_models_heading(results))}</h2>", html_table(models_table(results)),
             f'<p class="muted">{escape(memory_method(results))}</p>']
    if has_forward(results):
        body += ["<h2>Latency</h2>", html_table(latency_table(results)),
                 '<p class="muted">GFLOP/s = FLOPs per inference / p50; % of peak compares it with the matmul peak '
                 "of the artifact's precision measured at the start of the run.</p>"]
    prompt, decode = prompt_table(results), decode_table(results)
    if prompt:
        body += ["<h2>Prefill and time to first token</h2>", html_table(prompt),
                 f'<p class="muted">{escape(PROMPT_NOTE)}</p>']
    if decode:
        body += ["<h2>Decode with the KV cache</h2>", html_table(decode), f'<p class="muted">{escape(DECODE_NOTE)}</p>']
    base = baseline_table(results)
    if base:
        body += [f"<h2>Compared with the baseline ({escape(results['baseline'])})</h2>", html_table(base)]
    notes = results.get("notes") or []
    body += ["<h2>Notes</h2>", '<ul class="notes">' + "".join(f"<li>{escape(n['text'])}</li>" for n in notes)
             + ("" if notes else "<li>None: no compressed artifact was slower than its reference.</li>") + "</ul>"]
    peak = peak_table(results)
    if peak:
        body += ["<h2>Matmul peak</h2>", html_table(peak)]
    bandwidth = bandwidth_table(results)
    if bandwidth:
        body += ["<h2>Memory bandwidth</h2>", html_table(bandwidth)]
    body += ['<h2>Environment</h2><dl class="env">'
             + "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in environment_items(results)) + "</dl>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>compress benchmark report</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


# --------------------------------------------------------------------------- files

def write_reports(results: dict, directory: str | os.PathLike) -> tuple[Path, Path]:
    """Write report.md and report.html into `directory`; return their paths."""
    directory = Path(directory)
    make_dir(directory)
    md, html = directory / "report.md", directory / "report.html"
    atomic_write(md, render_markdown(results))
    atomic_write(html, render_html(results))
    return md, html


def report(cfg: ReportConfig) -> tuple[Path, Path]:
    """Re-render report.md and report.html from `cfg.results`."""
    src = Path(cfg.results)
    if src.is_dir():
        src = src / "results.json"
    if not src.is_file():
        raise UserError(f"'{cfg.results}' is not a results.json file. Pass the results.json that compress bench "
                        "wrote (or its directory).")
    try:
        results = json.loads(src.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"'{src}' is not valid JSON ({err.msg} at line {err.lineno}). Re-run compress bench.") from None
    version = results.get("schema_version") if isinstance(results, dict) else None
    if version not in READABLE_VERSIONS:
        readable = " and ".join(str(v) for v in READABLE_VERSIONS)
        raise UserError(f"'{src}' has schema_version {version}; this compress renders versions {readable} "
                        f"(it writes {SCHEMA_VERSION}). Re-run compress bench with this version.")
    paths = write_reports(results, cfg.out or src.parent)
    print(f"compress report: wrote {paths[0]} and {paths[1]}")
    return paths
