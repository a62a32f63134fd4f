"""`smolfactory export`: checkpoint -> adapter or merged folder with a model card; merged logits = adapter logits."""

from __future__ import annotations

import pytest
import torch
from peft import AutoPeftModelForCausalLM
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from smolfactory import CausalLMModule, LoraSettings
from smolfactory.cli import main
from tests.test_checkpoints import trainer_with_checkpoints
from tests.test_model import tiny_data  # noqa: F401  (a fixture)


@pytest.mark.parametrize("lora", [LoraSettings(r=4, alpha=8), None], ids=["lora", "full"])
def test_export_adapter_and_merged_give_the_trained_logits(tiny_model_dir, tiny_data, tmp_path, capsys, lora):  # noqa: F811
    module = CausalLMModule(model_name=tiny_model_dir, lora=lora, learning_rate=1e-2)
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
