"""Batch tokenized examples into padded tensors."""

from __future__ import annotations

import torch

from smolfactory.model.loss import IGNORE_INDEX


def pad_collate(examples: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest one in the batch.

    Two examples of lengths 3 and 2 become::

        input_ids      [[a, b, c], [d, e, P]]      P = pad_token_id
        labels         [[-100, b, c], [-100, e, -100]]
        attention_mask [[1, 1, 1], [1, 1, 0]]

    Padding is marked by length, never by comparing ids with ``pad_token_id`` (which may equal the
    end-of-turn token that the model must learn).
    """
    longest = max(len(example["input_ids"]) for example in examples)
    shape = (len(examples), longest)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[row, :length] = torch.tensor(example["input_ids"])
        labels[row, :length] = torch.tensor(example["labels"])
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def packed_collate(rows: list[list[dict[str, list[int]]]], pad_token_id: int | None = None) -> dict[str, torch.Tensor]:
    """Concatenate packed rows into one padding-free row of shape ``[1, tokens]``.

    Examples ``[a, b, c]`` and ``[d, e]`` become::

        input_ids    [[a, b, c, d, e]]
        labels       [[-100, b, c, -100, e]]
        position_ids [[0, 1, 2, 0, 1]]

    Each example's first label is dropped: nothing before it in its own example predicts it, and the
    token before it belongs to another example. No attention mask: transformers separates the examples
    by their restarting position ids.
    """
    input_ids, labels, position_ids = [], [], []
    for example in (example for row in rows for example in row):
        input_ids += example["input_ids"]
        labels += [IGNORE_INDEX, *example["labels"][1:]]
        position_ids += range(len(example["input_ids"]))
    return {
        "input_ids": torch.tensor([input_ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([position_ids]),
    }


def prompt_collate(examples: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor | list]:
    """Left-pad the prompt of each example (everything before its last trained span) for generation.

    ``input_ids [[a, b, c], [P, d, e]]`` and ``attention_mask [[1, 1, 1], [0, 1, 1]]``: left padding keeps
    every prompt's last token in the final column, where generation continues. ``references`` holds the
    token ids of each example's last trained span (the answer the data gives).
    """
    prompts, references = [], []
    for example in examples:
        labels = example["labels"]
        end = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX) + 1
        start = end
        while start > 0 and labels[start - 1] != IGNORE_INDEX:
            start -= 1
        prompts.append(example["input_ids"][:start])
        references.append(example["input_ids"][start:end])
    longest = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, longest - len(prompt) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "references": references}
