"""The chunked LM-head loss equals the plain one: the loss and every gradient, over several chunks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from smolfactory.model.loss import IGNORE_INDEX, label_token_log_probs, label_token_loss


def reference(hidden_states, lm_head, labels):
    """The textbook way: logits for every position, shift, cross-entropy summed over the trained ones."""
    logits = lm_head(hidden_states)[:, :-1].float()
    targets = labels[:, 1:]
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def inputs(bias: bool, train_head: bool):
    torch.manual_seed(0)
    hidden = torch.randn(3, 29, 16, requires_grad=True)
    head = torch.nn.Linear(16, 53, bias=bias)
    head.requires_grad_(train_head)
    labels = torch.randint(0, 53, (3, 29))
    labels[torch.rand(3, 29) < 0.4] = IGNORE_INDEX  # prompt and padding positions
    return hidden, head, labels


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("train_head", [False, True], ids=["frozen-head", "trained-head"])
def test_chunked_loss_and_gradients_equal_the_plain_computation(bias, train_head):
    hidden, head, labels = inputs(bias, train_head)
    with torch.no_grad():  # make about half of the trained targets the model's own argmax (for token accuracy)
        predicted = head(hidden[:, :-1]).argmax(-1)
        right = (torch.rand(predicted.shape) < 0.5) & (labels[:, 1:] != IGNORE_INDEX)
        labels[:, 1:][right] = predicted[right]
    expected = reference(hidden, head, labels)
    expected_grads = torch.autograd.grad(expected * 0.37, [hidden, *[p for p in head.parameters() if p.requires_grad]])
    # 7 positions a chunk: about 7 chunks, the last one short.
    loss_sum, count, correct = label_token_loss(hidden, head, labels, chunk_size=7)
    grads = torch.autograd.grad(loss_sum * 0.37, [hidden, *[p for p in head.parameters() if p.requires_grad]])
    assert count == (labels[:, 1:] != IGNORE_INDEX).sum()
    # Token accuracy's count, against the argmax of the full logits at the trained positions.
    trained = labels[:, 1:] != IGNORE_INDEX
    assert correct == (predicted[trained] == labels[:, 1:][trained]).sum() >= right.sum() > 0
    assert not correct.requires_grad
    torch.testing.assert_close(loss_sum, expected, atol=1e-5, rtol=1e-6)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-5)


def test_chunked_loss_under_bf16_autocast_multiplies_in_bf16():
    hidden, head, labels = inputs(bias=False, train_head=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(hidden, head, labels)
        loss_sum, _, _ = label_token_loss(hidden, head, labels, chunk_size=5)
    # Both round the product to bf16 the same way; fp32 would differ by more than this.
    torch.testing.assert_close(loss_sum, expected, atol=1e-3, rtol=1e-4)
    fp32 = reference(hidden, head, labels)
    assert (loss_sum - fp32).abs() > 1e-3
    gradient = torch.autograd.grad(loss_sum, hidden)[0]
    assert gradient.dtype == torch.float32 and torch.isfinite(gradient).all()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("train_head", [False, True], ids=["frozen-head", "trained-head"])
def test_tempered_log_probs_and_gradients_equal_the_plain_computation(bias, train_head):
    """GRPO's log-probs at a sampling temperature: log_softmax(logits / T) at each label, and its gradients."""
    hidden, head, labels = inputs(bias, train_head)
    weights = torch.randn(labels.shape[0], labels.shape[1] - 1)  # a different upstream gradient per position
    trained = labels[:, 1:] != IGNORE_INDEX
    logits = head(hidden)[:, :-1].float() / 0.7
    plain = logits.log_softmax(-1).gather(2, labels[:, 1:].clamp(min=0)[..., None]).squeeze(2)[trained]
    parameters = [hidden, *[p for p in head.parameters() if p.requires_grad]]
    expected_grads = torch.autograd.grad((plain * weights[trained]).sum(), parameters)
    chunked = label_token_log_probs(hidden, head, labels, chunk_size=7, temperature=0.7)
    grads = torch.autograd.grad((chunked.log_probs * weights[trained]).sum(), parameters)
    torch.testing.assert_close(chunked.log_probs, plain.detach(), rtol=1e-5, atol=1e-5)
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)[trained]
    torch.testing.assert_close(chunked.entropy, entropy.detach(), rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
