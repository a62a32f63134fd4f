"""Attention over packed rows on a CPU: each example's own causal window, examples of similar length together.

A packed row holds several examples kept apart by position ids that restart at each one
(``smolfactory.data.packing``). Under ``sdpa``, transformers turns them into a block-diagonal mask over the whole
row, and torch's CPU flash kernel then computes every score of the row, most of them masked, with a slow backward
pass. Here each example is cut out of its row; examples of the same length, rounded up to ``BUCKET`` tokens, are
batched together, and each batch runs causal attention as plain matrix products: scores and softmax in float32,
probabilities kept in the compute dtype for the backward pass. It is the CPU counterpart of flash-attention's
variable-length path. Examples longer than ``MAX_SAVED_LENGTH`` keep torch's flash kernel (causal, without a
mask), whose memory does not grow with the square of their length.

A padded batch takes the same path: ``without_padding`` lays its rows end to end without their padding, so no
layer computes anything for a pad token (``RecipeModule.final_hidden_states``).

The model runs this through transformers' ``AttentionInterface`` under the name ``PACKED_SDPA``; any call
without a ``packed_layout`` (generation, other kernels) is exactly ``sdpa``. ``build.attends_example_by_example``
decides where: sdpa on a CPU, compiled or not. It runs outside torch.compile (a compiled layer calls it eagerly
between its compiled parts): its work depends on the examples' lengths, which change every batch, and a traced
copy would compile again for each new set of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_SDPA = "smolfactory_packed_sdpa"
BUCKET = 32
"""Examples are padded to a multiple of this many tokens, and those of one padded length attend together."""
MAX_SAVED_LENGTH = 1024
"""Longest padded example whose attention probabilities are kept for the backward pass."""
UNSUPPORTED = ("sliding_window", "softcap", "s_aux")
"""Attention variants some models pass as keyword arguments; calls that set one run through sdpa."""


class CausalAttention(torch.autograd.Function):
    """``softmax(q k^T * scale + causal mask) v`` for one batch of equally long examples.

    Grouped-query heads are folded into the query length, so keys and values are never repeated:
    ``query [examples, kv_heads, heads_per_kv * length, dim]``, ``key`` and ``value``
    ``[examples, kv_heads, length, dim]``, ``future [length, length]`` True above the diagonal.
    """

    @staticmethod
    def forward(ctx, query, key, value, future, scale: float):
        examples, kv_heads, rows, _ = query.shape
        length = key.shape[2]
        with torch.autocast(query.device.type, enabled=False):
            scores = torch.matmul(query, key.transpose(-1, -2)).float().mul_(scale)
            scores.view(examples, kv_heads, rows // length, length, length).masked_fill_(future, float("-inf"))
            probs = torch.softmax(scores, dim=-1).to(query.dtype)
            out = torch.matmul(probs, value)
        ctx.scale = scale
        ctx.save_for_backward(query, key, value, out, probs)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, probs = ctx.saved_tensors
        grad_value = torch.matmul(probs.transpose(-1, -2), grad_out)
        grad_probs = torch.matmul(grad_out, value.transpose(-1, -2)).float()
        # softmax's gradient: p * (dp - sum(p * dp)), where sum(p * dp) over a row equals sum(dout * out)
        row_dot = (grad_out.float() * out.float()).sum(-1, keepdim=True)
        grad_scores = grad_probs.sub_(row_dot).mul_(probs).to(query.dtype)
        grad_query = torch.matmul(grad_scores, key).mul_(ctx.scale)
        grad_key = torch.matmul(grad_scores.transpose(-1, -2), query).mul_(ctx.scale)
        return grad_query, grad_key, grad_value, None, None


@dataclass(frozen=True)
class ExampleGroup:
    """Examples padded to one length, cut out of their packed rows."""

    count: int
    length: int
    token_index: torch.Tensor
    """``[count, length]`` positions in the flattened batch; padding slots repeat the example's first token."""
    future: torch.Tensor | None
    """``[length, length]``, True above the diagonal; None where torch's flash kernel runs instead."""

    def rows(self, heads: int) -> torch.Tensor:
        """``[count * heads * length]`` rows of a ``[tokens * heads, dim]`` view, ordered example, head, slot."""
        head = torch.arange(heads, device=self.token_index.device)
        return (self.token_index[:, None, :] * heads + head[:, None]).flatten()


