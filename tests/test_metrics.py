"""Metrics: perplexity and token accuracy per step and per epoch (token-weighted, torchmetrics), checked
against hand computations; GenerationSamples answers fixed prompts at each validation."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from smolfactory import LoraSettings, SFTDataModule, SFTModule
from smolfactory.callbacks.samples import GenerationSamples
from smolfactory.model.loss import IGNORE_INDEX
from tests.conftest import StepRecorder, adamw, chat, conversations, greedy_by_hand, quiet_trainer, user, write_jsonl


@pytest.fixture
def two_batches(tiny_model_dir, tmp_path):
    rows = [
        chat("What is your name?", "My name is Quill, and I was made by the SmolFactory project."),
        chat("Say a colour.", "Blue."),
        chat("Count to three.", "One, two, three."),
        chat("Who made you?", "The SmolFactory project made me."),
    ]
    return conversations(tmp_path, tiny_model_dir, rows, batch_size=2)


@torch.no_grad()
def by_hand(model, dataloader) -> tuple[float, float]:
    """Token-mean cross-entropy and argmax accuracy over every label, from the model's full logits."""
    losses, hits, count = 0.0, 0, 0
    for batch in dataloader:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        trained = targets != IGNORE_INDEX
        losses += torch.nn.functional.cross_entropy(logits[trained], targets[trained], reduction="sum").item()
        hits += int((logits[trained].argmax(-1) == targets[trained]).sum())
        count += int(trained.sum())
    return losses / count, hits / count


@pytest.mark.slow
def test_step_and_epoch_metrics_are_token_weighted(tiny_model_dir, two_batches, tmp_path):
    module = SFTModule(model_name=tiny_model_dir, lora=LoraSettings(r=8), optimizer=adamw(3e-2), lr_scheduler=None)
    record = StepRecorder()
    L.seed_everything(0)
    trainer = quiet_trainer(tmp_path, 30, [record])
    trainer.fit(module, datamodule=two_batches)  # 15 epochs of 2 steps
    steps = record.steps
    for step in steps:
        assert step["train_perplexity"] == pytest.approx(math.exp(step["train_loss"]), rel=1e-5)
    last_epoch = steps[-2:]
    assert last_epoch[0]["tokens"] != last_epoch[1]["tokens"]  # so a plain mean of the two would differ
    tokens = sum(step["tokens"] for step in last_epoch)
    for name in ("loss", "token_accuracy"):
        expected = sum(step[f"train_{name}"] * step["tokens"] for step in last_epoch) / tokens
        assert trainer.callback_metrics[f"train_{name}_epoch"].item() == pytest.approx(expected, rel=1e-5)
    epoch_loss = trainer.callback_metrics["train_loss_epoch"].item()
    assert trainer.callback_metrics["train_perplexity_epoch"].item() == pytest.approx(math.exp(epoch_loss), rel=1e-5)

    # Validation metrics on the trained model equal the full-logits computation, and accuracy is not trivial.
    loader = two_batches.train_dataloader()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, dataloaders=loader, verbose=False)
    loss, accuracy = by_hand(module.model, loader)
    assert 0.05 < accuracy < 1.0
    assert trainer.callback_metrics["val_loss"].item() == pytest.approx(loss, rel=1e-5)
    assert trainer.callback_metrics["val_perplexity"].item() == pytest.approx(math.exp(loss), rel=1e-5)
    assert trainer.callback_metrics["val_token_accuracy"].item() == pytest.approx(accuracy, rel=1e-6)


@pytest.mark.slow
def test_generation_samples_at_each_validation(tiny_model_dir, tmp_path):
    rows = [chat("Say a colour.", "Blue."), chat("Count to three.", "One, two, three.")] * 4
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    data = SFTDataModule(tokenizer=tiny_model_dir, dataset=str(path), val_split=0.25, batch_size=2)
    module = SFTModule(model_name=tiny_model_dir, lora=LoraSettings(r=4), optimizer=adamw(1e-2))
    prompts = ["Say a colour.", "Who are you?"]
    trainer = L.Trainer(
        accelerator="cpu", max_steps=4, val_check_interval=2, check_val_every_n_epoch=None,
        logger=CSVLogger(tmp_path, name="logs"),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[GenerationSamples(prompts=prompts, max_new_tokens=6)], default_root_dir=tmp_path,
    )  # fmt: skip
    L.seed_everything(0)
    trainer.fit(module, datamodule=data)
    lines = [
        json.loads(line) for line in (tmp_path / "logs" / "version_0" / "generations.jsonl").read_text().splitlines()
    ]
    assert [(row["step"], row["prompt"]) for row in lines] == [
        (2, prompts[0]),
        (2, prompts[1]),
        (4, prompts[0]),
        (4, prompts[1]),
    ]
    module.model.eval()
    for row in lines[2:]:  # the last validation ran on the final weights
        assert row["answer"] == greedy_by_hand(module.model, data.tokenizer, [user(row["prompt"])], new_tokens=6)
