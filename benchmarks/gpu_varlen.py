"""Packed rows through each variable-length attention path, against sdpa: loss, gradients and speed.

    python benchmarks/gpu_varlen.py --model FOLDER --dataset FILE --output result.json
        [--max-length 2048] [--batch-size 8] [--device cuda] [--iterations 5]

One packed batch from smolfactory's data path (SFTDataModule, packing: true) goes through SFTModule's own loss
(``batch_sums``: label-only, chunked) with every weight trained, under bf16 autocast as bf16-mixed runs it. Each
path's loss and gradient are compared with sdpa's, and both with sdpa in float32: a path is "equal within bf16
tolerance" when it is no further from the float32 result than twice sdpa-in-bf16 is (bf16's own rounding sets
the scale). Then forward and backward are timed on the same batch.

The paths:
- ``sdpa``, the reference: transformers sees the positions restart and gives SDPA a block-diagonal mask, a dense
  [batch, 1, T, T] one, so SDPA cannot use its flash kernel and computes every block of every row.
- ``flash_attention_2``: flash-attn's variable-length kernel on the rows laid end to end (RecipeModule does
  that); needs the flash-attn package, which has no binary wheel on PyPI.
- ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (PyTorch 2.10 and later, CUDA: the FlashAttention-2
  kernels built into PyTorch), registered here through transformers' AttentionInterface, with the sequence
  boundaries read from position_ids. Not a smolfactory option yet: this measures whether it should become one.
- ``flex_attention``: transformers' FlexAttention path, a document mask built from position_ids, compiled.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import time
from pathlib import Path

import torch

from smolfactory import SFTDataModule, SFTModule
from smolfactory.callbacks.throughput import real_tokens

PATHS = ("sdpa", "flash_attention_2", "torch_varlen", "flex_attention")


def unavailable(path: str, device: str) -> str | None:
    """Why a path cannot run here, or None."""
    if path == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        return "flash-attn not installed (no binary wheel on PyPI), unmeasured"
    if path == "torch_varlen" and importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (2.10 and later), unmeasured"
    if path != "sdpa" and device != "cuda":
        return "needs CUDA"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder (with its tokenizer)")
    parser.add_argument("--dataset", required=True, help="conversations (messages layout), JSONL")
    parser.add_argument("--output", required=True, help="JSON file for the results")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iterations", type=int, default=5, help="timed forward and backward passes")
    args = parser.parse_args()
    register_torch_varlen()
    batch = packed_batch(args)
    tokens = int(real_tokens(batch))
    reference = loss_and_gradients(args.model, "sdpa", batch, autocast=False)
    sdpa = loss_and_gradients(args.model, "sdpa", batch, autocast=True)
    tolerance = distance(sdpa, reference)
    summary = {"tokens_per_batch": tokens, "rows": args.batch_size, "max_length": args.max_length,
               "sdpa_bf16_vs_fp32": tolerance, "paths": {}}  # fmt: skip
    for path in PATHS:  # written after each path: a path that hangs (flex_attention compiles) keeps the others
        summary["paths"][path] = measure_path(args, path, batch, tokens, sdpa, reference, tolerance)
        print(f"{path}: {summary['paths'][path]}", flush=True)
        Path(args.output).write_text(json.dumps(summary))


def packed_batch(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """The first packed batch of the data, as the recipes' loader makes it (input_ids, labels, position_ids)."""
    data = SFTDataModule(tokenizer=args.model, dataset=args.dataset, val_split=0, max_length=args.max_length,
                         batch_size=args.batch_size, packing=True)  # fmt: skip
    data.prepare_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    return {key: value.to(args.device) for key, value in batch.items()}


class Pass:
    """One forward and backward pass of a path: its loss and every weight's gradient (float32)."""

    def __init__(self, loss: float, gradients: list[torch.Tensor]) -> None:
        self.loss, self.gradients = loss, gradients


def build(model: str, path: str, device: torch.device) -> SFTModule:
    """SFTModule training every weight, as a recipe with lora: null builds it, on the device."""
    module = SFTModule(model_name=model, lora=None, attn_implementation=path, lr_scheduler=None)
    module.configure_model()
    return module.to(device)


def loss_and_gradients(model: str, path: str, batch: dict, autocast: bool) -> Pass:
    return one_pass(build(model, path, batch["input_ids"].device), batch, autocast)


def one_pass(module: SFTModule, batch: dict, autocast: bool = True) -> Pass:
    loss = step(module, batch, autocast)
    return Pass(loss.item(), [p.grad.float() for p in module.model.parameters() if p.grad is not None])


def step(module: SFTModule, batch: dict, autocast: bool = True) -> torch.Tensor:
    """The recipe's loss (token mean over the batch's labels) and its backward pass."""
    module.model.zero_grad(set_to_none=True)
    device = batch["input_ids"].device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = module.batch_sums(batch)["loss"]
        mean = loss.total / loss.count
    mean.backward()
    return mean.detach()


