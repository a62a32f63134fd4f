"""Causal language-model loss computed only where a label exists.

Hugging Face models shift labels inside their own loss; here the shift happens in exactly one place,
``label_token_loss``. The LM head runs only on positions whose next token is trained, so prompt and
padding positions never produce a [tokens x vocabulary] logits tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def label_token_loss(
    hidden_states: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over trained positions, and how many there were.

    Args:
        hidden_states: ``[batch, seq, hidden]`` final decoder states.
        lm_head: maps hidden states to vocabulary logits.
        labels: ``[batch, seq]`` token ids, ``-100`` where nothing is trained; not yet shifted.

    Returns:
        ``(loss_sum, num_tokens)``: divide the first by the second (or by a count taken over a whole
        optimizer step) for the mean.
    """
    targets = labels[:, 1:]
    trained = targets != IGNORE_INDEX
    hidden = hidden_states[:, :-1][trained]
    logits = lm_head(hidden).float()
    loss_sum = F.cross_entropy(logits, targets[trained], reduction="sum")
    return loss_sum, trained.sum()
