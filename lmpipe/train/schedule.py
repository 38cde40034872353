"""The learning-rate schedule as data: a linear warmup, then a cosine decay to a floor.

It is stored in every checkpoint, so a resume continues the exact same curve: the LR at step k after
a resume equals the uninterrupted run's LR at step k. A resume that changes the plan (more steps, a
new peak LR, a re-warmup) starts a new segment at the checkpoint's step instead.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Schedule:
    start: int  # the step the segment begins at (0 for a fresh run)
    warmup: int  # linear warmup steps from `start`
    peak: float  # LR at the end of the warmup
    floor: float  # LR at `end`
    end: int  # the planned last step

    def lr_at(self, step: int) -> float:
        k = step - self.start
        if k < self.warmup:
            return self.peak * (k + 1) / self.warmup
        span = max(1, self.end - self.start - self.warmup)
        progress = min(1.0, (k - self.warmup) / span)
        return self.floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.peak - self.floor)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        return cls(**d)

    @classmethod
    def fresh(cls, steps: int, warmup: int, lr: float, min_lr: float) -> "Schedule":
        return cls(start=0, warmup=warmup, peak=lr, floor=min_lr, end=steps)

    def extended(self, step: int, more: int, lr: float | None = None,
                 warmup: int = 0) -> "Schedule":
        """A new segment from `step` to `step + more`: from `lr` if given (a restart), else from the
        current LR (continuous, no jump), decaying to the same floor."""
        peak = self.lr_at(step) if lr is None else lr
        return Schedule(start=step, warmup=warmup, peak=peak, floor=min(self.floor, peak),
                        end=step + more)
