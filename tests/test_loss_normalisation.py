"""The loss of an optimizer step is the mean over every label token of the step, however it is split
(across processes: tests/test_distributed.py).

Examples of very different lengths make a mean of micro-batch means differ from the token mean, so the
tests can tell the two apart.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from smolfactory import SFTDataModule, SFTModule
from smolfactory.model.loss import label_token_loss
from tests.conftest import RAGGED, write_jsonl


class GradientRecorder(SFTModule):
    """Keeps the gradients the optimizer receives at each step (after normalisation, before clipping)."""

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        self.gradients = {n: p.grad.clone() for n, p in self.named_parameters() if p.grad is not None}


def one_step(model_dir, data_path, batch_size, accumulate, packing=False):
    L.seed_everything(0)
    module = GradientRecorder(model_name=model_dir, lora=None)
    datamodule = SFTDataModule(
        tokenizer=model_dir, dataset=str(data_path), val_split=0, batch_size=batch_size, packing=packing
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)
    return module.gradients, trainer.callback_metrics["train_loss"].item()


def reference_step(model_dir, data_path):
    """Gradient and loss of the token mean over the four examples, each run alone through transformers."""
    datamodule = SFTDataModule(tokenizer=model_dir, dataset=str(data_path), val_split=0)
    datamodule.setup("fit")
    module = SFTModule(model_name=model_dir, lora=None)
    module.configure_model()
    sums, counts, means = [], [], []
    for example in datamodule.train_data:
        input_ids, labels = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
        hidden = module.causal_lm(input_ids=input_ids, output_hidden_states=True).hidden_states[-1]
        loss_sum, count, _ = label_token_loss(hidden, module.causal_lm.get_output_embeddings(), labels)
        sums, counts, means = sums + [loss_sum], counts + [count], means + [loss_sum / count]
    loss = torch.stack(sums).sum() / torch.stack(counts).sum()
    loss.backward()
    gradients = {n: p.grad.clone() for n, p in module.named_parameters()}
    return gradients, loss.item(), torch.stack(means).mean().item()


def assert_same(gradients, reference, atol=1e-6):
    assert gradients.keys() == reference.keys()
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, reference[name], atol=atol, rtol=1e-4, msg=name)


@pytest.fixture
def ragged_path(tmp_path):
    return write_jsonl(tmp_path / "ragged.jsonl", RAGGED)


@pytest.mark.slow
def test_accumulation_4x1_equals_batch_4_equals_the_token_mean(tiny_model_dir, ragged_path):
    reference, loss, mean_of_means = reference_step(tiny_model_dir, ragged_path)
    assert abs(loss - mean_of_means) > 0.01  # the data tells the two normalisations apart
    for batch_size, accumulate in [(4, 1), (1, 4), (2, 2)]:
        gradients, step_loss = one_step(tiny_model_dir, ragged_path, batch_size, accumulate)
        assert step_loss == pytest.approx(loss, abs=1e-5), (batch_size, accumulate)
        assert_same(gradients, reference)


@pytest.mark.slow
def test_packed_step_equals_the_token_mean(tiny_model_dir, ragged_path):
    reference, loss, _ = reference_step(tiny_model_dir, ragged_path)
    gradients, step_loss = one_step(tiny_model_dir, ragged_path, 4, 1, packing=True)
    assert step_loss == pytest.approx(loss, abs=1e-5)
    assert_same(gradients, reference, atol=1e-5)
