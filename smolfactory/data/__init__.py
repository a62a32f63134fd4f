"""Data side: LightningDataModules that load, render, tokenize and mask chat and preference datasets."""

from smolfactory.data.base import TokenizedDataModule
from smolfactory.data.kinds import Conversation, ExampleKind, PreferencePair
from smolfactory.data.preference import PreferenceDataModule
from smolfactory.data.sft import SFTDataModule
from smolfactory.data.sources import DatasetSource

__all__ = [
    "Conversation",
    "DatasetSource",
    "ExampleKind",
    "PreferenceDataModule",
    "PreferencePair",
    "SFTDataModule",
    "TokenizedDataModule",
]
