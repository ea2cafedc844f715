"""The floor under any training loop: forward, backward, clip, fused AdamW step, nothing else.

No logging, no checkpoints, no evaluation, no progress bar, batches prepared in advance. A
trainer cannot be faster than this on the same model, batches and precision without
changing the arithmetic itself; how close a trainer comes to it is its overhead.
"""

from __future__ import annotations

import time


def floor_seconds(model, batches: list[dict], lr: float, clip: float = 1.0, weight_decay: float = 0.01) -> float:
    """Seconds for one pass over `batches` (dicts of tensors the model's forward takes)."""
    import torch

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    t0 = time.perf_counter()
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    loss.item()
    return time.perf_counter() - t0
