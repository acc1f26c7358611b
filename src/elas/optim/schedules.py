"""Learning-rate schedules as pure functions of the step (so a resumed run needs no scheduler state)."""
from __future__ import annotations

import math


def warmup_cosine(step: int, max_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr: linear from 1/warmup to 1 over warmup_steps, then cosine to min_ratio at
    max_steps (and min_ratio after)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