def distance(one: Pass, other: Pass) -> dict[str, float]:
    """Relative difference of the losses, and of the gradients as one vector (2-norm)."""
    squared_error = sum(float((a - b).square().sum()) for a, b in zip(one.gradients, other.gradients, strict=True))
    squared_norm = sum(float(b.square().sum()) for b in other.gradients)
    return {"loss": abs(one.loss - other.loss) / abs(other.loss), "gradient": (squared_error / squared_norm) ** 0.5}


def measure_path(
    args: argparse.Namespace, path: str, batch: dict, tokens: int, sdpa: Pass, reference: Pass, tolerance: dict
) -> dict:
    """A path's distance to sdpa and to float32, whether it is within bf16 tolerance, and its speed."""
    reason = unavailable(path, args.device)
    if reason is not None:
        return {"status": "skipped", "note": reason}
    try:
        module = build(args.model, path, batch["input_ids"].device)
        result = one_pass(module, batch)  # (for flex_attention, also its compilation)
        to_reference = distance(result, reference)
        equal = all(to_reference[key] <= 2 * tolerance[key] + 1e-6 for key in to_reference)
        speed = time_steps(module, batch, tokens, args.iterations)
    except Exception as error:  # one path failing leaves the others to run
        return {"status": "failed", "note": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
    return {"status": "ok", "loss": result.loss, "vs_sdpa": distance(result, sdpa), "vs_fp32": to_reference,
            "equal_within_bf16": equal, **speed}  # fmt: skip


def time_steps(module: SFTModule, batch: dict, tokens: int, iterations: int) -> dict[str, float | None]:
    """Tokens/s of forward and backward passes (the module is warm) and their peak memory."""
    device = batch["input_ids"].device
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(iterations):
        step(module, batch)
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"tokens_per_sec": tokens * iterations / seconds, "peak_gib": peak}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- torch.nn.attention.varlen as a transformers attention function ----------------------------------------------


def register_torch_varlen() -> None:
    """Make attn_implementation="torch_varlen" available to every transformers model (no attention mask: the
    sequence boundaries come from position_ids, as for flash-attention)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import flash_attention_mask

    AttentionInterface.register("torch_varlen", torch_varlen_attention)
    AttentionMaskInterface.register("torch_varlen", flash_attention_mask)


def torch_varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed sequence: ``query`` [batch, heads, T, dim] -> [batch, T, heads, dim].

    The rows are laid end to end and cut where position_ids restart at 0, so a row's examples (and its
    trailing padding run) never see each other.
    """
    from torch.nn.attention.varlen import varlen_attn

    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    starts, longest = sequence_starts(position_ids, batch, length, query.device)
    query, key, value = (x.transpose(1, 2).reshape(batch * length, x.shape[1], dim) for x in (query, key, value))
    options = varlen_options(kv_heads != heads)
    if kv_heads != heads and "enable_gqa" not in options:
        key, value = (x.repeat_interleave(heads // kv_heads, dim=1) for x in (key, value))
    output = varlen_attn(query, key, value, starts, starts, longest, longest, scale=scaling, **options)
    return output.reshape(batch, length, heads, dim), None


# The last position_ids seen and their offsets: every layer of a forward pass gets the same tensor, and reading the
# longest length back waits for the GPU, so it is done once per pass rather than once per layer.
_last_starts: list = [None, None]


def sequence_starts(
    position_ids: torch.Tensor | None, batch: int, length: int, device: torch.device
) -> tuple[torch.Tensor, int]:
    """Cumulative sequence offsets (int32, with the total at the end) and the longest sequence's length."""
    if position_ids is not None and _last_starts[0] is position_ids:
        return _last_starts[1]
    starts = offsets_of(position_ids, batch, length, device)
    _last_starts[:] = [position_ids, starts]
    return starts


def offsets_of(
    position_ids: torch.Tensor | None, batch: int, length: int, device: torch.device
) -> tuple[torch.Tensor, int]:
    if position_ids is None:  # unpacked rows: each row is one sequence
        position_ids = torch.arange(length, device=device).expand(batch, length)
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    offsets = torch.cat([starts, torch.tensor([flat.numel()], device=device)]).to(torch.int32)
    return offsets, int((offsets[1:] - offsets[:-1]).max())


def varlen_options(grouped: bool) -> dict:
    """Causal masking as this torch's varlen_attn spells it (2.10: is_causal; later: window_size), and grouped
    query attention where it accepts it."""
    from torch.nn.attention.varlen import varlen_attn

    parameters = inspect.signature(varlen_attn).parameters
    options = {"is_causal": True} if "is_causal" in parameters else {"window_size": (-1, 0)}
    if grouped and "enable_gqa" in parameters:
        options["enable_gqa"] = True
    return options


if __name__ == "__main__":
    main()
