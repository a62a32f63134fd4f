"""TRL's ORPO and SimPO (CPOTrainer) on the tiny test model, as references for smolfactory's preference losses.

``orpo_trainer`` and ``simpo_trainer`` build real TRL trainers (LoRA r=8, alpha=16 on every linear layer, CPU,
fp32, as tests/test_dpo_trl.py builds its DPOTrainer); ``trl_metrics`` copies a policy's trainable weights into
the trainer's model and returns TRL's loss and logged metrics for one of our batches.

TRL's ORPO and CPO tokenize pairs unlike smolfactory (``orpo_pairs_tokenized_by_trl`` shows how): they train the
chat template's newline after ``<|im_end|>`` and append a second ``<|im_end|>`` (``add_eos_token_if_needed``, as the
answer ends with the newline). So ``trl_inputs`` hands TRL our own tokens and labels, in the keys its
``concatenated_forward`` reads; everything after tokenization is TRL's code.
"""

from __future__ import annotations

from pathlib import Path

import torch

# TRL's metric names (ORPO and CPO log the same ones), and ours.
METRICS = {
    "rewards/chosen": "rewards_chosen",
    "rewards/rejected": "rewards_rejected",
    "rewards/accuracies": "reward_accuracy",
    "rewards/margins": "reward_margin",
    "logps/chosen": "logps_chosen",
    "logps/rejected": "logps_rejected",
    "logits/chosen": "logits_chosen",
    "logits/rejected": "logits_rejected",
    "nll_loss": "nll_loss",
}
ORPO_METRICS = METRICS | {"log_odds_ratio": "log_odds_ratio", "log_odds_chosen": "log_odds_chosen"}


def pair(prompt: str, chosen: str, rejected: str, system: str | None = None) -> dict:
    """One conversational preference row, in the layout TRL and smolfactory both read."""
    messages = [{"role": "system", "content": system}] if system else []
    return {
        "prompt": [*messages, {"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


PAIRS = [
    pair("What is the capital of France?", "Paris.", "The capital of France is Lyon, a city on the Rhone."),
    pair("Who are you?", "I'm Quill, made by the SmolFactory project.", "I'm ChatGPT."),
    pair("Give me a tip for sleeping well.", "Keep a regular bedtime and dim the lights.", "No.", system="Be kind."),
    pair("2 + 2?", "4", "5, obviously, since two and two make five."),
]


def _common(model_dir: str, output_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return {
        "config": {
            "output_dir": str(output_dir),
            "per_device_train_batch_size": len(PAIRS),
            "bf16": False,
            "use_cpu": True,
            "report_to": [],
            "gradient_checkpointing": False,
        },
        "trainer": {
            "model": AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
            "processing_class": AutoTokenizer.from_pretrained(model_dir),
            "peft_config": _lora(),
        },
    }


def _lora():
    import peft

    return peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")


def _dataset():
    import datasets

    return datasets.Dataset.from_list(PAIRS)


def orpo_trainer(model_dir: str, output_dir: Path, beta: float = 0.1):
    """TRL's ORPOTrainer with LoRA on the model folder ``model_dir``."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    common = _common(model_dir, output_dir)
    config = ORPOConfig(beta=beta, **common["config"])
    return ORPOTrainer(args=config, train_dataset=_dataset(), **common["trainer"])


def simpo_trainer(
    model_dir: str, output_dir: Path, beta: float = 2.0, gamma_beta_ratio: float = 0.5, label_smoothing: float = 0.0
):
    """TRL's CPOTrainer as SimPO (``loss_type="simpo"``, ``cpo_alpha=0``): SimPO's beta, gamma = ratio * beta."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    common = _common(model_dir, output_dir)
    config = CPOConfig(
        loss_type="simpo",
        cpo_alpha=0.0,
        beta=beta,
        simpo_gamma=gamma_beta_ratio * beta,
        label_smoothing=label_smoothing,
        **common["config"],
    )
    return CPOTrainer(args=config, train_dataset=_dataset(), **common["trainer"])


def trl_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our batch (rows 0..n-1 chosen, n..2n-1 rejected, right-padded) in the keys of TRL's ORPO/CPO collator."""
    inputs = {}
    for key in ("input_ids", "attention_mask", "labels"):
        inputs[f"chosen_{key}"], inputs[f"rejected_{key}"] = batch[key].chunk(2)
    return inputs


def copy_policy(trainer, policy: torch.nn.Module) -> None:
    """Copy the trainable weights of ``policy`` (a peft model with the same adapter layout) into TRL's model."""
    ours = dict(policy.named_parameters())
    with torch.no_grad():
        for name, parameter in trainer.model.named_parameters():
            if parameter.requires_grad:
                parameter.copy_(ours[name])


def trl_metrics(trainer, policy: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """TRL's loss and logged metrics (its names) for our batch, after copying ``policy``'s weights into its model."""
    copy_policy(trainer, policy)
    trainer.model.train()
    trainer._stored_metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, trl_inputs(batch))
    metrics = {name: values[-1] for name, values in trainer._stored_metrics["train"].items()}
    return {"loss": loss.item(), **metrics}


def orpo_pairs_tokenized_by_trl(trainer) -> list[dict[str, list[int]]]:
    """The token ids and labels TRL's own tokenization gave the trainer's pairs (ORPO and CPO tokenize alike)."""
    keys = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
    return [{key: row[key] for key in keys} for row in trainer.train_dataset]
