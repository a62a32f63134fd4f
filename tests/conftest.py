"""Shared fixtures: the real SmolLM2 tokenizer and tiny randomly initialised Llama models built on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from smolfactory.model.loading import DEFAULT_MODEL, resolve_model_path


@pytest.fixture(scope="session")
def builtin_path() -> str:
    """Folder of the built-in SmolLM2-135M-Instruct (converted from GGUF on first use)."""
    return resolve_model_path(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tokenizer(builtin_path):
    return AutoTokenizer.from_pretrained(builtin_path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> str:
    """A 2-layer, hidden-64 Llama with SmolLM2's vocabulary and tokenizer, saved as a model folder."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        # Wider than the usual 0.02 so that LoRA on a random model moves the logits within a few steps.
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def chat(*turns: str) -> dict:
    """A ``messages`` row from alternating user/assistant texts."""
    roles = ["user", "assistant"]
    return {"messages": [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]}
