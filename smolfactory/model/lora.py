"""LoRA settings as they appear in the YAML, and how they become a ``peft`` model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners import lora
from torch import nn
from transformers import PreTrainedModel

from smolfactory.errors import SmolFactoryError


@dataclass(frozen=True)
class LoraSettings:
    """Low-rank adapters on the model's linear layers (the base weights stay frozen).

    Attributes:
        r: Rank of each adapter's update matrices.
        alpha: Scaling numerator: an adapter's update is multiplied by alpha / r (alpha / sqrt(r) with use_rslora).
        dropout: Dropout on the adapter's input during training.
        target_modules: Layers with adapters: all-linear (all but the LM head), attention, or a list such as [q_proj,
            v_proj].
        use_dora: DoRA: also learn each weight's magnitude (weight-decomposed LoRA); slower, often better at low rank.
        use_rslora: Rank-stabilised LoRA: scale by alpha / sqrt(r), so larger ranks keep learning.
        modules_to_save: Modules trained in full beside the adapters and saved with them, e.g. [lm_head] or
            [embed_tokens].
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    use_dora: bool = False
    use_rslora: bool = False
    modules_to_save: list[str] | None = None

    def check(self) -> None:
        """Raise a one-line error for values peft would reject later, deep inside model building."""
        if self.r < 1:
            raise SmolFactoryError(f"model.lora.r must be at least 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise SmolFactoryError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")


def attention_linear_names(model: PreTrainedModel) -> list[str]:
    """Names of the linear layers inside the model's attention blocks (q_proj, k_proj, ... for Llama)."""
    names = {
        child_name
        for module in model.modules()
        if type(module).__name__.endswith("Attention")
        for child_name, child in module.named_children()
        if isinstance(child, nn.Linear)
    }
    if not names:
        raise SmolFactoryError(
            f"{type(model).__name__} has no linear layer inside a module named *Attention; "
            "list model.lora.target_modules explicitly"
        )
    return sorted(names)


def apply_lora(model: PreTrainedModel, settings: LoraSettings) -> PeftModel:
    """Wrap ``model`` with fresh LoRA adapters; only the adapters (and modules_to_save) train afterwards."""
    targets = attention_linear_names(model) if settings.target_modules == "attention" else settings.target_modules
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        use_dora=settings.use_dora,
        use_rslora=settings.use_rslora,
        modules_to_save=settings.modules_to_save,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as error:  # peft's message for a target that matches nothing, and similar
        raise SmolFactoryError(f"model.lora: {str(error).splitlines()[0]}") from error


def skip_input_casts_under_autocast(model: nn.Module) -> None:
    """Let each plain LoRA linear layer skip peft's cast of its input while autocast runs.

    peft casts an adapter's input to the adapter's dtype (float32) before its first matrix product, and under
    autocast that product casts it straight back to bf16, for the same values (bf16 to float32 to bf16 is exact).
    Where the input arrives in bf16 (o_proj and down_proj under bf16-mixed) that is two copies forward and two
    back per layer: 240 a step for SmolLM2-135M, about 2% of a packed LoRA step on a CPU. peft's own quantized
    layers already skip the cast under autocast; this does the same for ``nn.Linear`` ones. Without autocast the
    cast stays, since there it is what makes the dtypes match. Layers with a LoRA variant (DoRA) keep it.
    """
    for layer in model.modules():
        if isinstance(layer, lora.Linear) and not layer.lora_variant:
            layer.register_forward_pre_hook(cast_input_only_without_autocast)


def cast_input_only_without_autocast(layer: lora.Linear, args: tuple) -> None:
    if args:
        layer.cast_input_dtype_enabled = not torch.is_autocast_enabled(args[0].device.type)
