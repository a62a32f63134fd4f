"""TokenThroughput counts the real tokens and the FLOPs of a step the way they can be counted by hand."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForCausalLM

from smolfactory import LoraSettings, SFTDataModule, SFTModule
from smolfactory.callbacks import TokenThroughput
from smolfactory.callbacks.throughput import (
    attention_flops_per_pair,
    attention_pairs,
    flops_per_token,
    measure_matmul_peak,
    real_tokens,
)
from smolfactory.data.collate import packed_collate, pad_collate
from smolfactory.model.lora import apply_lora
from tests.conftest import chat, write_jsonl

IGNORE = -100


def example(length: int, start: int) -> dict[str, list[int]]:
    ids = list(range(start, start + length))
    return {"input_ids": ids, "labels": [IGNORE, *ids[1:]]}


@pytest.mark.parametrize("collate", ["padded", "packed"])
def test_real_tokens_leave_out_exactly_the_padding(collate):
    lengths = [[5, 3], [7], [2, 2, 1]]  # rows of examples (packed) or single examples (padded)
    rows = [[example(n, 10 * i + j) for j, n in enumerate(row)] for i, row in enumerate(lengths)]
    if collate == "packed":
        batch = packed_collate(rows, pad_token_id=0)
    else:
        batch = pad_collate([e for row in rows for e in row], pad_token_id=0)
    assert batch["input_ids"].numel() > sum(map(sum, lengths))  # there is padding to leave out
    assert real_tokens(batch) == sum(map(sum, lengths))


@pytest.mark.parametrize("collate", ["padded", "packed"])
def test_attention_pairs_are_each_examples_causal_window(collate):
    lengths = [[5, 3], [7], [2, 2, 1]]
    rows = [[example(n, 10 * i + j) for j, n in enumerate(row)] for i, row in enumerate(lengths)]
    if collate == "packed":
        batch = packed_collate(rows, pad_token_id=0)
    else:
        batch = pad_collate([e for row in rows for e in row], pad_token_id=0)
    # Query i of an example attends to keys 0..i of the same example: 15 + 6 + 28 + 3 + 3 + 1.
    by_hand = sum(sum(1 for i in range(n) for _ in range(i + 1)) for row in lengths for n in row)
    assert attention_pairs(batch) == by_hand == 56


def test_attention_flops_match_torchs_count_of_the_attention_products(tiny_model_dir):
    """Eager attention multiplies full [length x length] score matrices (the causal mask only hides the upper
    half): torch's FLOP counter of their batched products, forward and backward, scaled to the causal half,
    must equal our count for the row's pairs."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    length = 24
    batch = {"input_ids": torch.arange(100, 100 + length)[None, :]}
    counter = FlopCounterMode(display=False)
    with counter:
        model(**batch).logits.sum().backward()
    products = counter.get_flop_counts()["Global"][torch.ops.aten.bmm]
    causal_pairs = length * (length + 1) // 2
    assert attention_pairs(batch) == causal_pairs
    assert attention_flops_per_pair(model) * causal_pairs == products * causal_pairs / length**2


def test_flops_per_token_match_the_layer_shapes(tiny_model_dir):
    config = AutoConfig.from_pretrained(tiny_model_dir)
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * h // config.num_attention_heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i  # q, o; k, v; gate, up, down
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # Full fine-tuning: 6 FLOPs a weight (forward, input gradient, weight gradient).
    assert flops_per_token(model) == (6 * layers * per_layer, 6 * h * config.vocab_size)
    # LoRA r=4 on every linear layer: the frozen weights cost 4, the adapters (r x (in + out)) 6.
    lora_weights = 4 * layers * (2 * (h + h) + 2 * (h + kv) + 2 * (h + i) + (i + h))
    model = apply_lora(model, LoraSettings(r=4))
    body, head = flops_per_token(model)
    assert body == 4 * layers * per_layer + 6 * lora_weights
    assert head == 4 * h * config.vocab_size


@pytest.mark.slow
def test_fit_logs_tokens_per_second_and_mfu(tiny_model_dir, tmp_path):
    rows = [chat(f"Question {i}?", "Answer " * (1 + 3 * i)) for i in range(4)]
    data = SFTDataModule(tokenizer=tiny_model_dir, dataset=str(write_jsonl(tmp_path / "d.jsonl", rows)),
                         val_split=0, batch_size=2)  # fmt: skip
    data.prepare_data()
    data.setup("fit")
    lengths = [len(e["input_ids"]) for e in data.train_data]
    throughput = TokenThroughput()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, log_every_n_steps=1, callbacks=[throughput],
    )  # fmt: skip
    trainer.fit(SFTModule(model_name=tiny_model_dir, lora=LoraSettings(r=4)), datamodule=data)
    assert throughput._tokens == 2 * sum(lengths)  # 4 steps of 2 examples: two epochs
    metrics = trainer.callback_metrics
    assert metrics["train_tokens_per_sec"] > 0
    assert 0 < metrics["train_mfu"] < 1
    # The MFU is the counted FLOPs over the time and the measured peak: recompute it from the tokens/s.
    seconds = throughput._tokens / metrics["train_tokens_per_sec"].item()
    assert metrics["train_mfu"].item() == pytest.approx(throughput._flops / seconds / throughput.peak_flops)
    assert torch.isfinite(metrics["train_mfu"])


def test_the_matmul_peak_is_measured_once_per_process_device_and_dtype():
    """A notebook's second fit reads MFU against the first fit's peak (two timings never agree to the bit)."""
    first = measure_matmul_peak(torch.device("cpu"), torch.float32, size=256, seconds=0.01)
    assert first > 0 and measure_matmul_peak(torch.device("cpu"), torch.float32, size=256, seconds=0.01) == first
