"""smolfactory: fine-tune small language models with PyTorch Lightning."""

import smolfactory.quiet  # noqa: F401  (first: it filters messages that the imports below already emit)

# isort: split
from smolfactory.data import PreferenceDataModule, PromptDataModule, SFTDataModule
from smolfactory.model import DPOModule, LoraSettings, ModelSettings, RecipeModule, SFTModule, build_model

__all__ = [
    "DPOModule",
    "LoraSettings",
    "ModelSettings",
    "PreferenceDataModule",
    "PromptDataModule",
    "RecipeModule",
    "SFTDataModule",
    "SFTModule",
    "build_model",
]
__version__ = "0.1.0"
