"""Padded, length-grouped and packed batches of the same data: tokens/s, padding, and packed isolation.

    .venv/bin/python benchmarks/batching.py [--model builtin:smollm2-135m-instruct] [--random-init]
        [--device cpu|cuda] [--dtype float32|bfloat16] [--attn sdpa eager] [--dataset builtin:quickstart]
        [--max-length 512] [--batch-size 8] [--batches 6] [--masked]

For each batching mode, times forward + backward of the label-only loss (LoRA r=16 on all linear layers)
over the first batches of an epoch and prints real (non-padding) tokens/s and the padding share. Then it
checks that the loss of one packed batch equals the token-weighted loss of its examples run one by one
(transformers must keep packed examples apart), for each attention implementation asked for.
On a CPU with sdpa, padded batches run without their padding and packed rows attend example by example, as
`fit` runs them; --masked runs both through sdpa's kernel under a mask instead (as before 2026-12-02).
--random-init builds the model from its config with random weights (same shapes and speed), for machines
that only have the tokenizer files.
"""

from __future__ import annotations

import argparse
import time
from itertools import islice

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from smolfactory import LoraSettings, SFTDataModule, SFTModule
from smolfactory.data.collate import packed_collate
from smolfactory.model import resolve_model_path
from smolfactory.model.build import attends_example_by_example, build_model
from smolfactory.model.lora import apply_lora
from smolfactory.model.loss import IGNORE_INDEX, label_token_loss
from smolfactory.model.packed_attention import PACKED_SDPA

MODES = {"padded": {}, "grouped": {"group_by_length": True}, "packed": {"packing": True}}


def build_module(args: argparse.Namespace, attention: str) -> SFTModule:
    module = SFTModule(model_name=args.model, lora=LoraSettings(r=16), attn_implementation=attention)
    on_cuda = args.device.startswith("cuda")
    example_by_example = attends_example_by_example(module.model_settings, on_cuda) and not args.masked
    if args.random_init:  # same architecture, random weights: no weight files needed
        config = AutoConfig.from_pretrained(resolve_model_path(args.model), attn_implementation=attention)
        torch.manual_seed(0)
        module.model = apply_lora(AutoModelForCausalLM.from_config(config), LoraSettings(r=16))
        if example_by_example:
            module.causal_lm.set_attn_implementation(PACKED_SDPA)
    else:  # as fit builds it on this device
        module.model = build_model(module.model_settings, module.lora, precision=None, on_cuda=on_cuda)
    # --masked: every batch through sdpa's kernel, padding and packed rows masked, as before 2026-12-02
    module.attends_example_by_example = example_by_example
    return module.to(device=args.device, dtype=getattr(torch, args.dtype))


def to_device(batch: dict, device: str) -> dict:
    return {key: value.to(device) for key, value in batch.items()}


def time_mode(module: SFTModule, args: argparse.Namespace, mode: str) -> dict:
    datamodule = SFTDataModule(
        tokenizer=args.model,
        dataset=args.dataset,
        max_length=args.max_length,
        batch_size=args.batch_size,
        val_split=0,
        on_bad_row="skip",
        **MODES[mode],
    )
    datamodule.setup("fit")
    torch.manual_seed(0)
    loader = datamodule.train_dataloader()
    collate = loader.collate_fn

    def counted(items: list) -> tuple[dict, int]:  # the batch, and its real (non-padding) tokens
        examples = [example for row in items for example in row] if mode == "packed" else items
        return collate(items), sum(len(example["input_ids"]) for example in examples)

    loader.collate_fn = counted
    batches = [(to_device(batch, args.device), real) for batch, real in islice(loader, args.batches + 1)]
    real = padded = 0
    module.train()
    for step, (batch, batch_real) in enumerate(batches):
        if step == 1:  # the first batch warms up kernels and allocators
            synchronize(args.device)
            start = time.perf_counter()
        loss = module.batch_sums(batch)["loss"]
        (loss.total / loss.count).backward()
        if step >= 1:
            real += batch_real
            padded += batch["input_ids"].numel()
    synchronize(args.device)
    seconds = time.perf_counter() - start
    module.zero_grad(set_to_none=True)
    return {"mode": mode, "tokens/s": real / seconds, "padding": 1 - real / padded, "seconds": seconds}


def isolation_gap(module: SFTModule, args: argparse.Namespace) -> tuple[float, float, int]:
    """(packed loss, one-by-one loss, examples) for the first packed batch."""
    datamodule = SFTDataModule(
        tokenizer=args.model, dataset=args.dataset, max_length=args.max_length, batch_size=2, val_split=0,
        packing=True, on_bad_row="skip",
    )  # fmt: skip
    datamodule.setup("fit")
    rows = [datamodule.train_dataloader().dataset[i] for i in range(2)]
    batch = to_device(packed_collate(rows, datamodule.tokenizer.pad_token_id), args.device)
    module.eval()
    with torch.no_grad():
        packed_sum, packed_count = module.batch_sums(batch)["loss"]
        total, count = 0.0, 0
        for example in (example for row in rows for example in row):
            input_ids = torch.tensor([example["input_ids"]], device=args.device)
            labels = torch.tensor([example["labels"]], device=args.device)
            hidden = module.causal_lm.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
            loss_sum, n, _ = label_token_loss(hidden, module.causal_lm.get_output_embeddings(), labels)
            total, count = total + loss_sum.item(), count + n.item()
    assert packed_count.item() == count and IGNORE_INDEX in batch["labels"]
    return (packed_sum / packed_count).item(), total / count, sum(len(row) for row in rows)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--random-init", action="store_true", help="random weights from the model's config")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--attn", nargs="+", default=["sdpa", "eager"])
    parser.add_argument("--dataset", default="builtin:quickstart")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=6, help="timed batches per mode (after one warm-up)")
    parser.add_argument("--masked", action="store_true", help="sdpa over padded and packed rows, masked, on a CPU too")
    args = parser.parse_args()

    print(f"{args.model} ({'random init' if args.random_init else 'pretrained'}), {args.device}, {args.dtype}")
    module = build_module(args, args.attn[0])
    print(f"\n| batching ({args.attn[0]}) | real tokens/s | padding | seconds |\n|---|---|---|---|")
    for mode in MODES:
        row = time_mode(module, args, mode)
        print(f"| {mode} | {row['tokens/s']:.0f} | {row['padding']:.1%} | {row['seconds']:.1f} |")
    print("\n| attention | packed loss | examples one by one | difference | examples |\n|---|---|---|---|---|")
    for attention in args.attn:
        packed, alone, examples = isolation_gap(build_module(args, attention), args)
        print(f"| {attention} | {packed:.6f} | {alone:.6f} | {abs(packed - alone):.2e} | {examples} |")


if __name__ == "__main__":
    main()
