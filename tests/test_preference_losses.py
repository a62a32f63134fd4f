"""Preference losses against TRL 1.16: formula by formula on seeded random log-probabilities, then ORPO and SimPO on
the tiny model against TRL's ORPOTrainer and CPOTrainer (simpo) for a real batch, loss and metrics to 1e-5.

For ORPO and SimPO the formula-level references are TRL's own methods (``ORPOTrainer.odds_ratio_loss``,
``CPOTrainer.cpo_loss``) on trainer objects made with ``object.__new__`` and given just the attributes those methods
read. TRL 1.16 computes the DPO losses inline in ``DPOTrainer._compute_loss``, so ``trl_dpo_losses`` below
transcribes those lines (trl/trainer/dpo_trainer.py, 1383-1510), straight-line, one branch per loss type.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from smolfactory.errors import SmolFactoryError
from smolfactory.model.preference_losses import (
    DPOLoss,
    DPOLossType,
    ORPOLoss,
    PairLogProbs,
    PairLoss,
    PreferenceLoss,
    SimPOLoss,
)

PAIRS = 6
TOLERANCE = {"abs": 1e-5, "rel": 1e-5}


def random_log_probs(seed: int) -> PairLogProbs:
    """Seeded sums over 1-20 answer tokens, each token's log-probability in (-3, 0); the chosen sequences have a
    prompt of 5-15 more tokens."""
    generator = torch.Generator().manual_seed(seed)
    chosen_tokens, rejected_tokens = torch.randint(1, 21, (2, PAIRS), generator=generator)
    per_token = -3 * torch.rand(2, PAIRS, generator=generator, dtype=torch.float64).float() - 1e-3
    chosen = (per_token[0] * chosen_tokens).requires_grad_()
    rejected = (per_token[1] * rejected_tokens).requires_grad_()
    prompt_tokens = torch.randint(5, 16, (PAIRS,), generator=generator)
    prompt = -2 * torch.rand(PAIRS, generator=generator) * prompt_tokens
    return PairLogProbs(
        chosen, rejected, chosen_tokens, rejected_tokens, chosen + prompt, chosen_tokens + prompt_tokens
    )


def trl_dpo_losses(
    loss_type: str, policy: PairLogProbs, reference: PairLogProbs, beta: float, label_smoothing: float
) -> torch.Tensor:
    """TRL 1.16's per-pair DPO losses, transcribed from ``DPOTrainer._compute_loss``; ``sigmoid`` with label smoothing
    is conservative DPO (cDPO), the form TRL's CPOTrainer keeps and its DPOTrainer dropped."""
    chosen_logratios = policy.chosen - reference.chosen
    rejected_logratios = policy.rejected - reference.rejected
    delta_score = chosen_logratios - rejected_logratios
    eps = label_smoothing
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta_score) * (1 - eps) - F.logsigmoid(-beta * delta_score) * eps
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta_score)
    if loss_type == "ipo":
        ipo_delta = chosen_logratios / policy.chosen_tokens.clamp(min=1.0) - rejected_logratios / (
            policy.rejected_tokens.clamp(min=1.0)
        )
        return (ipo_delta - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        epsilon = torch.tensor(eps)
        qw, log_qw = torch.sigmoid(beta * delta_score), F.logsigmoid(beta * delta_score)
        ql, log_ql = torch.sigmoid(-beta * delta_score), F.logsigmoid(-beta * delta_score)
        return qw * (log_qw - torch.log1p(-epsilon)) + ql * (log_ql - torch.log(epsilon))
    if loss_type == "nca_pair":
        chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
        return (
            -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)
        )
    if loss_type == "robust":
        clean_loss_term = -(1 - eps) * F.logsigmoid(beta * delta_score)
        flipped_loss_term = -eps * F.logsigmoid(-beta * delta_score)
        return (clean_loss_term - flipped_loss_term) / (1 - 2 * eps)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
    if loss_type == "sppo_hard":
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
    if loss_type == "apo_down":
        return (
            torch.sigmoid(beta * chosen_logratios) + 1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))
        )
    if loss_type == "sigmoid_norm":
        delta = chosen_logratios / policy.chosen_tokens.clamp(min=1.0) - rejected_logratios / (
            policy.rejected_tokens.clamp(min=1.0)
        )
        return -F.logsigmoid(beta * delta)
    raise AssertionError(loss_type)


