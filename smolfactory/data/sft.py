"""SFTDataModule: datasets of any common layout to batches of input ids and labels.

The pipeline, per dataset: load rows (``sources``), turn each row into a conversation or text
(``formats``), render and tokenize it with the trained spans marked (``templates``), fit it to
``max_length``, then mix the datasets and batch them: padded, grouped by length, or packed (``packing``).
Tokenization runs once through ``datasets.map`` and is cached; rank 0 does it first in ``prepare_data``.
"""

from __future__ import annotations

import dataclasses
import math
import random
from functools import partial
from typing import Any, Literal

import datasets
import lightning as L
import torch
from datasets.distributed import split_dataset_by_node
from datasets.fingerprint import Hasher
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from smolfactory.checkpoints import check_same_settings
from smolfactory.data import examples
from smolfactory.data.collate import packed_collate, pad_collate, prompt_collate
from smolfactory.data.examples import (
    EXAMPLE_COLUMNS,
    RowSettings,
    conversation_examples,
    summarize,
    summary_line,
    tokenize_rows,
)
from smolfactory.data.formats import Format, RowError, check_columns, detect_format
from smolfactory.data.packing import (
    EpochShuffleSampler,
    LengthGroupedBatchSampler,
    PackedDataset,
    PackedStream,
    ResumableDataLoader,
)
from smolfactory.data.sources import BUILTIN_DATASETS, Datasets, DatasetSource, ValidationDataset, load_rows
from smolfactory.data.templates import TrainOn, resolve_chat_template
from smolfactory.errors import SmolFactoryError
from smolfactory.model.loading import BUILTIN_PREFIX, DEFAULT_MODEL, load_tokenizer

# Settings a resumed run may change: how many processes read and tokenize, not what the batches hold.
RESUMABLE_CHANGES = {"num_workers", "num_proc"}
Overlong = Literal["truncate", "truncate_prompt", "drop", "split"]
BadRowPolicy = Literal["error", "skip"]


