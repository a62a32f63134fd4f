"""Two CPU processes fit a tiny model (DDP, FSDP2 or FSDP) and record what the single-process test compares.

    python tests/distributed_run.py ddp|fsdp2|fsdp MODEL_DIR DATA_PATH OUT_FOLDER PAIRS_PATH

For full fine-tuning and LoRA in turn: two optimizer steps of global batch 4 (per rank, 2 micro-batches
of 1 accumulated, gradients clipped by norm), the first step's gradients (gathered in full), each step's loss,
and the exported Hugging Face folder. Under DDP, also DPO with LoRA on the preference pairs of PAIRS_PATH, and
GRPO with LoRA on the prompts of DATA_PATH.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from torch.distributed.fsdp._common_utils import clean_tensor_name
from torch.distributed.tensor import DTensor

from smolfactory import (
    DPOModule,
    GRPOModule,
    LoraSettings,
    PreferenceDataModule,
    PromptDataModule,
    Reward,
    SamplingSettings,
    SFTDataModule,
    SFTModule,
)
from smolfactory.callbacks import HFExport
from smolfactory.model.sharding import DecoderLayerPolicy
from tests.conftest import StopAtStep, adamw


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy on the CPU, for tests only.

    Lightning accepts FSDPStrategy on the CPU only through a subclass, and torch's FSDP then needs the device
    named: the model is wrapped here with `device_id=cpu`, by the same rules Lightning uses, before Lightning
    sees it.
    """

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        wrapped = FullyShardedDataParallel(
            module=model, sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs
        )
        self.kwargs.pop("auto_wrap_policy", None)  # applied above
        return super()._setup_model(wrapped)


class RecorderMixin:
    """Records each step's loss and the first step's full gradients."""

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        self.losses = [*getattr(self, "losses", []), self.trainer.callback_metrics["train_loss"].item()]
        if not hasattr(self, "first"):
            self.first = {n: g.flatten()[:512].tolist() for n, g in self.full_gradients().items()}
            modules = list(self.trainer.strategy.model.modules())
            self.shard_groups = sum(isinstance(m, FullyShardedDataParallel | FSDPModule) for m in modules)
            self.checkpointed = sum(isinstance(m, CheckpointWrapper) for m in modules)

    def full_gradients(self) -> dict:
        root = self.trainer.strategy.model
        if isinstance(root, FullyShardedDataParallel):
            # FSDP's parameters are flat shards; summon the full ones, gradients included.
            with FullyShardedDataParallel.summon_full_params(root, with_grads=True):
                named = self.named_parameters()
                return {clean_tensor_name(n): p.grad.clone() for n, p in named if p.requires_grad}
        grads = {n: p.grad for n, p in self.named_parameters() if p.grad is not None}
        return {n: g.full_tensor() if isinstance(g, DTensor) else g for n, g in grads.items()}


class Recorder(RecorderMixin, SFTModule):
    pass


class DPORecorder(RecorderMixin, DPOModule):
    pass


class GRPORecorder(RecorderMixin, GRPOModule):
    """GRPO (DAPO's token-weighted loss) with completions that depend only on the prompt, so that a process
    sees the same ones whichever rank and micro-batch its prompts land in: completion i of a prompt is its last
    i + 2 tokens, reversed."""

    def __init__(self, **kwargs) -> None:
        rewards = [Reward("tests.distributed_run.completion_length")]
        super().__init__(rewards=rewards, sampling=SamplingSettings(num_generations=3), **kwargs)

    def generate_completions(self, batch: dict) -> torch.Tensor:
        rows = [
            ids[keep.bool()][-(i + 2) :].flip(0)
            for ids, keep in zip(batch["input_ids"], batch["attention_mask"], strict=True)
            for i in range(self.sampling.num_generations)
        ]
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=self.tokenizer.pad_token_id)


def completion_length(prompts, completions, completion_ids, **kwargs) -> list[float]:
    """A reward that differs within every group (the completions' lengths differ)."""
    return [float(len(ids)) for ids in completion_ids]


VARIANTS = {"full": None, "lora": LoraSettings(r=4, alpha=8)}
# Below the gradient norms of these runs, so clipping changes every update: by the norm over all shards and ranks.
CLIP_NORM = 0.05


def run(variant: str, model_dir: str, data_path: str, out: Path, strategy, devices: int, batch_size: int,
        accumulate: int, steps: int = 2, name: str | None = None, stop_at: int | None = None,
        resume: bool = False, preference: bool = False, grpo: bool = False) -> None:  # fmt: skip
    """Fit `steps` optimizer steps into out/name (default: the variant) and record them in out/name.json.

    With `stop_at` the run saves out/name/checkpoints/last.ckpt at every step and is interrupted after that
    step; with `resume` as well, it goes on from that checkpoint instead.
    """
    name = name or variant
    L.seed_everything(0)
    module_class, data_class = (DPORecorder, PreferenceDataModule) if preference else (Recorder, SFTDataModule)
    if grpo:
        module_class, data_class = GRPORecorder, PromptDataModule
    module = module_class(model_name=model_dir, lora=VARIANTS[variant], optimizer=adamw(1e-2))
    data = data_class(tokenizer=model_dir, dataset=data_path, val_split=0, batch_size=batch_size)
    last = out / name / "checkpoints" / "last.ckpt"
    checkpoints = stop_at is not None
    callbacks = [ModelCheckpoint(dirpath=last.parent, save_last=True, every_n_train_steps=1)]
    callbacks += [] if resume else [StopAtStep(stop_at)]
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps, accumulate_grad_batches=accumulate,
        gradient_clip_val=CLIP_NORM,
        logger=False, enable_checkpointing=checkpoints, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, default_root_dir=out / name, callbacks=[HFExport(), *(callbacks if checkpoints else [])],
    )  # fmt: skip
    trainer.fit(module, datamodule=data, ckpt_path=last if resume else None)
    if trainer.is_global_zero:
        record = {"losses": module.losses, "gradients": module.first}
        record |= {"shard_groups": module.shard_groups, "checkpointed": module.checkpointed}
        (out / f"{name}.json").write_text(json.dumps(record))


STRATEGIES = {
    "ddp": lambda: "ddp",
    "fsdp2": lambda: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
    # As configs/strategy/fsdp.yaml: activation checkpointing (another wrapper in the names), sharded checkpoints.
    "fsdp": lambda: CPUFSDPStrategy(
        auto_wrap_policy=DecoderLayerPolicy(),
        activation_checkpointing_policy=DecoderLayerPolicy(),
        state_dict_type="sharded",
    ),
}


def main() -> None:
    strategy_name, model_dir, data_path, out, pairs_path = sys.argv[1:6]
    settings = dict(devices=2, batch_size=1, accumulate=2)
    for variant in VARIANTS:
        run(variant, model_dir, data_path, Path(out), STRATEGIES[strategy_name](), **settings)
    if strategy_name == "ddp":
        run("lora", model_dir, pairs_path, Path(out), "ddp", **settings, name="dpo", preference=True)
        run("lora", model_dir, data_path, Path(out), "ddp", **settings, name="grpo", grpo=True)
    if strategy_name != "ddp":
        # A 4-step LoRA run stopped after 2 steps (a sharded checkpoint), then resumed.
        for resume in (False, True):
            strategy = STRATEGIES[strategy_name]()
            run("lora", model_dir, data_path, Path(out), strategy, **settings, steps=4, name="resumed", stop_at=2,
                resume=resume)  # fmt: skip


if __name__ == "__main__":
    main()
