"""TRL 1.16's GRPOTrainer on the tiny test model, as the reference for smolfactory's GRPO loss, advantages and metrics.

``grpo_trainer`` builds a real ``trl.GRPOTrainer`` (CPU, fp32, no vLLM, no LoRA) offline on a model folder;
``trl_loss`` runs its ``_compute_loss`` on fixed inputs, ``trl_logps`` its forward (log-probs and entropies), and
``trl_scores`` its ``_generate_and_score_completions`` with fixed completions and fixed rewards. TRL's code does all
the computing; this module only feeds it and reads back what it returned and logged.

TRL 1.16's formulas (trl/trainer/grpo_trainer.py), for reference
=================================================================

Notation: one micro-batch of B completions, T completion positions (right-padded), ``mask`` the completion mask
(B, T) (``completion_mask``; it is 0 after the first EOS and, with ``mask_truncated_completions``, 0 on a whole
truncated completion), ``logp`` the policy's per-token log-probs (with the logits divided by ``temperature``,
default 1.0), ``old`` = ``old_per_token_logps`` if given else ``logp.detach()``, ``A`` the advantages (B, 1).

Ratio (``importance_sampling_level="token"``, the default)::

    coef_1 = exp(logp - old)
    coef_2 = clamp(coef_1, 1 - epsilon, 1 + epsilon_high)          # epsilon_high defaults to epsilon
    per_token_loss = -min(coef_1 * A, coef_2 * A)                  # grpo, bnpo, dr_grpo, dapo
    per_token_loss = -clamp(coef_1, max=epsilon_high).detach() * A * logp        # cispo (epsilon_high is eps_max)

(``delta`` None by default; set, it clamps coef_1 at max=delta in the first term. Off by default and left out here:
``top_entropy_quantile`` < 1, ``off_policy_mask_threshold``, ``entropy_coef``, vLLM importance sampling, the
sapo/luspo/vespo losses, ``importance_sampling_level="sequence"``.)

KL (only when ``beta != 0``; ``ref`` = ``ref_per_token_logps``, the k3 estimator of KL(pi || ref))::

    per_token_kl = exp(ref - logp) - (ref - logp) - 1
    per_token_kl = per_token_kl * coef_1            # use_bias_correction_kl, True by default in 1.16 (not detached:
                                                    # its gradient counts even where coef_1 == 1, i.e. no old logps)
    per_token_loss = per_token_loss + beta * per_token_kl                      # after the clipping, for every type

The ``kl`` metric is of the corrected ``per_token_kl``.

Normalisation (``gas`` = ``current_gradient_accumulation_steps``, which the training loop sets to the number of
micro-batches in the current optimizer step: ``gradient_accumulation_steps``; in eval mode gas = 1)::

    grpo:    mean_b( sum_t(per_token_loss * mask)[b] / clamp(sum_t mask[b], min=1) ) / gas
    bnpo:    sum(per_token_loss * mask) / clamp(sum(mask), min=1) / gas                      (this micro-batch)
    dr_grpo: sum(per_token_loss * mask) / (B * max_completion_length) / gas
    dapo, cispo: sum(per_token_loss * mask) / N,
             N = clamp(num_items_in_batch, min=1) / num_processes * gas / steps_per_generation

``num_items_in_batch`` is the number of loss tokens (sum of the masks, all processes) of the whole *generation*
batch, which ``_generate_and_score_completions`` puts in every micro-batch; with the default
``steps_per_generation = gradient_accumulation_steps`` and one process, N is just that total, so dapo/cispo divide
the micro-batch's token-loss sum by the token count of the optimizer step's whole batch.

Logged metrics of the loss (``_metrics["train"]``), ``masked_mean(x) = sum(x * mask) / clamp(sum(mask), min=1)``
over the micro-batch (all processes)::

    kl       = masked_mean(per_token_kl)                             (beta != 0 only)
    entropy  = masked_mean(entropies)                                (always; entropy of softmax(logits / T))
    clip_ratio/low_mean    = masked_mean((coef_1 < 1 - epsilon) & (A < 0))          (grpo, bnpo, dr_grpo, dapo)
    clip_ratio/high_mean   = masked_mean((coef_1 > 1 + epsilon_high) & (A > 0))
    clip_ratio/region_mean = masked_mean(low | high)
    clip_ratio/low_min     = nanmin over sequences of sum_t(low * mask) / sum_t(mask)    (NaN for an all-0 mask row:
    clip_ratio/high_max    = nanmax over sequences of sum_t(high * mask) / sum_t(mask)    no clamp here, nan skipped)
    cispo_clip_ratio       = masked_mean((coef_1 > epsilon_high) & (A > 0))            (cispo only)

Advantages (``multi_objective_aggregation="sum_then_normalize"``, the default; G = ``num_generations``; groups are
G consecutive rows, TRL's sampler repeats each prompt G times in a row)::

    r_ij = reward of function j for completion i; None -> NaN
    reward_i = nansum_j(w_j * r_ij)      (a None from some of the functions counts as 0 here)
    reward_i = NaN if every r_ij is NaN  ("unscorable")
    mean_i = nanmean of reward over i's group
    std_i  = nanstd over i's group       (scale_rewards "group" or "none"; 0 if G == 1)
           = nanstd over the whole batch (scale_rewards "batch")
    A_i = reward_i - mean_i, then / (std_i + 1e-4) unless scale_rewards == "none"
    A_i = nan_to_num(A_i, nan=0.0)                                   (unscorable completions get advantage 0)

``nanstd`` is the Bessel-corrected (n - 1) standard deviation over the non-NaN values (NaN when fewer than two).
Logged: ``rewards/<func>/mean`` = nanmean_i r_ij, ``rewards/<func>/std`` = nanstd_i r_ij, ``reward`` =
nanmean_i reward_i, ``reward_std`` = nanstd_i reward_i (reward_i as above, NaN when unscorable),
``frac_reward_zero_std`` = mean_i isclose(std_i, 0) (per completion, with the std used for scaling: group or batch).
Completion lengths (``len(completion_ids)``: up to and including the first EOS, no padding; masked-out truncated
completions count with their length): ``completions/mean_length``, ``min_length``, ``max_length``;
``completions/clipped_ratio`` = fraction whose last id is neither an EOS nor the pad token (truncated at
``max_completion_length``); ``completions/mean_terminated_length``, ``min_terminated_length``,
``max_terminated_length`` over the others (all three 0.0 when every completion was truncated); ``num_tokens`` =
``state.num_input_tokens_seen`` after adding every prompt and completion token of the batch (``trl_scores`` resets
it to 0 first, so it is this batch's prompt + completion tokens).

Forward (``_get_per_token_logps_and_entropies``): TRL concatenates the left-padded ``prompt_ids`` and right-padded
``completion_ids`` and calls ``model(input_ids=..., attention_mask=..., labels=..., fused_lm_head=True)``: the
attention mask only, no ``position_ids``. Llama (transformers 5) then uses positions ``0 .. P+C-1`` for every row,
so a prompt with k pad tokens on the left starts at position k, not 0; unlike ``generate``, which derives positions
from the attention mask. Rotary embeddings depend only on position differences, so for this Llama (sdpa) the
log-probs of a left-padded row equal those of the same tokens unpadded up to float rounding: measured on the tiny
model, fp32 CPU, prompts left-padded by 15 tokens: against the same rows unpadded (positions from 0), log-probs
(around -9 to -12) differ by at most 1.9e-6 and entropies by 9.5e-7; against the right-aligned layout (prompt,
completion, then right padding, one row per sequence) both by at most 9.5e-7. So: equal to ~2e-6, not bit-identical;
compare to 1e-5 (tests/test_trl_grpo_reference.py checks these against ``PADDING_LOGP_DIFF`` = 1e-5). ``logp`` and
entropy are 0 on positions whose ``completion_mask`` is 0 (TRL's labels are -100 there, and the fused head scatters
only the labelled positions).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Give me a tip for sleeping well."}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "2 + 2?"}],
    [{"role": "user", "content": "Who are you?"}],
]

# What trl_loss reads back from _metrics["train"] (those a loss type logs: kl only with beta != 0, clip_ratio/* for
# grpo, bnpo, dr_grpo and dapo, cispo_clip_ratio for cispo).
LOSS_METRICS = (
    "kl",
    "entropy",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "clip_ratio/low_min",
    "clip_ratio/high_max",
    "cispo_clip_ratio",
)

# Everything _generate_and_score_completions logs without tools or vLLM, besides rewards/<name>/mean and /std.
SCORE_METRICS = (
    "num_tokens",
    "completions/mean_length",
    "completions/min_length",
    "completions/max_length",
    "completions/clipped_ratio",
    "completions/mean_terminated_length",
    "completions/min_terminated_length",
    "completions/max_terminated_length",
    "reward",
    "reward_std",
    "frac_reward_zero_std",
)

# Bound on |difference| between TRL's log-probs (and entropies) of a left-padded prompt and those of the same sequence
# unpadded or right-aligned (measured: at most 1.9e-6, see the module docstring); tests/test_trl_grpo_reference.py
# checks it.
PADDING_LOGP_DIFF = 1e-5


def dummy_reward(completions, **kwargs) -> list[float]:
    """The reward function the trainer is built with (``trl_scores`` swaps in its own fixed ones)."""
    return [0.0 for _ in completions]


def grpo_trainer(model_dir: str, tmp_path: Path, **config):
    """A real ``trl.GRPOTrainer`` on the model folder ``model_dir``: CPU, fp32, no vLLM, no LoRA, no reporting, the
    four conversational ``PROMPTS`` as its dataset and ``dummy_reward``. ``config`` overrides ``GRPOConfig`` keys
    (loss_type, beta, epsilon, epsilon_high, scale_rewards, num_generations, max_completion_length,
    mask_truncated_completions, num_iterations, per_device_train_batch_size, gradient_accumulation_steps, ...);
    the defaults here are num_generations=4, per_device_train_batch_size=4, max_completion_length=8. With
    beta != 0 TRL loads its reference model from ``model_dir`` too."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    settings = {
        "output_dir": str(tmp_path / "grpo"),
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        "use_vllm": False,
        "report_to": [],
        "gradient_checkpointing": False,
        "num_generations": 4,
        "per_device_train_batch_size": 4,
        "max_completion_length": 8,
        "logging_steps": 1,
        "save_strategy": "no",
        "seed": 0,
        **config,
    }
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return GRPOTrainer(
        model=model,
        reward_funcs=dummy_reward,
        args=GRPOConfig(**settings),
        train_dataset=datasets.Dataset.from_list([{"prompt": prompt} for prompt in PROMPTS]),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )


