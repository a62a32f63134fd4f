"""Preference losses, one class each: DPO and its variants, ORPO, SimPO; formulas and metrics as TRL 1.16 has them.

A loss reads what a recipe measured for a micro-batch of pairs (``PairLogProbs``: per answer, the summed
log-probability of its trained tokens and how many there were; the reference model's too when the loss needs one)
and returns one loss per pair (``PairLoss``). The recipe sums the losses and divides by the pairs of the whole
optimizer step, so a loss's mean over one micro-batch is the value TRL's trainer reports for that batch.

Which trainer each class matches (``trl/`` is the installed package):

- ``DPOLoss``: ``trl/trainer/dpo_trainer.py`` ``DPOTrainer._compute_loss`` (summed log-probs, one ``loss_type``).
- ``ORPOLoss``: ``trl/experimental/orpo/orpo_trainer.py`` ``ORPOTrainer.odds_ratio_loss`` and
  ``get_batch_loss_metrics`` (per-token mean log-probs, plus the chosen sequences' NLL).
- ``SimPOLoss``: ``trl/experimental/cpo/cpo_trainer.py`` ``CPOTrainer.cpo_loss`` with ``loss_type="simpo"``,
  ``cpo_alpha=0`` (per-token mean log-probs, no NLL term).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F

from smolfactory.errors import SmolFactoryError


class PairLogProbs(NamedTuple):
    """What a model assigns to a micro-batch of pairs; every field is ``[pairs]``, row i of each belongs together."""

    chosen: torch.Tensor
    """Summed log-probability of each chosen answer's trained tokens (differentiable for the policy)."""
    rejected: torch.Tensor
    """The same for the rejected answers."""
    chosen_tokens: torch.Tensor
    """How many tokens of each chosen answer are trained."""
    rejected_tokens: torch.Tensor
    """The same for the rejected answers."""
    chosen_sequence: torch.Tensor | None = None
    """Summed log-probability of every attended token of each chosen sequence but the first, prompt included:
    ORPO's NLL term as TRL computes it ("over the full prompt and response"). Only ``ORPOLoss(nll_on_prompt=True)``
    reads it."""
    chosen_sequence_tokens: torch.Tensor | None = None
    """How many tokens ``chosen_sequence`` sums over."""


class PairLoss(NamedTuple):
    """One loss per pair, and the per-pair values behind the metrics; every tensor is ``[pairs]``."""

    losses: torch.Tensor
    """The loss of each pair (differentiable); their mean over a micro-batch is TRL's loss for that batch."""
    rewards_chosen: torch.Tensor
    """The implicit reward of each chosen answer (detached): reward_accuracy is mean(chosen > rejected)."""
    rewards_rejected: torch.Tensor
    """The same for the rejected answers (detached)."""
    extra: dict[str, torch.Tensor]
    """Further metrics of this loss (detached), named as smolfactory logs them; each one's mean over the pairs of a
    batch is the value TRL logs for it."""


class PreferenceLoss:
    """A loss on pairs of answers: ``loss(policy, reference) -> PairLoss``. No parameters, no state: each loss is a
    frozen dataclass of its settings (``model.loss: {class_path: ..., init_args: ...}`` in a config)."""

    needs_reference: ClassVar[bool] = False
    """Whether ``__call__`` reads the reference model's log-probabilities (else it is passed None)."""
    EXTRA_METRICS: ClassVar[tuple[str, ...]] = ()
    """The names of ``PairLoss.extra``, logged beside every preference loss's metrics."""

    @property
    def needs_chosen_sequence(self) -> bool:
        """Whether the policy's ``PairLogProbs`` must carry ``chosen_sequence`` and ``chosen_sequence_tokens``."""
        return False

    def __call__(self, policy: PairLogProbs, reference: PairLogProbs | None) -> PairLoss:
        raise NotImplementedError


DPOLossType = Literal[
    "sigmoid", "ipo", "hinge", "robust", "exo_pair", "bco_pair", "nca_pair", "sppo_hard", "apo_zero", "apo_down",
    "sigmoid_norm",
]  # fmt: skip

