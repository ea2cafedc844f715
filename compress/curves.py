"""The training curve of a run as an inline SVG: training loss per logged step, and the
validation loss where the task reports one (a causal LM's NLL per token, the same units)."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

from compress.svg import nice_ticks

W, H, LEFT, RIGHT, TOP, BOTTOM = 640, 360, 64, 16, 36, 48


def _read(log: Path) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    train, val = [], []
    for line in log.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by kill -9
        if r.get("event") == "train" and isinstance(r.get("loss"), (int, float)):
            train.append((r["step"], r["loss"]))
        elif r.get("event") == "eval" and isinstance(r.get("val_nll"), (int, float)):
            val.append((r["step"], r["val_nll"]))
    return train, val


def loss_curve_svg(log: Path, title: str = "") -> str:
    """SVG text of the loss curves in a run's `log.jsonl`."""
    train, val = _read(Path(log))
    points = train + val
    if not points:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="60"><text x="8" y="30">no steps logged</text></svg>'
    x_hi = max(p[0] for p in points) or 1
    y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
    pad = (y_hi - y_lo) * 0.05 or 0.5
    y_lo, y_hi = max(0.0, y_lo - pad), y_hi + pad

    def sx(x):
        return LEFT + (W - LEFT - RIGHT) * x / x_hi

    def sy(y):
        return TOP + (H - TOP - BOTTOM) * (1 - (y - y_lo) / (y_hi - y_lo))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<text x="{LEFT}" y="20" font-size="14">{escape(title or "training curve")}</text>']
    for t in nice_ticks(y_lo, y_hi):
        y = sy(t)
        out.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                   f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{t:g}</text>')
    for t in nice_ticks(0, x_hi):
        x = sx(t)
        out.append(f'<text x="{x:.1f}" y="{H - BOTTOM + 16}" text-anchor="middle">{t:g}</text>')
    out.append(f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 10}" text-anchor="middle">optimizer step</text>')
    out.append(f'<text transform="translate(14,{(TOP + H - BOTTOM) / 2}) rotate(-90)" text-anchor="middle">'
               'loss (nats per token)</text>')
    if train:
        path = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y) in enumerate(train))
        out.append(f'<path d="{path}" fill="none" stroke="#0072B2" stroke-width="1.5"/>')
    for x, y in val:
        out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="#D55E00"/>')
    legend = [("#0072B2", "training loss")] + ([("#D55E00", "validation NLL per token")] if val else [])
    for i, (colour, label) in enumerate(legend):
        x = W - RIGHT - 200
        y = TOP + 4 + 18 * i
        out.append(f'<rect x="{x}" y="{y}" width="12" height="12" fill="{colour}"/>'
                   f'<text x="{x + 18}" y="{y + 10}">{label}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
