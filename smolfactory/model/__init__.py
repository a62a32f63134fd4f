"""Model side: the recipes' LightningModules (siblings on RecipeModule), model building and loading."""

from smolfactory.model.build import ModelSettings, build_model
from smolfactory.model.dpo import DPOModule
from smolfactory.model.grpo import GRPOModule, SamplingSettings
from smolfactory.model.loading import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model_path
from smolfactory.model.lora import LoraSettings
from smolfactory.model.recipe import RecipeModule
from smolfactory.model.sft import SFTModule

__all__ = [
    "DEFAULT_MODEL",
    "DPOModule",
    "GRPOModule",
    "LoraSettings",
    "ModelSettings",
    "RecipeModule",
    "SFTModule",
    "SamplingSettings",
    "build_model",
    "load_model",
    "load_tokenizer",
    "resolve_model_path",
]
