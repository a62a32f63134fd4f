"""Causal language-model loss computed only where a label exists, a chunk of positions at a time.

Hugging Face models shift labels inside their own loss; here the shift happens in exactly one place,
``label_token_loss``. The LM head runs only on positions whose next token is trained, and only on
``chunk_size`` of them at once: the [tokens x vocabulary] logits are never held whole, in the forward pass
or the backward. Each chunk's gradients are computed right after its loss (the softmax minus the one-hot
target), so the backward pass only scales them: no logits are kept or recomputed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_SIZE = 1024


class TokenLoss(NamedTuple):
    """Sums over the trained positions of a batch (divide by a token count for means)."""

    loss_sum: torch.Tensor
    """Summed next-token cross-entropy (differentiable)."""
    num_tokens: torch.Tensor
    """How many positions were trained."""
    num_correct: torch.Tensor
    """How many of them the model's most likely token got right (for token accuracy)."""


def label_token_loss(
    hidden_states: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor, chunk_size: int = CHUNK_SIZE
) -> TokenLoss:
    """Summed next-token cross-entropy over trained positions, how many there were, and how many were right.

    Args:
        hidden_states: ``[batch, seq, hidden]`` final decoder states.
        lm_head: maps hidden states to vocabulary logits.
        labels: ``[batch, seq]`` token ids, ``-100`` where nothing is trained; not yet shifted.
        chunk_size: Positions whose logits exist at the same time.

    Returns:
        ``(loss_sum, num_tokens, num_correct)``: divide the sums by a token count (of the batch, or of a
        whole optimizer step) for means.
    """
    targets = labels[:, 1:]
    trained = targets != IGNORE_INDEX
    hidden = hidden_states[:, :-1][trained]
    if type(lm_head) is torch.nn.Linear:
        loss_sum, correct = ChunkedLinearCrossEntropy.apply(
            hidden, lm_head.weight, lm_head.bias, targets[trained], chunk_size
        )
    else:  # a wrapped head (e.g. peft's modules_to_save): its own forward, all trained positions at once
        logits = lm_head(hidden).float()
        loss_sum = F.cross_entropy(logits, targets[trained], reduction="sum")
        correct = (logits.detach().argmax(-1) == targets[trained]).sum()
    return TokenLoss(loss_sum, trained.sum(), correct)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T + bias, targets)), with the gradients formed chunk by chunk; also
    how many argmax predictions equal their target (not differentiable)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):  # noqa: ANN001, ANN205 (autograd signature)
        device = hidden.device.type
        # The dtype nn.Linear would multiply in: autocast's, else the hidden states'.
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        w = weight.to(compute)
        b = None if bias is None else bias.to(compute)
        need_hidden, need_weight = hidden.requires_grad, weight.requires_grad
        need_bias = bias is not None and bias.requires_grad
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size].to(compute)
            t = targets[start : start + chunk_size]
            logits = F.linear(h, w, b).float()
            log_z = torch.logsumexp(logits, dim=-1)
            loss_sum += (log_z - logits.gather(1, t[:, None]).squeeze(1)).sum()
            correct += (logits.argmax(-1) == t).sum()
            # d(loss)/d(logits) = softmax - one_hot(target), formed in place of the logits.
            grad_logits = logits.sub_(log_z[:, None]).exp_()
            grad_logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            if need_hidden:
                grad_hidden[start : start + chunk_size] = (grad_logits.to(compute) @ w).to(hidden.dtype)
            if need_weight:
                grad_weight += grad_logits.T @ h.float()
            if need_bias:
                grad_bias += grad_logits.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = weight.dtype, None if bias is None else bias.dtype
        ctx.mark_non_differentiable(correct)
        return loss_sum, correct

    @staticmethod
    def backward(ctx, grad_output, grad_correct):  # noqa: ANN001, ANN205 (autograd signature)
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        return (
            None if grad_hidden is None else grad_hidden * grad_output.to(grad_hidden.dtype),
            None if grad_weight is None else (grad_weight * grad_output).to(weight_dtype),
            None if grad_bias is None else (grad_bias * grad_output).to(bias_dtype),
            None,
            None,
        )
