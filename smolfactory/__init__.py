"""smolfactory: fine-tune small language models with PyTorch Lightning."""

import smolfactory.quiet  # noqa: F401  (first: it filters messages that the imports below already emit)

# isort: split
from smolfactory.data import PreferenceDataModule, PromptDataModule, SFTDataModule
from smolfactory.evaluation import reward_results
from smolfactory.model import (
    DPOModule,
    GRPOModule,
    LoraSettings,
    ModelSettings,
    RecipeModule,
    SamplingSettings,
    SFTModule,
    build_model,
)
from smolfactory.rewards import Reward

__all__ = [
    "DPOModule",
    "GRPOModule",
    "LoraSettings",
    "ModelSettings",
    "PreferenceDataModule",
    "PromptDataModule",
    "RecipeModule",
    "Reward",
    "SFTDataModule",
    "SFTModule",
    "SamplingSettings",
    "build_model",
    "reward_results",
]
__version__ = "0.1.0"
