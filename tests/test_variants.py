"""Model variants: QLoRA and 8-bit on this CPU, LoRA options, gradient checkpointing, dtypes, bad combinations."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from bitsandbytes.nn import Linear4bit, Linear8bitLt
from torch.utils.data import DataLoader

from smolfactory import LoraSettings, SFTModule
from smolfactory.cli import main
from smolfactory.errors import SmolFactoryError
from smolfactory.model.precision import check_combination
from tests.conftest import QUICKSTART, adamw, fit, tiny_overrides


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "layer"), [("nf4", Linear4bit), ("fp4", Linear4bit), ("int8", Linear8bitLt)])
def test_quantized_lora_trains_on_this_cpu(tiny_model_dir, tiny_data, tmp_path, kind, layer):  # noqa: F811
    module = SFTModule(
        model_name=tiny_model_dir,
        lora=LoraSettings(r=8, alpha=16),
        quantization=kind,
        gradient_checkpointing=True,
        optimizer=adamw(1e-2),
        lr_scheduler=None,
    )
    recorder = fit(module, tiny_data, tmp_path, max_steps=12)
    assert recorder.losses[-1] < 0.8 * recorder.losses[0]
    base = module.causal_lm
    assert isinstance(base.model.layers[0].self_attn.q_proj.base_layer, layer)
    # QLoRA's preparation: the small unquantized weights (norms) in float32, only adapters training.
    assert base.model.norm.weight.dtype == torch.float32
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert base.is_gradient_checkpointing


def gradients(module, batch):
    module.model.zero_grad(set_to_none=True)
    loss_sum, count = module.batch_sums(batch)["loss"]
    (loss_sum / count).backward()
    return loss_sum.item(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize("lora", [None, LoraSettings(r=4)], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_model_dir, tiny_data, lora):  # noqa: F811
    tiny_data.setup("fit")
    loader = DataLoader(tiny_data.train_data, tiny_data.hparams.batch_size, collate_fn=tiny_data.train_collate())
    batch = next(iter(loader))
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = SFTModule(model_name=tiny_model_dir, lora=lora, gradient_checkpointing=checkpointing)
        module.configure_model()
        assert module.causal_lm.is_gradient_checkpointing == checkpointing
        results.append(gradients(module, batch))
    (loss, plain), (checkpointed_loss, checkpointed) = results
    assert checkpointed_loss == pytest.approx(loss, abs=1e-6)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_lora_on_attention_only(tiny_model_dir):
    module = SFTModule(model_name=tiny_model_dir, lora=LoraSettings(r=4, target_modules="attention"))
    module.configure_model()
    adapted = {name.split(".lora_A")[0].split(".")[-1] for name, _ in module.named_parameters() if "lora_A" in name}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_rslora_scales_by_the_square_root_of_the_rank(tiny_model_dir):
    for rslora, expected in ((False, 32 / 16), (True, 32 / math.sqrt(16))):
        module = SFTModule(model_name=tiny_model_dir, lora=LoraSettings(r=16, alpha=32, use_rslora=rslora))
        module.configure_model()
        assert module.causal_lm.model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(expected)


@pytest.mark.slow
def test_dora_learns_magnitudes_and_modules_to_save_train_in_full(tiny_model_dir, tiny_data, tmp_path):  # noqa: F811
    lora = LoraSettings(r=4, use_dora=True, modules_to_save=["norm"])
    module = SFTModule(model_name=tiny_model_dir, lora=lora, optimizer=adamw(1e-2), lr_scheduler=None)
    recorder = fit(module, tiny_data, tmp_path, max_steps=10)
    assert recorder.losses[-1] < 0.8 * recorder.losses[0]
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in name for name in trainable)
    assert any(name.endswith("model.norm.modules_to_save.default.weight") for name in trainable)
    # The saved copy moved away from the frozen original.
    norm = module.causal_lm.model.norm
    assert not torch.equal(norm.modules_to_save["default"].weight, norm.original_module.weight)


@pytest.mark.slow
def test_full_fine_tuning_can_freeze_the_embeddings(tiny_model_dir, tiny_data, tmp_path):  # noqa: F811
    module = SFTModule(model_name=tiny_model_dir, lora=None, freeze_embeddings=True, optimizer=adamw(1e-2))
    module.configure_model()
    embeddings = module.causal_lm.get_input_embeddings().weight
    before, layer_before = embeddings.detach().clone(), module.causal_lm.model.layers[0].mlp.up_proj.weight.clone()
    fit(module, tiny_data, tmp_path, max_steps=3)
    assert not embeddings.requires_grad and torch.equal(embeddings, before)
    assert not torch.equal(module.causal_lm.model.layers[0].mlp.up_proj.weight, layer_before)


def test_weights_dtype_is_kept_apart_from_the_precision(tiny_model_dir, tiny_data, tmp_path):  # noqa: F811
    module = SFTModule(model_name=tiny_model_dir, lora=LoraSettings(r=4), dtype="bfloat16")
    module.configure_model()
    assert module.causal_lm.model.layers[0].mlp.up_proj.base_layer.weight.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"quantization": "nf4", "lora": False}, "set model.lora"),
        ({"quantization": "int8", "precision": "bf16-true"}, "casts every weight"),
        ({"weights": "float16", "precision": "32-true"}, "needs loss scaling"),
        ({"freeze_embeddings": True}, "for full fine-tuning"),
        ({"attn_implementation": "flash_attention_2", "precision": "32-true"}, "CUDA GPUs only"),
        ({"liger": True, "precision": "32-true"}, "Liger's Triton kernels run on CUDA GPUs only"),
    ],
)
def test_combinations_that_cannot_work_are_refused(settings, message):
    arguments = {
        "precision": None,
        "on_cuda": False,
        "weights": "float32",
        "quantization": None,
        "lora": True,
        "attn_implementation": "sdpa",
        "freeze_embeddings": False,
    }
    with pytest.raises(SmolFactoryError, match=message):
        check_combination(**{**arguments, **settings})
    check_combination(**arguments)  # the defaults work


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed")
def test_liger_without_the_package_is_one_line(tiny_model_dir):
    module = SFTModule(model_name=tiny_model_dir, liger=True)
    with pytest.raises(SmolFactoryError, match="needs the liger-kernel package; pip install liger-kernel"):
        module.configure_model()


@pytest.mark.slow
def test_a_bad_combination_is_one_line_from_the_cli(tmp_path, tiny_model_dir, capsys):
    overrides = tiny_overrides(tmp_path, tiny_model_dir)
    args = ["fit", "--config", QUICKSTART, "--config", overrides, "--trainer.precision=bf16-true"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--model.quantization=nf4"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: trainer.precision: bf16-true casts")
