"""The shape of the recipes: siblings on RecipeModule, a model built without a Trainer, the optimizer and schedule
by class path, and ORPO / SimPO picked from the command line."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from smolfactory import DPOModule, LoraSettings, ModelSettings, RecipeModule, SFTModule, build_model
from smolfactory.errors import SmolFactoryError
from smolfactory.model.schedules import WarmupCosineLR
from tests.conftest import DPO_QUICKSTART, adamw, smolfactory, stand_in_config


def test_recipes_are_siblings_on_one_base():
    for recipe in (SFTModule, DPOModule):
        assert recipe.__bases__ == (RecipeModule,)
    assert not issubclass(DPOModule, SFTModule) and not issubclass(SFTModule, DPOModule)


def test_a_notebook_builds_the_model_a_recipe_trains_without_a_trainer(tiny_model_dir):
    """build_model gives the same adapters on the same base as SFTModule.configure_model, with the same logits."""
    lora = LoraSettings(r=4, alpha=8)
    torch.manual_seed(0)
    model = build_model(ModelSettings(name=tiny_model_dir), lora)
    module = SFTModule(model_name=tiny_model_dir, lora=lora)
    torch.manual_seed(0)
    module.configure_model()
    ours = {name for name, p in model.named_parameters() if p.requires_grad}
    assert ours == {name.removeprefix("model.") for name, p in module.named_parameters() if p.requires_grad}
    assert model.training and module.model.training
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(model(input_ids=ids).logits, module(ids))


def test_warmup_cosine_follows_transformers_schedule():
    """WarmupCosineLR (a plain, checkpointable scheduler) gives transformers' cosine-with-floor curve, step by step."""
    total, warmup, floor = 20, 4, 0.1

    def learning_rates(make) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        scheduler, rates = make(optimizer), []
        for _ in range(total):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return rates

    ours = learning_rates(lambda o: WarmupCosineLR(o, warmup_steps=warmup, min_lr_ratio=floor, total_steps=total))
    reference = learning_rates(
        lambda o: get_cosine_with_min_lr_schedule_with_warmup(o, warmup, total, min_lr_rate=floor)
    )
    assert ours == pytest.approx(reference, rel=1e-12, abs=1e-15)


def test_the_optimizer_is_a_class_path_a_class_or_a_partial_and_hparams_stay_plain(tiny_model_dir):
    as_dict = SFTModule(model_name=tiny_model_dir, optimizer=adamw(1e-3))
    as_partial = SFTModule(model_name=tiny_model_dir, optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.0))
    assert as_dict.hparams.optimizer == adamw(1e-3)
    assert as_partial.hparams.optimizer == adamw(1e-3) | {"class_path": "torch.optim.adamw.AdamW"}
    json.dumps(dict(as_partial.hparams))  # plain values: checkpoints load with torch.load(weights_only=True)
    with pytest.raises(SmolFactoryError, match=r"model.optimizer: cannot import nowhere.Adam \(No module named"):
        SFTModule(optimizer={"class_path": "nowhere.Adam"})
    with pytest.raises(SmolFactoryError, match="model.optimizer: give a class path and its arguments"):
        SFTModule(optimizer="AdamW")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("loss", "extra"),
    [("ORPOLoss", "train_nll_loss"), ("SimPOLoss", "train_logps_chosen")],
    ids=["orpo", "simpo"],
)
def test_reference_free_losses_train_from_the_command_line(capfd, tmp_path, tiny_model_dir, loss, extra):
    """The DPO quickstart with --model.loss ORPOLoss or SimPOLoss: no reference adapter or model, the loss's own
    metrics logged, and the final adapter written."""
    stand_in = stand_in_config(
        tmp_path, tiny_model_dir, trainer={"max_steps": 2, "val_check_interval": 2, "log_every_n_steps": 1}
    )
    run = smolfactory(
        capfd, "fit", "--config", DPO_QUICKSTART, "--config", stand_in, f"--model.loss={loss}",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert run.code == 0, run.err
    metrics = (tmp_path / "run" / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert extra in metrics and "train_reward_accuracy" in metrics and "val_loss" in metrics
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["hyper_parameters"]["loss"]["class_path"].endswith(loss)
    assert not any("reference" in name for name in saved["state_dict"])


@pytest.mark.slow
def test_a_loss_setting_of_the_wrong_loss_is_refused_in_one_line(capfd, tmp_path, tiny_model_dir):
    stand_in = stand_in_config(tmp_path, tiny_model_dir)
    run = smolfactory(
        capfd, "fit", "--config", DPO_QUICKSTART, "--config", stand_in, "--model.loss=SimPOLoss",
        "--model.loss.beta=-1", f"--trainer.default_root_dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert run.code == 2 and run.error == "error: model.loss.beta must be > 0, got -1.0"
    assert not list(tmp_path.rglob("*.ckpt"))