def _as_tensors(inputs: dict) -> dict:
    """``inputs`` without None values, with numbers and lists as tensors (TRL indexes, masks and clamps them); other
    values (``trl_scores``' ``metrics``) pass through, unread by TRL."""
    out = {}
    for key, value in inputs.items():
        if value is not None:
            out[key] = torch.tensor(value) if isinstance(value, (int, float, list)) else value
    if "advantages" in out:
        out["advantages"] = out["advantages"].float()
    if "num_items_in_batch" not in out:
        out["num_items_in_batch"] = out["completion_mask"].sum()
    return out


def trl_loss(trainer, inputs: dict) -> tuple[float, dict[str, float]]:
    """TRL's ``_compute_loss(model, inputs)`` in train mode, as for one micro-batch of an optimizer step of
    ``args.gradient_accumulation_steps`` micro-batches: the loss value and the metrics it logged (``LOSS_METRICS``
    that this loss type logs, each the value appended by this call).

    ``inputs`` holds TRL's keys: prompt_ids and prompt_mask (B, P: TRL left-pads prompts), completion_ids and
    completion_mask (B, T, right-padded), advantages (B,), old_per_token_logps (B, T; optional: without it TRL uses
    the policy's own detached log-probs, ratio 1), ref_per_token_logps (B, T; needed when beta != 0) and
    num_items_in_batch (the loss tokens of the whole generation batch; defaults here to this completion_mask's sum,
    i.e. the micro-batch is the whole generation batch). Lists and ints are turned into tensors.

    What is set up: the model in train mode (TRL picks "train" from ``model.training``) and
    ``current_gradient_accumulation_steps = args.gradient_accumulation_steps``, which the Trainer's loop sets
    before each step and grpo/bnpo/dr_grpo divide by (dapo/cispo scale ``num_items_in_batch`` by
    ``gas / steps_per_generation``, 1 by default)."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    metrics = trainer._metrics["train"]
    metrics.clear()
    loss = trainer._compute_loss(trainer.model, _as_tensors(inputs))
    return loss.item(), {name: metrics[name][-1] for name in LOSS_METRICS if metrics.get(name)}


def trl_logps(trainer, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's per-token log-probs and entropies (B, T) of ``inputs``' completions (the keys of ``trl_loss``) under
    the trainer's model, from ``_get_per_token_logps_and_entropies`` as ``_compute_loss`` calls it (prompt and
    completion concatenated, the attention mask only, the logits divided by ``args.temperature``). Both are 0 where
    completion_mask is 0."""
    inputs = _as_tensors(inputs)
    trainer.model.train()
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention_mask, inputs["completion_ids"].size(1), compute_entropy=True
        )
    return logps, entropies


