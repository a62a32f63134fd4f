"""PreferenceDataModule: pairs of answers to one prompt, for DPO and its variants.

Each row becomes one pair: the prompt followed by the chosen answer, and the prompt followed by the rejected
one, both rendered with the chat template and tokenized as for SFT (``kinds.PreferencePair``). Loading, validation
splits, mixing, bad rows, the tokenization cache, loaders and resume are ``TokenizedDataModule``'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import datasets
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from smolfactory.data.base import BadRowPolicy, TokenizedDataModule
from smolfactory.data.kinds import PreferencePair
from smolfactory.data.preference_formats import PreferenceFormat
from smolfactory.data.sources import Datasets, ValidationDataset
from smolfactory.model.loading import DEFAULT_MODEL


class PreferenceDataModule(TokenizedDataModule):
    """Preference datasets (a prompt, a chosen and a rejected answer) to batches of paired sequences for DPO."""

    def __init__(
        self,
        tokenizer: str = DEFAULT_MODEL,
        dataset: Datasets = "builtin:quickstart-preference",
        validation_dataset: ValidationDataset = None,
        val_split: float = 0.05,
        format: PreferenceFormat = "auto",
        columns: dict[str, str] | None = None,
        system_prompt: str | None = None,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        max_length: int = 1024,
        overlong: Literal["truncate", "truncate_prompt", "drop"] = "truncate",
        group_by_length: bool = False,
        on_bad_row: BadRowPolicy = "error",
        batch_size: int = 4,
        num_workers: int = 0,
        num_proc: int | None = None,
        seed: int = 42,
    ) -> None:
        """Pairs of answers rendered with the chat template, labels only on the answers.

        Args:
            tokenizer: Model name whose tokenizer and chat template are used (the CLI links it to model.model_name).
            dataset: Training pairs: a Hub id, local json/jsonl/parquet/csv file or builtin:quickstart-preference,
                or a list of {path, name, split, revision, format, columns, weight, num_samples} sources to mix.
            validation_dataset: Separate validation pairs (same forms as dataset); null splits them off dataset.
            val_split: Fraction of dataset held out for validation (unused with validation_dataset or builtin data).
            format: Row layout: prompt_chosen_rejected, sharegpt, chosen_rejected, or auto (from the columns).
            columns: Column renames, layout field -> your column, e.g. {prompt: question, chosen: good, rejected: bad}.
            system_prompt: System turn added to prompts that have none.
            chat_template: Replaces the tokenizer's template: a built-in name (chatml), a .jinja file or a Jinja string.
            chat_template_kwargs: Extra variables for the chat template, e.g. {enable_thinking: false} for SmolLM3.
            max_length: Longest sequence (prompt and answer) in tokens.
            overlong: A longer sequence keeps its first max_length tokens (truncate), or loses the prompt's start
                first, the same tokens on both sides, so the answers fit (truncate_prompt), or its pair is dropped.
                A pair left with nothing to train on a side is dropped and counted.
            group_by_length: Batch pairs of similar length to cut padding.
            on_bad_row: A malformed row stops with an error naming it, or is skipped and counted.
            batch_size: Pairs per micro-batch (twice as many sequences go through the model).
            num_workers: DataLoader worker processes.
            num_proc: Processes that tokenize the dataset (datasets.map); null tokenizes in this process.
            seed: Seed of the train/validation split and of dataset mixing.
        """
        super().__init__(PreferencePair())

    def add_reference_log_probs(self, compute: Callable[[dict], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Add each pair's reference log-probabilities, ``compute(batch) -> (chosen, rejected)``, as columns.

        Batches then carry them, and the model needs no reference forward pass while training.
        """
        for name in ("train_data", "val_data"):
            data: datasets.Dataset | None = getattr(self, name)
            if data is None or "ref_chosen_logps" in data.column_names:
                continue
            rank_zero_info(f"Computing reference log-probabilities of {len(data)} {name.split('_')[0]} pairs")
            chosen, rejected = [], []
            for batch in DataLoader(data, batch_size=self.hparams.batch_size, collate_fn=self.train_collate()):
                batch_chosen, batch_rejected = compute(batch)
                chosen += batch_chosen.tolist()
                rejected += batch_rejected.tolist()
            setattr(self, name, data.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected))
