"""Packing: best-fit decreasing rows, padding-free batches, and the loss they give (isolated examples)."""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils.data import SequentialSampler

from smolfactory import CausalLMModule, SFTDataModule
from smolfactory.data.collate import packed_collate
from smolfactory.data.packing import LengthGroupedBatchSampler, pack_examples
from smolfactory.model.loss import IGNORE_INDEX, label_token_loss
from tests.conftest import chat, write_jsonl


def best_fit_decreasing_reference(lengths, capacity):
    """The textbook algorithm, written the slow way: scan every row for the tightest fit."""
    rows, free = [], []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [row for row in range(len(rows)) if free[row] >= lengths[index]]
        if fits:
            best = min(fits, key=lambda row: (free[row], row))
            rows[best].append(index)
            free[best] -= lengths[index]
        else:
            rows.append([index])
            free.append(capacity - lengths[index])
    return rows


@pytest.mark.parametrize("seed", range(5))
def test_pack_examples_is_best_fit_decreasing(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 512) for _ in range(300)]
    rows = pack_examples(lengths, 512)
    assert rows == best_fit_decreasing_reference(lengths, 512)
    assert sorted(i for row in rows for i in row) == list(range(300))  # every example exactly once
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)


def test_pack_examples_docstring_example():
    assert pack_examples([5, 3, 4, 2], 8) == [[0, 1], [2, 3]]


def test_packed_collate_docstring_example():
    rows = [[{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}]]
    batch = packed_collate(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert "attention_mask" not in batch


def test_length_grouped_batches_cover_every_example_once_with_similar_lengths():
    lengths = [random.Random(0).randint(1, 100) for _ in range(100)]
    sampler = LengthGroupedBatchSampler(SequentialSampler(range(100)), 4, False, lengths, window_batches=5)
    batches = list(sampler)
    assert sorted(i for batch in batches for i in batch) == list(range(100)) and len(batches) == len(sampler)
    for window in range(0, 100, 20):  # within each window of 5 batches, longest first
        ordered = [lengths[i] for batch in batches[window // 4 : window // 4 + 5] for i in batch]
        assert ordered == sorted((lengths[i] for i in range(window, window + 20)), reverse=True)


@pytest.fixture
def ragged_rows():
    return [
        chat("Hi", "Hello!"),
        chat("Tell me a story about a dragon who learned to bake bread.", "Once, a dragon " * 12),
        chat("2 + 2?", "4"),
        chat("Name three colours.", "Red, green and blue.", "And two more?", "Yellow and purple."),
        chat("Why is the sky blue?", "Sunlight scatters off air molecules; blue light scatters the most."),
    ]


def test_packed_batches_hold_whole_examples_without_padding(tiny_model_dir, tmp_path, ragged_rows):
    path = write_jsonl(tmp_path / "d.jsonl", ragged_rows)
    datamodule = SFTDataModule(tokenizer=tiny_model_dir, dataset=str(path), val_split=0, max_length=128, packing=True)
    datamodule.setup("fit")
    lengths = datamodule.train_data["length"]
    batches = list(datamodule.train_dataloader())
    assert all(set(batch) == {"input_ids", "labels", "position_ids"} for batch in batches)
    assert sum(batch["input_ids"].numel() for batch in batches) == sum(lengths)  # no padding token at all
    starts = sorted(
        int(length)
        for batch in batches
        for length in torch.diff(
            torch.nonzero(batch["position_ids"][0] == 0).flatten(), append=torch.tensor([batch["input_ids"].shape[1]])
        )
    )
    assert starts == sorted(lengths)  # each example keeps its own positions 0..length-1


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_equals_token_weighted_loss_of_the_examples_alone(tiny_model_dir, tmp_path, ragged_rows, attention):
    path = write_jsonl(tmp_path / "d.jsonl", ragged_rows)
    datamodule = SFTDataModule(
        tokenizer=tiny_model_dir, dataset=str(path), val_split=0, max_length=256, packing=True, batch_size=8
    )
    datamodule.setup("fit")
    module = CausalLMModule(model_name=tiny_model_dir, lora=None, attn_implementation=attention)
    module.configure_model()
    module.eval()
    (batch,) = list(datamodule.train_dataloader())
    assert (batch["position_ids"] == 0).sum() == len(ragged_rows)  # all five examples in one row
    with torch.no_grad():
        packed_sum, packed_count = module.loss_terms(batch)
        # Each example on its own, through transformers' own forward pass: no packing, no padding.
        total, count = 0.0, 0
        for example in datamodule.train_data:
            input_ids, labels = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
            hidden = module.causal_lm(input_ids=input_ids, output_hidden_states=True).hidden_states[-1]
            loss_sum, n = label_token_loss(hidden, module.causal_lm.get_output_embeddings(), labels)
            total, count = total + loss_sum.item(), count + n.item()
        # Without restarting positions, examples would see each other: the loss must then differ.
        leaky = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1])[None])
        leaky_sum, _ = module.loss_terms(leaky)
    assert packed_count.item() == count
    assert (packed_sum / packed_count).item() == pytest.approx(total / count, abs=1e-5)
    assert abs(leaky_sum.item() - packed_sum.item()) / count > 1e-3
    assert IGNORE_INDEX in batch["labels"]
