"""GRPOModule: online reinforcement learning with verifiable rewards (GRPO, DAPO, Dr. GRPO, BNPO, CISPO).

Each training step takes a batch of prompts (``PromptDataModule``) and:

1. samples ``num_generations`` completions of every prompt from the policy itself (transformers' ``generate``:
   batched, KV cache, temperature / top-p / top-k, at most ``max_completion_length`` tokens); a completion ends
   at its first end-of-sequence token;
2. scores every completion with the reward functions (plain Python, TRL's signature, ``smolfactory.rewards``)
   and turns the weighted rewards into advantages within each prompt's group (``policy_losses.group_advantages``);
3. computes the loss (``model.loss``, one class per loss in ``policy_losses``) from the completions'
   log-probabilities, run through the label-only chunked LM head (no [tokens x vocabulary] logits).

A rollout (steps 1-2) is reused for ``num_iterations`` optimizer steps, through importance ratios against the
log-probabilities of the policy that generated it; the data module hands the same prompts again and the
rollouts travel in checkpoints, so a resumed run continues exactly. With ``beta > 0`` the loss has a KL term to
a reference: the model with its adapter switched off under LoRA (no second copy).
"""

from __future__ import annotations

import dataclasses
import inspect
from types import SimpleNamespace
from typing import Any, ClassVar, NamedTuple

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from smolfactory.data.collate import pad_collate
from smolfactory.errors import SmolFactoryError
from smolfactory.model.build import causal_lm_of
from smolfactory.model.loading import load_tokenizer
from smolfactory.model.loss import IGNORE_INDEX, TokenLogProbs, label_token_log_probs
from smolfactory.model.policy_losses import (
    GRPOLoss,
    PolicyLoss,
    PolicyTokens,
    ScaleRewards,
    group_advantages,
    nan_to_zero,
    nanstd,
)
from smolfactory.model.recipe import RecipeModule, Sum, class_path
from smolfactory.model.reference import load_reference, reference_of
from smolfactory.model.sft import WARMUP_COSINE
from smolfactory.rewards import Reward, score

