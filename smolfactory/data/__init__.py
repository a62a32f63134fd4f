"""Data side: LightningDataModules that load, render, tokenize and mask chat datasets."""

from smolfactory.data.sft import SFTDataModule
from smolfactory.data.sources import DatasetSource

__all__ = ["DatasetSource", "SFTDataModule"]
