"""Self-check of tests/trl_grpo_reference.py: TRL's GRPOTrainer runs on fixed completions, rewards and log-probs,
and gives numbers that can be checked by hand."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from tests.trl_grpo_reference import PADDING_LOGP_DIFF, PROMPTS, grpo_trainer, trl_logps, trl_loss, trl_scores

pytestmark = pytest.mark.slow

EOS = 2  # SmolLM2's <|im_end|>, also its pad token
# Two prompts, four generations each (the trainer's defaults: num_generations=4, max_completion_length=8).
COMPLETIONS = [
    [10, 11, EOS],
    [12, EOS, 13, 14],  # goes on after its EOS: TRL cuts it there
    [15, 16, 17, 18, 19, 20, 21, 22],  # no EOS: truncated at max_completion_length
    [EOS],
    [30, 31, 32, EOS],
    [33, EOS],
    [34, 35, 36, 37, 38, 39, 40, EOS],
    [36, 37, 38, EOS],
]
LENGTHS = [3, 2, 8, 1, 4, 2, 8, 4]
TWO_PROMPTS = [PROMPTS[0], PROMPTS[2]]


@pytest.fixture(scope="module")
def trainer(tiny_model_dir, tmp_path_factory):
    built = {}

    def get(**config):
        key = tuple(sorted(config.items()))
        if key not in built:
            built[key] = grpo_trainer(tiny_model_dir, tmp_path_factory.mktemp("grpo"), **config)
        return built[key]

    return get


def masks(lengths: list[int], width: int = 8) -> torch.Tensor:
    return torch.tensor([[1] * n + [0] * (width - n) for n in lengths])


def test_scores_without_scaling_one_none_reward_one_truncated(trainer):
    grpo = trainer(beta=0.04)
    rewards = [[1.0], [0.0], [0.0], [0.0], [1.0], [None], [0.5], [0.2]]
    out = trl_scores(grpo, TWO_PROMPTS, COMPLETIONS, rewards, scale_rewards="none")

    # reward - group mean; the None reward is left out of its group's mean and gets advantage 0
    expected = [0.75, -0.25, -0.25, -0.25, 1 - 1.7 / 3, 0.0, 0.5 - 1.7 / 3, 0.2 - 1.7 / 3]
    torch.testing.assert_close(out["advantages"], torch.tensor(expected), atol=1e-6, rtol=0)
    assert torch.equal(out["completion_mask"], masks(LENGTHS))  # zero after the first EOS
    assert out["completion_ids"][1].tolist() == [12, EOS] + [EOS] * 6
    assert out["num_items_in_batch"].item() == sum(LENGTHS)
    # beta != 0: TRL's reference model (loaded from the same folder) gives the policy's own log-probs
    logps, _ = trl_logps(grpo, out)
    torch.testing.assert_close(out["ref_per_token_logps"], logps, atol=1e-5, rtol=0)

    metrics = out["metrics"]
    terminated = [n for i, n in enumerate(LENGTHS) if i != 2]
    prompt_tokens = 4 * int(out["prompt_mask"][0].sum() + out["prompt_mask"][4].sum())
    assert metrics == pytest.approx(
        {
            "num_tokens": prompt_tokens + sum(LENGTHS),
            "completions/mean_length": sum(LENGTHS) / 8,
            "completions/min_length": 1.0,
            "completions/max_length": 8.0,
            "completions/clipped_ratio": 1 / 8,
            "completions/mean_terminated_length": sum(terminated) / 7,
            "completions/min_terminated_length": 1.0,
            "completions/max_terminated_length": 8.0,
            "rewards/reward_0/mean": 2.7 / 7,
            "rewards/reward_0/std": statistics.stdev([1, 0, 0, 0, 1, 0.5, 0.2]),
            "reward": 2.7 / 7,
            "reward_std": statistics.stdev([1, 0, 0, 0, 1, 0.5, 0.2]),
            "frac_reward_zero_std": 0.0,
        },
        abs=1e-6,
    )


def test_scores_group_scaling_weights_and_masked_truncation(trainer):
    grpo = trainer()
    # two reward functions, weights 1 and 0.5; a None from one function counts as 0 in the weighted sum
    rewards = [[1.0, 0.0], [0.0, None], [0.0, 0.0], [0.0, 1.0]] + [[2.0, 0.0]] * 4
    out = trl_scores(grpo, TWO_PROMPTS, COMPLETIONS, rewards, [1.0, 0.5], "group", mask_truncated_completions=True)

    summed = [1.0, 0.0, 0.0, 0.5]
    mean, std = statistics.mean(summed), statistics.stdev(summed)
    expected = [(r - mean) / (std + 1e-4) for r in summed] + [0.0] * 4  # second group: all 2, std 0
    torch.testing.assert_close(out["advantages"], torch.tensor(expected), atol=1e-5, rtol=0)
    # the truncated completion is masked out entirely and does not count in num_items_in_batch
    assert torch.equal(out["completion_mask"], masks([0 if i == 2 else n for i, n in enumerate(LENGTHS)]))
    assert out["num_items_in_batch"].item() == sum(LENGTHS) - 8
    metrics = out["metrics"]
    assert metrics["frac_reward_zero_std"] == 0.5
    assert metrics["rewards/reward_0/mean"] == pytest.approx(9 / 8)
    assert metrics["rewards/reward_1/mean"] == pytest.approx(1 / 7)
    assert metrics["reward"] == pytest.approx((1.5 + 8) / 8)
    assert metrics["completions/clipped_ratio"] == 1 / 8  # logged lengths still count the masked completion
    assert "old_per_token_logps" not in out  # one iteration, generation every optimizer step: TRL skips it


def test_scores_batch_scaling(trainer):
    out = trl_scores(trainer(), TWO_PROMPTS, COMPLETIONS, [[1.0]] + [[0.0]] * 7, scale_rewards="batch")
    std = statistics.stdev([1.0] + [0.0] * 7)  # over the whole batch
    expected = [0.75 / (std + 1e-4)] + [-0.25 / (std + 1e-4)] * 3 + [0.0] * 4
    torch.testing.assert_close(out["advantages"], torch.tensor(expected), atol=1e-5, rtol=0)
    assert out["metrics"]["frac_reward_zero_std"] == 0.0


def batch_inputs(grpo) -> dict:
    """TRL's own inputs for COMPLETIONS (left-padded prompts), before advantages and log-probs are set."""
    out = trl_scores(grpo, TWO_PROMPTS, COMPLETIONS, [[0.0]] * 8)
    return {key: out[key] for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}


