"""Data side: LightningDataModules that load, render, tokenize and mask chat and preference datasets."""

from smolfactory.data.preference import PreferenceDataModule
from smolfactory.data.sft import SFTDataModule
from smolfactory.data.sources import DatasetSource

__all__ = ["DatasetSource", "PreferenceDataModule", "SFTDataModule"]