DPO_CASES: list[tuple[str, float]] = [
    ("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.1), ("exo_pair", 1e-3),
    ("bco_pair", 0.0), ("nca_pair", 0.0), ("sppo_hard", 0.0), ("apo_zero", 0.0), ("apo_down", 0.0),
    ("sigmoid_norm", 0.0),
]  # fmt: skip
assert {name for name, _ in DPO_CASES} == set(DPOLossType.__args__)


def pair_metrics(result: PairLoss) -> dict[str, float]:
    """Batch means of a PairLoss, named as smolfactory logs them."""
    chosen, rejected = result.rewards_chosen, result.rewards_rejected
    metrics = {
        "loss": result.losses.mean(),
        "rewards_chosen": chosen.mean(),
        "rewards_rejected": rejected.mean(),
        "reward_accuracy": (chosen > rejected).float().mean(),
        "reward_margin": (chosen - rejected).mean(),
    }
    metrics |= {name: value.mean() for name, value in result.extra.items()}
    return {name: value.item() for name, value in metrics.items()}


def assert_detached_and_differentiable(result: PairLoss) -> None:
    assert result.losses.shape == (PAIRS,) and result.losses.requires_grad
    assert not any(value.requires_grad for value in (result.rewards_chosen, result.rewards_rejected)), "rewards"
    assert all(value.shape == (PAIRS,) and not value.requires_grad for value in result.extra.values())


@pytest.mark.parametrize(("loss_type", "label_smoothing"), DPO_CASES)
def test_dpo_loss_equals_trls_formula(loss_type: str, label_smoothing: float):
    policy, reference = random_log_probs(0), random_log_probs(1)
    reference = PairLogProbs(*(value.detach() if value.is_floating_point() else value for value in reference))
    beta = 0.3
    loss = DPOLoss(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    assert loss.needs_reference
    result = loss(policy, reference)
    assert_detached_and_differentiable(result)
    expected = trl_dpo_losses(loss_type, policy, reference, beta, label_smoothing)
    torch.testing.assert_close(result.losses, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(result.rewards_chosen, beta * (policy.chosen - reference.chosen).detach())
    torch.testing.assert_close(result.rewards_rejected, beta * (policy.rejected - reference.rejected).detach())


def trl_odds_ratio(policy: PairLogProbs, beta: float):
    """TRL's ``ORPOTrainer.odds_ratio_loss`` on per-token mean log-probabilities, on a trainer built without
    ``__init__`` (the method reads ``beta`` and ``accelerator.device``)."""
    from trl.experimental.orpo import ORPOTrainer

    trainer = object.__new__(ORPOTrainer)
    trainer.beta, trainer.accelerator = beta, SimpleNamespace(device=torch.device("cpu"))
    chosen = (policy.chosen / policy.chosen_tokens).detach()
    rejected = (policy.rejected / policy.rejected_tokens).detach()
    return chosen, rejected, trainer.odds_ratio_loss(chosen, rejected)


@pytest.mark.parametrize("nll_on_prompt", [True, False])
def test_orpo_loss_equals_trls_formula(nll_on_prompt: bool):
    pytest.importorskip("trl")
    policy, beta = random_log_probs(2), 0.2
    loss = ORPOLoss(beta=beta, nll_on_prompt=nll_on_prompt)
    assert not loss.needs_reference and loss.needs_chosen_sequence == nll_on_prompt
    result = loss(policy, None)
    assert_detached_and_differentiable(result)
    chosen, rejected, (losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen) = trl_odds_ratio(
        policy, beta
    )
    # TRL's NLL: nn.CrossEntropyLoss's mean over every counted token of the batch's chosen sequences.
    sums, tokens = (
        (policy.chosen_sequence, policy.chosen_sequence_tokens)
        if nll_on_prompt
        else (policy.chosen, policy.chosen_tokens)
    )
    nll = -sums.sum() / tokens.sum()
    ours = pair_metrics(result)
    expected = {
        "loss": (nll - losses.mean()).item(),  # get_batch_loss_metrics: policy_nll_loss - losses.mean()
        "rewards_chosen": chosen_rewards.mean().item(),
        "rewards_rejected": rejected_rewards.mean().item(),
        "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
        "reward_margin": (chosen_rewards - rejected_rewards).mean().item(),
        "nll_loss": nll.item(),
        "log_odds_ratio": log_odds_ratio.item(),
        "log_odds_chosen": log_odds_chosen.item(),
        "logps_chosen": chosen.mean().item(),
        "logps_rejected": rejected.mean().item(),
    }
    assert ours.keys() == expected.keys()
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, **TOLERANCE), name
    assert 0 < ours["reward_accuracy"] < 1  # the random pairs go both ways


def trl_simpo(policy: PairLogProbs, beta: float, gamma: float, label_smoothing: float):
    """TRL's ``CPOTrainer.cpo_loss`` with ``loss_type="simpo"`` on per-token mean log-probabilities, on a trainer
    built without ``__init__`` (the attributes ``__init__`` sets from CPOConfig and that ``cpo_loss`` reads)."""
    from trl.experimental.cpo import CPOTrainer

    trainer = object.__new__(CPOTrainer)
    trainer.beta, trainer.label_smoothing, trainer.loss_type = beta, label_smoothing, "simpo"
    trainer.simpo_gamma, trainer.alpha, trainer.accelerator = gamma, 0.0, SimpleNamespace(device=torch.device("cpu"))
    chosen = (policy.chosen / policy.chosen_tokens).detach()
    rejected = (policy.rejected / policy.rejected_tokens).detach()
    return chosen, rejected, trainer.cpo_loss(chosen, rejected)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_loss_equals_trls_formula(label_smoothing: float):
    pytest.importorskip("trl")
    policy, beta, ratio = random_log_probs(3), 2.5, 0.3
    loss = SimPOLoss(beta=beta, gamma_beta_ratio=ratio, label_smoothing=label_smoothing)
    assert not loss.needs_reference and not loss.needs_chosen_sequence
    result = loss(PairLogProbs(*policy[:4]), None)  # no chosen_sequence: SimPO has no NLL term
    assert_detached_and_differentiable(result)
    chosen, rejected, (losses, chosen_rewards, rejected_rewards) = trl_simpo(
        policy, beta, ratio * beta, label_smoothing
    )
    ours = pair_metrics(result)
    expected = {
        "loss": losses.mean().item(),  # get_batch_loss_metrics: losses.mean() + cpo_alpha (0) * nll
        "rewards_chosen": chosen_rewards.mean().item(),
        "rewards_rejected": rejected_rewards.mean().item(),
        "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
        "reward_margin": (chosen_rewards - rejected_rewards).mean().item(),
        "logps_chosen": chosen.mean().item(),
        "logps_rejected": rejected.mean().item(),
    }
    assert ours.keys() == expected.keys()
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, **TOLERANCE), name


def test_losses_are_one_class_each_with_their_settings_checked():
    assert all(issubclass(cls, PreferenceLoss) for cls in (DPOLoss, ORPOLoss, SimPOLoss))
    bad = [
        (lambda: DPOLoss(beta=0), "model.loss.beta must be > 0"),
        (lambda: DPOLoss(loss_type="exo_pair"), "exo_pair needs model.loss.label_smoothing > 0"),
        (lambda: DPOLoss(loss_type="hinge", label_smoothing=0.1), "applies to the sigmoid, robust and exo_pair"),
        (lambda: DPOLoss(loss_type="kto"), "unknown model.loss.loss_type 'kto'"),
        (lambda: DPOLoss(label_smoothing=0.5), "must be in [0, 0.5)"),
        (lambda: ORPOLoss(beta=-1), "model.loss.beta must be > 0"),
        (lambda: SimPOLoss(label_smoothing=0.6), "must be in [0, 0.5)"),
        (lambda: DPOLoss()(random_log_probs(0), None), "needs the reference"),
        (lambda: ORPOLoss()(PairLogProbs(*random_log_probs(0)[:4]), None), "needs PairLogProbs.chosen_sequence"),
    ]
    for make, message in bad:
        with pytest.raises(SmolFactoryError, match=message.replace("[", r"\[").replace(")", r"\)")):
            make()


def test_orpo_nll_share_of_each_pair_averages_to_the_token_mean():
    """Each pair's NLL share is -sum * pairs / tokens of the batch: the mean over pairs is the batch's token mean,
    while a pair with more tokens weighs more (as in TRL), unlike a mean of per-pair means."""
    policy = random_log_probs(4)
    nll = ORPOLoss(nll_on_prompt=False)(policy, None).extra["nll_loss"]
    assert nll.mean().item() == pytest.approx((-policy.chosen.sum() / policy.chosen_tokens.sum()).item(), rel=1e-6)
    assert nll.mean().item() != pytest.approx((-policy.chosen / policy.chosen_tokens).mean().item(), rel=1e-3)
    assert math.isfinite(nll.sum().item())


# What TRL's ORPO and CPO trainers are given (tests/test_preference_trl.py compares DPOModule with them).


@pytest.fixture(scope="module")
def pair_batch(tiny_model_dir, tmp_path_factory) -> dict[str, torch.Tensor]:
    """One batch of tests/trl_reference.py's pairs as PreferenceDataModule builds it."""
    from torch.utils.data import DataLoader

    from smolfactory import PreferenceDataModule
    from tests.conftest import write_jsonl
    from tests.trl_reference import PAIRS

    path = write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", PAIRS)
    datamodule = PreferenceDataModule(tokenizer=tiny_model_dir, dataset=str(path), val_split=0, batch_size=len(PAIRS))
    datamodule.setup("fit")
    loader = DataLoader(datamodule.train_data, batch_size=len(PAIRS), collate_fn=datamodule.train_collate())
    return next(iter(loader))


def test_trl_orpo_and_cpo_train_the_template_newline_and_a_second_end_of_turn(tiny_model_dir, pair_batch, tmp_path):
    """Why trl_reference hands TRL our tokens: its ORPO/CPO tokenization renders the same chat template but then
    appends <|im_end|> after the template's trailing newline (add_eos_token_if_needed) and trains both."""
    pytest.importorskip("trl")
    from tests.trl_reference import orpo_pairs_tokenized_by_trl, orpo_trainer

    trainer = orpo_trainer(tiny_model_dir, tmp_path)
    tokenizer = trainer.processing_class
    (newline,), eos = tokenizer("\n", add_special_tokens=False)["input_ids"], tokenizer.eos_token_id
    kept = pair_batch["attention_mask"].bool()
    ours = [
        (ids[k].tolist(), labels[k].tolist())
        for ids, labels, k in zip(pair_batch["input_ids"], pair_batch["labels"], kept, strict=True)
    ]
    pairs = len(ours) // 2
    for index, theirs in enumerate(orpo_pairs_tokenized_by_trl(trainer)):
        for side, (ids, labels) in (("chosen", ours[index]), ("rejected", ours[pairs + index])):
            assert ids[-1] == newline and labels[-1] == -100  # ours ends with the template's newline, untrained
            assert theirs[f"{side}_input_ids"] == ids + [eos]
            assert theirs[f"{side}_labels"] == labels[:-1] + [newline, eos]