def test_dapo_loss_with_zero_advantages_is_zero(trainer):
    grpo = trainer(loss_type="dapo")
    inputs = batch_inputs(grpo) | {"advantages": torch.zeros(8)}
    loss, metrics = trl_loss(grpo, inputs)
    _, entropies = trl_logps(grpo, inputs)
    mask = inputs["completion_mask"]
    assert loss == 0.0
    assert metrics == pytest.approx(
        {
            "entropy": ((entropies * mask).sum() / mask.sum()).item(),
            "clip_ratio/low_mean": 0.0,
            "clip_ratio/high_mean": 0.0,
            "clip_ratio/region_mean": 0.0,
            "clip_ratio/low_min": 0.0,
            "clip_ratio/high_max": 0.0,
        }
    )  # no kl with beta 0


@pytest.mark.parametrize("bias_correction", [True, False])
def test_grpo_loss_clipping_kl_and_accumulation(trainer, bias_correction):
    grpo = trainer(loss_type="grpo", beta=0.04, gradient_accumulation_steps=2, use_bias_correction_kl=bias_correction)
    inputs = batch_inputs(grpo)
    logps, _ = trl_logps(grpo, inputs)
    mask = inputs["completion_mask"]
    inputs |= {
        "advantages": torch.tensor([1.0] * 4 + [-1.0] * 4),
        "old_per_token_logps": logps - 0.5,  # ratio e^0.5 > 1.2 everywhere: clipped where the advantage is > 0
        "ref_per_token_logps": logps + 0.1,
    }
    loss, metrics = trl_loss(grpo, inputs)
    # k3 estimator, times the ratio with use_bias_correction_kl (TRL's default)
    kl = (math.exp(0.1) - 0.1 - 1) * (math.exp(0.5) if bias_correction else 1.0)
    # per sequence: -min(r A, clip(r) A) + beta kl; mean over sequences; / 2 accumulation steps
    assert loss == pytest.approx(((-1.2 + math.exp(0.5)) / 2 + 0.04 * kl) / 2, abs=1e-6)
    high = mask[:4].sum().item() / mask.sum().item()
    assert metrics["kl"] == pytest.approx(kl, abs=1e-6)
    assert metrics["clip_ratio/high_mean"] == pytest.approx(high)
    assert metrics["clip_ratio/region_mean"] == pytest.approx(high)
    assert metrics["clip_ratio/high_max"] == 1.0
    assert metrics["clip_ratio/low_mean"] == metrics["clip_ratio/low_min"] == 0.0


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo", "dr_grpo"])
def test_normalisations_with_accumulation(trainer, loss_type):
    grpo = trainer(loss_type=loss_type, gradient_accumulation_steps=2)
    inputs = batch_inputs(grpo) | {"advantages": torch.ones(8)}  # ratio 1, beta 0: -1 per token
    tokens = inputs["completion_mask"].sum().item()
    inputs["num_items_in_batch"] = 2 * tokens  # this micro-batch is half of the generation batch's tokens
    expected = {"dapo": -tokens / (2 * tokens), "bnpo": -1 / 2, "dr_grpo": -tokens / (8 * 8) / 2}[loss_type]
    assert trl_loss(grpo, inputs)[0] == pytest.approx(expected, abs=1e-6)


