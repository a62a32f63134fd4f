"""Shared fixtures: the real SmolLM2 tokenizer, tiny randomly initialised Llama models built on it, and a way to
run the `smolfactory` command in-process."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from smolfactory.cli import main
from smolfactory.model.loading import DEFAULT_MODEL, resolve_model_path


@pytest.fixture(scope="session")
def builtin_path() -> str:
    """Folder of the built-in SmolLM2-135M-Instruct (converted from GGUF on first use)."""
    return resolve_model_path(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tokenizer(builtin_path):
    return AutoTokenizer.from_pretrained(builtin_path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> str:
    """A 2-layer, hidden-64 Llama with SmolLM2's vocabulary and tokenizer, saved as a model folder."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        # Wider than the usual 0.02 so that LoRA on a random model moves the logits within a few steps.
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_adapter_dir(tmp_path_factory, tiny_model_dir, tokenizer) -> str:
    """A LoRA adapter folder (r=16 on every linear layer, as the quickstart trains) on the tiny model."""
    from peft import LoraConfig, get_peft_model

    folder = tmp_path_factory.mktemp("tiny-adapter")
    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    get_peft_model(LlamaForCausalLM.from_pretrained(tiny_model_dir), config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def chat(*turns: str) -> dict:
    """A ``messages`` row from alternating user/assistant texts."""
    roles = ["user", "assistant"]
    return {"messages": [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]}


ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
DPO_QUICKSTART = str(ROOT / "configs" / "dpo_quickstart.yaml")


@dataclass
class Run:
    """What one `smolfactory` command did: its exit status and everything it printed."""

    code: int
    out: str
    err: str

    @property
    def error(self) -> str:
        """The last line on stderr (where the one-line errors go)."""
        lines = self.err.strip().splitlines()
        return lines[-1] if lines else ""


def smolfactory(capfd: pytest.CaptureFixture, *args: object) -> Run:
    """Run the `smolfactory` command in this process, as the console script would (status 2 for our errors)."""
    capfd.readouterr()
    # Lightning's messages go through its own loggers, whose stream pytest captured at import: listen to them too.
    log = logging.StreamHandler(io.StringIO())
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    for logger in loggers:
        logger.addHandler(log)
    try:
        main([str(arg) for arg in args])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code if isinstance(exit_info.code, int) else int(exit_info.code is not None)
    finally:
        for logger in loggers:
            logger.removeHandler(log)
    out, err = capfd.readouterr()
    return Run(code, out + log.stream.getvalue(), err)


def stand_in_config(folder: Path, model_dir: str, **sections: dict) -> str:
    """A second --config for a shipped recipe: the tiny model instead of its model, no progress bar; ``sections``
    add more settings ({"data": {...}, "trainer": {...}})."""
    config = {"model": {"model_name": model_dir}, "trainer": {"enable_progress_bar": False}}
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    path = folder / f"stand-in-{len(list(folder.glob('stand-in-*')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


class SignalAt(L.Callback):
    """Sends this process a signal (SIGTERM, as a job scheduler would, or SIGINT: Ctrl-C) after optimizer step
    ``step``, for CLI tests: `--trainer.callbacks+={"class_path": "tests.conftest.SignalAt", ...}`."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)) -> None:
        self.step, self.signum, self.sent = step, signum, False

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


def adamw(lr: float = 2e-4, eight_bit: bool = False, **init_args: object) -> dict:
    """``model.optimizer``: torch's AdamW (or bitsandbytes' 8-bit AdamW) at ``lr``, without weight decay unless
    given (as the recipes' defaults)."""
    class_path = "bitsandbytes.optim.AdamW8bit" if eight_bit else "torch.optim.AdamW"
    return {"class_path": class_path, "init_args": {"lr": lr, "weight_decay": 0.0, **init_args}}
