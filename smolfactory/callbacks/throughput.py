"""Real-token throughput and model FLOPs utilisation (MFU) during fit."""

from __future__ import annotations

import functools
import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from smolfactory.model.loss import IGNORE_INDEX


class TokenThroughput(L.Callback):
    def __init__(self, peak_flops: float | None = None) -> None:
        """Log real (non-padding) tokens/s and MFU at every logging step, and a summary when fit ends.

        MFU counts the matrix multiplies a step needs: every linear layer forward and backward through the
        activations, weight gradients of the trained ones only, the LM head at label positions only, and
        attention over each example's causal window (not the padding, nor the other examples of a packed
        row, which a masked kernel computes and discards). Recomputation by gradient checkpointing is not
        counted: it is work the step needs only because memory ran short.

        Args:
            peak_flops: The device's matmul peak in FLOP/s per device; null measures it when fit starts (a
                large matrix multiply in the training's compute dtype, the best over half a second).
        """
        self.peak_flops = peak_flops
        self._tokens = 0  # real tokens (all ranks) since fit started
        self._flops = 0.0
        self._seconds = 0.0
        self._started: float | None = None
        self._step = 0
        self._pending: torch.Tensor | None = None  # (real tokens, label tokens) not yet collected

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step = trainer.global_step
        self.flops_per_count = flops_per_count(pl_module.model)
        if self.peak_flops is None:
            self.peak_flops = measure_matmul_peak(pl_module.device, compute_dtype(trainer.precision))
        rank_zero_info(f"Matmul peak for MFU: {self.peak_flops / 1e9:.1f} GFLOP/s per device")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, *args) -> None:
        if self._started is None:  # after validation or at the start: time training only
            self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch: dict, *args) -> None:
        # Counted on the device, without waiting for it: the host syncs (and ranks reduce) only when logging.
        batch = pl_module.trained_batch(batch) if hasattr(pl_module, "trained_batch") else batch
        counts = batch_counts(batch)
        self._pending = counts if self._pending is None else self._pending + counts
        stepped, self._step = trainer.global_step != self._step, trainer.global_step
        if not stepped or trainer.global_step % trainer.log_every_n_steps:  # log after optimizer steps only
            return
        self._collect(trainer)
        now = time.perf_counter()
        self._seconds += now - self._started
        self._started = now
        pl_module.log_dict(
            self.metrics(trainer.world_size), on_step=True, on_epoch=False, prog_bar=True, rank_zero_only=True
        )

    def _collect(self, trainer: L.Trainer) -> None:
        """Add the counts since the last call, summed over ranks (every rank calls this at the same step)."""
        if self._pending is None:
            return
        counts = trainer.strategy.reduce(self._pending.double(), reduce_op="sum").tolist()
        self._pending = None
        self._tokens += int(counts[0])
        self._flops += sum(count * price for count, price in zip(counts, self.flops_per_count, strict=True))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and self._started is not None:
            self._seconds += time.perf_counter() - self._started
            self._started = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._collect(trainer)
        if self._started is not None:
            self._seconds += time.perf_counter() - self._started
            self._started = None
        metrics = self.metrics(trainer.world_size)
        rank_zero_info(
            f"Trained {self._tokens:,} real tokens in {self._seconds:.1f} s: "
            f"{metrics['train_tokens_per_sec']:,.0f} tokens/s, MFU {100 * metrics['train_mfu']:.1f}%"
        )

    def metrics(self, world_size: int) -> dict[str, float]:
        seconds = max(self._seconds, 1e-9)
        return {
            "train_tokens_per_sec": self._tokens / seconds,
            "train_mfu": self._flops / seconds / (self.peak_flops * world_size),
        }


