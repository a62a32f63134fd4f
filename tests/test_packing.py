"""Packing: best-fit decreasing rows, padding-free batches, and the loss they give (isolated examples)."""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils.data import SequentialSampler

from smolfactory import SFTDataModule, SFTModule
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
    rows = [
        [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}],
        [{"input_ids": [6, 7], "labels": [6, 7]}],
    ]
    batch = packed_collate(rows, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100, 7, -100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
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


def test_packed_batches_hold_whole_examples_in_rows_of_max_length(tiny_model_dir, tmp_path, ragged_rows):
    path = write_jsonl(tmp_path / "d.jsonl", ragged_rows)
    datamodule = SFTDataModule(
        tokenizer=tiny_model_dir, dataset=str(path), val_split=0, max_length=128, packing=True, batch_size=2
    )
    datamodule.setup("fit")
    data = datamodule.train_data
    batches = list(datamodule.train_dataloader())
    assert all(set(batch) == {"input_ids", "labels", "position_ids"} for batch in batches)
    assert all(batch["input_ids"].shape[1] <= 128 for batch in batches)
    # Cut every row where its positions restart: the pieces are the examples, plus each short row's padding.
    pieces = []
    for batch in batches:
        for ids, positions in zip(batch["input_ids"], batch["position_ids"], strict=True):
            starts = [*torch.nonzero(positions == 0).flatten().tolist(), len(ids)]
            pieces += [ids[a:b].tolist() for a, b in zip(starts, starts[1:], strict=False)]
    examples = [piece for piece in pieces if piece in data["input_ids"]]
    assert sorted(examples) == sorted(data["input_ids"])  # every example exactly once, whole
    padding = [piece for piece in pieces if piece not in data["input_ids"]]
    assert all(set(piece) == {datamodule.tokenizer.pad_token_id} for piece in padding)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_equals_token_weighted_loss_of_the_examples_alone(tiny_model_dir, tmp_path, ragged_rows, attention):
    path = write_jsonl(tmp_path / "d.jsonl", ragged_rows)
    datamodule = SFTDataModule(
        tokenizer=tiny_model_dir, dataset=str(path), val_split=0, max_length=160, packing=True, batch_size=8
    )
    datamodule.setup("fit")
    module = SFTModule(model_name=tiny_model_dir, lora=None, attn_implementation=attention)
    module.configure_model()
    module.eval()
    (batch,) = list(datamodule.train_dataloader())
    assert batch["input_ids"].shape[0] == 2  # five examples in two rows, the shorter one padded
    assert (batch["position_ids"] == 0).sum() == len(ragged_rows) + 1
    with torch.no_grad():
        packed_sum, packed_count = module.batch_sums(batch)["loss"]
        # Each example on its own, through transformers' own forward pass: no packing, no padding.
        total, count = 0.0, 0
        for example in datamodule.train_data:
            input_ids, labels = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
            hidden = module.causal_lm(input_ids=input_ids, output_hidden_states=True).hidden_states[-1]
            loss_sum, n, _ = label_token_loss(hidden, module.causal_lm.get_output_embeddings(), labels)
            total, count = total + loss_sum.item(), count + n.item()
        # Without restarting positions, examples would see each other: the loss must then differ.
        leaky = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]))
        leaky_sum, _ = module.batch_sums(leaky)["loss"]
    assert packed_count.item() == count
    assert (packed_sum / packed_count).item() == pytest.approx(total / count, abs=1e-5)
    assert abs(leaky_sum.item() - packed_sum.item()) / count > 1e-3
    assert IGNORE_INDEX in batch["labels"]
