"""Policy-gradient losses of online RL (GRPO and its variants), one class per loss, and the group advantages.

A batch of rollouts is ``N`` completions, ``num_generations`` per prompt, each scored by reward functions. Their
advantages (``group_advantages``) say how much better each completion did than the others of its prompt. A loss
turns the completions' per-token log-probabilities under the policy being trained, under the policy that
generated them (``old``) and under a reference model into a sum and a count (``Sum``): the recipe divides the
sums of every micro-batch of an optimizer step, on every rank, by their counts. What a loss counts is what
distinguishes GRPO's variants:

==========  ==========================================================  ===========================
loss_type   one micro-batch's contribution                              count
==========  ==========================================================  ===========================
grpo        sum over completions of the mean over its tokens            completions
bnpo        mean over the micro-batch's tokens                          1 (a micro-batch)
dr_grpo     sum over tokens / max_completion_length                     completions
dapo        sum over tokens                                             tokens (of the whole step)
==========  ==========================================================  ===========================

These are TRL 1.16's ``GRPOTrainer`` formulas (its grpo, bnpo and dr_grpo divide each micro-batch's loss by the
accumulation steps: a mean over equal micro-batches, as here), checked against it in tests/test_grpo_trl.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal, NamedTuple

import torch

from smolfactory.errors import SmolFactoryError
from smolfactory.model.recipe import Sum

ScaleRewards = Literal["group", "batch", "none"]
STD_EPSILON = 1e-4  # TRL's: a group whose rewards all agree gets advantages 0, not a division by zero


class PolicyTokens(NamedTuple):
    """Per-token values of a batch of completions, ``[completions, tokens]``, zero where ``mask`` is False."""

    log_probs: torch.Tensor
    """log p(token) under the policy being trained (differentiable)."""
    old_log_probs: torch.Tensor | None
    """Under the policy that generated the completions; None when that is the same as ``log_probs`` (one update
    per rollout)."""
    ref_log_probs: torch.Tensor | None
    """Under the reference model (needed when ``beta > 0``)."""
    advantages: torch.Tensor
    """One per completion."""
    mask: torch.Tensor
    """Which tokens are trained: those up to the first end-of-sequence token (none of a masked truncated one)."""
    max_completion_length: int
    """The longest completion generation allows (Dr. GRPO's constant normaliser)."""


class PolicyLossResult(NamedTuple):
    loss: Sum
    """The differentiable loss total, and what it is a mean over (see the module's table)."""
    metrics: dict[str, Sum]
    """The loss's diagnostics (KL, clip ratios), each a sum and a count."""


class PolicyLoss(ABC):
    """A policy-gradient loss over completions and their advantages."""

    beta: float = 0.0
    METRICS: ClassVar[tuple[str, ...]] = ()
    """The diagnostics ``metrics`` holds (``kl`` is added when ``beta > 0``)."""

    @property
    def needs_reference(self) -> bool:
        return self.beta > 0

    @property
    def metric_names(self) -> tuple[str, ...]:
        return (("kl",) if self.needs_reference else ()) + self.METRICS

    @property
    @abstractmethod
    def count_name(self) -> str:
        """What the loss is a mean over, for the logged total (train_<name>)."""

    @abstractmethod
    def per_token_loss(self, tokens: PolicyTokens, ratio: torch.Tensor) -> tuple[torch.Tensor, dict[str, Sum]]:
        """The loss at every token (before the KL term), and the loss's own diagnostics."""

    @abstractmethod
    def total(self, per_token: torch.Tensor, mask: torch.Tensor, max_completion_length: int) -> Sum:
        """The micro-batch's loss total and count."""

    def __call__(self, tokens: PolicyTokens) -> PolicyLossResult:
        mask = tokens.mask.float()
        old = tokens.log_probs.detach() if tokens.old_log_probs is None else tokens.old_log_probs
        ratio = torch.exp(tokens.log_probs - old)
        per_token, metrics = self.per_token_loss(tokens, ratio)
        if self.needs_reference:
            if tokens.ref_log_probs is None:
                raise SmolFactoryError(f"{type(self).__name__} with beta > 0 needs the reference log-probabilities")
            # k3, the low-variance non-negative estimator of KL(policy || reference) (Schulman), weighted by the
            # importance ratio because the tokens were sampled from the old policy (TRL 1.16's default correction)
            log_ratio = tokens.ref_log_probs - tokens.log_probs
            kl = (torch.exp(log_ratio) - log_ratio - 1) * ratio
            per_token = per_token + self.beta * kl
            metrics = {"kl": masked_sum(kl.detach(), mask)} | metrics
        return PolicyLossResult(self.total(per_token, mask, tokens.max_completion_length), metrics)


@dataclass(frozen=True)
class GRPOLoss(PolicyLoss):
    """PPO's clipped surrogate on group advantages (GRPO), with the normalisation of ``loss_type``.

    ``loss = -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A) + beta * KL`` per token, where
    ``ratio`` is p_policy / p_old of the token.

    Attributes:
        loss_type: How token losses become a loss (see the module's table): dapo (TRL's default) weighs every token of
            the step alike; grpo every completion alike; dr_grpo divides by a constant; bnpo per micro-batch.
        epsilon: Lower clipping bound of the ratio: 1 - epsilon.
        epsilon_high: Upper clipping bound, 1 + epsilon_high; None: epsilon (DAPO's clip-higher uses 0.28).
        beta: Weight of the KL penalty to the reference model; 0 loads no reference (TRL's default).
    """

    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    beta: float = 0.0

    METRICS: ClassVar[tuple[str, ...]] = (
        "clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "clip_ratio_low_min", "clip_ratio_high_max",
    )  # fmt: skip

    @property
    def count_name(self) -> str:
        return {"grpo": "completions", "dr_grpo": "completions", "bnpo": "micro_batches", "dapo": "tokens"}[
            self.loss_type
        ]

    def per_token_loss(self, tokens: PolicyTokens, ratio: torch.Tensor) -> tuple[torch.Tensor, dict[str, Sum]]:
        low, high = 1 - self.epsilon, 1 + (self.epsilon if self.epsilon_high is None else self.epsilon_high)
        advantages = tokens.advantages[:, None]
        per_token = -torch.min(ratio * advantages, ratio.clamp(low, high) * advantages)
        ratio, mask = ratio.detach(), tokens.mask.float()
        is_low = ((ratio < low) & (advantages < 0)).float()
        is_high = ((ratio > high) & (advantages > 0)).float()
        one = torch.ones((), device=ratio.device)
        metrics = {
            "clip_ratio_low": masked_sum(is_low, mask),
            "clip_ratio_high": masked_sum(is_high, mask),
            "clip_ratio_region": masked_sum(torch.maximum(is_low, is_high), mask),
            # per micro-batch, the lowest and highest completion's share of clipped tokens (averaged over the step)
            "clip_ratio_low_min": Sum(nan_to_zero(completion_means(is_low, mask).nan_to_num(torch.inf).min()), one),
            "clip_ratio_high_max": Sum(nan_to_zero(completion_means(is_high, mask).nan_to_num(-torch.inf).max()), one),
        }
        return per_token, metrics

    def total(self, per_token: torch.Tensor, mask: torch.Tensor, max_completion_length: int) -> Sum:
        masked = per_token * mask
        completions = torch.tensor(float(mask.shape[0]), device=mask.device)
        if self.loss_type == "grpo":
            return Sum((masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum(), completions)
        if self.loss_type == "bnpo":
            return Sum(masked.sum() / mask.sum().clamp(min=1.0), torch.ones((), device=mask.device))
        if self.loss_type == "dr_grpo":
            return Sum(masked.sum() / max_completion_length, completions)
        return Sum(masked.sum(), mask.sum())


@dataclass(frozen=True)
class CISPOLoss(PolicyLoss):
    """CISPO (MiniMax-M1): the REINFORCE gradient of every token, weighted by its importance ratio clipped from
    above and not differentiated, so that no token's gradient is dropped by clipping. Token-weighted like DAPO.

    ``loss = -min(ratio, epsilon_high).detach() * A * log p_policy + beta * KL`` per token.

    Attributes:
        epsilon_high: Upper bound of the importance weight (the paper's and TRL's recommended 5.0).
        beta: Weight of the KL penalty to the reference model; 0 loads no reference.
    """

    epsilon_high: float = 5.0
    beta: float = 0.0

    METRICS: ClassVar[tuple[str, ...]] = ("cispo_clip_ratio",)
    count_name = "tokens"

    def per_token_loss(self, tokens: PolicyTokens, ratio: torch.Tensor) -> tuple[torch.Tensor, dict[str, Sum]]:
        advantages = tokens.advantages[:, None]
        weight = ratio.clamp(max=self.epsilon_high).detach()
        clipped = ((ratio.detach() > self.epsilon_high) & (advantages > 0)).float()
        return -weight * advantages * tokens.log_probs, {"cispo_clip_ratio": masked_sum(clipped, tokens.mask.float())}

    def total(self, per_token: torch.Tensor, mask: torch.Tensor, max_completion_length: int) -> Sum:
        return Sum((per_token * mask).sum(), mask.sum())


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> Sum:
    """The sum of ``values`` over the trained tokens, and how many there are."""
    return Sum((values * mask).sum(), mask.sum())


def completion_means(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each completion's mean over its trained tokens (NaN for one without any)."""
    return (values * mask).sum(-1) / mask.sum(-1)


def nan_to_zero(value: torch.Tensor) -> torch.Tensor:
    """0 for a value no completion defines (every one masked): a metric's mean stays finite."""
    return value if torch.isfinite(value) else torch.zeros_like(value)


# ---- advantages --------------------------------------------------------------------------------------------------


class Scores(NamedTuple):
    """Rewards of a batch of completions (``num_generations`` per prompt, a prompt's together) and advantages."""

    advantages: torch.Tensor
    """One per completion: reward minus its group's mean, divided by the std of ``scale_rewards``."""
    rewards: torch.Tensor
    """The weighted sum of the reward functions per completion; NaN where every function returned None."""
    is_std_zero: torch.Tensor
    """Per completion: whether the std it was scaled by is zero (its group's rewards all agree)."""


def group_advantages(
    rewards_per_function: torch.Tensor, weights: torch.Tensor, num_generations: int, scale_rewards: ScaleRewards
) -> Scores:
    """Advantages of completions from their rewards ``[completions, functions]`` (NaN where a function returned
    None), as TRL 1.16 forms them: weighted rewards summed, minus the mean of the prompt's group, divided by the
    std (of the group, of the whole batch, or not at all) plus 1e-4. A completion no function scored gets 0."""
    unscorable = torch.isnan(rewards_per_function).all(dim=1)
    rewards = (rewards_per_function * weights[None, :]).nansum(dim=1)
    rewards[unscorable] = torch.nan
    grouped = rewards.view(-1, num_generations)
    group_mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    elif num_generations > 1:  # group, and none (whose std only says which groups agree)
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
    else:
        std = torch.zeros_like(rewards)
    advantages = rewards - group_mean
    if scale_rewards != "none":
        advantages = advantages / (std + STD_EPSILON)
    is_std_zero = torch.isclose(std, torch.zeros_like(std))
    return Scores(torch.nan_to_num(advantages, nan=0.0), rewards, is_std_zero)


def nanstd(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The sample standard deviation (Bessel-corrected) of the values that are not NaN; NaN for fewer than two."""
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    variance = torch.nanmean((values - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(values)).sum(dim=dim, keepdim=True)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(variance, torch.nan))
    std = torch.sqrt(variance * correction)
    return std.squeeze() if dim is None else std.squeeze(dim)
