"""TokenizedDataModule: what every kind of example shares, from dataset sources to batches that resume exactly.

The pipeline, per dataset: load rows (``sources``), check the row layout and turn each row into tokenized
examples (the kind of example, ``kinds``, through ``tokenize.tokenize_rows``), then mix the datasets, split off
validation data, and batch them: shuffled, grouped by length, or packed. Tokenization runs once through
``datasets.map`` and is cached; rank 0 does it first in ``prepare_data``. With ``streaming``, rows are read and
tokenized lazily while training instead.

``SFTDataModule``, ``PreferenceDataModule`` and ``PromptDataModule`` are thin subclasses: a typed ``__init__`` (the
YAML schema) and the kind of example they hand to this class.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import random
from typing import Any, Literal

import datasets
import lightning as L
import torch
from datasets.distributed import split_dataset_by_node
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import BatchSampler, DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from smolfactory.checkpoints import check_same_settings
from smolfactory.data.formats import RowError
from smolfactory.data.kinds import ExampleKind
from smolfactory.data.loaders import ResumableLoader, WindowedStream
from smolfactory.data.packing import EpochShuffleSampler, LengthGroupedBatchSampler, PackedDataset
from smolfactory.data.sources import BUILTIN_DATASETS, DatasetSource, load_rows
from smolfactory.data.templates import resolve_chat_template
from smolfactory.data.tokenize import RowSettings, summarize, summary_line, tokenize_rows
from smolfactory.errors import SmolFactoryError
from smolfactory.model.loading import BUILTIN_PREFIX, load_tokenizer

# Settings a resumed run may change: how many processes read and tokenize, not what the batches hold.
RESUMABLE_CHANGES = {"num_workers", "num_proc"}
Overlong = Literal["truncate", "truncate_prompt", "drop", "split"]
BadRowPolicy = Literal["error", "skip"]


class TokenizedDataModule(L.LightningDataModule):
    """Datasets to batches of tokenized examples of one kind: loading, mixing, splits, cache, loaders and resume.

    The settings are the arguments of the subclass's ``__init__``, kept as ``hparams``; this class reads
    ``tokenizer``, ``dataset``, ``validation_dataset``, ``val_split``, ``format``, ``columns``, ``system_prompt``,
    ``chat_template``, ``chat_template_kwargs``, ``max_length``, ``overlong``, ``group_by_length`` (where offered),
    ``on_bad_row``, ``batch_size``, ``num_workers``, ``num_proc`` and ``seed`` (see ``SFTDataModule`` for what each
    means).
    """

    def __init__(self, kind: ExampleKind, streaming: bool = False) -> None:
        """Called by a subclass's ``__init__``, whose arguments become the settings.

        Args:
            kind: What a row becomes, how examples are batched and shown.
            streaming: Read and tokenize rows lazily while training.
        """
        super().__init__()
        # The caller's arguments, not these two: the subclass's signature is the YAML schema and the checkpoint's.
        caller = inspect.currentframe().f_back
        self.save_hyperparameters(frame=caller)
        # Under LightningCLI, hparams hold the parsed config; the arguments themselves are typed.
        arguments = inspect.getargvalues(caller).locals
        self.kind, self.streaming = kind, streaming
        hparams = self.hparams
        if not 0 <= hparams.val_split < 1:
            raise SmolFactoryError(f"data.val_split must be in [0, 1), got {hparams.val_split}")
        if hparams.max_length < 2 or hparams.batch_size < 1:
            raise SmolFactoryError(
                f"data.max_length must be >= 2 and data.batch_size >= 1, got {hparams.max_length}, {hparams.batch_size}"
            )
        if streaming and hparams.get("group_by_length"):  # (not every data module offers it)
            raise SmolFactoryError("data.group_by_length needs the whole dataset; it does not work with data.streaming")
        # Sources as plain dicts, so checkpoints (which keep these) load with torch.load(weights_only=True).
        dataset, validation_dataset = arguments["dataset"], arguments["validation_dataset"]
        plain = [dataclasses.asdict(s) if isinstance(s, DatasetSource) else str(s) for s in _listed(dataset)]
        hparams.dataset = plain if isinstance(dataset, list) else plain[0]
        if isinstance(validation_dataset, DatasetSource):
            hparams.validation_dataset = dataclasses.asdict(validation_dataset)
        elif validation_dataset is not None:
            hparams.validation_dataset = str(validation_dataset)
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.train_data: datasets.Dataset | datasets.IterableDataset | None = None
        self.val_data: datasets.Dataset | datasets.IterableDataset | None = None
        self.summaries: dict[str, dict[str, Any]] = {}
        self._prepared: tuple | None = None

    @property
    def sources(self) -> list[DatasetSource]:
        """The training datasets, as sources."""
        return [_as_source(item) for item in _listed(self.hparams.dataset)]

    def prepare_data(self) -> None:
        # Lightning runs this on one process per node before setup: the other ranks then load the
        # tokenized data from the datasets cache instead of tokenizing it again.
        # In the process that prepared, setup then reuses the result instead of reading the cache back.
        if not self.streaming:
            self._prepared = self._build(report=True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is None:
            build = self._build_stream if self.streaming else self._build
            prepared = self._prepared
            self.train_data, self.val_data = prepared if prepared is not None else build(report=True)
            self._prepared = None

    # --- resume ---

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

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Tell the train loader that the training loop took a batch (what a checkpoint then resumes after)."""
        if self.trainer is not None and self.trainer.training:
            loader = self.trainer.train_dataloader  # the loader Lightning uses (it rebuilds ours under DDP)
            if isinstance(loader, ResumableLoader):
                loader.batch_taken()
        return batch

    # --- loaders ---

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches, from a loader that resumes exactly where a checkpoint left it.

        Arguments by keyword: under DDP Lightning builds the loader again with its own sampler and batch_size.
        """
        hparams, collate = self.hparams, self.kind.train_collate(self.tokenizer.pad_token_id)
        common = {"collate_fn": collate, "num_workers": hparams.num_workers, "generator": self._generator()}
        if self.streaming:
            stream = WindowedStream(self._node_share(self.train_data), hparams.seed, self._packing_capacity())
            return ResumableLoader(stream, batch_size=hparams.batch_size, order=stream, **common)
        data = PackedDataset(self.train_data, hparams.max_length) if self.kind.packing else self.train_data
        order = EpochShuffleSampler(len(data), hparams.seed)
        batches = self.train_batches(order, data)
        if batches is not None:
            return ResumableLoader(data, batch_sampler=batches, order=order, **common)
        return ResumableLoader(data, batch_size=hparams.batch_size, sampler=order, order=order, **common)

    def train_batches(self, order: EpochShuffleSampler, data: Dataset) -> BatchSampler | None:
        """The train loader's batches of indices in ``order`` (a subclass may batch its own way), or None for
        consecutive batches of ``batch_size``. A ``BatchSampler`` whose first argument is the sampler: Lightning
        builds it again under DDP with its own sampler."""
        if self.hparams.get("group_by_length"):
            return LengthGroupedBatchSampler(order, self.hparams.batch_size, False, data["length"])
        return None

    def val_dataloader(self) -> DataLoader:
        if self.val_data is None:
            return []
        data = self.val_data
        if self.streaming:
            data = WindowedStream(self._node_share(data), seed=None, capacity=self._packing_capacity())
        elif self.kind.packing:
            data = PackedDataset(data, self.hparams.max_length)
        return DataLoader(
            data,
            self.hparams.batch_size,
            collate_fn=self.kind.train_collate(self.tokenizer.pad_token_id),
            num_workers=self.hparams.num_workers,
            generator=self._generator(),
        )

    def test_dataloader(self) -> DataLoader:
        """The validation data: `smolfactory test` reports the held-out loss of a checkpoint."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """Prompts of the validation data (the training data without one), with the answers the data gives, for
        `smolfactory predict`."""
        data = self.val_data if self.val_data is not None else self.train_data
        collate = self.kind.predict_collate(self.tokenizer.pad_token_id)
        return DataLoader(data, batch_size=self.hparams.batch_size, collate_fn=collate)

    def train_collate(self) -> Any:
        """The collate function of training batches (the kind's, with this tokenizer's padding)."""
        return self.kind.train_collate(self.tokenizer.pad_token_id)

    def _packing_capacity(self) -> int | None:
        return self.hparams.max_length if self.kind.packing else None

    def _node_share(self, data: datasets.IterableDataset) -> datasets.IterableDataset:
        """This rank's share of a stream's rows, as a new stream whose position is its beginning (whoever read
        ``data`` before)."""
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return split_dataset_by_node(data, rank=rank, world_size=world_size)

    def _generator(self) -> torch.Generator:
        """A generator of the loader's own to seed its iterators: torch's default draws from the global one at
        every epoch and validation, which a resumed run could not replay (its dropout masks would differ)."""
        return torch.Generator().manual_seed(self.hparams.seed)

    # --- building the datasets ---

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
        settings = RowSettings(
            format=self._layout(source, column_names, columns),
            columns=columns,
            system_prompt=self.hparams.system_prompt,
            template_kwargs=self.hparams.chat_template_kwargs,
            max_length=self.hparams.max_length,
            overlong=self.hparams.overlong,
            on_bad_row=self.hparams.on_bad_row,
        )
        # datasets fingerprints the function and its arguments, not the code the function calls: the kind's code
        # goes in as an argument, so a change to masking never reuses labels cached by the old code. The tokenizer
        # (with its chat template), the settings and the kind (train_on, ...) are arguments too.
        arguments = {"tokenizer": self.tokenizer, "settings": settings, "source": source.path, "kind": self.kind}
        arguments["code"] = self.kind.code
        mapping = {"batched": True, "batch_size": 256, "with_indices": True, "remove_columns": column_names}
        columns_kept = self.kind.columns
        if streaming:
            stream = rows.map(tokenize_rows, fn_kwargs=arguments, **mapping)
            return stream.filter(lambda n: n > 0, input_columns="num_trained").select_columns(columns_kept)
        try:
            tokenized = rows.map(
                tokenize_rows,
                fn_kwargs=arguments,
                num_proc=self.hparams.num_proc,
                desc=f"Tokenizing {source.path}",
                **mapping,
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
        return kept.select_columns(columns_kept)

    def _layout(self, source: DatasetSource, column_names: list[str], columns: dict[str, str]) -> str:
        """The dataset's row layout (given, or told from its columns), checked against the renames and template."""
        try:
            layout = self.kind.layout(source.format or self.hparams.format, column_names, columns)
        except RowError as error:
            raise SmolFactoryError(f"dataset {source.path}: {error}") from error
        rows = self.kind.templated_rows(layout)
        if rows is not None and not self.tokenizer.chat_template:
            raise SmolFactoryError(
                f"the tokenizer of {self.hparams.tokenizer} has no chat template for the {rows} rows of "
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