def test_cispo_loss_clips_the_ratio(trainer):
    grpo = trainer(loss_type="cispo", epsilon_high=5.0)
    inputs = batch_inputs(grpo)
    logps, _ = trl_logps(grpo, inputs)
    mask = inputs["completion_mask"]
    inputs |= {"advantages": torch.ones(8), "old_per_token_logps": logps - 2.0}  # ratio e^2 > 5
    loss, metrics = trl_loss(grpo, inputs)
    assert loss == pytest.approx((-5.0 * logps * mask).sum().item() / mask.sum().item(), rel=1e-5)
    assert metrics["cispo_clip_ratio"] == 1.0
    assert "clip_ratio/low_mean" not in metrics


def test_left_padded_log_probs_equal_unpadded_and_right_aligned(trainer):
    grpo = trainer()
    inputs = batch_inputs(grpo)
    logps, entropies = trl_logps(grpo, inputs)
    prompt_lengths = inputs["prompt_mask"].sum(1).tolist()
    pads = len(inputs["prompt_mask"][0]) - prompt_lengths[4]
    assert pads > 0 and prompt_lengths[:4] == [prompt_lengths[0]] * 4  # the second prompt is left-padded
    prompts = [ids[mask.bool()] for ids, mask in zip(inputs["prompt_ids"], inputs["prompt_mask"], strict=True)]

    # The second prompt's completions, without the padding (positions from 0).
    unpadded = {key: inputs[key][4:] for key in ("completion_ids", "completion_mask")}
    unpadded |= {"prompt_ids": inputs["prompt_ids"][4:, pads:], "prompt_mask": inputs["prompt_mask"][4:, pads:]}
    unpadded_logps, unpadded_entropies = trl_logps(grpo, unpadded)

    # Right-aligned: each row is prompt, completion, then padding. TRL's forward with the first token as the
    # "prompt" scores every later position; keep the completions'.
    sequences = [
        torch.cat([prompt, ids[:n]]) for prompt, ids, n in zip(prompts, inputs["completion_ids"], LENGTHS, strict=True)
    ]
    width = max(len(ids) for ids in sequences)
    right = {
        "prompt_ids": torch.stack([ids[:1] for ids in sequences]),
        "prompt_mask": torch.ones(8, 1, dtype=torch.long),
        "completion_ids": torch.stack(
            [torch.cat([ids[1:], ids.new_full((width - len(ids),), EOS)]) for ids in sequences]
        ),
        "completion_mask": masks([len(ids) - 1 for ids in sequences], width - 1),
    }
    right_logps, right_entropies = trl_logps(grpo, right)

    mask = inputs["completion_mask"].bool()
    for i, (prompt, n) in enumerate(zip(prompts, LENGTHS, strict=True)):
        completion = slice(len(prompt) - 1, len(prompt) - 1 + n)
        assert (logps[i, :n] - right_logps[i, completion]).abs().max() <= PADDING_LOGP_DIFF
        assert (entropies[i, :n] - right_entropies[i, completion]).abs().max() <= PADDING_LOGP_DIFF
    assert (logps[4:] - unpadded_logps)[mask[4:]].abs().max() <= PADDING_LOGP_DIFF
    assert (entropies[4:] - unpadded_entropies)[mask[4:]].abs().max() <= PADDING_LOGP_DIFF