def _fixed_reward(column: int, table: list[list[float | None]]):
    """A reward function returning ``table[row][column]`` for each completion, keyed by the ``row`` column
    ``trl_scores`` puts in its inputs (TRL passes dataset columns to reward functions as keyword lists)."""

    def reward(prompts, completions, completion_ids, row, **kwargs) -> list[float | None]:
        return [table[index][column] for index in row]

    reward.__name__ = f"reward_{column}"
    return reward


@contextlib.contextmanager
def _settings(trainer, **attributes):
    saved = {name: getattr(trainer, name) for name in attributes}
    for name, value in attributes.items():
        setattr(trainer, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(trainer, name, value)


def trl_scores(
    trainer,
    prompts: list,
    completion_ids: list[list[int]],
    rewards_per_func: list[list[float | None]],
    reward_weights: list[float] | None = None,
    scale_rewards: str = "group",
    mask_truncated_completions: bool = False,
) -> dict:
    """TRL's real ``_generate_and_score_completions`` on ``prompts`` (each repeated ``num_generations`` times in a
    row, as TRL's sampler orders them: completion i answers ``prompts[i // num_generations]``), with fixed
    completions and rewards.

    ``completion_ids[i]`` are the generated ids of completion i (at most ``max_completion_length``; they may end
    with, or go on after, an EOS). The only thing patched is the model's ``generate``: it returns the left-padded
    prompts TRL gave it followed by these ids (right-padded with the pad token), so TRL's own code cuts each
    completion after its first EOS, pads, masks and measures it. ``rewards_per_func[i][j]`` is the reward of function
    j for completion i (None: the function gives no reward); real reward functions named ``reward_<j>`` return these
    values, in place of the trainer's reward functions for this call, with ``reward_weights`` (default all 1),
    ``scale_rewards`` and ``mask_truncated_completions`` set as GRPOTrainer's ``__init__`` sets them from its config.

    Returns TRL's output tensors (prompt_ids, prompt_mask, completion_ids, completion_mask, advantages,
    num_items_in_batch, and old_per_token_logps / ref_per_token_logps when TRL computes them) and ``metrics``: every
    value this call logged (``SCORE_METRICS`` and ``rewards/reward_<j>/mean`` and ``/std``), each the last appended.
    ``state.num_input_tokens_seen`` is reset to 0 first, so ``num_tokens`` counts this batch only."""
    generations = trainer.num_generations
    if len(completion_ids) != len(prompts) * generations or len(rewards_per_func) != len(completion_ids):
        raise ValueError("need one completion and one row of rewards for each of num_generations copies of a prompt")
    eos = set(trainer.eos_token_ids)
    for ids in completion_ids:
        # generate() stops a row early only at an EOS: one without EOS was cut at max_completion_length.
        if len(ids) > trainer.max_completion_length or (
            not eos & set(ids) and len(ids) < trainer.max_completion_length
        ):
            raise ValueError(f"{ids}: a completion without EOS has max_completion_length ids, and none has more")
    n_funcs = len(rewards_per_func[0])
    funcs = [_fixed_reward(j, rewards_per_func) for j in range(n_funcs)]
    weights = torch.ones(n_funcs) if reward_weights is None else torch.tensor(reward_weights, dtype=torch.float32)
    pad = trainer.processing_class.pad_token_id
    width = max(len(ids) for ids in completion_ids)
    completions = torch.tensor([ids + [pad] * (width - len(ids)) for ids in completion_ids])
    model = trainer.model

    def generate(input_ids, **kwargs):
        if input_ids.size(0) != completions.size(0):
            raise ValueError(f"TRL generated for {input_ids.size(0)} prompts, {completions.size(0)} expected")
        return torch.cat([input_ids, completions.to(input_ids.device)], dim=1)

    inputs = [
        {"prompt": prompt, "row": i * generations + g} for i, prompt in enumerate(prompts) for g in range(generations)
    ]
    model.train()
    trainer.state.num_input_tokens_seen = 0
    metrics = trainer._metrics["train"]
    metrics.clear()
    with _settings(
        trainer,
        reward_funcs=funcs,
        reward_func_names=[func.__name__ for func in funcs],
        reward_processing_classes=[None] * n_funcs,
        reward_weights=weights,
        scale_rewards=scale_rewards,
        mask_truncated_completions=mask_truncated_completions,
    ):
        model.generate = generate
        try:
            output = trainer._generate_and_score_completions(inputs)
        finally:
            del model.generate
    return {**output, "metrics": {name: values[-1] for name, values in metrics.items() if values}}
