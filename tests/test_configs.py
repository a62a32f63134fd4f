"""Every recipe in configs/models/ parses and builds, with a tiny stand-in model on the CPU (no download):
the hub model, dataset, LoRA, quantization and strategy settings are those the file says."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from bitsandbytes.nn import Linear4bit
from lightning.pytorch.cli import instantiate_class

from smolfactory.cli import SmolFactoryCLI

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "models").glob("*.yaml"))


def test_the_promised_recipes_exist():
    names = {path.stem for path in CONFIGS}
    expected = {"smollm3-3b-lora", "smollm3-3b-qlora", "smollm3-3b-full-fsdp", "smollm2-135m-lora",
                "smollm2-360m-lora", "smollm2-1.7b-lora", "qwen2.5-0.5b-lora"}  # fmt: skip
    assert expected <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.stem)
def test_recipe_builds_with_a_tiny_stand_in(config, tiny_model_dir, tmp_path):
    raw = yaml.safe_load(config.read_text())
    assert raw["model"]["model_name"].count("/") == 1  # a Hub id, as written for machines with the Hub
    assert raw["trainer"]["accelerator"] == "cuda" and raw["trainer"]["precision"] == "bf16-mixed"
    overrides = [
        f"--model.model_name={tiny_model_dir}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.precision=32-true",
        "--trainer.strategy=auto",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    cli = SmolFactoryCLI(args=["--config", str(config), *overrides], run=False)
    model, data = cli.model, cli.datamodule
    assert data.hparams.tokenizer == tiny_model_dir  # linked from model.model_name
    sources = [{k: v for k, v in source.items() if v is not None} for source in data.hparams.dataset]
    assert sources == raw["data"]["dataset"]
    model.configure_model()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if raw["model"].get("lora") is None:
        assert len(trainable) == len(list(model.parameters()))  # full fine-tuning
    else:
        assert trainable and all("lora_" in name for name in trainable)
        assert model.model.peft_config["default"].r == raw["model"]["lora"]["r"]
    quantized = any(isinstance(m, Linear4bit) for m in model.modules())
    assert quantized == (raw["model"].get("quantization") == "nf4")
    strategy = raw["trainer"].get("strategy")
    if strategy:  # built as written (the Trainer refuses FSDP without CUDA, the strategy itself does not)
        arguments = {
            key: instantiate_class((), value) if isinstance(value, dict) else value
            for key, value in strategy["init_args"].items()
        }
        built = instantiate_class((), {"class_path": strategy["class_path"], "init_args": arguments})
        assert type(built).__name__ == "FSDPStrategy"
        assert raw["trainer"]["devices"] == 8