@dataclass(frozen=True)
class PackedLayout:
    """Where each example of a packed batch sits: computed once per batch, used by every layer."""

    groups: tuple[ExampleGroup, ...]
    example_start: torch.Tensor
    """For each token of the flattened batch, where its example begins in the groups' outputs laid end to end
    (in padded tokens)."""
    slot: torch.Tensor
    """For each token, its position within its example."""
    padded_length: torch.Tensor
    """For each token, its example's padded length."""

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor) -> PackedLayout:
        """Examples start at each row's start and wherever a position does not follow the one before it."""
        flat = position_ids.reshape(-1)
        starts = torch.ones_like(flat, dtype=torch.bool)
        starts[1:] = flat[1:] != flat[:-1] + 1
        starts[:: position_ids.shape[-1]] = True
        example = starts.cumsum(0) - 1
        starts = starts.nonzero().flatten()
        lengths = torch.diff(starts, append=starts.new_tensor([flat.numel()]))
        padded = (lengths + BUCKET - 1) // BUCKET * BUCKET
        example_start = torch.empty_like(starts)
        groups, offset = [], 0
        for length in padded.unique().tolist():
            chosen = (padded == length).nonzero().flatten()
            example_start[chosen] = offset + length * torch.arange(len(chosen), device=flat.device)
            slots = torch.arange(length, device=flat.device)
            index = torch.where(slots < lengths[chosen, None], starts[chosen, None] + slots, starts[chosen, None])
            future = None
            if length <= MAX_SAVED_LENGTH:
                future = torch.ones(length, length, dtype=torch.bool, device=flat.device).triu(1)
            groups.append(ExampleGroup(len(chosen), length, index, future))
            offset += index.numel()
        slot = torch.arange(flat.numel(), device=flat.device) - starts[example]
        return cls(tuple(groups), example_start[example], slot, padded[example])

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
        """Causal attention within each example: ``[batch, heads, length, dim]`` in, ``[batch, length, heads, dim]``
        out (the layout transformers' attention functions return)."""
        batch, heads, length, dim = query.shape
        kv_heads = key.shape[1]
        # Under autocast the rotary embedding hands over float32 queries and keys; sdpa computes in the autocast
        # dtype, and so does this.
        device = query.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
        # One row per (token, head): each group's gather then yields [examples, heads, slots, dim] directly.
        queries = query.transpose(1, 2).reshape(-1, dim).to(dtype)
        keys = key.transpose(1, 2).reshape(-1, dim).to(dtype)
        values = value.transpose(1, 2).reshape(-1, dim).to(dtype)
        outputs = []
        for group in self.groups:
            count, size = group.count, group.length
            q = queries.index_select(0, group.rows(heads)).view(count, heads, size, dim)
            kv_rows = group.rows(kv_heads)
            k = keys.index_select(0, kv_rows).view(count, kv_heads, size, dim)
            v = values.index_select(0, kv_rows).view(count, kv_heads, size, dim)
            if group.future is None or dtype == torch.float32:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
            else:  # the query heads sharing a key head, laid end to end
                out = CausalAttention.apply(q.view(count, kv_heads, -1, dim), k, v, group.future, scale)
            outputs.append(out.reshape(-1, dim))
        head = torch.arange(heads, device=query.device)
        rows = (heads * self.example_start + self.slot)[:, None] + head * self.padded_length[:, None]
        return torch.cat(outputs).index_select(0, rows.flatten()).view(batch, length, heads, dim)


def without_padding(
    input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A padded batch as one packed row: ``input_ids`` and ``position_ids`` ``[1, real tokens]`` (positions count
    each row's real tokens from 0, as generation does), and the real tokens' places in the flattened batch.

    Each row's real tokens must be one example, as the collators make them (padding on either side).
    """
    real = attention_mask.bool()
    kept = real.flatten().nonzero().flatten()
    positions = real.long().cumsum(-1) - 1
    packed = {"input_ids": input_ids.flatten()[kept][None], "position_ids": positions.flatten()[kept][None]}
    return packed, kept


def packed_sdpa_attention(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature (``attention_mask``, ``dropout``, ``scaling``, ...):
    ``PackedLayout.attend`` for packed batches, sdpa for every other call."""
    layout: PackedLayout | None = kwargs.pop("packed_layout", None)
    unsupported = kwargs.get("dropout", 0.0) > 0 or any(kwargs.get(name) is not None for name in UNSUPPORTED)
    if layout is None or unsupported or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)
    scaling = kwargs.get("scaling")
    return layout.attend(query, key, value, scaling if scaling is not None else query.shape[-1] ** -0.5), None


AttentionInterface.register(PACKED_SDPA, torch.compiler.disable(packed_sdpa_attention))
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
