"""Two CPU processes fit a tiny model (DDP or FSDP2) and record what the single-process test compares.

    python tests/distributed_run.py ddp|fsdp MODEL_DIR DATA_PATH OUT_FOLDER

For full fine-tuning and LoRA in turn: two optimizer steps of global batch 4 (per rank, 2 micro-batches
of 1 accumulated), the first step's gradients (gathered in full), each step's loss, and the exported
Hugging Face folder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.tensor import DTensor

from smolfactory import CausalLMModule, LoraSettings, SFTDataModule
from smolfactory.callbacks import HFExport


class Recorder(CausalLMModule):
    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        self.losses = [*getattr(self, "losses", []), self.trainer.callback_metrics["train_loss"].item()]
        if not hasattr(self, "first"):
            grads = {n: p.grad for n, p in self.named_parameters() if p.grad is not None}
            full = {n: g.full_tensor() if isinstance(g, DTensor) else g for n, g in grads.items()}
            self.first = {n: g.flatten()[:512].tolist() for n, g in full.items()}


VARIANTS = {"full": None, "lora": LoraSettings(r=4, alpha=8)}


def run(variant: str, model_dir: str, data_path: str, out: Path, strategy, devices: int, batch_size: int,
        accumulate: int) -> None:  # fmt: skip
    L.seed_everything(0)
    module = Recorder(model_name=model_dir, lora=VARIANTS[variant], learning_rate=1e-2)
    data = SFTDataModule(tokenizer=model_dir, dataset=data_path, val_split=0, batch_size=batch_size)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=2, accumulate_grad_batches=accumulate,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, default_root_dir=out / variant, callbacks=[HFExport()],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    if trainer.is_global_zero:
        (out / f"{variant}.json").write_text(json.dumps({"losses": module.losses, "gradients": module.first}))


def main() -> None:
    strategy_name, model_dir, data_path, out = sys.argv[1:5]
    for variant in VARIANTS:
        fsdp = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        strategy = "ddp" if strategy_name == "ddp" else fsdp
        run(variant, model_dir, data_path, Path(out), strategy, devices=2, batch_size=1, accumulate=2)


if __name__ == "__main__":
    main()
