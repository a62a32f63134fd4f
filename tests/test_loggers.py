"""TrackioLogger: what Lightning logs during a fit is what Trackio's local database holds afterwards."""

from __future__ import annotations

from argparse import Namespace

import pytest
import torch

from smolfactory import LoraSettings, SFTModule
from smolfactory.loggers import TrackioLogger
from smolfactory.loggers.trackio import flat_config
from tests.conftest import StepRecorder, adamw, quiet_trainer


def test_trackio_logger_stores_the_logged_losses_and_config(tmp_path, monkeypatch, tiny_model_dir, tiny_data):  # noqa: F811
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    from trackio.sqlite_storage import SQLiteStorage

    module = SFTModule(model_name=tiny_model_dir, lora=LoraSettings(r=4), optimizer=adamw(1e-2))
    recorder = StepRecorder()
    trainer = quiet_trainer(tmp_path, 4, [recorder])
    trainer.loggers = [TrackioLogger(project="smolfactory-test", name="tiny-run")]
    trainer.log_every_n_steps = 1
    trainer.fit(module, datamodule=tiny_data)
    logs = SQLiteStorage.get_logs("smolfactory-test", "tiny-run")
    losses = [row["train_loss"] for row in logs if "train_loss" in row]
    assert losses == pytest.approx(recorder.losses, rel=1e-6) and len(losses) == 4
    assert [row["step"] for row in logs if "train_loss" in row] == [0, 1, 2, 3]
    config = SQLiteStorage.get_run_config("smolfactory-test", "tiny-run")
    assert config["optimizer/init_args/lr"] == 1e-2 and config["lora/r"] == 4


def test_nested_settings_become_one_flat_config_of_plain_values():
    lora, data = LoraSettings(r=4, target_modules=["q_proj"]), Namespace(max_length=8, dtype=torch.bfloat16)
    config = flat_config({"lora": lora, "data": data, "name": None})
    assert config["lora/r"] == 4 and config["lora/target_modules"] == "['q_proj']"
    assert config["data/max_length"] == 8 and config["data/dtype"] == "torch.bfloat16" and config["name"] is None
