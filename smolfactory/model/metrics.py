"""Epoch metrics of a causal LM as torchmetrics objects: token-weighted, synchronised across devices."""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric


class TokenPerplexity(MeanMetric):
    """exp of the token-weighted mean cross-entropy; ``update(mean_loss, weight=num_tokens)``."""

    def compute(self) -> torch.Tensor:
        return super().compute().exp()


class LanguageModelMetrics(torch.nn.Module):
    """Loss, perplexity and token accuracy over an epoch, each batch or step weighted by its label tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.loss, self.perplexity, self.token_accuracy = MeanMetric(), TokenPerplexity(), MeanMetric()

    def update(self, loss_sum: torch.Tensor, num_tokens: torch.Tensor, num_correct: torch.Tensor) -> None:
        tokens = num_tokens.clamp(min=1).to(torch.float32)
        mean = loss_sum.detach().float() / tokens
        self.loss.update(mean, weight=tokens)
        self.perplexity.update(mean, weight=tokens)
        self.token_accuracy.update(num_correct.float() / tokens, weight=tokens)
