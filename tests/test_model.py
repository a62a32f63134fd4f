"""SFTModule on a tiny real Llama: loss, optimisation, schedule, and the exported folder."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from peft import AutoPeftModelForCausalLM
from peft.tuners import lora
from transformers import AutoModelForCausalLM

from smolfactory import LoraSettings, SFTModule
from smolfactory.callbacks import HFExport
from smolfactory.errors import SmolFactoryError
from smolfactory.model.build import CompiledForTraining, ModelSettings, build_model, load_base
from smolfactory.model.lora import apply_lora
from smolfactory.model.packed_attention import PackedLayout
from smolfactory.model.sharding import decoder_layers
from tests.conftest import adamw, fit


def test_label_token_loss_equals_transformers_loss(tiny_model_dir, tiny_data):
    module = SFTModule(model_name=tiny_model_dir, lora=None)
    module.configure_model()
    tiny_data.setup("fit")
    batch = next(iter(tiny_data.train_dataloader()))
    loss_sum, num_tokens = module.batch_sums(batch)["loss"]
    reference = module.model(**batch).loss  # transformers shifts and averages internally
    num_labels = (batch["labels"][:, 1:] != -100).sum()
    assert num_tokens == num_labels
    torch.testing.assert_close(loss_sum / num_tokens, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [LoraSettings(r=8, alpha=16), None], ids=["lora", "full"])
def test_loss_falls_on_a_repeated_batch(tiny_model_dir, tiny_data, tmp_path, lora):
    # A constant learning rate (no schedule): this test is about optimisation, not the schedule.
    module = SFTModule(model_name=tiny_model_dir, lora=lora, optimizer=adamw(1e-2), lr_scheduler=None)
    recorder = fit(module, tiny_data, tmp_path, max_steps=20)
    assert len(recorder.losses) == 20
    assert recorder.losses[-1] < 0.6 * recorder.losses[0]


def test_lora_trains_only_adapters_and_configure_model_is_idempotent(tiny_model_dir):
    module = SFTModule(model_name=tiny_model_dir, lora=LoraSettings(r=4))
    module.configure_model()
    model = module.model
    module.configure_model()
    assert module.model is model
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    # all-linear: attention and MLP projections get adapters, the (tied) LM head does not.
    for projection in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(f"{projection}.lora_A" in name for name in trainable)
    assert not any("lm_head" in name or "embed_tokens" in name for name in trainable)


@pytest.mark.slow
def test_warmup_then_cosine_schedule(tiny_model_dir, tiny_data, tmp_path):
    peak, warmup, total, floor = 1e-3, 3, 10, 0.1
    schedule = {
        "class_path": "smolfactory.model.schedules.WarmupCosineLR",
        "init_args": {"warmup_steps": warmup, "min_lr_ratio": floor},
    }
    module = SFTModule(model_name=tiny_model_dir, optimizer=adamw(peak), lr_scheduler=schedule)
    recorder = fit(module, tiny_data, tmp_path, max_steps=total)

    def expected(step: int) -> float:
        if step < warmup:
            return peak * step / warmup
        progress = (step - warmup) / (total - warmup)
        return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))

    assert recorder.lrs == pytest.approx([expected(step) for step in range(total)], rel=1e-6, abs=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [LoraSettings(r=8, alpha=16), None], ids=["lora", "full"])
def test_exported_folder_reloads_with_identical_logits(tiny_model_dir, tiny_data, tmp_path, lora):
    module = SFTModule(model_name=tiny_model_dir, lora=lora, optimizer=adamw(1e-2))
    fit(module, tiny_data, tmp_path, max_steps=3, callbacks=[HFExport()])
    final = tmp_path / "final"
    files = {path.name for path in final.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= files
    if lora is not None:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files
        reloaded = AutoPeftModelForCausalLM.from_pretrained(final)
    else:
        assert "model.safetensors" in files
        reloaded = AutoModelForCausalLM.from_pretrained(final)
    input_ids = torch.tensor([[1, 42, 7, 99, 2048, 5]])
    module.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, module(input_ids), rtol=0, atol=1e-6)
        # Training changed the model: the export is not simply the base model.
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        assert not torch.allclose(base(input_ids).logits, module(input_ids), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [LoraSettings(r=8), None], ids=["continue-adapter", "merge-then-full"])
def test_an_adapter_folder_as_model_name_starts_from_that_adapter(tiny_model_dir, tiny_data, tmp_path, lora):
    first = SFTModule(model_name=tiny_model_dir, lora=LoraSettings(r=8, alpha=16), optimizer=adamw(1e-2))
    fit(first, tiny_data, tmp_path, max_steps=3, callbacks=[HFExport()])
    adapter = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "final").eval()

    second = SFTModule(model_name=str(tmp_path / "final"), lora=lora)
    second.configure_model()
    second.eval()
    input_ids = torch.tensor([[1, 42, 7, 99, 2048, 5]])
    with torch.no_grad():
        torch.testing.assert_close(second(input_ids), adapter(input_ids).logits, rtol=1e-5, atol=1e-5)
    trainable = [name for name, p in second.named_parameters() if p.requires_grad]
    if lora is None:
        assert len(trainable) == len(list(second.parameters())) and not any("lora_" in n for n in trainable)
    else:
        assert trainable and all("lora_" in name for name in trainable)


def test_lora_checkpoint_holds_only_trainable_weights(tiny_model_dir, tiny_data, tmp_path):
    module = SFTModule(model_name=tiny_model_dir, lora=LoraSettings(r=4))
    fit(module, tiny_data, tmp_path, max_steps=1)
    path = tmp_path / "lora.ckpt"
    module.trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["state_dict"]
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert set(saved) == trainable
    base_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    assert path.stat().st_size < 0.1 * base_bytes


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"optimizer": "AdamW"}, "model.optimizer: give a class path"), ({"lora": LoraSettings(r=0)}, "lora.r must be")],
)
def test_bad_model_settings_fail_when_the_module_is_built(kwargs, message):
    with pytest.raises(SmolFactoryError, match=message):
        SFTModule(**kwargs)


@pytest.mark.slow
def test_fused_adamw_steps_equal_torch_reference_adamw(tiny_model_dir, tiny_data, tmp_path):
    """On the CPU the optimizer is torch's fused AdamW; its weights after 3 steps equal those of the
    single-tensor (for-loop) implementation run on the same gradients."""

    class ReferenceAdamW(SFTModule):
        def configure_optimizers(self):
            config = super().configure_optimizers()
            fused = config["optimizer"]
            assert fused.defaults["fused"] is True
            config["optimizer"] = torch.optim.AdamW(fused.param_groups, foreach=False, fused=False)
            config["lr_scheduler"]["scheduler"].optimizer = config["optimizer"]
            return config

    weights = []
    for module_class in (SFTModule, ReferenceAdamW):
        module = module_class(model_name=tiny_model_dir, lora=None, optimizer=adamw(1e-2, weight_decay=0.1))
        fit(module, tiny_data, tmp_path, max_steps=3)
        weights.append({name: p.detach().clone() for name, p in module.named_parameters()})
    for name, value in weights[0].items():
        torch.testing.assert_close(value, weights[1][name], atol=1e-6, rtol=1e-5)
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert (weights[0]["model.model.norm.weight"] - start["model.norm.weight"]).abs().max() > 1e-3  # it trained


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    """Each decoder layer compiled, the same losses, and attention example by example still running at every call
    (between the compiled parts)."""
    attend, calls = PackedLayout.attend, []

    def counting_attend(self, *args, **kwargs):
        calls.append(1)
        return attend(self, *args, **kwargs)

    monkeypatch.setattr(PackedLayout, "attend", counting_attend)
    losses, attention_calls = [], []
    for compiled in (False, True):
        calls.clear()
        module = SFTModule(model_name=tiny_model_dir, lora=LoraSettings(r=4), optimizer=adamw(1e-2), compile=compiled)
        losses.append(fit(module, tiny_data, tmp_path, max_steps=3).losses)
        attention_calls.append(len(calls))
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    assert attention_calls == [2 * 3, 2 * 3]  # 2 layers x 3 steps of one batch, compiled or not
    layers = decoder_layers(module.model)
    assert len(layers) == 2 and all(isinstance(layer.forward, CompiledForTraining) for layer in layers)
    assert all("_orig_mod" not in name for name in module.state_dict())  # checkpoint keys unchanged


def test_adapters_skip_their_input_cast_under_autocast_with_the_same_gradients(tiny_model_dir):
    """Under autocast peft's cast of an adapter's input to float32 is undone by the product's cast to bf16, so
    skipping it must leave the loss and every gradient bit for bit as peft computes them; without autocast the
    cast stays (a bf16 base under float32 adapters needs it)."""
    settings = ModelSettings(tiny_model_dir)
    ours = build_model(settings, LoraSettings(r=4))
    peft_as_is = apply_lora(load_base(settings, tiny_model_dir, None), LoraSettings(r=4))
    torch.manual_seed(0)
    with torch.no_grad():  # nonzero B matrices, so that every adapter weight gets a gradient
        for name, value in ours.named_parameters():
            value.copy_(torch.randn_like(value) * 0.1 if "lora_B" in name else value)
    peft_as_is.load_state_dict(ours.state_dict())
    input_ids = torch.randint(0, ours.config.vocab_size, (2, 24))
    grads = []
    for model in (ours, peft_as_is):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    adapters = [layer for layer in ours.modules() if isinstance(layer, lora.Linear)]
    assert adapters and not any(layer.cast_input_dtype_enabled for layer in adapters)
    assert all(torch.equal(grads[0][name], grads[1][name]) for name in grads[1]) and len(grads[0]) == len(grads[1])
    assert all(grad.abs().sum() > 0 for grad in grads[0].values())

    bf16_base = build_model(dataclasses.replace(settings, dtype="bfloat16"), LoraSettings(r=4))
    assert bf16_base(input_ids=input_ids).logits.dtype == torch.bfloat16  # float32 adapters, no autocast: cast kept
    assert all(layer.cast_input_dtype_enabled for layer in bf16_base.modules() if isinstance(layer, lora.Linear))
