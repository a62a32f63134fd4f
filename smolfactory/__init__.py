"""smolfactory: fine-tune small language models with PyTorch Lightning."""

from smolfactory.data import PreferenceDataModule, SFTDataModule
from smolfactory.model import CausalLMModule, DPOModule, LoraSettings

__all__ = ["CausalLMModule", "DPOModule", "LoraSettings", "PreferenceDataModule", "SFTDataModule"]
__version__ = "0.1.0"