GRPO_OPTIMIZER = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-5, "weight_decay": 0.0}}
# What every rollout reports, beside the loss and one reward_<name> (and its _std) per reward function.
ROLLOUT_METRICS = (
    "reward", "reward_std", "frac_reward_zero_std", "completion_length", "completion_length_min",
    "completion_length_max", "clipped_ratio", "terminated_length", "entropy",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """How completions are sampled from the policy.

    Attributes:
        num_generations: Completions per prompt (the group whose rewards are compared); at least 2.
        max_completion_length: Most tokens generated per completion; one that reaches it without ending is truncated.
        temperature: Sampling temperature; the loss's log-probabilities are of the same tempered distribution (as
            TRL's).
        top_p: Nucleus sampling: draw from the smallest set of tokens whose probabilities add up to top_p (1: all).
        top_k: Draw from the k likeliest tokens only; 0: no top-k filtering.
        mask_truncated_completions: Leave truncated completions out of the loss (DAPO): their unfinished answers get no
            credit or blame.
    """

    num_generations: int = 8
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    mask_truncated_completions: bool = False

    def check(self) -> None:
        if self.num_generations < 2:
            raise SmolFactoryError(
                f"model.sampling.num_generations must be >= 2 (advantages compare a prompt's completions), "
                f"got {self.num_generations}"
            )
        if self.max_completion_length < 1 or self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise SmolFactoryError(
                "model.sampling: max_completion_length >= 1, temperature > 0 and 0 < top_p <= 1 are needed, got "
                f"{self.max_completion_length}, {self.temperature}, {self.top_p}"
            )


class Rollout(NamedTuple):
    """Completions of a batch of prompts, scored: what the loss needs, for as many updates as reuse it."""

    prompt_ids: torch.Tensor
    """The batch's left-padded prompts ``[prompts, length]`` (to check that a reuse gets the same prompts)."""
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    """``[completions, tokens]``, a prompt's ``num_generations`` together, right-padded after their end."""
    completion_mask: torch.Tensor
    """The real tokens of each completion (up to its end)."""
    sequences: dict[str, torch.Tensor]
    """Prompt and completion of every completion, right-padded: ``input_ids``, ``labels`` (the trained completion
    tokens), ``attention_mask``."""
    mask: torch.Tensor
    """``[completions, tokens]``: the trained tokens of each completion."""
    advantages: torch.Tensor
    old_log_probs: torch.Tensor | None
    ref_log_probs: torch.Tensor | None
    scores: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """The rollout's metrics (rewards, lengths) as (total, count)."""
    samples: list[dict[str, Any]]
    """Each completion's prompt, text, reward and advantage (for logs)."""


class GRPOModule(RecipeModule):
    """Online RL from reward functions (GRPO and its variants) on a causal LM: LoRA adapters or every weight."""

    PROGRESS_BAR: ClassVar[frozenset[str]] = frozenset({"loss", "reward"})

    def __init__(
        self,
        rewards: list[Reward],
        loss: PolicyLoss = GRPOLoss(),  # noqa: B008 (frozen, so sharing is safe)
        sampling: SamplingSettings = SamplingSettings(),  # noqa: B008
        num_iterations: int = 1,
        scale_rewards: ScaleRewards = "group",
        optimizer: OptimizerCallable = GRPO_OPTIMIZER,  # noqa: B006 (never mutated)
        lr_scheduler: LRSchedulerCallable | None = WARMUP_COSINE,  # noqa: B006
        **kwargs: Any,
    ) -> None:
        """Sample completions of each prompt, score them, and make the better ones likelier.

        Args:
            rewards: Reward functions, each {function: import path, weight, arguments}: plain Python with TRL's
                signature (prompts, completions, **columns) -> list[float | None]; every dataset column reaches
                them. Shipped: smolfactory.rewards.exact_answer, math_equivalence, format_match, length_penalty.
            loss: smolfactory.model.policy_losses.GRPOLoss {loss_type: dapo, grpo, dr_grpo or bnpo, epsilon,
                epsilon_high, beta} or CISPOLoss {epsilon_high, beta}; beta > 0 adds a KL penalty to the reference
                (the model with its adapter switched off under LoRA).
            sampling: num_generations per prompt, max_completion_length, temperature, top_p, top_k,
                mask_truncated_completions.
            num_iterations: Optimizer steps per rollout (PPO's epochs, TRL's mu): later ones reuse its completions
                through importance ratios.
            scale_rewards: Divide advantages by the std of the prompt's group (group), of the micro-batch (batch),
                or not at all (none, Dr. GRPO).
            optimizer: Optimizer class path and arguments (see SFTModule); weight decay on matrices only.
            lr_scheduler: Learning-rate schedule class path, stepped every optimizer step; null keeps it constant.
            **kwargs: The model settings every recipe shares: model_name, lora, dtype, quantization, ...
        """
        rewards = [Reward(**reward) if isinstance(reward, dict) else reward for reward in rewards]
        if not rewards:
            raise SmolFactoryError(
                "model.rewards: give at least one reward function, e.g. smolfactory.rewards.exact_answer"
            )
        per_function = tuple(f"reward_{reward.name}{suffix}" for reward in rewards for suffix in ("", "_std"))
        # Before the base builds the epoch metrics: the rewards and the loss add their own.
        self.METRICS = ("loss", *ROLLOUT_METRICS, *per_function, *loss.metric_names)
        self.loss_count_name = loss.count_name
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, **kwargs)
        self.sampling = SamplingSettings(**sampling) if isinstance(sampling, dict) else sampling
        self.sampling.check()
        if num_iterations < 1:
            raise SmolFactoryError(f"model.num_iterations must be >= 1, got {num_iterations}")
        self.rewards, self.policy_loss = rewards, loss
        self.reward_functions = [reward.load(f"model.rewards[{i}]") for i, reward in enumerate(rewards)]
        # Plain values in hparams, so that checkpoints load with torch.load(weights_only=True).
        self.hparams.rewards = [dataclasses.asdict(reward) for reward in rewards]
        self.hparams.sampling = dataclasses.asdict(self.sampling)
        if not isinstance(self.hparams.loss, dict):
            self.hparams.loss = {"class_path": class_path(type(loss)), "init_args": dataclasses.asdict(loss)}
        self.reference_model: torch.nn.Module | None = None
        self.tokenizer = None
        self._rollouts: list[Rollout] = []
        self._micro_batch = 0
        self.latest_samples: list[dict[str, Any]] = []
        """The last rollout's completions with their prompt, reward and advantage (the samples callback logs them)."""

    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()
        self.tokenizer = load_tokenizer(self.hparams.model_name)
        if self.policy_loss.needs_reference:
            self.reference_model = load_reference(self, no_copy_fix="train LoRA, or set model.loss.beta: 0")

    # ---- rollouts -------------------------------------------------------------------------------------------

    @property
    def end_token_ids(self) -> list[int]:
        """The tokens that end a completion: the tokenizer's end of sequence and the model's generation ones."""
        ids = self.causal_lm.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        return sorted({self.tokenizer.eos_token_id, *ids} - {None})

    def generate_completions(self, batch: dict[str, Any]) -> torch.Tensor:
        """``num_generations`` sampled completions of every prompt, a prompt's together: ``[completions, tokens]``
        (the tokens after a completion's end are padding)."""
        sampling, repeats = self.sampling, self.sampling.num_generations
        input_ids = batch["input_ids"].repeat_interleave(repeats, dim=0)
        attention_mask = batch["attention_mask"].repeat_interleave(repeats, dim=0)
        training = self.model.training
        self.model.eval()  # the policy as it is, without dropout
        try:
            with torch.no_grad():
                generated = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    do_sample=True,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    top_k=sampling.top_k,
                    max_new_tokens=sampling.max_completion_length,
                    eos_token_id=self.end_token_ids,
                    pad_token_id=self.tokenizer.pad_token_id,
                    use_cache=True,
                )
        finally:
            self.model.train(training)
        return generated[:, input_ids.shape[1] :]

    def rollout(self, batch: dict[str, Any]) -> Rollout:
        """Generate completions of the batch's prompts, score them, and compute what every update needs."""
        repeats = self.sampling.num_generations
        completions = self.generate_completions(batch)
        is_end = torch.isin(completions, torch.tensor(self.end_token_ids, device=completions.device))
        ended = is_end.any(dim=1)
        lengths = torch.where(ended, is_end.int().argmax(dim=1) + 1, completions.shape[1])
        positions = torch.arange(completions.shape[1], device=completions.device)
        mask = positions[None, :] < lengths[:, None]
        if self.sampling.mask_truncated_completions:
            mask &= ended[:, None]
        prompts = [
            ids[keep.bool()].tolist() for ids, keep in zip(batch["input_ids"], batch["attention_mask"], strict=True)
        ]
        completion_ids = [row[:length].tolist() for row, length in zip(completions, lengths.tolist(), strict=True)]
        sequences = completion_sequences(prompts, completion_ids, mask, repeats, self.tokenizer.pad_token_id)
        sequences = {key: value.to(self.device) for key, value in sequences.items()}
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        rewards = self.score(batch, texts, completion_ids).to(self.device)
        weights = torch.tensor([reward.weight for reward in self.rewards], device=self.device)
        scores = group_advantages(rewards, weights, repeats, self.hparams.scale_rewards)
        metrics = rollout_metrics(rewards, scores, lengths.float(), ended, [reward.name for reward in self.rewards])
        samples = [
            {"prompt": batch["prompts"][i // repeats], "completion": text, "reward": reward, "advantage": advantage}
            for i, (text, reward, advantage) in enumerate(
                zip(texts, scores.rewards.tolist(), scores.advantages.tolist(), strict=True)
            )
        ]
        self.latest_samples = samples[:repeats] if not self.training else samples  # held-out: one prompt's group
        rollout = Rollout(
            batch["input_ids"],
            batch["attention_mask"],
            completions,
            (positions[None, :] < lengths[:, None]).long(),
            sequences,
            mask,
            scores.advantages,
            None,  # old and reference log-probabilities, below
            None,
            metrics,
            samples,
        )
        if self.hparams.num_iterations > 1:  # the policy that generated them, for the importance ratios of reuses
            with torch.no_grad():
                rollout = rollout._replace(old_log_probs=self.completion_log_probs(self.model, rollout)[0])
        if self.policy_loss.needs_reference:
            with reference_of(self.model, self.reference_model) as reference:
                rollout = rollout._replace(ref_log_probs=self.completion_log_probs(reference, rollout)[0])
        return rollout

    def score(self, batch: dict[str, Any], texts: list[str], completion_ids: list[list[int]]) -> torch.Tensor:
        """Every reward function's value for every completion, ``[completions, functions]``, NaN for None."""
        repeats = self.sampling.num_generations
        conversational = [batch["conversational"][i // repeats] for i in range(len(texts))]
        completions = [
            [{"role": "assistant", "content": text}] if chat else text
            for text, chat in zip(texts, conversational, strict=True)
        ]
        prompts = [prompt for prompt in batch["prompts"] for _ in range(repeats)]
        columns = {name: [v for v in values for _ in range(repeats)] for name, values in batch["columns"].items()}
        trainer = self.attached_trainer
        state = SimpleNamespace(
            global_step=trainer.global_step if trainer is not None else 0,
            max_steps=trainer.max_steps if trainer is not None else -1,
        )
        return score(self.reward_functions, prompts, completions, completion_ids, columns, trainer_state=state)

    def completion_log_probs(self, model: torch.nn.Module, rollout: Rollout) -> tuple[torch.Tensor, TokenLogProbs]:
        """log p of every trained completion token under ``model`` at the sampling temperature (the distribution
        the tokens were drawn from), ``[completions, tokens]`` (0 elsewhere), and the per-token diagnostics; the LM
        head runs only at those tokens."""
        if self.model_settings.gradient_checkpointing:  # no KV cache under checkpointing: prompt and completion
            hidden_states, labels = self.final_hidden_states(model, rollout.sequences), rollout.sequences["labels"]
        else:
            hidden_states, labels = self.shared_prompt_hidden_states(model, rollout)
        head = causal_lm_of(model).get_output_embeddings()
        tokens = label_token_log_probs(hidden_states, head, labels, temperature=self.sampling.temperature)
        per_token = torch.zeros(rollout.mask.shape, dtype=tokens.log_probs.dtype, device=rollout.mask.device)
        return per_token.masked_scatter(rollout.mask, tokens.log_probs), tokens

    def shared_prompt_hidden_states(
        self, model: torch.nn.Module, rollout: Rollout
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states that predict each completion token, ``[completions, 1 + tokens, hidden]``, and the
        labels they predict (the first column none), with every prompt run once for its whole group.

        The prompt runs first, its keys and values kept (a KV cache that carries gradients) and repeated for its
        ``num_generations`` completions, which then run after it: a group's prompt costs one forward and backward
        instead of ``num_generations`` of them. Its last hidden state predicts the first completion token.
        """
        repeats, prompt_mask = self.sampling.num_generations, rollout.prompt_mask
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        no_logits = torch.zeros(0, dtype=torch.long, device=prompt_mask.device)
        prompt = model(
            input_ids=rollout.prompt_ids,
            attention_mask=prompt_mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=no_logits,
            output_hidden_states=True,
        )
        # transformers renamed past_key_values to cache during 5.x: take whichever this version has
        cache_argument = (
            "cache" if "cache" in inspect.signature(causal_lm_of(model).forward).parameters else "past_key_values"
        )
        cache = getattr(prompt, cache_argument)
        cache.batch_repeat_interleave(repeats)
        completion_mask = rollout.completion_mask
        starts = prompt_mask.sum(-1).repeat_interleave(repeats)
        completion = model(
            input_ids=rollout.completion_ids,
            attention_mask=torch.cat([prompt_mask.repeat_interleave(repeats, dim=0), completion_mask], dim=1),
            position_ids=starts[:, None] + torch.arange(completion_mask.shape[1], device=starts.device),
            use_cache=True,
            logits_to_keep=no_logits,
            output_hidden_states=True,
            **{cache_argument: cache},
        )
        last_prompt_state = prompt.hidden_states[-1][:, -1:].repeat_interleave(repeats, dim=0)
        hidden_states = torch.cat([last_prompt_state, completion.hidden_states[-1]], dim=1)
        labels = torch.where(rollout.mask, rollout.completion_ids, IGNORE_INDEX)
        return hidden_states, torch.cat([torch.full_like(labels[:, :1], IGNORE_INDEX), labels], dim=1)

    # ---- the recipe's part ----------------------------------------------------------------------------------

    def batch_sums(self, rollout: Rollout) -> dict[str, Sum]:
        """The loss of a rollout's completions (differentiable) and the sums behind every metric."""
        log_probs, tokens = self.completion_log_probs(self.model, rollout)
        policy = PolicyTokens(
            log_probs,
            rollout.old_log_probs,
            rollout.ref_log_probs,
            rollout.advantages,
            rollout.mask,
            self.sampling.max_completion_length,
        )
        result = self.policy_loss(policy)
        entropy = Sum(tokens.entropy.sum(), rollout.mask.sum())
        scores = {name: Sum(*value) for name, value in rollout.scores.items()}
        return {"loss": result.loss, "entropy": entropy} | scores | result.metrics

    # ---- training: rollouts reused for num_iterations steps ------------------------------------------------

    def on_fit_start(self) -> None:
        if self.hparams.num_iterations == 1:
            return
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "repeat_batches"):
            raise SmolFactoryError("model.num_iterations > 1 needs the prompts of a PromptDataModule")
        datamodule.repeat_batches(group=self.trainer.accumulate_grad_batches, times=self.hparams.num_iterations)

    def on_train_start(self) -> None:
        super().on_train_start()
        self._micro_batch = 0

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Generate and score (the first of ``num_iterations`` steps) or reuse this micro-batch's rollout, then
        the loss."""
        index, self._micro_batch = self._micro_batch, self._micro_batch + 1
        if self.trainer.global_step % self.hparams.num_iterations == 0:
            del self._rollouts[index:]
            self._rollouts.append(self.rollout(batch))
        elif index >= len(self._rollouts) or not torch.equal(self._rollouts[index].prompt_ids, batch["input_ids"]):
            raise SmolFactoryError(
                "model.num_iterations: the loader did not hand the same prompts again for a rollout's reuse; use "
                "smolfactory.PromptDataModule"
            )
        return super().training_step(self._rollouts[index], batch_idx)

    def trained_batch(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The tokens the last training step ran through the model: each prompt once for its group, then the
        completions (``attention_mask``, one row), the trained completion tokens (``labels``), and, as that
        row is no sequence, the (query, key) pairs attention related (``attention_pairs``): each prompt's
        causal ones, and each completion's over its prompt and itself."""
        rollout = self._rollouts[self._micro_batch - 1 if self._micro_batch else -1]
        if self.model_settings.gradient_checkpointing:  # every completion after its own copy of the prompt
            return rollout.sequences
        ran = torch.cat([rollout.prompt_mask.flatten(), rollout.completion_mask.flatten()])
        labels = torch.where(rollout.mask, rollout.completion_ids, IGNORE_INDEX)
        prompts = rollout.prompt_mask.sum(-1)
        completions = rollout.completion_mask.sum(-1)
        pairs = (prompts * (prompts + 1) // 2).sum()
        pairs += (completions * prompts.repeat_interleave(self.sampling.num_generations)).sum()
        pairs += (completions * (completions + 1) // 2).sum()
        return {
            "attention_mask": ran[None, :],
            "labels": torch.nn.functional.pad(labels, (1, 0), value=IGNORE_INDEX),
            "attention_pairs": pairs,
        }

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        self._micro_batch = 0

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        super().validation_step(self.rollout(batch), batch_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        super().test_step(self.rollout(batch), batch_idx)

    # ---- checkpoints: the rollouts later steps reuse -------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.hparams.num_iterations > 1:
            checkpoint["rollouts"] = [rollout._asdict() for rollout in self._rollouts]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._rollouts = [Rollout(**saved) for saved in checkpoint.get("rollouts", [])]


def completion_sequences(
    prompts: list[list[int]], completions: list[list[int]], mask: torch.Tensor, repeats: int, pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Each completion after its prompt, right-padded (no padding inside a sequence: positions count from its
    first token, as when it was generated); labels on the completion's trained tokens."""
    examples = []
    for index, (completion, trained) in enumerate(zip(completions, mask.tolist(), strict=True)):
        prompt = prompts[index // repeats]
        labels = [token if keep else IGNORE_INDEX for token, keep in zip(completion, trained, strict=False)]
        examples.append({"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + labels})
    return pad_collate(examples, pad_token_id)


def rollout_metrics(
    rewards: torch.Tensor, scores: Any, lengths: torch.Tensor, ended: torch.Tensor, names: list[str]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The rollout's rewards and completion lengths as (total, count): means over completions, or one value per
    micro-batch (stds, extremes) averaged over the step."""
    one = torch.ones((), device=rewards.device)
    count = torch.tensor(float(lengths.numel()), device=rewards.device)

    def mean(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        valid = ~torch.isnan(values)
        return values[valid].sum(), valid.sum().float()

    metrics = {
        "reward": mean(scores.rewards),
        "reward_std": (nan_to_zero(nanstd(scores.rewards)), one),
        "frac_reward_zero_std": (scores.is_std_zero.float().sum(), count),
        "completion_length": (lengths.sum(), count),
        "completion_length_min": (lengths.min(), one),
        "completion_length_max": (lengths.max(), one),
        "clipped_ratio": ((~ended).float().sum(), count),
        "terminated_length": (lengths[ended].sum(), ended.float().sum()),
    }
    for index, name in enumerate(names):
        metrics[f"reward_{name}"] = mean(rewards[:, index])
        metrics[f"reward_{name}_std"] = (nan_to_zero(nanstd(rewards[:, index])), one)
    return metrics
