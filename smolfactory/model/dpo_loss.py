"""Preference losses: DPO and the variants TRL offers, one formula per pair of sequences.

Every loss reads the sequence log-probabilities of the chosen and rejected answers under the policy and the
reference model (sums over each answer's trained tokens) and returns one loss per pair; the module sums them
and divides by the pairs of the optimizer step. The formulas and names follow TRL's ``DPOTrainer`` (1.16),
so that a ``loss_type`` means the same in both; where TRL normalises by answer length (``ipo``,
``sigmoid_norm``) the lengths come in too.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from smolfactory.errors import SmolFactoryError

DPOLossType = Literal[
    "sigmoid", "ipo", "hinge", "robust", "exo_pair", "bco_pair", "nca_pair", "sppo_hard", "apo_zero", "apo_down",
    "sigmoid_norm",
]  # fmt: skip


def check_loss_settings(loss_type: str, beta: float, label_smoothing: float) -> None:
    """A one-line error for settings that the chosen loss cannot take."""
    if beta <= 0:
        raise SmolFactoryError(f"model.beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise SmolFactoryError(f"model.label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type == "exo_pair" and label_smoothing == 0.0:
        raise SmolFactoryError("model.loss_type exo_pair needs model.label_smoothing > 0 (the paper uses 1e-3)")
    if label_smoothing > 0 and loss_type not in ("sigmoid", "robust", "exo_pair"):
        raise SmolFactoryError(
            f"model.label_smoothing applies to the sigmoid, robust and exo_pair losses, not to {loss_type}; "
            "set it to 0 or change model.loss_type"
        )


def preference_loss(
    loss_type: str,
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """One loss per pair.

    Args:
        loss_type: Which preference loss (see ``DPOLossType``).
        chosen_logratios: ``[pairs]`` log pi(chosen) - log pi_ref(chosen), summed over the answer's tokens.
        rejected_logratios: ``[pairs]`` the same for the rejected answers.
        beta: Strength of the pull towards the reference model (IPO's tau).
        label_smoothing: Probability that a preference label is wrong (sigmoid: conservative DPO; robust; exo_pair).
        chosen_tokens: ``[pairs]`` trained tokens of each chosen answer (for ipo and sigmoid_norm).
        rejected_tokens: ``[pairs]`` the same for the rejected answers.
    """
    delta = chosen_logratios - rejected_logratios
    if loss_type in ("ipo", "sigmoid_norm"):  # per-token log-ratios: comparable across answer lengths
        delta = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
    smoothing = label_smoothing
    if loss_type == "sigmoid":  # DPO; with label smoothing, conservative DPO (cDPO)
        return -(1 - smoothing) * F.logsigmoid(beta * delta) - smoothing * F.logsigmoid(-beta * delta)
    if loss_type == "sigmoid_norm":
        return -F.logsigmoid(beta * delta)
    if loss_type == "ipo":  # IPO, eq. 17: regress the per-token margin to 1 / (2 tau)
        return (delta - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":  # SLiC
        return torch.relu(1 - beta * delta)
    if loss_type == "robust":  # rDPO: unbiased under labels flipped with probability label_smoothing
        clean, flipped = F.logsigmoid(beta * delta), F.logsigmoid(-beta * delta)
        return (-(1 - smoothing) * clean + smoothing * flipped) / (1 - 2 * smoothing)
    if loss_type == "exo_pair":  # EXO, eq. 16: KL from the model's pair distribution to [1 - eps, eps]
        win, lose = beta * delta, -beta * delta
        return torch.sigmoid(win) * (F.logsigmoid(win) - math.log1p(-smoothing)) + torch.sigmoid(lose) * (
            F.logsigmoid(lose) - math.log(smoothing)
        )
    chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
    if loss_type == "bco_pair":
        return -F.logsigmoid(chosen_rewards) - F.logsigmoid(-rejected_rewards)
    if loss_type == "nca_pair":
        return -F.logsigmoid(chosen_rewards) - 0.5 * (F.logsigmoid(-chosen_rewards) + F.logsigmoid(-rejected_rewards))
    if loss_type == "sppo_hard":  # SPPO with hard win probabilities: log-ratios regressed to +-1 / (2 beta)
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    if loss_type == "apo_zero":  # APO eq. 7: the chosen answers are better than the model's own
        return 1 - torch.sigmoid(chosen_rewards) + torch.sigmoid(rejected_rewards)
    if loss_type == "apo_down":  # APO eq. 8: the chosen answers are worse than the model's own
        return torch.sigmoid(chosen_rewards) + 1 - torch.sigmoid(beta * delta)
    raise SmolFactoryError(f"unknown model.loss_type '{loss_type}'; choose one of {', '.join(DPOLossType.__args__)}")
