"""Learning-rate schedules picked by class path (``model.lr_scheduler``), stepped once per optimizer step."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LRScheduler

from smolfactory.errors import SmolFactoryError


class WarmupCosineLR(LRScheduler):
    """Linear warm-up from zero to each group's learning rate, then a cosine decay to ``min_lr_ratio`` of it.

    The same curve as transformers' ``get_cosine_with_min_lr_schedule_with_warmup``: at step ``s`` the factor is
    ``s / warmup_steps`` during warm-up, then ``min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * p)) / 2`` with
    ``p`` the fraction of the remaining steps done. A plain class (its state is numbers only), so checkpoints
    load with ``torch.load(weights_only=True)`` and a resumed run continues the curve exactly.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        total_steps: int | None = None,
        last_epoch: int = -1,
    ) -> None:
        """
        Args:
            optimizer: The optimizer whose groups' learning rates follow the curve.
            warmup_steps: Optimizer steps of linear warm-up from zero to the peak learning rate.
            min_lr_ratio: Final learning rate of the cosine decay, as a fraction of the peak.
            total_steps: Length of the schedule in optimizer steps; the recipes fill it in from
                trainer.max_steps (or the epochs' length) when it is left out.
            last_epoch: The index of the last step taken (-1: a fresh schedule).
        """
        if warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
            raise SmolFactoryError(
                f"lr_scheduler warmup_steps must be >= 0 and min_lr_ratio in [0, 1], got {warmup_steps}, {min_lr_ratio}"
            )
        self.warmup_steps, self.min_lr_ratio, self.total_steps = warmup_steps, min_lr_ratio, total_steps
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """The multiple of the peak learning rate at optimizer step ``step``."""
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        total = self.total_steps if self.total_steps is not None else step
        progress = (step - self.warmup_steps) / max(1, total - self.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine

    def get_lr(self) -> list[float]:
        return [base_lr * self.factor(self.last_epoch) for base_lr in self.base_lrs]
