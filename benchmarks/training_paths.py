"""Training paths on one device: loss normalisation across accumulation, padded or packed, three precisions.

    .venv/bin/python benchmarks/training_paths.py [--accelerator cpu|cuda] [--tokenizer FOLDER] [--steps 30]

Builds a small random Llama (4 layers, hidden 256) on the given tokenizer and trains it on the quickstart
data with Lightning. First it compares the first optimizer step's loss and gradient of batch 4 with batch
1 x accumulation 4 and 2 x 2 (the token-mean normalisation makes them equal); then it trains for
``--steps`` steps under each precision, padded and packed, full and LoRA, and prints the losses and time.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import lightning as L
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from smolfactory import SFTDataModule, SFTModule
from smolfactory.model import DEFAULT_MODEL, resolve_model_path


class FirstGradients(SFTModule):
    """Keeps the gradient of the first optimizer step, as the optimizer receives it."""

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        if not hasattr(self, "first"):
            self.first = {n: p.grad.float().clone() for n, p in self.named_parameters() if p.grad is not None}


class StepLosses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > len(self.losses):
            self.losses.append(trainer.callback_metrics["train_loss"].item())


def small_model(tokenizer_folder: str, folder: str) -> str:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train(model: str, args: argparse.Namespace, precision: str, packing: bool, accumulate: int, batch_size: int,
          steps: int, lora: bool) -> tuple[list[float], dict, float]:  # fmt: skip
    L.seed_everything(0)
    module = FirstGradients(
        model_name=model,
        lora={"r": 16} if lora else None,
        optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3, "weight_decay": 0.0}},
    )
    datamodule = SFTDataModule(
        tokenizer=model, dataset="builtin:quickstart", val_split=0, batch_size=batch_size, packing=packing
    )
    recorder = StepLosses()
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=1, precision=precision, max_steps=steps,
        accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[recorder],
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    return recorder.losses, module.first, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--tokenizer", default=None, help="folder with tokenizer files (default: the built-in model)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed", "bf16-true"])
    args = parser.parse_args()
    model = small_model(args.tokenizer or resolve_model_path(DEFAULT_MODEL), tempfile.mkdtemp())

    print("| first step | loss | batch-4 loss | largest gradient difference |\n|---|---|---|---|")
    base_losses, base_gradients, _ = train(model, args, "32-true", False, 1, 4, 1, False)
    for batch_size, accumulate in [(1, 4), (2, 2)]:
        losses, gradients, _ = train(model, args, "32-true", False, accumulate, batch_size, 1, False)
        gap = max((gradients[n] - base_gradients[n]).abs().max().item() for n in gradients)
        name = f"batch {batch_size} x accumulation {accumulate}"
        print(f"| {name} | {losses[0]:.6f} | {base_losses[0]:.6f} | {gap:.1e} |")

    print("\n| precision | batching | LoRA | steps | first loss | last loss | seconds |\n|---|---|---|---|---|---|---|")
    for precision in args.precisions:
        for packing in (False, True):
            for lora in (False, True):
                losses, _, seconds = train(model, args, precision, packing, 2, 4, args.steps, lora)
                batching = "packed" if packing else "padded"
                print(
                    f"| {precision} | {batching} | {lora} | {len(losses)} | {losses[0]:.3f} | {losses[-1]:.3f} "
                    f"| {seconds:.1f} |"
                )


if __name__ == "__main__":
    main()