def batch_counts(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A batch's real tokens, label tokens and attention pairs, the counts ``flops_per_count`` prices."""
    real = real_token_mask(batch)
    return torch.stack([real.sum(), label_tokens(batch), attention_pairs(batch, real)])


def flops_per_count(model: torch.nn.Module) -> tuple[float, float, float]:
    """FLOPs of a real token in the decoder body, of a label token in the LM head, and of an attention pair."""
    return (*flops_per_token(model), attention_flops_per_pair(model))


def real_token_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[rows, seq]``, true at the non-padding tokens of a padded (attention_mask) or packed (position_ids)
    batch."""
    if "attention_mask" in batch:
        return batch["attention_mask"].bool()
    if "position_ids" not in batch:
        return torch.ones_like(batch["input_ids"], dtype=torch.bool)
    # A packed row shorter than the batch ends in a padding run: its last run of positions, with no label.
    positions, labels = batch["position_ids"], batch["labels"]
    index = torch.arange(positions.shape[1], device=positions.device).expand_as(positions)
    last_start = torch.where(positions == 0, index, 0).amax(dim=1, keepdim=True)
    in_last_run = index >= last_start
    padding_run = (last_start.squeeze(1) > 0) & ~((labels != IGNORE_INDEX) & in_last_run).any(dim=1)
    return ~(in_last_run & padding_run[:, None])


def real_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Non-padding tokens of a padded (attention_mask) or packed (position_ids) batch, as a 0-dim tensor."""
    return real_token_mask(batch).sum()


def attention_pairs(batch: dict[str, torch.Tensor], real: torch.Tensor | None = None) -> torch.Tensor:
    """(query, key) pairs that causal attention relates within the batch's real examples, as a 0-dim tensor.

    An example of n tokens has n (n + 1) / 2: its token at position p attends to p + 1 keys. Padded rows: one
    example per row, its attention_mask's tokens. Packed rows: each run of positions restarting at 0 is an
    example, the padding run excluded. A batch that counts its own (``attention_pairs``, GRPO's shared
    prompts) gives that count. ``real``: the batch's ``real_token_mask``, where the caller has it.
    """
    if "attention_pairs" in batch:
        return batch["attention_pairs"]
    real = real_token_mask(batch) if real is None else real
    packed = "position_ids" in batch and "attention_mask" not in batch
    positions = batch["position_ids"] if packed else real.cumsum(dim=1) - 1
    return ((positions + 1) * real).sum()


def label_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Positions whose next token is trained (where the LM head runs), as a 0-dim tensor."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def flops_per_token(model: torch.nn.Module) -> tuple[float, float]:
    """FLOPs a training token costs in the decoder body, and at a label position in the LM head.

    A linear layer of N weights costs 2N in the forward pass, 2N for the gradient of its input and, when its
    weight trains, 2N for that gradient.
    """
    head = model.get_output_embeddings()
    body = 0.0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            weights = module.in_features * module.out_features
            body += (6 if module.weight.requires_grad else 4) * weights
    head_weights = head.in_features * head.out_features
    return body, (6 if head.weight.requires_grad else 4) * head_weights


def attention_flops_per_pair(model: torch.nn.Module) -> float:
    """FLOPs of one (query, key) pair of attention, over all layers and heads, forward and backward.

    Per layer and query dimension: 2 for the score and 2 for its share of the weighted values (forward), 8
    in backward (gradients of the scores, queries, keys and values). Sliding windows are not modelled: the
    count is full causal attention, which is what the small models here use. A model whose config does not
    name its layers and heads the transformers way costs 0 here (MFU then leaves attention out).
    """
    config = model.config.get_text_config()
    layers, heads = getattr(config, "num_hidden_layers", None), getattr(config, "num_attention_heads", None)
    if not layers or not heads:
        return 0.0
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 12.0 * layers * heads * head_dim


def compute_dtype(precision: str | int | None) -> torch.dtype:
    """The dtype matrix multiplies run in under a Lightning precision setting."""
    text = str(precision)
    if text.startswith("bf16"):
        return torch.bfloat16
    if text.startswith("16"):
        return torch.float16
    return torch.float32


@functools.cache
def measure_matmul_peak(
    device: torch.device, dtype: torch.dtype, size: int | None = None, seconds: float = 0.5
) -> float:
    """FLOP/s of a large square matrix multiply on `device` in `dtype`: the best of at least four runs, repeated
    for about `seconds` (on a shared VM a few runs in a row can all be slowed, and the peak would read low).

    Measured once per process, device and dtype: a notebook's later fits read their MFU against the same peak
    (comparable with the first) and do not spend the half second again."""
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best, runs, deadline = float("inf"), 0, time.perf_counter() + seconds
    while runs < 4 or time.perf_counter() < deadline:
        runs += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.nn.functional.linear(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
