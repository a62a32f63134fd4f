"""CausalLMModule: supervised fine-tuning of a Hugging Face causal LM, with or without LoRA."""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from peft import PeftModel
from transformers import PreTrainedModel, get_cosine_with_min_lr_schedule_with_warmup

from smolfactory.errors import SmolFactoryError
from smolfactory.model.loading import DEFAULT_MODEL, adapter_base_model, load_model, resolve_model_path
from smolfactory.model.lora import LoraSettings, apply_lora
from smolfactory.model.loss import label_token_loss

# Config keys of models that rescale or soft-cap their logits after the LM head (Gemma 2/3, Cohere,
# Granite); the label-only loss calls the LM head directly and would skip that step.
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


class CausalLMModule(L.LightningModule):
    """Supervised fine-tuning of a Hugging Face causal LM: LoRA adapters or every weight."""

    def __init__(
        self,
        model_name: str = DEFAULT_MODEL,
        lora: LoraSettings | None = LoraSettings(),  # noqa: B008 (frozen, so sharing is safe)
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa",
    ) -> None:
        """Fine-tune a pretrained causal language model.

        Args:
            model_name: Hub id, model or adapter folder, or builtin:smollm2-135m-instruct (also names the tokenizer).
            lora: LoRA settings; null trains every weight. An adapter folder as model_name keeps training that adapter.
            learning_rate: Peak AdamW learning rate, reached after the warm-up.
            weight_decay: AdamW weight decay, applied to matrices only (not to norms or biases).
            betas: AdamW beta coefficients.
            warmup_steps: Optimizer steps of linear warm-up from zero to the peak learning rate.
            min_lr_ratio: Final learning rate of the cosine decay, as a fraction of the peak.
            attn_implementation: Attention kernel of the transformers model: sdpa, eager or flash_attention_2.
        """
        super().__init__()
        if warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
            raise SmolFactoryError(
                f"model.warmup_steps must be >= 0 and model.min_lr_ratio in [0, 1], got {warmup_steps}, {min_lr_ratio}"
            )
        self.save_hyperparameters()
        # Under LightningCLI, hparams hold the parsed config (plain dicts); keep the typed settings here.
        self.lora = LoraSettings(**lora) if isinstance(lora, dict) else lora
        if self.lora is not None:
            self.lora.check()
        self.model: PreTrainedModel | PeftModel | None = None
        # LoRA checkpoints hold only the trainable weights (see on_save_checkpoint); the frozen base is
        # rebuilt by configure_model, so its keys are expected to be missing when a checkpoint loads.
        self.strict_loading = self.lora is None

    def configure_model(self) -> None:
        # Lightning calls this for every stage and on load_from_checkpoint: build only once.
        if self.model is not None:
            return
        name, attention = self.hparams.model_name, self.hparams.attn_implementation
        path = resolve_model_path(name)
        base_name = adapter_base_model(path)
        if base_name is None:
            model = load_model(path, attn_implementation=attention)
            if self.lora is not None:
                model = apply_lora(model, self.lora)
        else:  # an adapter folder: keep training its adapter, or merge it and train every weight
            model = PeftModel.from_pretrained(
                load_model(base_name, attn_implementation=attention), path, is_trainable=True
            )
            if self.lora is None:
                model = model.merge_and_unload()
                model.requires_grad_(True)
        postprocessing = [key for key in LOGIT_POSTPROCESSING if getattr(model.config, key, None) not in (None, 1.0)]
        if postprocessing:
            raise SmolFactoryError(
                f"model '{name}' post-processes its logits ({', '.join(postprocessing)}), which smolfactory's "
                "label-only loss does not support yet; use a model without it (SmolLM, Qwen, Llama)"
            )
        model.train()  # from_pretrained returns eval mode, and Lightning keeps the modes it finds
        self.model = model

    @property
    def causal_lm(self) -> PreTrainedModel:
        """The transformers model underneath any PEFT wrapper (its layers hold the adapters)."""
        return self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model

    def forward(self, input_ids: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits ``[batch, seq, vocab]`` for every position."""
        return self.model(input_ids=input_ids, **kwargs).logits

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy over a batch's trained tokens, and how many tokens were trained."""
        decoder = self.causal_lm.get_decoder()
        hidden = decoder(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False
        ).last_hidden_state
        return label_token_loss(hidden, self.causal_lm.get_output_embeddings(), batch["labels"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss_sum, num_tokens = self.loss_terms(batch)
        loss = loss_sum / num_tokens.clamp(min=1)
        self.log("train_loss", loss, prog_bar=True, batch_size=int(num_tokens))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._log_eval_loss("val_loss", batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._log_eval_loss("test_loss", batch)

    def _log_eval_loss(self, name: str, batch: dict[str, torch.Tensor]) -> None:
        loss_sum, num_tokens = self.loss_terms(batch)
        # batch_size=num_tokens makes the epoch value a token-weighted mean, not a mean of batch means.
        self.log(name, loss_sum / num_tokens.clamp(min=1), prog_bar=True, batch_size=int(num_tokens))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.lora is not None:  # the frozen base is rebuilt from model_name: keep only what trains
            trainable = {name for name, parameter in self.named_parameters() if parameter.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def configure_optimizers(self) -> dict:
        decay, no_decay = [], []
        for parameter in self.parameters():
            if parameter.requires_grad:
                (decay if parameter.ndim >= 2 else no_decay).append(parameter)
        groups = [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.learning_rate, betas=self.hparams.betas)
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, self.hparams.warmup_steps, self._total_steps(), min_lr_rate=self.hparams.min_lr_ratio
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _total_steps(self) -> int:
        if self.trainer.max_steps > 0:
            return self.trainer.max_steps
        total = self.trainer.estimated_stepping_batches
        if total == float("inf"):
            raise SmolFactoryError("the cosine schedule needs a length: set trainer.max_steps or trainer.max_epochs")
        return int(total)
