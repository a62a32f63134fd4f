"""LoRA settings as they appear in the YAML, and how they become a ``peft`` model."""

from __future__ import annotations

from dataclasses import dataclass

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from smolfactory.errors import SmolFactoryError


@dataclass(frozen=True)
class LoraSettings:
    """Low-rank adapters on the model's linear layers (the base weights stay frozen)."""

    r: int = 16
    """Rank of each adapter's update matrices."""
    alpha: int = 32
    """Scaling numerator: an adapter's update is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training."""
    target_modules: str | list[str] = "all-linear"
    """Layers that get adapters: 'all-linear' (every linear layer but the LM head) or a list of module names."""

    def check(self) -> None:
        """Raise a one-line error for values peft would reject later, deep inside model building."""
        if self.r < 1:
            raise SmolFactoryError(f"model.lora.r must be at least 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise SmolFactoryError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")


def apply_lora(model: PreTrainedModel, settings: LoraSettings) -> PeftModel:
    """Wrap ``model`` with fresh LoRA adapters; only the adapters require gradients afterwards."""
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)
