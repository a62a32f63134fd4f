"""GRPOModule against TRL 1.16's GRPOTrainer: the same fixed completions, rewards and old log-probabilities give
the same advantages, loss and metrics, to 1e-5.

TRL's real code runs through tests/trl_grpo_reference.py. Three levels:

* scores: ``group_advantages`` and ``rollout_metrics`` against ``_generate_and_score_completions`` (every
  scale_rewards, a truncated completion masked or not, two weighted reward functions, None rewards);
* losses: every loss type, with and without KL, on TRL's own log-probs (ratios on both sides of the clip range,
  advantages of both signs), one micro-batch and two accumulated ones (totals and counts summed, divided once);
* end to end (slow): ``GRPOModule.rollout`` and ``batch_sums`` on the same weights as TRL's model, with only the
  sampling replaced by the fixed completions: advantages, reference log-probs, metrics, loss and its gradient.

Runs when TRL is installed (the ``dev`` and ``bench`` extras).
"""

from __future__ import annotations

import math

import pytest
import torch

from smolfactory.model.grpo import GRPOModule, SamplingSettings, rollout_metrics
from smolfactory.model.policy_losses import CISPOLoss, GRPOLoss, PolicyLoss, PolicyTokens, group_advantages
from smolfactory.model.recipe import Sum
from smolfactory.rewards import Reward
from tests.trl_grpo_reference import PROMPTS, grpo_trainer, trl_logps, trl_loss, trl_scores

trl = pytest.importorskip("trl")

TOLERANCE = 1e-5
EOS = 2  # SmolLM2's <|im_end|>, also its pad token
MAX_COMPLETION_LENGTH = 8
GENERATIONS = 4
TWO_PROMPTS = [PROMPTS[0], PROMPTS[2]]
# Two prompts, four generations each: one goes on after its EOS, two are truncated at max_completion_length.
COMPLETIONS = [
    [10, 11, EOS],
    [12, EOS, 13, 14],
    [15, 16, 17, 18, 19, 20, 21, 22],  # no EOS: truncated
    [EOS],
    [30, 31, 32, EOS],
    [33, EOS],
    [34, 35, 36, 37, 38, 39, 40, 41],  # no EOS: truncated
    [36, 37, 38, 42, 43, EOS],
]
# Rewards of two functions (weights 1 and 0.5): None from one function, a completion no function scores.
MIXED = [[1.0, 0.0], [0.0, None], [0.25, 1.0], [0.0, 0.0], [2.0, 1.0], [None, None], [0.5, -1.0], [1.5, 0.5]]
# The second group's rewards all agree (std 0: advantages 0 under group scaling).
AGREEING = [[1.0, 0.5], [0.0, 1.0], [None, 0.0], [0.5, 0.5]] + [[1.0, 1.0]] * 4
REWARD_TABLES = {"mixed": MIXED, "agreeing": AGREEING}
WEIGHTS = [1.0, 0.5]
# Advantages of both signs (and one 0) for the loss checks on fixed inputs.
ADVANTAGES = [1.2, -0.7, 0.3, -1.5, 0.9, -0.2, 0.0, 1.1]
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo"]
EPSILON_HIGH = {"dapo": 0.28, "cispo": 1.25}  # DAPO's clip-higher; CISPO's bound on the ratio itself

# TRL's metric names -> ours.
SCORE_METRICS = {
    "reward": "reward",
    "reward_std": "reward_std",
    "frac_reward_zero_std": "frac_reward_zero_std",
    "completions/mean_length": "completion_length",
    "completions/min_length": "completion_length_min",
    "completions/max_length": "completion_length_max",
    "completions/clipped_ratio": "clipped_ratio",
    "completions/mean_terminated_length": "terminated_length",
} | {
    f"rewards/reward_{j}/{stat}": f"reward_{j}" + ("_std" if stat == "std" else "")
    for j in (0, 1)
    for stat in ("mean", "std")
}
LOSS_METRICS = {
    "kl": "kl",
    "entropy": "entropy",
    "clip_ratio/low_mean": "clip_ratio_low",
    "clip_ratio/high_mean": "clip_ratio_high",
    "clip_ratio/region_mean": "clip_ratio_region",
    "clip_ratio/low_min": "clip_ratio_low_min",
    "clip_ratio/high_max": "clip_ratio_high_max",
    "cispo_clip_ratio": "cispo_clip_ratio",
}


def fixed_reward(completion_ids: list[list[int]], table: list[list[float | None]], column: int, **kwargs):
    """Column ``column`` of ``table`` for each completion, found by its ids (every completion of COMPLETIONS, cut
    after its first EOS, is different)."""
    rows = {tuple(cut(ids)): row for row, ids in enumerate(COMPLETIONS)}
    return [table[rows[tuple(ids)]][column] for ids in completion_ids]