# Each formula maps (chosen log-ratios, rejected log-ratios, beta, label smoothing) to one loss per pair; a log-ratio
# is log pi(answer) - log pi_ref(answer), summed over the answer's tokens (per token for PER_TOKEN_LOSSES).
DPOFormula = Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor]


def _sigmoid(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, smoothing: float) -> torch.Tensor:
    """DPO; with label smoothing, conservative DPO (cDPO)."""
    delta = beta * (chosen - rejected)
    return -(1 - smoothing) * F.logsigmoid(delta) - smoothing * F.logsigmoid(-delta)


def _sigmoid_norm(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, smoothing: float) -> torch.Tensor:
    """DPO on per-token log-ratios."""
    return -F.logsigmoid(beta * (chosen - rejected))


def _ipo(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, smoothing: float) -> torch.Tensor:
    """IPO, eq. 17: regress the per-token margin to 1 / (2 tau)."""
    return (chosen - rejected - 1 / (2 * beta)) ** 2


def _hinge(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, smoothing: float) -> torch.Tensor:
    """SLiC."""
    return torch.relu(1 - beta * (chosen - rejected))


def _robust(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, smoothing: float) -> torch.Tensor:
    """rDPO: unbiased when labels are flipped with probability label_smoothing."""
    delta = beta * (chosen - rejected)
    return (-(1 - smoothing) * F.logsigmoid(delta) + smoothing * F.logsigmoid(-delta)) / (1 - 2 * smoothing)


def _exo_pair(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, smoothing: float) -> torch.Tensor:
    """EXO, eq. 16: KL from the model's distribution over the pair to [1 - eps, eps]."""
    win, lose = beta * (chosen - rejected), beta * (rejected - chosen)
    return torch.sigmoid(win) * (F.logsigmoid(win) - math.log1p(-smoothing)) + torch.sigmoid(lose) * (
        F.logsigmoid(lose) - math.log(smoothing)
    )


def _bco_pair(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, smoothing: float) -> torch.Tensor:
    """BCO on pairs (TRL's form, without the running reward shift)."""
    return -F.logsigmoid(beta * chosen) - F.logsigmoid(-beta * rejected)


def _nca_pair(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, smoothing: float) -> torch.Tensor:
    """NCA on pairs."""
    return -F.logsigmoid(beta * chosen) - 0.5 * (F.logsigmoid(-beta * chosen) + F.logsigmoid(-beta * rejected))


