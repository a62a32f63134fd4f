"""Batch tokenized examples into padded tensors."""

from __future__ import annotations

import json
from typing import Any

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


def packed_collate(rows: list[list[dict[str, list[int]]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Packed rows side by side, each example with its own positions; no attention mask.

    Rows ``[a, b, c] + [d, e]`` and ``[f, g]`` (examples joined by ``+``) become::

        input_ids    [[a, b, c, d, e], [f, g, P, P, P]]      P = pad_token_id
        labels       [[-100, b, c, -100, e], [-100, g, -100, -100, -100]]
        position_ids [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]

    Each example's first label is dropped: nothing before it in its own example predicts it, and the
    token before it belongs to another example. transformers separates the examples by their restarting
    position ids; a short row's padding is one more sequence of its own, never trained. Rows are nearly
    full after best-fit packing, so that padding is small, and attention stays within ``max_length``.
    """
    longest = max(sum(len(example["input_ids"]) for example in row) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), longest), dtype=torch.long)
    for index, row in enumerate(rows):
        start = 0
        for example in row:
            end = start + len(example["input_ids"])
            input_ids[index, start:end] = torch.tensor(example["input_ids"])
            labels[index, start + 1 : end] = torch.tensor(example["labels"][1:])
            position_ids[index, start:end] = torch.arange(end - start)
            start = end
        position_ids[index, start:] = torch.arange(longest - start)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


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
    return {**left_pad(prompts, pad_token_id), "references": references}


def left_pad(prompts: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of prompts padded on the left to the longest: ``[[a, b, c], [d, e]]``
    becomes ``[[a, b, c], [P, d, e]]`` and ``[[1, 1, 1], [0, 1, 1]]``."""
    longest = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, longest - len(prompt) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def rollout_prompt_collate(examples: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Prompts to generate from (GRPO), with everything the reward functions read, one entry per prompt.

    Two prompts, the second conversational, of 3 and 2 tokens, from rows with columns ``answer`` and ``tests``::

        input_ids       [[a, b, c], [P, d, e]]  (left-padded: each prompt's last token in the last column)
        attention_mask  [[1, 1, 1], [0, 1, 1]]
        prompt_ids      [[a, b, c], [d, e]]
        prompts         ["What is 2 + 2?", [{"role": "user", "content": "Name a colour."}]]
        conversational  [False, True]
        columns         {"answer": ["4", "blue"], "tests": [[...], [...]]}

    A column missing from a prompt's row (rows of datasets with other columns) is None for that prompt.
    """
    prompt_ids = [example["prompt_ids"] for example in examples]
    prompts = [json.loads(example["prompt"]) for example in examples]
    rows = [json.loads(example["reward_columns"]) for example in examples]
    names = dict.fromkeys(name for row in rows for name in row)  # first seen first, as the dataset orders them
    return {
        **left_pad(prompt_ids, pad_token_id),
        "prompt_ids": prompt_ids,
        "prompts": prompts,
        "conversational": [isinstance(prompt, list) for prompt in prompts],
        "columns": {name: [row.get(name) for row in rows] for name in names},
    }


def reference_prompt_collate(examples: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Left-padded prompts with the token ids of the answers the data gives as ``references`` (empty without one),
    for ``smolfactory predict``."""
    prompts = left_pad([example["prompt_ids"] for example in examples], pad_token_id)
    return {**prompts, "references": [example["reference_ids"] for example in examples]}


def pair_collate(pairs: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Every pair's chosen sequence, then every rejected one, right-padded together: one forward pass runs both.

    Rows ``0 .. n-1`` of the batch are the chosen answers of pairs ``0 .. n-1``, rows ``n .. 2n-1`` their rejected
    answers (prompt included in each, labels only on the answer). Precomputed reference log-probabilities
    travel along as ``ref_chosen_logps`` and ``ref_rejected_logps``.
    """
    sides = [
        {"input_ids": pair[f"{side}_input_ids"], "labels": pair[f"{side}_labels"]}
        for side in ("chosen", "rejected")
        for pair in pairs
    ]
    batch = pad_collate(sides, pad_token_id)
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        if key in pairs[0]:
            batch[key] = torch.tensor([pair[key] for pair in pairs], dtype=torch.float32)
    return batch
