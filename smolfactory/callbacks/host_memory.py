"""Keep freed host memory in the process, so that a CPU training step stops paying the kernel for fresh pages.

glibc serves every allocation above its mmap threshold (128 KiB to 32 MiB) with a fresh mapping and hands
it back on free. A training step on the CPU allocates hundreds of such tensors (activations, their
gradients, the LM head's chunks of logits), and every one of them is page-faulted and zeroed by the kernel
again, step after step. Measured on a 2-core EPYC (packed 4 x 512 LoRA step of SmolLM2-135M, bf16-mixed):
a copy of one 1,024 x 49,152 chunk of logits took 316 ms, mostly page faults, and the whole step ran about
a quarter faster once freed blocks were kept for reuse; the peak resident set grew by about 8%.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

# mallopt(3) parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
LARGEST_INT = 2**31 - 1


def keep_freed_memory() -> bool:
    """Ask glibc to serve every allocation from its heap and to keep freed memory there for reuse.

    No allocation gets its own mapping (``M_MMAP_MAX`` 0), and the heap is not trimmed back to the system
    below 2 GiB of free memory at its top (``M_TRIM_THRESHOLD``). Returns False where the C library is
    not glibc (macOS, musl) and nothing changed.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, LARGEST_INT))


class HostMemory(L.Callback):
    def __init__(self, reuse_freed: bool = True) -> None:
        """How the process's own (host) memory is managed when the model trains on the CPU.

        Args:
            reuse_freed: Keep freed blocks in the process for the next step's tensors instead of returning
                each to the system (glibc, Linux): CPU steps run about a quarter faster, and the resident
                set stays near its peak. Nothing changes on a GPU, where the tensors live in CUDA's own
                caching allocator.
        """
        self.reuse_freed = reuse_freed

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.reuse_freed or trainer.strategy.root_device.type != "cpu":
            return
        if keep_freed_memory():
            rank_zero_info(
                "Host memory: freed blocks are kept for reuse, not returned to the system "
                "(set host_memory.reuse_freed: false to return them)"
            )
