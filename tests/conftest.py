"""Shared fixtures: the real SmolLM2 tokenizer, tiny randomly initialised Llama models built on it, and a way to
run the `smolfactory` command in-process."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from smolfactory import SFTDataModule
from smolfactory.cli import main
from smolfactory.model.loading import DEFAULT_MODEL, resolve_model_path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # make test runs two pytest processes on two cores: one thread each (and in the commands they start), or the
    # two would fight over the cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


ROOT = Path(__file__).resolve().parent.parent


def run_script(*args: object, timeout: float = 400) -> None:
    """Run ``python ARGS...`` from the project root in a process of its own (the multi-process tests' scripts).

    A failure fails the test with the end of the script's output. A script killed by a signal is run once
    more, with a warning: once in CI, a two-process FSDP2 run on two busy cores died of SIGSEGV inside torch
    (its output is lost with it), where the same run passes alone. Wrong results still fail: only a crash is
    retried, and ``PYTHONFAULTHANDLER`` makes any crash print the Python stack it happened in.
    """
    command = [sys.executable, *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONFAULTHANDLER": "1"}
    for attempt in (1, 2):
        done = subprocess.run(command, cwd=ROOT, env=env, timeout=timeout, capture_output=True, text=True)
        if done.returncode >= 0 or attempt == 2:
            break
        name = signal.Signals(-done.returncode).name
        warnings.warn(
            f"{args[0]} died of {name}; running it once more. Its output ended:\n{done.stderr[-3000:]}", stacklevel=2
        )
    if done.returncode:
        pytest.fail(f"{' '.join(command)} exited with {done.returncode}; its output ended:\n{done.stderr[-6000:]}")


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


def adamw(lr: float = 2e-4, eight_bit: bool = False, **init_args: object) -> dict:
    """``model.optimizer``: torch's AdamW (or bitsandbytes' 8-bit AdamW) at ``lr``, without weight decay unless
    given (as the recipes' defaults)."""
    class_path = "bitsandbytes.optim.AdamW8bit" if eight_bit else "torch.optim.AdamW"
    return {"class_path": class_path, "init_args": {"lr": lr, "weight_decay": 0.0, **init_args}}


class StepRecorder(L.Callback):
    """Records each optimizer step of a fit: its number, learning rate, label tokens and ``train_*`` metrics (a
    resumed fit records from where it resumed). With ``path`` (for the command: ``--trainer.callbacks+=``) each
    step is also appended to that file as a JSON line."""

    def __init__(self, path: str | None = None) -> None:
        self.path, self.steps = path, []
        self.pending: dict | None = None

    @property
    def losses(self) -> list[float]:
        return [step["train_loss"] for step in self.steps]

    @property
    def lrs(self) -> list[float]:
        return [step["lr"] for step in self.steps]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.last_step = trainer.global_step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, *args) -> None:
        if self.pending is None:  # the step's first micro-batch
            self.pending = {"lr": trainer.optimizers[0].param_groups[0]["lr"], "tokens": 0}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch: dict, *args) -> None:
        trained = pl_module.trained_batch(batch)  # GRPO: the completions it sampled, not the prompts
        self.pending["tokens"] += int((trained["labels"][:, 1:] != -100).sum())
        if trainer.global_step == self.last_step:  # accumulating: the optimizer has not stepped yet
            return
        self.last_step = trainer.global_step
        metrics = {name: value.item() for name, value in trainer.callback_metrics.items() if name.startswith("train_")}
        step, self.pending = {"step": trainer.global_step, **self.pending, **metrics}, None
        self.steps.append(step)
        if self.path is not None:
            with open(self.path, "a") as file:
                file.write(json.dumps(step) + "\n")


def recorded_steps(path: Path) -> list[dict]:
    """The steps a ``StepRecorder(path)`` appended to its file."""
    return [json.loads(line) for line in path.read_text().splitlines()]


class StopAtStep(L.Callback):
    """Interrupts fit after optimizer step ``step``, as a user or a job scheduler would: the run's schedule is still
    that of the whole run. With ``signum`` it sends this process that signal (SIGTERM, as a job scheduler would, or
    SIGINT: Ctrl-C), else it asks the Trainer to stop. For the command: `--trainer.callbacks+={"class_path":
    "tests.conftest.StopAtStep", ...}`."""

    def __init__(self, step: int, signum: int | None = None) -> None:
        self.step, self.signum, self.done = step, signum, False

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step != self.step or self.done:
            return
        self.done = True
        if self.signum is None:
            trainer.should_stop = True
        else:
            os.kill(os.getpid(), self.signum)


