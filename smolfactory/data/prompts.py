"""PromptDataModule: prompts for online RL (GRPO), with the columns its reward functions read.

Each row becomes one prompt rendered with the chat template up to its generation prompt (``kinds.Prompt``);
batches hold the prompts left-padded for ``generate``, the prompts as the rewards see them, and every other column
of their rows. A recipe that reuses its rollouts for several optimizer steps asks for each step's batches again
(``repeat_batches``). Loading, validation splits, mixing, bad rows, the tokenization cache, loaders and resume are
``TokenizedDataModule``'s.
"""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset

from smolfactory.data.base import BadRowPolicy, TokenizedDataModule
from smolfactory.data.kinds import Prompt
from smolfactory.data.loaders import RepeatedBatches
from smolfactory.data.packing import EpochShuffleSampler
from smolfactory.data.prompt_formats import PromptFormat
from smolfactory.data.sources import Datasets, ValidationDataset
from smolfactory.errors import SmolFactoryError
from smolfactory.model.loading import DEFAULT_MODEL


class PromptDataModule(TokenizedDataModule):
    """Prompt datasets to batches of left-padded prompts with their rows' columns, for online RL (GRPO)."""

    def __init__(
        self,
        dataset: Datasets,
        tokenizer: str = DEFAULT_MODEL,
        validation_dataset: ValidationDataset = None,
        val_split: float = 0.0,
        format: PromptFormat = "auto",
        columns: dict[str, str] | None = None,
        system_prompt: str | None = None,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        max_length: int = 512,
        overlong: Literal["truncate_prompt", "drop"] = "truncate_prompt",
        on_bad_row: BadRowPolicy = "error",
        batch_size: int = 2,
        num_workers: int = 0,
        num_proc: int | None = None,
        seed: int = 42,
    ) -> None:
        """Prompts rendered with the chat template up to the generation prompt; every other column goes to the rewards.

        Args:
            dataset: Training prompts: a Hub id or local json/jsonl/parquet/csv file, or a list of {path, name, split,
                revision, format, columns, weight, num_samples} sources to mix (their columns may differ).
            tokenizer: Model name whose tokenizer and chat template are used (the CLI links it to model.model_name).
            validation_dataset: Separate validation prompts (same forms as dataset); null splits them off dataset.
            val_split: Fraction of dataset held out for validation (unused with validation_dataset); 0, the
                default, holds out none (validating means generating).
            format: Row layout: messages or sharegpt (the conversation through its last user turn; a final assistant
                turn becomes column answer unless the row has one), prompt (a string or a message list), alpaca
                (instruction and input as one user turn), or auto (from the columns).
            columns: Column renames, layout field -> your column, e.g. {prompt: question}. The rewards get every
                column the prompt is not read from, by your names.
            system_prompt: System turn added to prompts that have none.
            chat_template: Replaces the tokenizer's template: a built-in name (chatml), a .jinja file or a Jinja string.
            chat_template_kwargs: Extra variables for the chat template, e.g. {enable_thinking: false} for SmolLM3.
            max_length: Longest prompt in tokens (the generation prompt included).
            overlong: A longer prompt keeps its last max_length tokens (truncate_prompt; the rewards still see it
                whole), or is dropped and counted (drop).
            on_bad_row: A malformed row stops with an error naming it, or is skipped and counted.
            batch_size: Prompts per micro-batch (each is answered num_generations times by the model).
            num_workers: DataLoader worker processes.
            num_proc: Processes that tokenize the dataset (datasets.map); null tokenizes in this process.
            seed: Seed of the train/validation split, of dataset mixing and of the prompts' order.
        """
        super().__init__(Prompt())
        self.repeat = (1, 1)

    def repeat_batches(self, group: int, times: int) -> None:
        """From the next train loader on, give each run of ``group`` batches (one optimizer step's micro-batches:
        ``group`` is trainer.accumulate_grad_batches) ``times`` times in a row, so that a recipe that reuses its
        rollouts for ``times`` optimizer steps (GRPO's num_iterations) gets the same prompts again. With times > 1, a
        pass's last run of fewer than ``group`` batches is left out. Call it before the loader is built (on_fit_start).
        """
        if group < 1 or times < 1:
            raise SmolFactoryError(f"repeat_batches needs group >= 1 and times >= 1, got {group} and {times}")
        self.repeat = (group, times)

    def train_batches(self, order: EpochShuffleSampler, data: Dataset) -> RepeatedBatches:
        """Batches of ``batch_size`` prompts in ``order``, repeated as ``repeat_batches`` says."""
        group, times = self.repeat
        batches = RepeatedBatches(order, self.hparams.batch_size, False, group, times)
        if len(batches) == 0:
            raise SmolFactoryError(
                f"{len(data)} training prompts in batches of data.batch_size={self.hparams.batch_size} are fewer than "
                f"one optimizer step of {group} micro-batches; lower data.batch_size or accumulate_grad_batches"
            )
        if batches.left_out:
            rank_zero_info(
                f"Each pass over the training prompts leaves out its last {batches.left_out} (of {len(data)}): too few "
                f"for a whole optimizer step of {group} micro-batches of {self.hparams.batch_size}, taken {times} times"
            )
        return batches