def _sppo_hard(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, smoothing: float) -> torch.Tensor:
    """SPPO with hard win probabilities: log-ratios regressed to +-1 / (2 beta)."""
    return (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2


def _apo_zero(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, smoothing: float) -> torch.Tensor:
    """APO eq. 7: the chosen answers are better than the model's own."""
    return 1 - torch.sigmoid(beta * chosen) + torch.sigmoid(beta * rejected)


def _apo_down(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, smoothing: float) -> torch.Tensor:
    """APO eq. 8: the chosen answers are worse than the model's own."""
    return torch.sigmoid(beta * chosen) + 1 - torch.sigmoid(beta * (chosen - rejected))


DPO_FORMULAS: dict[str, DPOFormula] = {
    "sigmoid": _sigmoid, "ipo": _ipo, "hinge": _hinge, "robust": _robust, "exo_pair": _exo_pair,
    "bco_pair": _bco_pair, "nca_pair": _nca_pair, "sppo_hard": _sppo_hard, "apo_zero": _apo_zero,
    "apo_down": _apo_down, "sigmoid_norm": _sigmoid_norm,
}  # fmt: skip
assert set(DPO_FORMULAS) == set(DPOLossType.__args__)
# Normalised by answer length, so that the margin is comparable across lengths (TRL divides by the token counts).
PER_TOKEN_LOSSES = ("ipo", "sigmoid_norm")
SMOOTHED_LOSSES = ("sigmoid", "robust", "exo_pair")


def check_loss_settings(loss_type: str, beta: float, label_smoothing: float) -> None:
    """A one-line error for settings that the chosen DPO loss cannot take."""
    if loss_type not in DPO_FORMULAS:
        raise SmolFactoryError(f"unknown model.loss.loss_type '{loss_type}'; choose one of {', '.join(DPO_FORMULAS)}")
    if beta <= 0:
        raise SmolFactoryError(f"model.loss.beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise SmolFactoryError(f"model.loss.label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type == "exo_pair" and label_smoothing == 0.0:
        raise SmolFactoryError(
            "model.loss.loss_type exo_pair needs model.loss.label_smoothing > 0 (the paper uses 1e-3)"
        )
    if label_smoothing > 0 and loss_type not in SMOOTHED_LOSSES:
        raise SmolFactoryError(
            f"model.loss.label_smoothing applies to the sigmoid, robust and exo_pair losses, not to {loss_type}; "
            "set it to 0 or change model.loss.loss_type"
        )


@dataclass(frozen=True)
class DPOLoss(PreferenceLoss):
    """DPO and the pairwise variants of TRL's DPOTrainer, on log-ratios to a reference model.

    Attributes:
        beta: Strength of the pull towards the reference model (IPO's tau); 0.1 is TRL's default.
        loss_type: sigmoid (DPO), ipo, hinge, robust, exo_pair, bco_pair, nca_pair, sppo_hard, apo_zero, apo_down or
            sigmoid_norm, with TRL's formulas.
        label_smoothing: Probability that a pair's preference is wrong: conservative DPO with sigmoid, or the robust and
            exo_pair losses.
    """

    needs_reference: ClassVar[bool] = True

    beta: float = 0.1
    loss_type: DPOLossType = "sigmoid"
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        check_loss_settings(self.loss_type, self.beta, self.label_smoothing)

    def __call__(self, policy: PairLogProbs, reference: PairLogProbs | None) -> PairLoss:
        """Rewards are beta times the summed log-ratios, as TRL's rewards/chosen and rewards/rejected."""
        if reference is None:
            raise SmolFactoryError("DPOLoss needs the reference model's log-probabilities")
        chosen, rejected = policy.chosen - reference.chosen, policy.rejected - reference.rejected
        margin_chosen, margin_rejected = chosen, rejected
        if self.loss_type in PER_TOKEN_LOSSES:
            margin_chosen, margin_rejected = (
                chosen / policy.chosen_tokens.clamp(min=1),
                rejected / policy.rejected_tokens.clamp(min=1),
            )
        losses = DPO_FORMULAS[self.loss_type](margin_chosen, margin_rejected, self.beta, self.label_smoothing)
        return PairLoss(losses, self.beta * chosen.detach(), self.beta * rejected.detach(), {})


def _check_positive(name: str, value: float) -> None:
    if value <= 0:
        raise SmolFactoryError(f"model.loss.{name} must be > 0, got {value}")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation: log1p(-exp(x)) far from 0, log(-expm1(x)) near it."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@dataclass(frozen=True)
class ORPOLoss(PreferenceLoss):
    """ORPO: the chosen sequences' NLL, minus beta times the log-sigmoid of the log odds ratio of chosen to rejected.

    The odds of an answer are p / (1 - p) with p its per-token mean probability, exp(mean log-prob) over its
    trained tokens. The NLL is TRL's: the mean over every token of the micro-batch's chosen sequences, so each pair
    contributes ``-chosen_sum * pairs / chosen_tokens_of_the_batch`` and the micro-batch mean is that token mean.
    Under gradient accumulation the NLL is thus averaged per micro-batch, then over micro-batches (as TRL does),
    not over every chosen token of the optimizer step.

    Rewards are beta times the per-token mean log-probabilities (TRL's), and ``logps_chosen``/``logps_rejected`` in
    ``extra`` are those means too: TRL's ORPO logs per-token means where its DPO logs sums.

    Attributes:
        beta: Weight of the odds-ratio term against the NLL (the paper's lambda); 0.1 is TRL's default.
        nll_on_prompt: The NLL covers the chosen sequences' prompt tokens too, as TRL computes it; false: only the
            chosen answers' trained tokens (the paper's SFT term).
    """

    EXTRA_METRICS: ClassVar[tuple[str, ...]] = (
        "nll_loss", "log_odds_ratio", "log_odds_chosen", "logps_chosen", "logps_rejected",
    )  # fmt: skip

    beta: float = 0.1
    nll_on_prompt: bool = True

    def __post_init__(self) -> None:
        _check_positive("beta", self.beta)

    @property
    def needs_chosen_sequence(self) -> bool:
        return self.nll_on_prompt

    def __call__(self, policy: PairLogProbs, reference: PairLogProbs | None = None) -> PairLoss:
        chosen = policy.chosen.float() / policy.chosen_tokens.clamp(min=1)
        rejected = policy.rejected.float() / policy.rejected_tokens.clamp(min=1)
        # log odds(chosen) - log odds(rejected), with log odds = log p - log(1 - p) (the paper's eqs. 4 and 7)
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        ratio = F.logsigmoid(log_odds)
        if self.nll_on_prompt:
            if policy.chosen_sequence is None or policy.chosen_sequence_tokens is None:
                raise SmolFactoryError("ORPOLoss(nll_on_prompt=True) needs PairLogProbs.chosen_sequence and its tokens")
            nll_sums, nll_tokens = policy.chosen_sequence.float(), policy.chosen_sequence_tokens
        else:
            nll_sums, nll_tokens = policy.chosen.float(), policy.chosen_tokens
        # Each pair's share of the micro-batch's token-mean NLL: the mean over pairs gives back that token mean.
        nll = -nll_sums * nll_sums.shape[0] / nll_tokens.sum().clamp(min=1)
        extra = {
            "nll_loss": nll.detach(),
            "log_odds_ratio": ratio.detach(),
            "log_odds_chosen": log_odds.detach(),
            "logps_chosen": chosen.detach(),
            "logps_rejected": rejected.detach(),
        }
        return PairLoss(nll - self.beta * ratio, self.beta * chosen.detach(), self.beta * rejected.detach(), extra)


@dataclass(frozen=True)
class SimPOLoss(PreferenceLoss):
    """SimPO: DPO without a reference, on per-token mean log-probabilities, with a target margin gamma.

    loss = -log sigmoid(beta * (mean_chosen - mean_rejected) - gamma), gamma = gamma_beta_ratio * beta; with label
    smoothing e, the cDPO mix (1 - e) * that + e * the same for the swapped pair. TRL's CPOTrainer with
    ``loss_type="simpo"``, ``cpo_alpha=0``, ``beta=beta`` and ``simpo_gamma=gamma_beta_ratio * beta`` (TRL's own
    defaults, beta 0.1 and simpo_gamma 0.5, are not SimPO's). Rewards are beta times the per-token means, and
    ``logps_chosen``/``logps_rejected`` in ``extra`` are those means too (TRL's CPO logs means, not sums).

    Attributes:
        beta: Scale of the reward margin; the SimPO paper uses 2.0 to 2.5 (10 for Gemma).
        gamma_beta_ratio: Target margin over beta; the paper tunes it in 0.3 to 0.8.
        label_smoothing: Probability that a pair's preference is wrong (the conservative mix of cDPO).
    """

    EXTRA_METRICS: ClassVar[tuple[str, ...]] = ("logps_chosen", "logps_rejected")

    beta: float = 2.0
    gamma_beta_ratio: float = 0.5
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        _check_positive("beta", self.beta)
        if not 0.0 <= self.label_smoothing < 0.5:
            raise SmolFactoryError(f"model.loss.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")

    def __call__(self, policy: PairLogProbs, reference: PairLogProbs | None = None) -> PairLoss:
        chosen = policy.chosen / policy.chosen_tokens.clamp(min=1)
        rejected = policy.rejected / policy.rejected_tokens.clamp(min=1)
        margin = self.beta * (chosen - rejected - self.gamma_beta_ratio)
        smoothing = self.label_smoothing
        losses = -(1 - smoothing) * F.logsigmoid(margin) - smoothing * F.logsigmoid(-margin)
        extra = {"logps_chosen": chosen.detach(), "logps_rejected": rejected.detach()}
        return PairLoss(losses, self.beta * chosen.detach(), self.beta * rejected.detach(), extra)
