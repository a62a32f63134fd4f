"""smolfactory: fine-tune small language models with PyTorch Lightning."""

from smolfactory.data import SFTDataModule
from smolfactory.model import CausalLMModule, LoraSettings

__all__ = ["CausalLMModule", "LoraSettings", "SFTDataModule"]
__version__ = "0.1.0"