def quiet_trainer(root: Path, max_steps: int, callbacks=(), enable_checkpointing=False, **kwargs) -> L.Trainer:
    """A CPU Trainer without logger, progress bar, summary or validation (``kwargs``: more Trainer options)."""
    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=enable_checkpointing,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=root,
        callbacks=list(callbacks),
        **kwargs,
    )


def trainer_with_checkpoints(root: Path, max_steps: int, **kwargs) -> L.Trainer:
    """A quiet Trainer that saves root/checkpoints/last.ckpt after every optimizer step."""
    checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, every_n_train_steps=1)
    return quiet_trainer(root, max_steps, [checkpoints], enable_checkpointing=True, **kwargs)


def fit(module: L.LightningModule, datamodule: L.LightningDataModule, root: Path, max_steps: int, callbacks=()):
    """Fit ``max_steps`` optimizer steps from seed 0 (adapters start random) and return the ``StepRecorder``."""
    L.seed_everything(0)
    recorder = StepRecorder()
    quiet_trainer(root, max_steps, [recorder, *callbacks]).fit(module, datamodule=datamodule)
    return recorder


def conversations(tmp_path: Path, tokenizer: str, rows: list[dict], batch_size: int) -> SFTDataModule:
    """An SFTDataModule over ``rows`` written to a file, without a validation split."""
    path = write_jsonl(tmp_path / "conversations.jsonl", rows)
    return SFTDataModule(tokenizer=tokenizer, dataset=str(path), val_split=0, batch_size=batch_size)


@pytest.fixture
def tiny_data(tiny_model_dir, tmp_path):
    """Four short conversations in one batch of four, no validation split."""
    rows = [
        chat("What is your name?", "My name is Quill."),
        chat("Who made you?", "The SmolFactory project made me."),
        chat("Say a colour.", "Blue."),
        chat("Count to three.", "One, two, three."),
    ]
    return conversations(tmp_path, tiny_model_dir, rows, batch_size=4)


# Conversations of very different lengths: a mean of per-batch means would weigh their tokens unequally.
RAGGED = [
    chat("Hi", "Hello!"),
    chat("Tell me a long story.", "Once upon a time " * 15),
    chat("2 + 2?", "4"),
    chat("Name three colours.", "Red, green and blue, and also yellow, purple and orange."),
]


def tiny_overrides(tmp_path: Path, tiny_model_dir: str, max_steps: int = 2) -> str:
    """A second --config that points the quickstart recipe at a tiny model and a temporary folder."""
    override = {
        "trainer": {
            "max_steps": max_steps,
            "val_check_interval": max_steps,
            "log_every_n_steps": 1,
            "default_root_dir": str(tmp_path),
            "enable_progress_bar": False,
        },
        "model": {"model_name": tiny_model_dir},
        "data": {"max_length": 256, "batch_size": 4},
    }
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump(override))
    return str(path)


def trained_spans(labels: list[int]) -> list[list[int]]:
    """The runs of trained label ids in a sequence of labels."""
    spans, current = [], []
    for label in labels:
        if label == -100:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(label)
    return spans + ([current] if current else [])


def user(text: str) -> dict:
    """A user turn."""
    return {"role": "user", "content": text}


def greedy_by_hand(model, tokenizer, messages: list[dict], new_tokens: int = 8) -> str:
    """Argmax of the next-token logits, one token at a time, until the end-of-turn token (no generate())."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = list(ids["input_ids"])
    answer = []
    for _ in range(new_tokens):
        token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if token in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")):
            break
        ids.append(token)
        answer.append(token)
    return tokenizer.decode(answer, skip_special_tokens=True).strip()


def this_cpu_has_bf16_units() -> bool:
    """Read here as the kernel reports it: any flags line of /proc/cpuinfo naming AMX-BF16 or AVX512-BF16."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = [line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")] if cpuinfo.exists() else []
    return any(word in ("amx_bf16", "avx512_bf16") for line in lines for word in line.split())


def hardware_precision_here() -> str:
    """The precision a config without one gets on this machine's CPU (bf16 units, else float32)."""
    return "bf16-mixed" if this_cpu_has_bf16_units() else "32-true"
