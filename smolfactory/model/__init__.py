"""Model side: LightningModules around transformers models, peft adapters and model loading."""

from smolfactory.model.dpo import DPOModule
from smolfactory.model.loading import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model_path
from smolfactory.model.lora import LoraSettings
from smolfactory.model.sft import CausalLMModule

__all__ = [
    "DEFAULT_MODEL",
    "CausalLMModule",
    "DPOModule",
    "LoraSettings",
    "load_model",
    "load_tokenizer",
    "resolve_model_path",
]
