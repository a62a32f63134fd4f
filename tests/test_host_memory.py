"""CPU fits keep freed host memory for reuse (glibc): a large tensor gets no mapping of its own, said at start."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform
import subprocess
import sys

import pytest
import torch

from smolfactory.callbacks import HostMemory
from smolfactory.cli import SmolFactoryCLI
from tests.conftest import QUICKSTART, ROOT, tiny_overrides

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="tunes glibc's allocator"
)
TENSOR_BYTES = 64 << 20  # above glibc's largest mmap threshold (32 MiB): mapped on its own by default


class MallInfo2(ctypes.Structure):
    """glibc's struct mallinfo2 (2.33 and later); hblkhd is the bytes held in mmap'ed blocks."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")
    ]  # fmt: skip


def bytes_mapped_for_a_tensor() -> int:
    """How much glibc's mmap'ed total grows while a 64 MiB tensor is alive."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = MallInfo2
    before = libc.mallinfo2().hblkhd
    tensor = torch.ones(TENSOR_BYTES, dtype=torch.uint8)
    during = libc.mallinfo2().hblkhd
    del tensor
    return during - before


BEFORE_AND_AFTER = """
from smolfactory.callbacks.host_memory import keep_freed_memory
from tests.test_host_memory import bytes_mapped_for_a_tensor
print(bytes_mapped_for_a_tensor(), keep_freed_memory(), bytes_mapped_for_a_tensor())
"""


@pytest.mark.slow  # a python process of its own (10 s of imports)
def test_keep_freed_memory_serves_large_tensors_from_the_heap():
    # A process of its own: the setting lasts for the rest of a process.
    result = subprocess.run([sys.executable, "-c", BEFORE_AND_AFTER], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    before, applied, after = result.stdout.split()
    assert int(before) >= TENSOR_BYTES  # glibc's default: a fresh mapping, page-faulted anew each time
    assert applied == "True"
    assert int(after) == 0


def test_a_cpu_fit_keeps_freed_memory_and_says_so(tmp_path, tiny_model_dir, caplog):
    overrides = tiny_overrides(tmp_path, tiny_model_dir, max_steps=1)
    with caplog.at_level(logging.INFO):
        SmolFactoryCLI(args=["fit", "--config", QUICKSTART, "--config", overrides, "--trainer.limit_val_batches=0"])
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("Host memory:")]
    assert lines == [
        "Host memory: freed blocks are kept for reuse, not returned to the system "
        "(set host_memory.reuse_freed: false to return them)"
    ]
    assert bytes_mapped_for_a_tensor() == 0  # this process's allocator now keeps large blocks in its heap


def test_reuse_freed_false_leaves_the_allocator_alone(tmp_path, tiny_model_dir, caplog):
    overrides = tiny_overrides(tmp_path, tiny_model_dir)
    args = ["--config", QUICKSTART, "--config", overrides, "--host_memory.reuse_freed=false"]
    with caplog.at_level(logging.INFO):
        cli = SmolFactoryCLI(args=args, run=False)
        (host_memory,) = [callback for callback in cli.trainer.callbacks if isinstance(callback, HostMemory)]
        host_memory.setup(cli.trainer, cli.model, "fit")  # as fit would call it, without fitting
    assert not [record for record in caplog.records if record.getMessage().startswith("Host memory:")]
