"""`smolfactory plot`: the curves read back from CSVLogger's file equal what the Trainer logged, and the PNG
shows them."""

from __future__ import annotations

import numpy as np
import pytest
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from matplotlib.image import imread

from smolfactory import LoraSettings, SFTModule
from smolfactory.cli import main
from smolfactory.plot import find_metrics, read_series
from tests.conftest import StepRecorder, adamw, quiet_trainer

STEPS = 6


@pytest.fixture
def logged_run(tmp_path, tiny_model_dir, tiny_data):  # noqa: F811
    module = SFTModule(
        model_name=tiny_model_dir,
        lora=LoraSettings(r=4),
        optimizer=adamw(1e-2),
        lr_scheduler={"class_path": "smolfactory.model.schedules.WarmupCosineLR", "init_args": {"warmup_steps": 2}},
    )
    recorder = StepRecorder()
    trainer = quiet_trainer(tmp_path, STEPS, [recorder, LearningRateMonitor(logging_interval="step")])
    trainer.loggers = [CSVLogger(tmp_path, name="logs")]
    trainer.log_every_n_steps = 1
    trainer.fit(module, datamodule=tiny_data)
    return tmp_path, recorder


@pytest.mark.slow
def test_curves_read_back_equal_the_logged_values(logged_run):
    run_dir, recorder = logged_run
    series = read_series(find_metrics(str(run_dir)))
    steps, losses = zip(*series["train_loss"], strict=True)
    assert list(losses) == pytest.approx(recorder.losses, rel=1e-6)
    assert len(losses) == STEPS and list(steps) == sorted(steps)
    rates = [value for _, value in series["lr-AdamW/pg1"]]  # two groups: with and without weight decay
    assert rates == pytest.approx(recorder.lrs, rel=1e-6)  # warm-up from 0, then the cosine


@pytest.mark.slow
def test_plot_writes_a_png_with_the_curves(logged_run, capsys):
    run_dir, _ = logged_run
    main(["plot", str(run_dir)])
    image = imread(run_dir / "curves.png")
    assert image.shape[:2] == (780, 960)  # 8 x 6.5 inches at 120 dpi: two panels
    blue = np.abs(image[..., :3] - np.array([0x1F, 0x77, 0xB4]) / 255).sum(-1) < 0.1  # the first line's colour
    assert blue[: image.shape[0] // 2].sum() > 100 and blue[image.shape[0] // 2 :].sum() > 100  # loss and lr drawn
    assert "train_loss" in capsys.readouterr().out
    assert not list(run_dir.glob("*.png.tmp*")) and len(list(run_dir.glob("*.png"))) == 1  # written atomically


def test_a_folder_without_logs_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: no metrics.csv under")
