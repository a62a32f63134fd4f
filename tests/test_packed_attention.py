"""Attention over packed rows on a CPU, example by example: equal to each example's own causal attention."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from smolfactory import SFTModule
from smolfactory.cli import SmolFactoryCLI
from smolfactory.data.collate import packed_collate, pad_collate
from smolfactory.model import packed_attention
from smolfactory.model.build import ModelSettings, attends_example_by_example
from smolfactory.model.packed_attention import PACKED_SDPA, PackedLayout
from tests.conftest import QUICKSTART, tiny_overrides

HEADS, KV_HEADS, DIM = 6, 2, 16


def positions_of(rows: list[list[int]], length: int) -> torch.Tensor:
    """position_ids of packed rows of examples of the given lengths, each row padded to ``length``."""
    examples = [[{"input_ids": [1] * n, "labels": [1] * n} for n in row] for row in rows]
    positions = packed_collate(examples, pad_token_id=0)["position_ids"]
    return F.pad(positions, (0, length - positions.shape[1]))  # a longer pad: positions 0, 0, ... start pieces


def example_by_example(query, key, value, position_ids):
    """The reference: every example cut out of its row and attended alone with sdpa's causal flag, in float64."""
    out = torch.zeros(query.shape[0], query.shape[2], HEADS, DIM, dtype=torch.float64)
    for row, positions in enumerate(position_ids.tolist()):
        starts = [i for i, p in enumerate(positions) if i == 0 or p != positions[i - 1] + 1] + [len(positions)]
        for start, end in zip(starts, starts[1:], strict=False):
            q, k, v = (x[row : row + 1, :, start:end].double() for x in (query, key, value))
            k, v = (x.repeat_interleave(HEADS // KV_HEADS, dim=1) for x in (k, v))
            out[row, start:end] = F.scaled_dot_product_attention(q, k, v, is_causal=True)[0].transpose(0, 1)
    return out


def random_qkv(batch: int, length: int, dtype=torch.float32):
    torch.manual_seed(0)
    # Laid out as transformers hands them over: projections [batch, length, heads * dim] viewed and transposed.
    shapes = [(batch, length, HEADS, DIM), (batch, length, KV_HEADS, DIM), (batch, length, KV_HEADS, DIM)]
    return [torch.randn(shape, dtype=dtype).transpose(1, 2).requires_grad_() for shape in shapes]


def gradients(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out.to(out.dtype))


@pytest.mark.parametrize(
    "dtype, max_saved_length",
    [(torch.float64, 1024), (torch.float64, 32), (torch.float32, 1024)],
    ids=["matrix-products", "longer-ones-flash", "float32-all-flash"],  # float32 keeps no probabilities: flash
)
def test_packed_attention_equals_each_example_alone(monkeypatch, dtype, max_saved_length):
    monkeypatch.setattr(packed_attention, "MAX_SAVED_LENGTH", max_saved_length)
    # Padded to 32, 64 and 96 tokens; the rows' padding (collate's, then ten more tokens) makes pieces too.
    position_ids = positions_of([[5, 40, 17], [80], [1, 2, 3, 33]], length=90)
    inputs = random_qkv(*position_ids.shape, dtype=dtype)
    layout = PackedLayout.from_position_ids(position_ids)
    assert {(group.length, group.future is None) for group in layout.groups} == {
        (32, False),
        (64, max_saved_length < 64),
        (96, max_saved_length < 96),
    }
    out = layout.attend(*inputs, scale=DIM**-0.5)
    expected = example_by_example(*inputs, position_ids)
    grad_out = torch.randn_like(expected)
    assert torch.allclose(out.double(), expected, atol=1e-5)
    for got, want in zip(gradients(out, inputs, grad_out), gradients(expected, inputs, grad_out), strict=True):
        assert torch.allclose(got.double(), want.double(), atol=1e-5)


def test_under_bf16_autocast_packed_attention_is_as_close_to_float64_as_masked_sdpa():
    position_ids = positions_of([[120, 300, 80], [500]], length=512)
    query, key, value = random_qkv(*position_ids.shape)
    expected = example_by_example(query, key, value, position_ids)
    grad_out = torch.randn_like(expected)
    wanted = gradients(expected, (query, key, value), grad_out)
    segment = (position_ids == 0).cumsum(1)
    mask = (segment[:, :, None] == segment[:, None, :]).tril()[:, None]

    def masked_sdpa(q, k, v):
        k, v = (x.repeat_interleave(HEADS // KV_HEADS, dim=1) for x in (k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)

    errors = {}
    for name, attention in {
        "packed": lambda q, k, v: PackedLayout.from_position_ids(position_ids).attend(q, k, v, DIM**-0.5),
        "masked sdpa": masked_sdpa,
    }.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attention(query, key, value)
        assert out.dtype == torch.bfloat16
        got = [out, *gradients(out, (query, key, value), grad_out)]
        errors[name] = [
            ((a.double() - b.double()).norm() / b.norm()).item() for a, b in zip(got, [expected, *wanted], strict=True)
        ]
    for packed, masked in zip(errors["packed"], errors["masked sdpa"], strict=True):
        assert packed < 0.02 and packed < 2 * masked, errors


def test_a_model_attends_example_by_example_only_where_it_pays():
    cpu = ModelSettings()
    assert attends_example_by_example(cpu, on_cuda=False)
    assert attends_example_by_example(dataclasses.replace(cpu, dtype="bfloat16"), on_cuda=False)
    assert not attends_example_by_example(cpu, on_cuda=True)  # flash-attention's variable-length path is CUDA's
    assert attends_example_by_example(dataclasses.replace(cpu, compile=True), on_cuda=False)  # outside the graph
    for other in ("eager", "flash_attention_2"):
        assert not attends_example_by_example(dataclasses.replace(cpu, attn_implementation=other), on_cuda=False)


def example_batch(layout: str) -> dict[str, torch.Tensor]:
    """Examples of 4 to 30 tokens packed into two rows, or one per row padded on the right or on the left."""
    lengths = [[9, 30], [4, 8, 20]]
    rows = [[{"input_ids": list(range(3, 3 + n)), "labels": list(range(3, 3 + n))} for n in row] for row in lengths]
    if layout == "packed":
        return packed_collate(rows, pad_token_id=0)
    batch = pad_collate([example for row in rows for example in row], pad_token_id=0)
    if layout == "left-padded":  # as prompts are for generation: the same rows, the padding moved to the front
        shift = batch["attention_mask"].shape[-1] - batch["attention_mask"].sum(-1)
        batch["labels"][:, 0] = -100  # nothing precedes a row's first token: no position predicts it
        batch = {key: torch.stack([row.roll(int(n)) for row, n in zip(value, shift, strict=True)])
                 for key, value in batch.items()}  # fmt: skip
    return batch


@pytest.mark.parametrize("layout", ["packed", "padded", "left-padded"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # matrix products / torch's flash kernel
def test_a_model_attending_example_by_example_gives_sdpa_loss_and_gradients(tiny_model_dir, layout, dtype):
    """Padded batches run without their padding, as one packed row: the same loss and gradients as masked sdpa."""
    module = SFTModule(model_name=tiny_model_dir, dtype="bfloat16")  # LoRA, as the quickstart trains
    module.configure_model()
    assert module.attends_example_by_example
    assert module.causal_lm.config._attn_implementation == PACKED_SDPA
    module.model.to(dtype).eval()  # to compare exactly; eval: no LoRA dropout, both passes alike
    batch = example_batch(layout)
    tokens = []
    embed = module.causal_lm.get_input_embeddings()
    hook = embed.register_forward_hook(lambda _, inputs, output: tokens.append(inputs[0].numel()))

    def loss_and_gradients(example_by_example: bool):
        module.attends_example_by_example = example_by_example  # False: no layout, so the model runs sdpa
        module.model.zero_grad()
        sums = module.batch_sums(batch)["loss"]
        loss = sums.total / sums.count
        loss.backward()
        trained = [p for p in module.model.parameters() if p.requires_grad]
        return loss.item(), [p.grad.clone() for p in trained]

    packed_loss, packed_grads = loss_and_gradients(True)
    sdpa_loss, sdpa_grads = loss_and_gradients(False)
    hook.remove()
    assert packed_loss == pytest.approx(sdpa_loss, rel=1e-6)
    for got, want in zip(packed_grads, sdpa_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-4)
    assert any(grad.abs().sum() > 0 for grad in packed_grads)
    padded = batch["input_ids"].numel()
    assert tokens == [71 if layout != "packed" else padded, padded]  # 71 real tokens: no pad token ran


@pytest.mark.parametrize("packing", [True, False])
def test_a_fit_through_the_command_attends_example_by_example(tmp_path, tiny_model_dir, monkeypatch, packing):
    """The shipped quickstart config as it is (its own precision), packed or padded: every layer attends through the
    layout, and a padded batch runs only its real tokens."""
    calls, tokens = [], []
    attend = PackedLayout.attend

    def counting_attend(self, query, *args, **kwargs):
        calls.append(query.shape[0] * query.shape[2])  # rows x tokens that attended
        return attend(self, query, *args, **kwargs)

    def counting_batch_sums(self, batch):
        tokens.append(batch["input_ids"].numel() if packing else int(batch["attention_mask"].sum()))
        return batch_sums(self, batch)

    batch_sums = SFTModule.batch_sums
    monkeypatch.setattr(PackedLayout, "attend", counting_attend)
    monkeypatch.setattr(SFTModule, "batch_sums", counting_batch_sums)
    overrides = tiny_overrides(tmp_path, tiny_model_dir, max_steps=2)
    SmolFactoryCLI(args=["fit", "--config", QUICKSTART, "--config", overrides, f"--data.packing={packing}"])
    assert (tmp_path / "final").is_dir()
    layers = 2  # the tiny model's decoder layers: each attends once per forward pass
    assert calls and calls[::layers] == tokens  # (forward passes of training and validation alike)
