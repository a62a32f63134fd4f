"""The precision a config leaves out is the hardware's, said at start; gradient clipping under every precision."""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import lightning as L
import pytest
import torch

from smolfactory import SFTModule
from smolfactory.cli import SmolFactoryCLI
from smolfactory.model.precision import hardware_precision, read_cpu_flags
from tests.conftest import QUICKSTART, hardware_precision_here, quiet_trainer, this_cpu_has_bf16_units, tiny_overrides

NO_BF16_REASON = "this CPU has neither AMX nor AVX512-BF16, so bf16 would run slower"


@pytest.mark.parametrize(
    ("flags", "expected", "reason"),
    [
        ({"avx512f", "avx512_bf16"}, "bf16-mixed", "this CPU has avx512_bf16"),  # AMD Zen 4, Intel Cooper Lake
        ({"amx_tile", "amx_bf16", "avx512_bf16"}, "bf16-mixed", "this CPU has amx_bf16 and avx512_bf16"),
        ({"avx2", "avx512f", "avx512_vnni"}, "32-true", NO_BF16_REASON),  # AVX-512 without bf16 dot products
        (set(), "32-true", NO_BF16_REASON),  # no /proc/cpuinfo (macOS, Windows)
    ],
)
def test_cpu_precision_follows_the_bf16_units(flags, expected, reason):
    assert hardware_precision("cpu", cpu_flags=flags) == (expected, reason)


def test_other_accelerators_keep_lightnings_default():
    assert hardware_precision("mps", cpu_flags={"avx512_bf16"}).precision == "32-true"


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads Linux's /proc/cpuinfo")
def test_cpu_flags_are_this_machines():
    flags = read_cpu_flags()
    if platform.machine() in ("x86_64", "AMD64"):
        assert {"fpu", "sse2"} <= flags
    assert bool(flags & {"amx_bf16", "avx512_bf16"}) == this_cpu_has_bf16_units()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU's choice")
@pytest.mark.parametrize("unset", [[], ["--trainer.precision=null"]], ids=["no key", "null"])
def test_a_config_without_precision_gets_the_cpus_and_says_so(unset, tmp_path, tiny_model_dir, caplog):
    overrides = tiny_overrides(tmp_path, tiny_model_dir)
    with caplog.at_level(logging.INFO):
        cli = SmolFactoryCLI(args=["--config", QUICKSTART, "--config", overrides, *unset], run=False)
    expected = hardware_precision_here()
    assert cli.trainer.precision == expected
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("Precision:")]
    assert len(lines) == 1
    assert lines[0].startswith(f"Precision: {expected}, because this CPU has ")
    assert lines[0].endswith("(set trainer.precision to choose)")


def test_an_explicit_precision_wins_silently(tmp_path, tiny_model_dir, caplog):
    overrides = tiny_overrides(tmp_path, tiny_model_dir)
    args = ["--config", QUICKSTART, "--config", overrides, "--trainer.precision=bf16-true"]
    with caplog.at_level(logging.INFO):
        cli = SmolFactoryCLI(args=args, run=False)
    assert cli.trainer.precision == "bf16-true"
    assert not [record for record in caplog.records if record.getMessage().startswith("Precision:")]


class NormBeforeStep(L.Callback):
    """The total gradient norm each optimizer step used: the step leaves the gradients as they were, and
    Lightning zeroes them only during the next step, so they are read there (and after the last step)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_zero_grad(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        self.record(optimizer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record(trainer.optimizers[0])

    def record(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:  # none before the first step
            self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_gradient_clipping_works_with_the_default_fused_adamw(precision, tiny_model_dir, tiny_data, tmp_path):
    """The default optimizer (torch's fused AdamW) steps with gradients clipped to the norm asked for, in every
    precision the CPU runs (Lightning alone refuses to clip around a fused optimizer under bf16-mixed)."""
    clip = 1e-3  # far below these gradients' norm, so every step is clipped
    module = SFTModule(model_name=tiny_model_dir, lora=None)
    norms = NormBeforeStep()
    trainer = quiet_trainer(tmp_path, max_steps=3, callbacks=[norms], precision=precision, gradient_clip_val=clip)
    trainer.fit(module, datamodule=tiny_data)
    assert trainer.optimizers[0].defaults["fused"] is True
    assert len(norms.norms) == 3
    assert norms.norms == pytest.approx([clip] * 3, rel=1e-2)
