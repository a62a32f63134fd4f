"""A callback that measures a recipe's steady-state speed and memory, for benchmarks/gpu.sh.

    smolfactory fit --config ... --trainer.callbacks+='{"class_path": "gpu_steady.SteadyThroughput",
                                                       "init_args": {"output": "result.json"}}'

smolfactory's own throughput callback times training from its first batch, so a run of a dozen steps would
count cuBLAS set-up, allocator growth and autotuning in its figure. This one starts its clock after
``warmup_steps`` optimizer steps and stops it at ``trainer.max_steps``, counting tokens and FLOPs the same way
(``smolfactory.callbacks.throughput``) against the matmul peak that callback measured when fit started.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch

from smolfactory.callbacks import TokenThroughput
from smolfactory.callbacks.throughput import batch_counts, flops_per_count


class SteadyThroughput(L.Callback):
    def __init__(self, output: str, warmup_steps: int = 3) -> None:
        """Write tokens/s, MFU and peak memory of the steps after the warm-up to a JSON file.

        Args:
            output: The JSON file written when the run reaches trainer.max_steps.
            warmup_steps: Optimizer steps left out of the measurement.
        """
        self.output = Path(output)
        self.warmup_steps = warmup_steps
        self._started: float | None = None
        self._counts: torch.Tensor | None = None  # batch_counts since the clock started

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch: dict, *args) -> None:
        if self._started is not None:
            # Counted on the device without waiting for it: the clock stops on a synchronised device.
            batch = pl_module.trained_batch(batch) if hasattr(pl_module, "trained_batch") else batch
            counts = batch_counts(batch).double()
            self._counts = counts if self._counts is None else self._counts + counts
        if self._started is None and trainer.global_step >= self.warmup_steps:
            synchronize(pl_module.device)
            self._started = time.perf_counter()
        elif self._started is not None and trainer.global_step >= trainer.max_steps:
            self._write(trainer, pl_module)

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(pl_module.device)
        seconds = time.perf_counter() - self._started
        counts = trainer.strategy.reduce(self._counts, reduce_op="sum").tolist()
        tokens = counts[0]
        flops = sum(count * price for count, price in zip(counts, flops_per_count(pl_module.model), strict=True))
        peak_flops = next(c.peak_flops for c in trainer.callbacks if isinstance(c, TokenThroughput))
        result = {
            "steps": trainer.global_step - self.warmup_steps,
            "tokens": int(tokens),
            "seconds": seconds,
            "tokens_per_sec": tokens / seconds,
            "mfu": flops / seconds / (peak_flops * trainer.world_size),
            "peak_flops": peak_flops,
            "trainable_parameters": sum(p.numel() for p in pl_module.model.parameters() if p.requires_grad),
            "peak_allocated_gib": peak_memory(pl_module.device, "max_memory_allocated"),
            "peak_reserved_gib": peak_memory(pl_module.device, "max_memory_reserved"),
            "loss": float(trainer.callback_metrics.get("train_loss", float("nan"))),
        }
        if trainer.is_global_zero:  # whole or not at all: the benchmark stops this run once the file is there
            partial = self.output.with_suffix(".partial")
            partial.write_text(json.dumps(result))
            partial.replace(self.output)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device, statistic: str) -> float | None:
    """GiB of a torch.cuda peak statistic since the process started (None off CUDA)."""
    return getattr(torch.cuda, statistic)(device) / 2**30 if device.type == "cuda" else None