def cut(ids: list[int]) -> list[int]:
    return ids[: ids.index(EOS) + 1] if EOS in ids else ids


def config(loss_type: str, beta: float, **more) -> dict:
    """GRPOConfig keys of a loss."""
    settings = {"loss_type": loss_type, "beta": beta, "max_completion_length": MAX_COMPLETION_LENGTH, **more}
    if loss_type in EPSILON_HIGH:
        settings["epsilon_high"] = EPSILON_HIGH[loss_type]
    return settings


def our_loss(loss_type: str, beta: float) -> PolicyLoss:
    if loss_type == "cispo":
        return CISPOLoss(epsilon_high=EPSILON_HIGH["cispo"], beta=beta)
    return GRPOLoss(loss_type=loss_type, epsilon_high=EPSILON_HIGH.get(loss_type), beta=beta)


@pytest.fixture(scope="module")
def trainer(tiny_model_dir, tmp_path_factory):
    """TRL trainers on the tiny model, one per configuration (built once)."""
    built = {}

    def get(**settings):
        key = tuple(sorted(settings.items()))
        if key not in built:
            built[key] = grpo_trainer(tiny_model_dir, tmp_path_factory.mktemp("grpo"), **settings)
        return built[key]

    return get


def rewards_tensor(table: list[list[float | None]]) -> torch.Tensor:
    return torch.tensor([[math.nan if value is None else value for value in row] for row in table])


def means(sums: dict[str, Sum | tuple]) -> dict[str, float]:
    return {name: (total / count.clamp(min=1)).item() for name, (total, count) in sums.items()}


def assert_metrics_equal(trl_metrics: dict[str, float], ours: dict[str, float], names: dict[str, str]) -> None:
    """Every metric TRL logged that we have, equal to TOLERANCE (NaN only where TRL's is NaN: none here)."""
    compared = {
        trl_name: (trl_metrics[trl_name], ours[our_name])
        for trl_name, our_name in names.items()
        if trl_name in trl_metrics
    }
    assert compared
    mismatches = {name: pair for name, pair in compared.items() if not abs(pair[0] - pair[1]) <= TOLERANCE}
    assert not mismatches, f"(TRL, ours): {mismatches}"


# ---- advantages and rollout metrics ------------------------------------------------------------------------


@pytest.mark.parametrize("mask_truncated", [False, True])
@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("table", ["mixed", "agreeing"])
def test_advantages_and_rollout_metrics(trainer, table, scale_rewards, mask_truncated):
    rewards = REWARD_TABLES[table]
    out = trl_scores(trainer(), TWO_PROMPTS, COMPLETIONS, rewards, WEIGHTS, scale_rewards, mask_truncated)

    per_function = rewards_tensor(rewards)
    scores = group_advantages(per_function, torch.tensor(WEIGHTS), GENERATIONS, scale_rewards)
    torch.testing.assert_close(scores.advantages, out["advantages"], atol=TOLERANCE, rtol=0)
    lengths = torch.tensor([float(len(cut(ids))) for ids in COMPLETIONS])
    ended = torch.tensor([EOS in ids for ids in COMPLETIONS])
    metrics = rollout_metrics(per_function, scores, lengths, ended, ["0", "1"])
    assert_metrics_equal(out["metrics"], means(metrics), SCORE_METRICS)


