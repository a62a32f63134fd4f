"""`smolfactory export`: checkpoint -> adapter or merged folder with a model card; merged logits = adapter logits."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from peft import AutoPeftModelForCausalLM
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from smolfactory import LoraSettings, SFTModule
from smolfactory.cli import main
from smolfactory.export import read_checkpoint
from tests.conftest import adamw, trainer_with_checkpoints


@pytest.mark.slow
@pytest.mark.parametrize("lora", [LoraSettings(r=4, alpha=8), None], ids=["lora", "full"])
def test_export_adapter_and_merged_give_the_trained_logits(tiny_model_dir, tiny_data, tmp_path, capsys, lora):  # noqa: F811
    module = SFTModule(model_name=tiny_model_dir, lora=lora, optimizer=adamw(1e-2))
    trainer_with_checkpoints(tmp_path, max_steps=3).fit(module, datamodule=tiny_data)
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    loader = DataLoader(tiny_data.train_data, tiny_data.hparams.batch_size, collate_fn=tiny_data.train_collate())
    batch = next(iter(loader))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    module.eval()
    with torch.no_grad():
        trained = module.model(**inputs).logits

    main(["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "adapter")])
    main(["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "merged"), "--merge"])
    assert f"Wrote {tmp_path / 'merged'}" in capsys.readouterr().out
    loader = AutoPeftModelForCausalLM if lora else AutoModelForCausalLM
    with torch.no_grad():
        adapter = loader.from_pretrained(tmp_path / "adapter").eval()(**inputs).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(**inputs).logits
    torch.testing.assert_close(adapter, trained, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, adapter, atol=1e-4, rtol=1e-4)
    assert (tmp_path / "merged" / "model.safetensors").is_file()

    card = (tmp_path / "merged" / "README.md").read_text()
    for fact in (tiny_model_dir, str(tiny_data.hparams.dataset), "| optimizer steps | 3 |", "final train_loss"):
        assert fact in card, fact
    method = ["LoRA r=4, alpha=8", "merged into the base weights"] if lora else ["full fine-tuning"]
    assert all(words in card for words in method)


def test_export_of_a_folder_that_is_no_sharded_checkpoint_is_one_line(tmp_path, capsys):
    # (Sharded checkpoint folders themselves are exported in tests/test_distributed.py.)
    (tmp_path / "last.ckpt").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--checkpoint", str(tmp_path / "last.ckpt"), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "last.ckpt is a folder without .metadata, so not a sharded checkpoint" in capsys.readouterr().err


def sharded_folder(path: Path, weights_key: str) -> Path:
    """A checkpoint folder laid out as Lightning's sharding strategies save one: the weights (under
    ``weights_key``) and ``optimizer_0`` as torch.distributed.checkpoint shards, everything else in meta.pt."""
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(layer.parameters())
    layer(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    names = {index: f"model.{name}" for index, (name, _) in enumerate(layer.named_parameters())}
    optimizer_state = optimizer.state_dict()  # keyed by parameter name, as FSDP's optimizer state dicts are
    optimizer_state["state"] = {names[index]: state for index, state in optimizer_state["state"].items()}
    optimizer_state["param_groups"][0]["params"] = list(names.values())
    weights = {f"model.{name}": value.detach() for name, value in layer.state_dict().items()}
    dcp.save({weights_key: weights, "optimizer_0": optimizer_state}, checkpoint_id=path)
    meta = {"epoch": 1, "global_step": 3, "hyper_parameters": {"learning_rate": 0.01, "lora": {"r": 4}}}
    torch.save({**meta, "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 1}}}}}, path / "meta.pt")
    return path


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save in one process, as intended
def test_a_sharded_folder_reads_as_lightnings_own_consolidation(tmp_path, monkeypatch):
    folder = sharded_folder(tmp_path / "last.ckpt", "model")  # FSDPStrategy's layout
    consolidated = tmp_path / "consolidated.ckpt"
    # Lightning's documented command, `python -m lightning.pytorch.utilities.consolidate_checkpoint`, in-process.
    monkeypatch.setattr(sys, "argv", ["consolidate_checkpoint", str(folder), "--output_file", str(consolidated)])
    runpy.run_module("lightning.pytorch.utilities.consolidate_checkpoint", run_name="__main__")
    expected = torch.load(consolidated, weights_only=True)
    saved = read_checkpoint(folder)
    assert {"state_dict", "optimizer_states", "hyper_parameters", "loops"} <= saved.keys()
    assert_same(saved, expected)

    # ModelParallelStrategy (FSDP2) names the weights "state_dict" already; Lightning's tool only reads FSDP's.
    assert read_checkpoint(sharded_folder(tmp_path / "fsdp2.ckpt", "state_dict")).keys() == expected.keys()


def assert_same(value: Any, expected: Any, where: str = "checkpoint") -> None:
    """Equal values of equal types, tensors included (same dtype, same elements), in nested dicts and lists."""
    assert type(value) is type(expected), where
    if isinstance(expected, torch.Tensor):
        assert value.dtype == expected.dtype and torch.equal(value, expected), where
    elif isinstance(expected, dict):
        assert list(value) == list(expected), where
        for key in expected:
            assert_same(value[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, list | tuple):
        assert len(value) == len(expected), where
        for index, (item, expected_item) in enumerate(zip(value, expected, strict=True)):
            assert_same(item, expected_item, f"{where}[{index}]")
    else:
        assert value == expected, where
