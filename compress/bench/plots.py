"""Inline SVG plots for report.html: no JavaScript, no external files, deterministic text.

Two plots: the primary quality metric (accuracy, perplexity, ...) against latency (or, for
causal LMs, decode tokens/s) with the Pareto front marked, and size per artifact. Both are strings of SVG that the HTML embeds as they are.
"""

from __future__ import annotations

import math
from html import escape

from compress.svg import nice_ticks

# Colour-blind-safe palette (Okabe-Ito), one colour per artifact, shared by both plots.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
FONT = "font-family=\"system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif\""


def colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _num(x: float) -> str:
    """Short deterministic text for a coordinate."""
    return f"{x:.1f}".rstrip("0").rstrip(".")


def log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks per decade, from the one at or below `lo` to the one at or above `hi`."""
    ticks = [m * 10.0**k for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
             for m in (1, 2, 5)]
    below = [t for t in ticks if t <= lo]
    above = [t for t in ticks if t >= hi]
    start, end = below[-1], above[0]
    return [float(f"{t:.6g}") for t in ticks if start <= t <= end]


def _tick_label(v: float) -> str:
    return f"{v:g}" if abs(v) < 1e5 else f"{v:.2g}"


def _free_label_y(placed: list[tuple[float, float, float, float]], x: float, y: float, width: float,
                  anchor: str) -> float:
    """A baseline near `y` where a label of `width` pixels overlaps no label placed before.

    Points that nearly coincide (an int8 model as fast as its parent) would otherwise
    print their names on top of each other. Tries y, y+14, y-14, y+28, ...
    """
    x0, x1 = (x - width, x) if anchor == "end" else (x, x + width)
    for k in range(12):
        ty = y + 14 * ((k + 1) // 2) * (1 if k % 2 else -1) if k else y
        box = (x0, ty - 11, x1, ty + 3)
        if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
            placed.append(box)
            return ty
    placed.append((x0, y - 11, x1, y + 3))
    return y


def scatter(items: list[dict], *, title: str, x_label: str, y_label: str, width: int = 560,
            height: int = 400, log_y_allowed: bool = False, x_higher_is_better: bool = False) -> str:
    """Quality-vs-speed scatter. items: {name, x, y, colour, front (bool)}.

    Points on the Pareto front are drawn as filled diamonds and joined by a dashed step
    line; the others as hollow circles. With `log_y_allowed`, a y range spanning a decade
    or more gets a log axis (perplexities of an untrained and a trained model). x is a
    latency (lower is better) unless `x_higher_is_better` (tokens/s): the step line then
    turns the other way, so that it never claims a quality at a speed no artifact reaches.
    """
    left, right, top, bottom = 64, 24, 40, 56  # room for tick and axis labels
    pw, ph = width - left - right, height - top - bottom
    xs = [i["x"] for i in items] or [1.0]
    ys = [i["y"] for i in items] or [0.0]
    # Latencies of compressed models often span decades (0.2 ms ORT int8 next to 20 ms
    # bitsandbytes); a linear axis would pile the fast ones onto one pixel.
    log_x = min(xs) > 0 and max(xs) / min(xs) >= 10
    x_ticks = log_ticks(min(xs), max(xs)) if log_x else nice_ticks(0.0, max(xs) * 1.08)
    log_y = log_y_allowed and min(ys) > 0 and max(ys) / min(ys) >= 10
    if log_y:
        y_ticks = log_ticks(min(ys), max(ys))
    else:
        pad = max(0.5, (max(ys) - min(ys)) * 0.15)
        y_ticks = nice_ticks(min(ys) - pad, max(ys) + pad)
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    if log_x:
        x_label += " (log scale)"
    if log_y:
        y_label += " (log scale)"

    def sx(v: float) -> float:
        if log_x:
            return left + (math.log10(v) - math.log10(x0)) / (math.log10(x1) - math.log10(x0)) * pw
        return left + (v - x0) / (x1 - x0) * pw

    def sy(v: float) -> float:
        if log_y:
            return top + ph - (math.log10(v) - math.log10(y0)) / (math.log10(y1) - math.log10(y0)) * ph
        return top + ph - (v - y0) / (y1 - y0) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot plot-scatter" viewBox="0 0 {width} {height}" '
           f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}" {FONT}>',
           f'<text x="{left}" y="22" font-size="15" font-weight="600" fill="#222">{escape(title)}</text>']
    for t in x_ticks:
        out.append(f'<line x1="{_num(sx(t))}" y1="{top}" x2="{_num(sx(t))}" y2="{top + ph}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{_num(sx(t))}" y="{top + ph + 18}" font-size="12" fill="#555" '
                   f'text-anchor="middle">{_tick_label(t)}</text>')
    for t in y_ticks:
        out.append(f'<line x1="{left}" y1="{_num(sy(t))}" x2="{left + pw}" y2="{_num(sy(t))}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{left - 8}" y="{_num(sy(t) + 4)}" font-size="12" fill="#555" '
                   f'text-anchor="end">{_tick_label(t)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    out.append(f'<text x="{left + pw / 2:.1f}" y="{height - 14}" font-size="13" fill="#222" '
               f'text-anchor="middle">{escape(x_label)}</text>')
    out.append(f'<text x="16" y="{top + ph / 2:.1f}" font-size="13" fill="#222" text-anchor="middle" '
               f'transform="rotate(-90 16 {top + ph / 2:.1f})">{escape(y_label)}</text>')

    front = sorted((i for i in items if i["front"]), key=lambda i: i["x"])
    if len(front) > 1:
        # A step line: from each front point, quality holds until the next (slower, better) one.
        path = [f"M{_num(sx(front[0]['x']))},{_num(sy(front[0]['y']))}"]
        for a, b in zip(front, front[1:]):
            # Left to right: with latency on x the next point is slower and better (hold the
            # quality, then step); with tokens/s it is faster and worse (step, then hold).
            if x_higher_is_better:
                path.append(f"V{_num(sy(b['y']))}H{_num(sx(b['x']))}")
            else:
                path.append(f"H{_num(sx(b['x']))}V{_num(sy(b['y']))}")
        out.append(f'<path class="pareto-front" d="{"".join(path)}" fill="none" stroke="#444" '
                   f'stroke-width="1.5" stroke-dasharray="5 4"/>')
    # Labels avoid each other and every marker.
    placed = [(sx(i["x"]) - 7, sy(i["y"]) - 7, sx(i["x"]) + 7, sy(i["y"]) + 7) for i in items]
    for i in items:
        cx, cy = sx(i["x"]), sy(i["y"])
        if i["front"]:
            r = 7
            out.append(f'<path class="pareto" d="M{_num(cx)},{_num(cy - r)}L{_num(cx + r)},{_num(cy)}'
                       f'L{_num(cx)},{_num(cy + r)}L{_num(cx - r)},{_num(cy)}Z" fill="{i["colour"]}" '
                       f'stroke="#222" stroke-width="1"><title>{escape(i["name"])} (Pareto front)</title></path>')
        else:
            out.append(f'<circle cx="{_num(cx)}" cy="{_num(cy)}" r="6" fill="#fff" stroke="{i["colour"]}" '
                       f'stroke-width="2.5"><title>{escape(i["name"])}</title></circle>')
        anchor, dx = ("end", -11) if cx > left + pw * 0.8 else ("start", 11)
        ty = _free_label_y(placed, cx + dx, cy + 4, len(i["name"]) * 7.0, anchor)
        out.append(f'<text x="{_num(cx + dx)}" y="{_num(ty)}" font-size="12" fill="#222" '
                   f'text-anchor="{anchor}">{escape(i["name"])}</text>')
    # Legend in the title row, right-aligned, so the plot area keeps the full width.
    lx = left + pw - 190
    out.append(f'<path class="pareto" d="M{lx + 6},10L{lx + 12},16L{lx + 6},22L{lx},16Z" fill="#888" stroke="#222"/>')
    out.append(f'<text x="{lx + 18}" y="20" font-size="12" fill="#222">Pareto front</text>')
    out.append(f'<circle cx="{lx + 112}" cy="16" r="5" fill="#fff" stroke="#888" stroke-width="2"/>')
    out.append(f'<text x="{lx + 124}" y="20" font-size="12" fill="#222">dominated</text>')
    out.append("</svg>")
    return "\n".join(out)


def bars(items: list[dict], *, title: str, unit: str, width: int = 560) -> str:
    """Horizontal bar chart. items: {name, value, colour}; one bar per item, value printed at its end."""
    left, right, top, row = 150, 90, 40, 30
    height = top + row * max(1, len(items)) + 34
    pw = width - left - right
    vmax = max([i["value"] for i in items if i["value"] is not None] or [1.0]) or 1.0
    ticks = nice_ticks(0.0, vmax)
    scale = pw / ticks[-1]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot plot-bars" viewBox="0 0 {width} {height}" '
           f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}" {FONT}>',
           f'<text x="12" y="22" font-size="15" font-weight="600" fill="#222">{escape(title)}</text>']
    base = top + row * max(1, len(items))
    for t in ticks:
        x = left + t * scale
        out.append(f'<line x1="{_num(x)}" y1="{top - 4}" x2="{_num(x)}" y2="{base}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{_num(x)}" y="{base + 18}" font-size="12" fill="#555" text-anchor="middle">'
                   f'{_tick_label(t)}</text>')
    for k, i in enumerate(items):
        y = top + k * row
        name = i["name"] if len(i["name"]) <= 24 else i["name"][:23] + "…"
        out.append(f'<text x="{left - 8}" y="{y + row / 2 + 4:.1f}" font-size="12" fill="#222" '
                   f'text-anchor="end">{escape(name)}</text>')
        if i["value"] is None:
            out.append(f'<text x="{left + 4}" y="{y + row / 2 + 4:.1f}" font-size="12" fill="#777">n/a</text>')
            continue
        w = i["value"] * scale
        out.append(f'<rect x="{left}" y="{y + 5}" width="{_num(max(w, 1.0))}" height="{row - 10}" '
                   f'fill="{i["colour"]}"><title>{escape(i["name"])}: {i["value"]:.3g} {escape(unit)}</title></rect>')
        out.append(f'<text x="{_num(left + w + 6)}" y="{y + row / 2 + 4:.1f}" font-size="12" fill="#222">'
                   f'{i["value"]:.3g} {escape(unit)}</text>')
    out.append(f'<line x1="{left}" y1="{top - 4}" x2="{left}" y2="{base}" stroke="#999"/>')
    out.append("</svg>")
    return "\n".join(out)