# ---- losses on TRL's log-probs --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixed_inputs(trainer) -> dict:
    """TRL's batch of COMPLETIONS (the truncated ones masked out, or not) with fixed advantages, old log-probs that
    put the ratios on both sides of the clip range, and reference log-probs off the policy's; under
    ``(mask_truncated, "policy")`` TRL's log-probs and entropies of the policy (every trainer here loads the same
    weights)."""
    inputs = {}
    for mask_truncated in (False, True):
        grpo = trainer()
        out = trl_scores(grpo, TWO_PROMPTS, COMPLETIONS, MIXED, WEIGHTS, mask_truncated_completions=mask_truncated)
        batch = {key: out[key] for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
        logps, entropies = trl_logps(grpo, batch)
        mask = batch["completion_mask"]
        generator = torch.Generator().manual_seed(0)
        old_offsets = (torch.rand(logps.shape, generator=generator) * 1.2 - 0.6) * mask  # ratios e^-0.6 .. e^0.6
        ref_offsets = (torch.rand(logps.shape, generator=generator) * 0.6 - 0.3) * mask
        inputs[mask_truncated] = batch | {
            "advantages": torch.tensor(ADVANTAGES),
            "old_per_token_logps": logps - old_offsets,
            "ref_per_token_logps": logps + ref_offsets,
        }
        inputs[mask_truncated, "policy"] = logps, entropies
    return inputs


def our_micro_batch(loss: PolicyLoss, inputs: dict, logps: torch.Tensor):
    tokens = PolicyTokens(
        logps,
        inputs["old_per_token_logps"],
        inputs["ref_per_token_logps"] if loss.beta else None,
        inputs["advantages"],
        inputs["completion_mask"].bool(),
        MAX_COMPLETION_LENGTH,
    )
    return loss(tokens)


def rows(inputs: dict, part: slice) -> dict:
    return {key: value[part] for key, value in inputs.items()}


@pytest.mark.parametrize("mask_truncated", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_and_metrics(trainer, fixed_inputs, loss_type, beta, mask_truncated):
    grpo = trainer(**config(loss_type, beta))
    inputs = fixed_inputs[mask_truncated]
    expected, trl_metrics = trl_loss(grpo, inputs)
    logps, entropies = fixed_inputs[mask_truncated, "policy"]
    result = our_micro_batch(our_loss(loss_type, beta), inputs, logps)

    if loss_type == "cispo":
        assert 0 < trl_metrics["cispo_clip_ratio"] < 1
    else:  # clipped on both sides, not everywhere
        assert 0 < trl_metrics["clip_ratio/low_mean"] and 0 < trl_metrics["clip_ratio/high_mean"]
        assert trl_metrics["clip_ratio/region_mean"] < 1
    assert (result.loss.total / result.loss.count).item() == pytest.approx(expected, abs=TOLERANCE)
    mask = inputs["completion_mask"]
    ours = means(result.metrics) | {"entropy": ((entropies * mask).sum() / mask.sum()).item()}
    assert_metrics_equal(trl_metrics, ours, LOSS_METRICS)
    assert set(ours) - {"entropy"} == {LOSS_METRICS[name] for name in trl_metrics} - {"entropy"}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_accumulated_micro_batches(trainer, fixed_inputs, loss_type):
    """Two micro-batches of 4 completions and 14 and 20 tokens, one optimizer step: TRL divides grpo, bnpo and
    dr_grpo by the accumulation steps and dapo and cispo by the step's tokens (``num_items_in_batch``); the sum of
    its two losses is ours, the sums of both micro-batches over the sum of their counts (KL included)."""
    beta = 0.04
    grpo = trainer(**config(loss_type, beta, gradient_accumulation_steps=2))
    inputs = fixed_inputs[False]
    loss = our_loss(loss_type, beta)
    logps = fixed_inputs[False, "policy"][0]
    halves = [rows(inputs | {"logps": logps}, slice(0, 4)), rows(inputs | {"logps": logps}, slice(4, 8))]
    assert halves[0]["completion_mask"].sum() != halves[1]["completion_mask"].sum()
    expected, total, count = 0.0, 0.0, 0.0
    for half in halves:
        half_logps = half.pop("logps")
        half["num_items_in_batch"] = inputs["completion_mask"].sum()
        expected += trl_loss(grpo, half)[0]
        result = our_micro_batch(loss, half, half_logps)
        total, count = total + result.loss.total, count + result.loss.count
    assert (total / count).item() == pytest.approx(expected, abs=TOLERANCE)


# ---- end to end: GRPOModule's rollout and batch_sums ----------------------------------------------------------


def our_module(
    model_dir: str,
    loss_type: str,
    beta: float,
    scale_rewards: str,
    mask_truncated: bool,
    table: list,
    temperature: float,
) -> GRPOModule:
    rewards = [
        Reward("tests.test_grpo_trl.fixed_reward", weight, {"table": table, "column": j}, name=str(j))
        for j, weight in enumerate(WEIGHTS)
    ]
    sampling = SamplingSettings(
        GENERATIONS, MAX_COMPLETION_LENGTH, temperature=temperature, mask_truncated_completions=mask_truncated
    )
    module = GRPOModule(
        rewards,
        our_loss(loss_type, beta),
        sampling,
        scale_rewards=scale_rewards,
        model_name=model_dir,
        lora=None,
    )
    module.configure_model()
    width = max(len(ids) for ids in COMPLETIONS)
    completions = torch.tensor([ids + [EOS] * (width - len(ids)) for ids in COMPLETIONS])

    def generate_completions(batch):
        assert batch["input_ids"].shape[0] * GENERATIONS == len(completions)
        return completions

    module.generate_completions = generate_completions
    return module


def perturb(model: torch.nn.Module) -> None:
    """Move the policy away from the reference (the weights as saved): seeded noise on every weight."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)


E2E_CASES = [
    # loss_type, beta, scale_rewards, mask_truncated, table, temperature
    ("grpo", 0.04, "batch", True, "agreeing", 1.0),
    ("bnpo", 0.0, "none", True, "mixed", 1.0),
    ("dr_grpo", 0.04, "group", False, "mixed", 1.0),
    ("dapo", 0.04, "none", False, "mixed", 1.0),
    ("cispo", 0.0, "batch", False, "agreeing", 1.0),
    # TRL divides the logits by the sampling temperature for every log-prob (policy, old, reference) and the
    # entropy: so does GRPOModule.completion_log_probs.
    ("dapo", 0.04, "group", False, "mixed", 0.7),
]  # fmt: skip


def trl_loss_and_gradients(trainer, inputs: dict) -> tuple[float, dict[str, float]]:
    """What ``trl_loss`` returns (loss, logged metrics), the loss's gradient left in the model's ``.grad``."""
    trainer.model.zero_grad()
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    metrics = trainer._metrics["train"]
    metrics.clear()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.item(), {name: values[-1] for name, values in metrics.items() if values}


@pytest.mark.slow
@pytest.mark.parametrize(("loss_type", "beta", "scale_rewards", "mask_truncated", "table", "temperature"), E2E_CASES)
def test_rollout_and_batch_sums(
    tiny_model_dir, tmp_path, loss_type, beta, scale_rewards, mask_truncated, table, temperature
):
    rewards = REWARD_TABLES[table]
    module = our_module(tiny_model_dir, loss_type, beta, scale_rewards, mask_truncated, rewards, temperature)
    perturb(module.model)
    # A trainer of its own: the shared ones keep the weights as saved.
    grpo = grpo_trainer(tiny_model_dir, tmp_path, **config(loss_type, beta, temperature=temperature))
    grpo.model.load_state_dict(module.model.state_dict())
    out = trl_scores(grpo, TWO_PROMPTS, COMPLETIONS, rewards, WEIGHTS, scale_rewards, mask_truncated)

    # The prompts as TRL tokenized them, left-padded, as PromptDataModule batches them.
    prompt_ids, prompt_mask = out["prompt_ids"][::GENERATIONS], out["prompt_mask"][::GENERATIONS]
    batch = {
        "input_ids": prompt_ids,
        "attention_mask": prompt_mask,
        "prompts": TWO_PROMPTS,
        "conversational": [True, True],
        "columns": {},
    }
    rollout = module.rollout(batch)
    mask = out["completion_mask"].bool()
    width = rollout.mask.shape[1]
    assert torch.equal(rollout.mask, mask[:, :width]) and not mask[:, width:].any()
    torch.testing.assert_close(rollout.advantages, out["advantages"], atol=TOLERANCE, rtol=0)
    assert_metrics_equal(out["metrics"], means(rollout.scores), SCORE_METRICS)
    if beta:
        torch.testing.assert_close(rollout.ref_log_probs, out["ref_per_token_logps"][:, :width], atol=TOLERANCE, rtol=0)
    else:
        assert rollout.ref_log_probs is None

    # Fixed old log-probs (as from an earlier policy): ratios on both sides of the clip range.
    with torch.no_grad():
        logps = module.completion_log_probs(module.model, rollout)[0]
    generator = torch.Generator().manual_seed(0)
    old = logps - (torch.rand(logps.shape, generator=generator) * 1.2 - 0.6) * rollout.mask
    rollout = rollout._replace(old_log_probs=old)
    inputs = {key: out[key] for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
    inputs |= {"advantages": out["advantages"], "num_items_in_batch": out["num_items_in_batch"]}
    inputs["old_per_token_logps"] = torch.nn.functional.pad(old, (0, mask.shape[1] - width))
    if beta:
        inputs["ref_per_token_logps"] = out["ref_per_token_logps"]
    expected, trl_metrics = trl_loss_and_gradients(grpo, inputs)

    module.model.zero_grad()
    sums = module.batch_sums(rollout)
    loss = sums["loss"].total / sums["loss"].count
    assert loss.item() == pytest.approx(expected, abs=TOLERANCE)
    assert_metrics_equal(trl_metrics, means(sums), LOSS_METRICS)
    # The gradients of the same loss on the same weights.
    loss.backward()
    theirs = dict(grpo.model.named_parameters())
    for name, parameter in module.model.named_parameters():
        torch.testing.assert_close(parameter.grad, theirs[name].grad, atol=TOLERANCE, rtol=1e-4, msg=name)
