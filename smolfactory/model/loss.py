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


def _head_in_compute_dtype(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.dtype, torch.Tensor, torch.Tensor | None]:
    """The dtype nn.Linear would multiply in (autocast's, else the hidden states'), and the head cast to it."""
    device = hidden.device.type
    compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    return compute, weight.to(compute), None if bias is None else bias.to(compute)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T + bias, targets)), with the gradients formed chunk by chunk; also
    how many argmax predictions equal their target (not differentiable)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):  # noqa: ANN001, ANN205 (autograd signature)
        compute, w, b = _head_in_compute_dtype(hidden, weight, bias)
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


class TokenLogProbs(NamedTuple):
    """Per-position values at a batch's trained positions, in row-major order (``labels[:, 1:] != -100``)."""

    log_probs: torch.Tensor
    """log p(label) under the model (differentiable)."""
    is_top1: torch.Tensor
    """Whether the label is the model's most likely token."""
    mean_logits: torch.Tensor
    """Mean of the vocabulary logits (a drift diagnostic TRL also reports)."""
    entropy: torch.Tensor
    """Entropy of the predicted distribution, in nats."""


def label_token_log_probs(
    hidden_states: torch.Tensor,
    lm_head: torch.nn.Module,
    labels: torch.Tensor,
    chunk_size: int = CHUNK_SIZE,
    temperature: float = 1.0,
) -> TokenLogProbs:
    """log p(label) at every trained position (and diagnostics), the LM head run only there, a chunk at a time.

    The sequence-level terms of preference losses are sums of these per row; ``row_sums`` forms them. With a
    ``temperature``, p is the distribution of the logits divided by it (what sampling at that temperature draws
    from).
    """
    targets = labels[:, 1:]
    trained = targets != IGNORE_INDEX
    hidden = hidden_states[:, :-1][trained]
    if type(lm_head) is torch.nn.Linear:
        return TokenLogProbs(
            *ChunkedLinearLogProbs.apply(
                hidden, lm_head.weight, lm_head.bias, targets[trained], chunk_size, 1.0 / temperature
            )
        )
    # a wrapped head (peft's modules_to_save): its own forward, all at once
    logits = lm_head(hidden).float() / temperature
    log_softmax = logits.log_softmax(-1)
    log_probs = log_softmax.gather(1, targets[trained][:, None]).squeeze(1)
    detached = log_softmax.detach()
    entropy = -(detached.exp() * detached).sum(-1)
    return TokenLogProbs(log_probs, detached.argmax(-1) == targets[trained], logits.detach().mean(-1), entropy)


def row_sums(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row sums of ``values`` given at the trained positions of ``labels``, ordered as
    ``label_token_log_probs`` returns them."""
    rows = (labels[:, 1:] != IGNORE_INDEX).nonzero()[:, 0]
    return values.new_zeros(labels.shape[0]).index_add(0, rows, values)


class ChunkedLinearLogProbs(torch.autograd.Function):
    """log_softmax(hidden @ weight.T + bias)[target] per position, chunk by chunk; also is-top-1, mean logit and
    entropy per position (not differentiable).

    The gradient of each position's log-probability with respect to its hidden state, (one_hot - softmax) @ weight,
    is formed in the forward pass (one [positions x hidden] tensor; the logits are never kept) and scaled by the
    incoming per-position gradient in the backward. A trainable weight's gradient needs those incoming gradients,
    so it recomputes the logits in the backward, a chunk at a time.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, scale=1.0):  # noqa: ANN001, ANN205 (autograd signature)
        compute, w, b = _head_in_compute_dtype(hidden, weight, bias)
        count = hidden.shape[0]
        log_probs = torch.zeros(count, dtype=torch.float32, device=hidden.device)
        mean_logits, entropy = torch.zeros_like(log_probs), torch.zeros_like(log_probs)
        is_top1 = torch.zeros(count, dtype=torch.bool, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
        for start in range(0, count, chunk_size):
            end = min(start + chunk_size, count)
            t = targets[start:end]
            logits = F.linear(hidden[start:end].to(compute), w, b).float()
            if scale != 1.0:  # 1 / temperature
                logits.mul_(scale)
            mean_logits[start:end] = logits.mean(-1)
            is_top1[start:end] = logits.argmax(-1) == t
            log_softmax = logits.sub_(logits.logsumexp(-1, keepdim=True))  # in place: one [chunk x vocab] buffer less
            log_probs[start:end] = log_softmax.gather(1, t[:, None]).squeeze(1)
            probs = log_softmax.exp()
            entropy[start:end] = -(probs * log_softmax).sum(-1)
            if grad_hidden is not None:
                # d log p(target) / d logits = one_hot(target) - softmax, formed in place of the probabilities.
                grad_logits = probs.neg_()
                grad_logits[torch.arange(end - start, device=t.device), t] += 1.0
                if scale != 1.0:
                    grad_logits.mul_(scale)
                grad_hidden[start:end] = (grad_logits.to(compute) @ w).to(hidden.dtype)
        need_weight = weight.requires_grad or (bias is not None and bias.requires_grad)
        ctx.save_for_backward(grad_hidden, hidden if need_weight else None, weight, bias, targets)
        ctx.chunk_size, ctx.compute, ctx.scale = chunk_size, compute, scale
        ctx.mark_non_differentiable(is_top1, mean_logits, entropy)
        return log_probs, is_top1, mean_logits, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, *unused):  # noqa: ANN001, ANN205 (autograd signature)
        grad_hidden, hidden, weight, bias, targets = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_log_probs[:, None].to(grad_hidden.dtype)
        grad_weight = grad_bias = None
        if hidden is not None:  # a trainable head: recompute each chunk's softmax, now that the scales are known
            w = weight.to(ctx.compute)
            b = None if bias is None else bias.to(ctx.compute)
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            grad_bias = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
            for start in range(0, hidden.shape[0], ctx.chunk_size):
                h = hidden[start : start + ctx.chunk_size].to(ctx.compute)
                t = targets[start : start + ctx.chunk_size]
                grad_logits = F.linear(h, w, b).float().mul_(ctx.scale).softmax(-1).neg_()
                grad_logits[torch.arange(t.shape[0], device=t.device), t] += 1.0
                grad_logits *= grad_log_probs[start : start + ctx.chunk_size, None] * ctx.scale
                grad_weight += grad_logits.T @ h.float()
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(0)
            grad_weight = grad_weight.to(weight.dtype) if weight.requires_grad else None
            grad_bias = grad_bias.to(bias.dtype) if grad_bias is not None and bias.requires_grad else None
        return grad_hidden, grad_weight, grad_bias, None, None, None