class SFTDataModule(L.LightningDataModule):
    """Chat, instruction or text datasets to batches of input ids and labels for supervised fine-tuning."""

    # What a row becomes (subclasses for other kinds of examples replace these three).
    row_examples = staticmethod(conversation_examples)
    example_columns = EXAMPLE_COLUMNS
    pipeline_source = examples.PIPELINE_SOURCE

    def __init__(
        self,
        tokenizer: str = DEFAULT_MODEL,
        dataset: Datasets = "builtin:quickstart",
        validation_dataset: ValidationDataset = None,
        val_split: float = 0.05,
        format: Format = "auto",
        columns: dict[str, str] | None = None,
        system_prompt: str | None = None,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        train_on: TrainOn = "assistant",
        max_length: int = 2048,
        overlong: Overlong = "truncate",
        packing: bool = False,
        group_by_length: bool = False,
        on_bad_row: BadRowPolicy = "error",
        streaming: bool = False,
        batch_size: int = 4,
        num_workers: int = 0,
        num_proc: int | None = None,
        seed: int = 42,
    ) -> None:
        """Examples rendered with a chat template (or as plain text), with labels only where the model learns.

        Args:
            tokenizer: Model name whose tokenizer and chat template are used (the CLI links it to model.model_name).
            dataset: Training data: a Hub id, local json/jsonl/parquet/csv file or builtin:quickstart, or a list of
                {path, name, split, revision, format, columns, weight, num_samples} sources to mix.
            validation_dataset: Separate validation data (same forms as dataset); null splits it off dataset.
            val_split: Fraction of dataset held out for validation (unused with validation_dataset or builtin data).
            format: Row layout: messages, sharegpt, alpaca, prompt_completion, text, or auto (from the columns).
            columns: Column renames, layout field -> your column, e.g. {instruction: question, output: answer}.
            system_prompt: System turn added to conversations that have none.
            chat_template: Replaces the tokenizer's template: a built-in name (chatml), a .jinja file or a Jinja string.
            chat_template_kwargs: Extra variables for the chat template, e.g. {enable_thinking: false} for SmolLM3.
            train_on: Tokens with a loss: assistant (every assistant turn), last_assistant, or all.
            max_length: Longest example in tokens (and the length of a packed row).
            overlong: Longer examples keep their first max_length tokens (truncate), lose their prompt's start
                first so the answer fits (truncate_prompt), are dropped, or split into max_length pieces. An example
                left with no trained token is dropped and counted.
            packing: Pack examples into padding-free rows of max_length tokens (best-fit decreasing).
            group_by_length: Without packing, batch examples of similar length to cut padding.
            on_bad_row: A malformed row (not a length problem) stops with an error naming it, or is skipped and
                counted.
            streaming: Read and tokenize rows lazily while training, for data larger than memory. Needs
                trainer.max_steps; validation comes only from validation_dataset; weights become sampling odds.
            batch_size: Examples per micro-batch (packed rows per micro-batch with packing).
            num_workers: DataLoader worker processes.
            num_proc: Processes that tokenize the dataset (datasets.map); null tokenizes in this process.
            seed: Seed of the train/validation split and of dataset mixing.
        """
        super().__init__()
        if not 0 <= val_split < 1:
            raise SmolFactoryError(f"data.val_split must be in [0, 1), got {val_split}")
        if max_length < 2 or batch_size < 1:
            raise SmolFactoryError(
                f"data.max_length must be >= 2 and data.batch_size >= 1, got {max_length}, {batch_size}"
            )
        if streaming and group_by_length:
            raise SmolFactoryError("data.group_by_length needs the whole dataset; it does not work with data.streaming")
        if packing and group_by_length:
            raise SmolFactoryError("set data.packing or data.group_by_length, not both: packed rows have no padding")
        self.save_hyperparameters()
        # Sources as plain dicts, so checkpoints (which keep these) load with torch.load(weights_only=True).
        plain = [dataclasses.asdict(s) if isinstance(s, DatasetSource) else str(s) for s in _listed(dataset)]
        self.hparams.dataset = plain if isinstance(dataset, list) else plain[0]
        if isinstance(validation_dataset, DatasetSource):
            self.hparams.validation_dataset = dataclasses.asdict(validation_dataset)
        elif validation_dataset is not None:
            self.hparams.validation_dataset = str(validation_dataset)
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.train_data: datasets.Dataset | None = None
        self.val_data: datasets.Dataset | None = None
        self.summaries: dict[str, dict[str, Any]] = {}

    @property
    def sources(self) -> list[DatasetSource]:
        """The training datasets, as sources."""
        return [_as_source(item) for item in _listed(self.hparams.dataset)]

    def prepare_data(self) -> None:
        # Lightning runs this on one process per node before setup: the other ranks then load the
        # tokenized data from the datasets cache instead of tokenizing it again.
        # In the process that prepared, setup then reuses the result instead of reading the cache back.
        if not self.hparams.streaming:
            self._prepared = self._build(report=True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is None:
            build = self._build_stream if self.hparams.streaming else self._build
            prepared = getattr(self, "_prepared", None)
            self.train_data, self.val_data = prepared if prepared is not None else build(report=True)
            self._prepared = None

    def state_dict(self) -> dict[str, Any]:
        """The settings that decide which batches come in which order, kept in every checkpoint."""
        return {"settings": dict(self.hparams), "steps": self._step_shape()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse to resume fit with other data settings, or other devices or accumulation: the batches would not
        continue where they stopped."""
        saved = state_dict.get("settings")
        if saved is None or self.trainer is None or self.trainer.state.fn != "fit":
            return
        check_same_settings(saved, dict(self.hparams), "data", RESUMABLE_CHANGES, self.trainer.ckpt_path)
        check_same_settings(state_dict["steps"], self._step_shape(), "trainer", set(), self.trainer.ckpt_path)

    def _step_shape(self) -> dict[str, int]:
        """How the examples of an optimizer step are shared out: processes, and micro-batches per process."""
        if self.trainer is None:
            return {}
        return {"world_size": self.trainer.world_size, "accumulate_grad_batches": self.trainer.accumulate_grad_batches}

    def train_dataloader(self) -> DataLoader:
        if self.hparams.streaming:
            return self._stream_loader(self.train_data.shuffle(seed=self.hparams.seed, buffer_size=10_000))
        return self._loader(self.train_data, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        if self.val_data is None:
            return []
        return self._stream_loader(self.val_data) if self.hparams.streaming else self._loader(self.val_data, False)

    def test_dataloader(self) -> DataLoader:
        """The validation data: `smolfactory test` reports the held-out loss of a checkpoint."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """Prompts of the validation data (the training data without one), for `smolfactory predict`."""
        data = self.val_data if self.val_data is not None else self.train_data
        collate = partial(prompt_collate, pad_token_id=self.tokenizer.pad_token_id)
        return DataLoader(data, batch_size=self.hparams.batch_size, collate_fn=collate)

    def _loader(self, data: datasets.Dataset, shuffle: bool) -> DataLoader:
        """Batches of ``data``; shuffled ones come from a loader that resumes mid-epoch in the same order."""
        hparams, collate = self.hparams, self._collate()
        if hparams.packing:
            data = PackedDataset(data, hparams.max_length)
        if not shuffle:
            return DataLoader(
                data,
                hparams.batch_size,
                collate_fn=collate,
                num_workers=hparams.num_workers,
                generator=self._generator(),
            )
        sampler = EpochShuffleSampler(len(data), hparams.seed)
        if hparams.group_by_length:
            batches = LengthGroupedBatchSampler(sampler, hparams.batch_size, False, data["length"])
            arguments = {"batch_sampler": batches}
        else:
            arguments = {"batch_size": hparams.batch_size, "sampler": sampler}
        return ResumableDataLoader(
            data, collate_fn=collate, num_workers=hparams.num_workers, batches_done=self._batches_done,
            generator=self._generator(), **arguments,
        )  # fmt: skip

    def _generator(self) -> torch.Generator:
        """A generator of the loader's own to seed its iterators: torch's default draws from the global one at
        every epoch and validation, which a resumed run could not replay (its dropout masks would differ)."""
        return torch.Generator().manual_seed(self.hparams.seed)

    def _batches_done(self) -> int:
        """Batches of the current epoch the training loop has taken (what a resumed run skips)."""
        if self.trainer is None:
            return 0
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.ready

    def _stream_loader(self, data: datasets.IterableDataset) -> DataLoader:
        if self.trainer is not None and self.trainer.world_size > 1:  # each rank reads its own share of rows
            data = split_dataset_by_node(data, rank=self.trainer.global_rank, world_size=self.trainer.world_size)
        if self.hparams.packing:
            data = PackedStream(data, self.hparams.max_length)
        return DataLoader(
            data,
            self.hparams.batch_size,
            collate_fn=self._collate(),
            num_workers=self.hparams.num_workers,
            generator=self._generator(),
        )

    def _collate(self) -> partial:
        """Packed rows side by side with restarting positions, or examples padded to the longest."""
        collate = packed_collate if self.hparams.packing else pad_collate
        return partial(collate, pad_token_id=self.tokenizer.pad_token_id)

    def _load_tokenizer(self) -> None:
        self.tokenizer = load_tokenizer(self.hparams.tokenizer)
        if self.hparams.chat_template:
            self.tokenizer.chat_template = resolve_chat_template(self.hparams.chat_template)

    def _build_stream(self, report: bool = False) -> tuple[datasets.IterableDataset, datasets.IterableDataset | None]:
        """Lazily tokenized (train, validation) streams; weights become the odds of drawing from each dataset."""
        self._load_tokenizer()
        streams = []
        for source in self.sources:
            stream = self._tokenize(source, report, streaming=True)
            streams.append(stream.take(source.num_samples) if source.num_samples is not None else stream)
        if len(streams) == 1:
            train = streams[0]
        elif any(source.weight is not None for source in self.sources):
            weights = [source.weight or 1.0 for source in self.sources]
            odds = [weight / sum(weights) for weight in weights]
            train = datasets.interleave_datasets(
                streams, probabilities=odds, seed=self.hparams.seed, stopping_strategy="all_exhausted"
            )
        else:
            train = datasets.concatenate_datasets(streams)
        validation = self.hparams.validation_dataset
        if not validation:
            rank_zero_info("data.streaming: no validation_dataset, so no validation (val_split needs all the data)")
            return train, None
        return train, self._tokenize(_as_source(validation, split="validation"), report, streaming=True)

    def _build(self, report: bool = False) -> tuple[datasets.Dataset, datasets.Dataset | None]:
        """Tokenize every dataset and return (train, validation)."""
        self._load_tokenizer()
        sources = self.sources
        train = datasets.concatenate_datasets([self._mixed(self._tokenize(s, report), s) for s in sources])
        validation = self.hparams.validation_dataset
        if validation:
            spec = _as_source(validation, split="validation")
            return train, self._tokenize(spec, report)
        builtin = sources[0].path
        if len(sources) == 1 and builtin.startswith(BUILTIN_PREFIX):  # built-in data ships a held-out split
            if "validation" in BUILTIN_DATASETS.get(builtin[len(BUILTIN_PREFIX) :], {}):
                return train, self._tokenize(DatasetSource(builtin, split="validation"), report)
        if self.hparams.val_split == 0:
            return train, None
        return self._split(train)

    def _split(self, data: datasets.Dataset) -> tuple[datasets.Dataset, datasets.Dataset]:
        val_split = self.hparams.val_split
        if len(data) - math.ceil(len(data) * val_split) < 1:
            raise SmolFactoryError(
                f"the training data has {len(data)} usable examples, too few to hold out data.val_split={val_split}; "
                "set data.val_split: 0 or give data.validation_dataset"
            )
        split = data.train_test_split(test_size=val_split, seed=self.hparams.seed)
        return split["train"], split["test"]

    def _mixed(self, data: datasets.Dataset, source: DatasetSource) -> datasets.Dataset:
        """The dataset resampled to its mixing share: whole repeats, then a seeded sample of the remainder."""
        if source.num_samples is None and source.weight is None:
            return data
        count = source.num_samples if source.num_samples is not None else max(1, round(source.weight * len(data)))
        repeats, remainder = divmod(count, len(data))
        rest = random.Random(self.hparams.seed).sample(range(len(data)), remainder)
        return data.select([*range(len(data))] * repeats + sorted(rest))

    def _tokenize(self, source: DatasetSource, report: bool, streaming: bool = False) -> datasets.Dataset:
        """Read, render, tokenize and fit every row of one dataset; rows are numbered from 1, as in the file."""
        rows = load_rows(source, streaming, self.hparams.on_bad_row)
        # A streamed json file may not know its columns before it is read: the first row tells.
        column_names = rows.column_names or list(next(iter(rows)))
        columns = source.columns if source.columns is not None else self.hparams.columns or {}
        layout = self._layout(source, column_names, columns)
        settings = RowSettings(
            format=layout,
            columns=columns,
            system_prompt=self.hparams.system_prompt,
            template_kwargs=self.hparams.chat_template_kwargs,
            train_on=self.hparams.train_on,
            max_length=self.hparams.max_length,
            overlong=self.hparams.overlong,
            on_bad_row=self.hparams.on_bad_row,
        )
        function = partial(
            tokenize_rows,
            tokenizer=self.tokenizer,
            settings=settings,
            source=source.path,
            row_examples=self.row_examples,
            columns=self.example_columns,
        )
        if streaming:
            stream = rows.map(function, batched=True, batch_size=256, with_indices=True, remove_columns=column_names)
            return stream.filter(lambda n: n > 0, input_columns="num_trained").select_columns(self.example_columns)
        # datasets fingerprints the mapped function but not the code it calls: include our code and the
        # tokenizer (with its chat template) explicitly, so a change to masking never reuses stale labels.
        fingerprint = Hasher.hash((rows._fingerprint, self.pipeline_source, Hasher.hash(self.tokenizer), settings))
        try:
            tokenized = rows.map(
                function,
                batched=True,
                batch_size=256,
                with_indices=True,
                remove_columns=column_names,
                new_fingerprint=fingerprint,
                num_proc=self.hparams.num_proc,
                desc=f"Tokenizing {source.path}",
            )
        except SmolFactoryError as error:  # a bad row: its one line, without the frames of datasets.map
            raise SmolFactoryError(str(error)) from None
        kept = tokenized.filter(lambda n: n > 0, input_columns="num_trained", num_proc=self.hparams.num_proc)
        summary = summarize(tokenized, len(rows), len(kept))
        if report:
            self.summaries[f"{source.path}:{source.split}"] = summary
            rank_zero_info(summary_line(f"{source.path} [{source.split}]", summary, self.hparams.max_length))
        if len(kept) == 0:
            if summary["dropped"]:
                raise SmolFactoryError(
                    f"dataset {source.path}: no row has a trained token within data.max_length="
                    f"{self.hparams.max_length} ({summary['dropped']} of {summary['rows']} dropped); raise "
                    "data.max_length, or set data.overlong: truncate_prompt to cut prompts from their start"
                )
            raise SmolFactoryError(f"dataset {source.path} has no example with a trained token; check its rows")
        return kept.select_columns(self.example_columns)

    def _layout(self, source: DatasetSource, column_names: list[str], columns: dict[str, str]) -> str:
        """The dataset's row layout (given, or told from its columns), checked against the renames and template."""
        layout = source.format or self.hparams.format
        try:
            layout = detect_format(column_names, columns) if layout == "auto" else layout
            check_columns(layout, columns)
        except RowError as error:
            raise SmolFactoryError(f"dataset {source.path}: {error}") from error
        if layout in ("messages", "sharegpt", "alpaca") and not self.tokenizer.chat_template:
            raise SmolFactoryError(
                f"the tokenizer of {self.hparams.tokenizer} has no chat template for the {layout} rows of "
                f"{source.path}; set data.chat_template (for instance chatml)"
            )
        return layout


def _listed(dataset: Any) -> list:
    return dataset if isinstance(dataset, list) else [dataset]


def _as_source(item: str | DatasetSource | dict, split: str = "train") -> DatasetSource:
    if isinstance(item, DatasetSource):
        return item
    if isinstance(item, dict):  # LightningCLI hands hparams over as plain dicts
        return DatasetSource(**item)
    return DatasetSource(item, split=split)
