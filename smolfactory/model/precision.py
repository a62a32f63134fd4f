"""Weights dtype, quantized base weights (bitsandbytes, for QLoRA), and how they meet the Trainer's precision.

The weights' dtype (``model.dtype``) is what the parameters are stored in; ``trainer.precision`` decides
what the matrix products run in (bf16-mixed: float32 weights, bfloat16 products). ``hardware_precision``
picks the precision when a config names none; ``check_combination`` refuses, in one line each, the pairs
that cannot work.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from transformers import BitsAndBytesConfig

from smolfactory.errors import SmolFactoryError

Quantization = Literal["nf4", "fp4", "int8"]
WeightsDtype = Literal["float32", "bfloat16", "float16"]


# /proc/cpuinfo flags of x86 CPUs whose bf16 matrix products outrun float32 ones: AMX tiles (Intel Sapphire
# Rapids and later) and AVX512-BF16 dot products (Intel Cooper Lake, AMD Zen 4 and later).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


class PrecisionChoice(NamedTuple):
    """A Lightning precision and why it suits the machine."""

    precision: str
    reason: str


def hardware_precision(accelerator: str = "auto", cpu_flags: set[str] | None = None) -> PrecisionChoice:
    """bf16 mixed precision where the hardware multiplies bf16 matrices faster than float32, else 32-true.

    That is CUDA GPUs with bf16 (compute capability 8.0, Ampere, and later) and x86 CPUs with AMX or
    AVX512-BF16. Without those units a bf16 product is emulated and runs far slower than float32 (on a CPU
    without them, 300 times: measured).

    Args:
        accelerator: Lightning's accelerator setting (auto, cpu, cuda, gpu, mps, ...).
        cpu_flags: The CPU's feature flags; None reads them from /proc/cpuinfo.
    """
    if accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available():
        name, capability = cuda_device()
        if capability >= (8, 0):
            return PrecisionChoice("bf16-mixed", f"{name} computes in bf16")
        return PrecisionChoice("32-true", f"{name} has no bf16 units")
    if accelerator == "auto" and torch.backends.mps.is_available():
        return PrecisionChoice("32-true", "Lightning's default on Apple's MPS")
    if accelerator not in ("auto", "cpu"):
        return PrecisionChoice("32-true", f"Lightning's default for accelerator {accelerator}")
    flags = cpu_flags if cpu_flags is not None else read_cpu_flags()
    found = [flag for flag in BF16_CPU_FLAGS if flag in flags]
    if found:
        return PrecisionChoice("bf16-mixed", f"this CPU has {' and '.join(found)}")
    return PrecisionChoice("32-true", "this CPU has neither AMX nor AVX512-BF16, so bf16 would run slower")


def cuda_device() -> tuple[str, tuple[int, int]]:
    """The first GPU's name and compute capability, read through NVML where it is installed (it comes with
    torch's CUDA wheels), so that CUDA is not initialised before Lightning forks processes (ddp_fork,
    ddp_notebook refuse to start after that); through torch otherwise."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return pynvml.nvmlDeviceGetName(handle), tuple(pynvml.nvmlDeviceGetCudaComputeCapability(handle))
    except Exception:  # no NVML, or a driver without it: ask torch (this initialises CUDA)
        return torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)


def read_cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 Linux: its ``flags`` line); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def bnb_config(kind: Quantization, compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """bitsandbytes settings: 4-bit NF4/FP4 with double quantization (QLoRA's recipe), or LLM.int8()."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise SmolFactoryError(
            f"model.quantization: {kind} needs bitsandbytes; pip install 'smolfactory[quant]' (bitsandbytes>=0.50)"
        )
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=kind,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def compute_dtype(precision: str | None, weights: WeightsDtype) -> torch.dtype:
    """The dtype matrix products run in: the autocast dtype of a mixed precision, else the weights' dtype."""
    if precision is not None and precision.startswith("bf16"):
        return torch.bfloat16
    if precision is not None and precision.startswith("16"):
        return torch.float16
    return getattr(torch, weights)


def check_combination(
    *,
    precision: str | None,
    on_cuda: bool,
    weights: WeightsDtype,
    quantization: Quantization | None,
    lora: bool,
    attn_implementation: str,
    freeze_embeddings: bool,
    liger: bool = False,
) -> None:
    """One-line errors for settings that cannot work together (``precision`` None: no Trainer yet)."""
    if quantization and not lora:
        raise SmolFactoryError(
            f"model.quantization: {quantization} freezes quantized base weights, so only adapters can train; "
            "set model.lora (it is null)"
        )
    if quantization and precision in ("bf16-true", "16-true"):
        raise SmolFactoryError(
            f"trainer.precision: {precision} casts every weight, which breaks {quantization} layers; "
            "use bf16-mixed (on a GPU) or 32-true"
        )
    if weights == "float16" and precision not in (None, "16-mixed"):
        raise SmolFactoryError(
            f"model.dtype: float16 needs loss scaling, which trainer.precision: {precision} does not do; "
            "use trainer.precision: 16-mixed, or model.dtype: bfloat16 or float32"
        )
    if freeze_embeddings and lora:
        raise SmolFactoryError("model.freeze_embeddings is for full fine-tuning (lora: null); LoRA freezes them")
    if attn_implementation == "flash_attention_2":
        if precision is not None and not on_cuda:
            raise SmolFactoryError("model.attn_implementation: flash_attention_2 runs on CUDA GPUs only; use sdpa")
        if importlib.util.find_spec("flash_attn") is None:
            raise SmolFactoryError(
                "model.attn_implementation: flash_attention_2 needs the flash-attn package "
                "(pip install flash-attn --no-build-isolation); or use sdpa"
            )
    if liger and precision is not None and not on_cuda:
        raise SmolFactoryError("model.liger: Liger's Triton kernels run on CUDA GPUs only; set model.liger: false")
