"""Data side: LightningDataModules that load, render, tokenize and mask chat, preference and prompt datasets."""

from smolfactory.data.base import TokenizedDataModule
from smolfactory.data.kinds import Conversation, ExampleKind, PreferencePair, Prompt
from smolfactory.data.preference import PreferenceDataModule
from smolfactory.data.prompts import PromptDataModule
from smolfactory.data.sft import SFTDataModule
from smolfactory.data.sources import DatasetSource

__all__ = [
    "Conversation",
    "DatasetSource",
    "ExampleKind",
    "PreferenceDataModule",
    "PreferencePair",
    "Prompt",
    "PromptDataModule",
    "SFTDataModule",
    "TokenizedDataModule",
]
