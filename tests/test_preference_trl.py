"""DPOModule against TRL: every preference loss (DPO's variants against DPOTrainer, ORPO against ORPOTrainer, SimPO
against CPOTrainer), same tiny model, same batch, same settings; loss and metrics equal to 1e-5.

The policy differs from the reference (seeded noise on the LoRA matrices, or on every weight for full
fine-tuning), so that rewards, margins and accuracies are not all zero. Runs when TRL is installed (the
``dev`` and ``bench`` extras).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from smolfactory import DPOModule, LoraSettings, PreferenceDataModule
from smolfactory.model.preference_losses import DPOLoss, DPOLossType, ORPOLoss, PreferenceLoss, SimPOLoss
from tests import trl_reference
from tests.conftest import write_jsonl
from tests.trl_reference import PAIRS

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")

BETA = 0.3


# TRL's names for the DPO metrics, and ours: those ORPO and CPO share, without their NLL, plus two of DPO's own.
METRICS = {trl: ours for trl, ours in trl_reference.METRICS.items() if trl != "nll_loss"} | {
    "mean_token_accuracy": "token_accuracy",
    "entropy": "entropy",
}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", PAIRS)


def our_batch(model_dir: str, path) -> tuple[PreferenceDataModule, dict[str, torch.Tensor]]:
    datamodule = PreferenceDataModule(tokenizer=model_dir, dataset=str(path), val_split=0, batch_size=len(PAIRS))
    datamodule.setup("fit")
    loader = DataLoader(datamodule.train_data, batch_size=len(PAIRS), collate_fn=datamodule.train_collate())
    return datamodule, next(iter(loader))


def trl_trainer(model_dir: str, tmp_path, lora: bool, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=BETA,
        loss_type=[loss_type],
        label_smoothing=label_smoothing,
        per_device_train_batch_size=len(PAIRS),
        bf16=False,
        use_cpu=True,
        report_to=[],
        gradient_checkpointing=False,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_config = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    reference = None if lora else AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return trl.DPOTrainer(
        model=model,
        ref_model=reference,
        args=config,
        train_dataset=datasets.Dataset.from_list(PAIRS),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=peft_config if lora else None,
    )


def perturbed_module(model_dir: str, lora: bool, loss: PreferenceLoss = DPOLoss(BETA)) -> DPOModule:  # noqa: B008
    """Our module, its policy moved away from the reference by seeded noise."""
    module = DPOModule(model_name=model_dir, lora=LoraSettings(r=8, alpha=16) if lora else None, loss=loss)
    module.configure_model()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in module.model.parameters():
            if parameter.requires_grad:
                scale = 0.05 if lora else 0.01
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return module


def trl_metrics(trainer, module: DPOModule, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """TRL's loss and metrics on our batch, after copying our policy's weights into its model."""
    ours = dict(module.model.named_parameters())
    with torch.no_grad():
        for name, parameter in trainer.model.named_parameters():
            if parameter.requires_grad:
                parameter.copy_(ours[name])
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "completion_mask": (batch["labels"] != -100).long(),
    }
    trainer.model.train()
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, inputs)
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    return {"loss": loss.item(), **metrics}


def our_metrics(module: DPOModule, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    module.model.train()
    return {name: value.item() for name, value in module.means(module.batch_sums(batch)).items()}


def assert_same(trl_values: dict[str, float], ours: dict[str, float], names: dict[str, str] = METRICS) -> None:
    assert ours["loss"] == pytest.approx(trl_values["loss"], abs=1e-5, rel=1e-5)
    for trl_name, name in names.items():
        assert ours[name] == pytest.approx(trl_values[trl_name], abs=1e-5, rel=1e-5), name
    assert abs(ours["reward_margin"]) > 0.01  # the policy is off the reference: the comparison is not of zeros


LOSS_TYPES: list[tuple[str, float]] = [
    ("sigmoid", 0.0),
    ("ipo", 0.0),
    ("hinge", 0.0),
    ("robust", 0.1),
    ("exo_pair", 1e-3),
    ("bco_pair", 0.0),
    ("nca_pair", 0.0),
    ("sppo_hard", 0.0),
    ("apo_zero", 0.0),
    ("apo_down", 0.0),
    ("sigmoid_norm", 0.0),
]
assert {name for name, _ in LOSS_TYPES} == set(DPOLossType.__args__)
# One case per loss: every DPO variant, ORPO and SimPO (the reference-free two against TRL's ORPO and CPO trainers).
LOSSES = [pytest.param(DPOLoss(BETA, name, smoothing), id=name) for name, smoothing in LOSS_TYPES] + [
    pytest.param(ORPOLoss(beta=0.25), id="orpo"),
    pytest.param(SimPOLoss(beta=2.0, gamma_beta_ratio=0.5, label_smoothing=0.1), id="simpo"),
]


def trl_reference_for(loss, model_dir: str, tmp_path) -> tuple[object, dict[str, str]]:
    """TRL's trainer for this loss, and which of its metrics to compare (its names -> ours).

    ORPO's and CPO's logits/chosen and logits/rejected average the vocabulary logits over every position of the
    padded rows, prompt and padding included, which needs the whole [rows x positions x vocabulary] tensor that
    smolfactory never builds: ours are the mean over the answer's trained tokens, as for DPO, so they are left out.
    """
    if isinstance(loss, DPOLoss):
        trainer = trl_trainer(model_dir, tmp_path, lora=True)
        trainer.loss_types, trainer.label_smoothing = [loss.loss_type], loss.label_smoothing
        return trainer, METRICS
    if isinstance(loss, ORPOLoss):
        names = {trl: ours for trl, ours in trl_reference.ORPO_METRICS.items() if not trl.startswith("logits/")}
        return trl_reference.orpo_trainer(model_dir, tmp_path, beta=loss.beta), names
    trainer = trl_reference.simpo_trainer(model_dir, tmp_path, loss.beta, loss.gamma_beta_ratio, loss.label_smoothing)
    # cpo_alpha=0: TRL computes no NLL and logs a constant 0.
    names = {trl: ours for trl, ours in trl_reference.METRICS.items() if not trl.startswith("logits/")}
    return trainer, {trl: ours for trl, ours in names.items() if trl != "nll_loss"}


@pytest.mark.slow
@pytest.mark.parametrize("loss", LOSSES)
def test_lora_preference_loss_equals_trl(loss, tiny_model_dir, pairs_file, tmp_path):
    _, batch = our_batch(tiny_model_dir, pairs_file)
    module = perturbed_module(tiny_model_dir, lora=True, loss=loss)
    trainer, names = trl_reference_for(loss, tiny_model_dir, tmp_path)
    if isinstance(loss, DPOLoss):
        trl_values = trl_metrics(trainer, module, batch)
    else:
        trl_values = trl_reference.trl_metrics(trainer, module.model, batch)
    assert_same(trl_values, our_metrics(module, batch), names)


@pytest.mark.slow
def test_conservative_dpo_mixes_the_loss_of_the_pair_and_of_the_swapped_pair(tiny_model_dir, pairs_file, tmp_path):
    """cDPO (sigmoid with label smoothing e) = (1 - e) DPO + e DPO with chosen and rejected swapped (TRL's DPO)."""
    _, batch = our_batch(tiny_model_dir, pairs_file)
    module = perturbed_module(tiny_model_dir, lora=True)
    trainer = trl_trainer(tiny_model_dir, tmp_path, lora=True)
    swapped = {key: torch.cat(value.chunk(2)[::-1]) for key, value in batch.items()}
    plain, reversed_ = (trl_metrics(trainer, module, b)["loss"] for b in (batch, swapped))
    module.pair_loss = DPOLoss(BETA, "sigmoid", 0.1)  # the same policy (its LoRA init drew from the global RNG)
    assert our_metrics(module, batch)["loss"] == pytest.approx(0.9 * plain + 0.1 * reversed_, rel=1e-5)


@pytest.mark.slow
def test_full_fine_tuning_dpo_equals_trl_with_a_reference_model(tiny_model_dir, pairs_file, tmp_path):
    _, batch = our_batch(tiny_model_dir, pairs_file)
    module = perturbed_module(tiny_model_dir, lora=False)
    assert module.reference_model is not None and not any(p.requires_grad for p in module.reference_model.parameters())
    trainer = trl_trainer(tiny_model_dir, tmp_path, lora=False)
    assert_same(trl_metrics(trainer, module, batch), our_metrics(module, batch))


def test_pairs_are_tokenized_as_trl_does_but_the_newline_after_the_end_of_turn_is_untrained(
    tiny_model_dir, pairs_file, tmp_path
):
    """Both render with the chat template into the same tokens; TRL also trains the template's newline after
    <|im_end|>, which smolfactory leaves untrained (as in SFT: the model never has to emit it)."""
    datamodule, _ = our_batch(tiny_model_dir, pairs_file)
    trainer = trl_trainer(tiny_model_dir, tmp_path, lora=True)
    newline = trainer.processing_class("\n", add_special_tokens=False)["input_ids"]
    for ours, theirs in zip(datamodule.train_data, trainer.train_dataset, strict=True):
        for side in ("chosen", "rejected"):
            answer = theirs[f"{side}_ids"]
            assert answer[-1:] == newline
            assert ours[f"{side}_input_ids"] == theirs["prompt_ids"] + answer
            assert ours[f"{side}_labels"] == [-100] * len(theirs["prompt_ids"]) + answer[:-1] + [-100]
