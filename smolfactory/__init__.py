"""smolfactory: fine-tune small language models with PyTorch Lightning."""

import smolfactory.quiet  # noqa: F401  (first: it filters messages that the imports below already emit)

# isort: split
from smolfactory.data import PreferenceDataModule, SFTDataModule
from smolfactory.model import CausalLMModule, DPOModule, LoraSettings

__all__ = ["CausalLMModule", "DPOModule", "LoraSettings", "PreferenceDataModule", "SFTDataModule"]
__version__ = "0.1.0"
