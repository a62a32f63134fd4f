"""SFTModule: supervised fine-tuning of a causal LM, with or without LoRA: next-token cross-entropy on the labels."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from smolfactory.model.loss import label_token_loss
from smolfactory.model.recipe import ADAMW, RecipeModule, Sum

WARMUP_COSINE = {"class_path": "smolfactory.model.schedules.WarmupCosineLR", "init_args": {"warmup_steps": 0}}


class SFTModule(RecipeModule):
    """Supervised fine-tuning of a Hugging Face causal LM: LoRA adapters or every weight."""

    METRICS = ("loss", "token_accuracy")
    EXP_METRICS: ClassVar[dict[str, str]] = {"perplexity": "loss"}
    loss_count_name = "tokens"

    def __init__(
        self,
        optimizer: OptimizerCallable = ADAMW,  # noqa: B006 (never mutated)
        lr_scheduler: LRSchedulerCallable | None = WARMUP_COSINE,  # noqa: B006
        **kwargs: Any,
    ) -> None:
        """Fine-tune a pretrained causal language model on the labelled tokens of its examples.

        Args:
            optimizer: Optimizer class path and arguments, e.g. torch.optim.AdamW {lr, weight_decay, betas} or
                bitsandbytes.optim.AdamW8bit (its two moments in 8 bits: a quarter of the memory and checkpoint
                space); weight_decay applies to matrices only (not to norms or biases).
            lr_scheduler: Learning-rate schedule class path, stepped every optimizer step; the default
                smolfactory.model.schedules.WarmupCosineLR {warmup_steps, min_lr_ratio} warms up linearly, then
                decays along a cosine. null keeps the learning rate constant.
            **kwargs: The model settings every recipe shares: model_name, lora, dtype, quantization, ...
        """
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, **kwargs)

    def batch_sums(self, batch: dict[str, torch.Tensor]) -> dict[str, Sum]:
        """Summed cross-entropy over the batch's label tokens, and how many of them the model predicts right."""
        hidden_states = self.final_hidden_states(self.model, batch)
        loss_sum, tokens, correct = label_token_loss(
            hidden_states, self.causal_lm.get_output_embeddings(), batch["labels"]
        )
        return {"loss": Sum(loss_sum, tokens), "token_accuracy": Sum(correct, tokens)}
