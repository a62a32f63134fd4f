"""PreferenceDataModule: pairs of answers to one prompt, for DPO and its variants.

Each row becomes one pair: the prompt followed by the chosen answer, and the prompt followed by the rejected
one, both rendered with the chat template and tokenized exactly as for SFT (the prompt segment ends where the
generation prompt ends, so both sequences share the prompt's tokens). Only the answers' assistant turns have
labels. Loading, validation splits, mixing, bad rows and the tokenization cache are SFTDataModule's.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import datasets
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from smolfactory.data import examples, preference_formats
from smolfactory.data.collate import pair_collate, prompt_collate
from smolfactory.data.examples import RowSettings, fit_length, leading_cut, trained_count
from smolfactory.data.formats import RowError, check_columns, detect_format
from smolfactory.data.preference_formats import PreferenceFormat, row_to_pair
from smolfactory.data.sft import BadRowPolicy, SFTDataModule
from smolfactory.data.sources import Datasets, DatasetSource, ValidationDataset
from smolfactory.data.templates import tokenize_turns
from smolfactory.errors import SmolFactoryError
from smolfactory.model.loading import DEFAULT_MODEL

PAIR_COLUMNS = ["chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels", "length"]


def pair_examples(
    row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, settings: RowSettings
) -> tuple[list[dict[str, Any]], bool]:
    """One preference row as a pair of tokenized sequences (none when a side is left with nothing to train),
    and whether a side was cut to fit ``max_length``."""
    pair = row_to_pair(row, settings.format, settings.columns, settings.system_prompt)
    sequences = {}
    for side, answer in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        messages = pair.prompt + answer
        turns = [index for index in range(len(pair.prompt), len(messages)) if messages[index]["role"] == "assistant"]
        sequences[side] = tokenize_turns(tokenizer, messages, turns, settings.template_kwargs)
    truncated = any(len(sequence["input_ids"]) > settings.max_length for sequence in sequences.values())
    if settings.overlong == "truncate_prompt":  # the same prompt tokens off both sides: as many as the longer needs
        cut = max(leading_cut(sequence["labels"], settings.max_length) for sequence in sequences.values())
        sequences = {side: {key: ids[cut:] for key, ids in sequence.items()} for side, sequence in sequences.items()}
    example: dict[str, Any] = {}
    for side, sequence in sequences.items():
        pieces = fit_length(sequence, settings)
        if not pieces:
            return [], truncated
        example[f"{side}_input_ids"], example[f"{side}_labels"] = pieces[0]
    example["length"] = max(len(example["chosen_input_ids"]), len(example["rejected_input_ids"]))
    example["num_trained"] = min(trained_count(example["chosen_labels"]), trained_count(example["rejected_labels"]))
    return [example], truncated


PAIR_PIPELINE_SOURCE = examples.PIPELINE_SOURCE + "".join(
    inspect.getsource(code) for code in (preference_formats, pair_examples)
)


class PreferenceDataModule(SFTDataModule):
    """Preference datasets (a prompt, a chosen and a rejected answer) to batches of paired sequences for DPO."""

    row_examples = staticmethod(pair_examples)
    example_columns = PAIR_COLUMNS
    pipeline_source = PAIR_PIPELINE_SOURCE

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
        super().__init__(
            tokenizer=tokenizer,
            dataset=dataset,
            validation_dataset=validation_dataset,
            val_split=val_split,
            format=format,
            columns=columns,
            system_prompt=system_prompt,
            chat_template=chat_template,
            chat_template_kwargs=chat_template_kwargs,
            max_length=max_length,
            overlong=overlong,
            group_by_length=group_by_length,
            on_bad_row=on_bad_row,
            batch_size=batch_size,
            num_workers=num_workers,
            num_proc=num_proc,
            seed=seed,
        )
        # SFTDataModule settings that pairs fix (LightningCLI records only the arguments above as hparams).
        self.hparams.update({"train_on": "assistant", "packing": False, "streaming": False})

    def _layout(self, source: DatasetSource, column_names: list[str], columns: dict[str, str]) -> str:
        layout = source.format or self.hparams.format
        try:
            if layout == "auto":
                layout = detect_format(column_names, columns, preference_formats.REQUIRED_COLUMNS)
            if layout not in preference_formats.LAYOUT_FIELDS:
                raise RowError(f"{layout} is not a preference layout ({', '.join(preference_formats.LAYOUT_FIELDS)})")
            check_columns(layout, columns, preference_formats.LAYOUT_FIELDS)
        except RowError as error:
            raise SmolFactoryError(f"dataset {source.path}: {error}") from error
        if not self.tokenizer.chat_template:
            raise SmolFactoryError(
                f"the tokenizer of {self.hparams.tokenizer} has no chat template for the preference rows of "
                f"{source.path}; set data.chat_template (for instance chatml)"
            )
        return layout

    def _collate(self) -> partial:
        return partial(pair_collate, pad_token_id=self.tokenizer.pad_token_id)

    def predict_dataloader(self) -> DataLoader:
        """The prompts of the validation pairs (the training pairs without them), for `smolfactory predict`."""
        data = self.val_data if self.val_data is not None else self.train_data
        return DataLoader(
            data,
            batch_size=self.hparams.batch_size,
            collate_fn=partial(chosen_prompt_collate, pad_token_id=self.tokenizer.pad_token_id),
        )

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
            for batch in DataLoader(data, batch_size=self.hparams.batch_size, collate_fn=self._collate()):
                batch_chosen, batch_rejected = compute(batch)
                chosen += batch_chosen.tolist()
                rejected += batch_rejected.tolist()
            setattr(self, name, data.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected))


def chosen_prompt_collate(pairs: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor | list]:
    """Left-padded prompts of a batch of pairs, with the chosen answers as references."""
    chosen = [{"input_ids": pair["chosen_input_ids"], "labels": pair["chosen_labels"]} for pair in pairs]
    return prompt_collate(chosen, pad_token_id)
