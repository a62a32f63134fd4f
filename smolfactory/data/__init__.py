"""Data side: LightningDataModules that load, render, tokenize and mask chat datasets."""

from smolfactory.data.sft import SFTDataModule

__all__ = ["SFTDataModule"]
