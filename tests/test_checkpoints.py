"""Checkpoints survive crashes during a save, a NaN loss stops training, SIGTERM saves a resumable checkpoint."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from smolfactory import LoraSettings, SFTDataModule, SFTModule
from smolfactory.callbacks import SaveOnInterrupt
from smolfactory.checkpoints import AtomicCheckpointIO, newest_checkpoint
from smolfactory.errors import SmolFactoryError
from tests.conftest import (
    QUICKSTART,
    ROOT,
    StepRecorder,
    StopAtStep,
    adamw,
    chat,
    recorded_steps,
    smolfactory,
    tiny_overrides,
    trainer_with_checkpoints,
    write_jsonl,
)


@pytest.mark.slow
def test_a_failed_write_leaves_the_previous_checkpoint_whole(tiny_model_dir, tiny_data, tmp_path, monkeypatch):  # noqa: F811
    trainer = trainer_with_checkpoints(tmp_path, max_steps=2, plugins=[AtomicCheckpointIO()])
    trainer.fit(SFTModule(model_name=tiny_model_dir, lora=LoraSettings(r=4)), datamodule=tiny_data)
    last = tmp_path / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    save = torch.save

    def write_half_then_fail(checkpoint, file):  # the disk fills up halfway through the file
        buffer = io.BytesIO()
        save(checkpoint, buffer)
        file.write(buffer.getvalue()[: buffer.tell() // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", write_half_then_fail)
    with pytest.raises(
        SmolFactoryError, match=r"could not write checkpoint last\.ckpt in .* \(No space left on device\)"
    ):
        trainer.save_checkpoint(last)
    assert last.read_bytes() == before  # the old checkpoint, untouched
    assert not [path for path in last.parent.iterdir() if not path.name.endswith(".ckpt")]  # nothing half-written


KILLED_WHILE_WRITING = """
import io, os, signal, sys, torch
from smolfactory.checkpoints import AtomicCheckpointIO
path = sys.argv[1]
AtomicCheckpointIO().save_checkpoint({"global_step": 1, "weights": torch.ones(100_000)}, path)
save = torch.save
def write_half_then_die(checkpoint, file):
    buffer = io.BytesIO()
    save(checkpoint, buffer)
    file.write(buffer.getvalue()[: buffer.tell() // 2])
    file.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = write_half_then_die
AtomicCheckpointIO().save_checkpoint({"global_step": 2, "weights": torch.zeros(100_000)}, path)
"""


@pytest.mark.slow
def test_kill_9_while_a_checkpoint_is_written_leaves_the_previous_one_as_the_newest(tmp_path):
    last = tmp_path / "checkpoints" / "last.ckpt"
    result = subprocess.run([sys.executable, "-c", KILLED_WHILE_WRITING, str(last)], cwd=ROOT, capture_output=True)
    assert result.returncode == -signal.SIGKILL
    assert torch.load(last, weights_only=True)["global_step"] == 1
    assert newest_checkpoint([last.parent]) == last  # the half-written file beside it is no candidate
    assert len(list(last.parent.iterdir())) == 2
    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, last)  # the next save clears it away
    assert list(last.parent.iterdir()) == [last]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
def test_a_lora_checkpoint_holds_what_trains_and_stays_small(tiny_model_dir, tiny_data, tmp_path, optimizer):  # noqa: F811
    module = SFTModule(
        model_name=tiny_model_dir, lora=LoraSettings(r=8), optimizer=adamw(eight_bit=optimizer == "adamw_8bit")
    )
    trainer_with_checkpoints(tmp_path, max_steps=2).fit(module, datamodule=tiny_data)
    last = tmp_path / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert set(saved["state_dict"]) == trainable
    # Weights and both AdamW moments: 3 x 4 bytes a weight in fp32; bitsandbytes keeps the moments in 8 bits.
    weight_bytes = 4 * sum(module.get_parameter(name).numel() for name in trainable)
    expected = 3 * weight_bytes if optimizer == "adamw" else 1.5 * weight_bytes
    assert expected < last.stat().st_size < expected + 200_000  # + loop, RNG and hyper-parameter state
    base = sum(f.stat().st_size for f in Path(tiny_model_dir).glob("*.safetensors"))
    assert last.stat().st_size < 0.1 * base


@pytest.mark.slow
def test_a_nan_loss_stops_with_the_step_and_the_last_good_checkpoint(tiny_model_dir, tiny_data, tmp_path):  # noqa: F811
    class TurnsNaN(SFTModule):
        def batch_sums(self, batch):
            sums = super().batch_sums(batch)
            if self.trainer.global_step == 2:
                sums["loss"] = sums["loss"]._replace(total=sums["loss"].total * float("nan"))
            return sums

    module = TurnsNaN(model_name=tiny_model_dir, lora=LoraSettings(r=4))
    with pytest.raises(SmolFactoryError, match=r"became nan at step 3; last good checkpoint: .*last\.ckpt"):
        trainer_with_checkpoints(tmp_path, max_steps=5).fit(module, datamodule=tiny_data)
    weights = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert all(torch.isfinite(p).all() for p in weights.values())  # the optimizer never stepped on NaN
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 2
    for name, value in saved["state_dict"].items():
        torch.testing.assert_close(value, dict(module.named_parameters())[name].detach())


@pytest.mark.slow
def test_sigterm_from_outside_saves_a_checkpoint_that_resumes(tmp_path, tiny_model_dir, capfd):
    overrides = tiny_overrides(tmp_path, tiny_model_dir, max_steps=100_000)
    command = [sys.executable, "-m", "smolfactory.cli", "fit", "--config", QUICKSTART, "--config", overrides]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    deadline = time.time() + 120
    while not any("Total params" in line for line in lines) and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(3)  # a few training steps
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0
    reader.join(timeout=10)
    output = "".join(lines)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert f"saved {last}. Resume with the same command plus --ckpt_path last" in output
    step = torch.load(last, weights_only=False)["global_step"]
    assert step > 0 and f"SIGTERM at step {step}:" in output and "Traceback" not in output
    assert "weights_only" not in output  # Lightning's log line when a save does not say what it keeps
    resumed = smolfactory(capfd, *command[3:], f"--trainer.max_steps={step + 2}", "--ckpt_path=last")
    assert resumed.code == 0, resumed.err[-2000:]
    assert f"Restored all states from the checkpoint at {last}" in resumed.out
    assert f"`max_steps={step + 2}` reached" in resumed.out
    assert "dataloader is not resumable" not in resumed.out + resumed.err
    assert [path.name for path in last.parent.iterdir()] == ["last.ckpt"]  # replaced, not versioned beside it
    assert torch.load(last, weights_only=True)["global_step"] == step + 2


@pytest.mark.slow
def test_after_kill_9_the_shipped_config_resumes_from_its_last_periodic_save(tmp_path, tiny_model_dir, capfd):
    """The quickstart's ModelCheckpoint had save_top_k 0 and save_last but no period: Lightning 2.6 then writes
    last.ckpt only when fit ends, and a kill -9 lost every step (the resume refused: no checkpoint)."""
    overrides = tiny_overrides(tmp_path, tiny_model_dir, max_steps=100_000)
    command = [sys.executable, "-m", "smolfactory.cli", "fit", "--config", QUICKSTART, "--config", overrides]
    last = tmp_path / "checkpoints" / "last.ckpt"
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not last.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    process.kill()
    process.wait(timeout=60)
    assert last.exists(), "no last.ckpt while training"
    step = torch.load(last, weights_only=True)["global_step"]
    assert step > 0 and step % 10 == 0  # the config's every_n_train_steps
    resumed = smolfactory(capfd, *command[3:], f"--trainer.max_steps={step + 3}", "--ckpt_path=last")
    assert resumed.code == 0, resumed.err[-2000:]
    assert f"Restored all states from the checkpoint at {last}" in resumed.out
    assert f"`max_steps={step + 3}` reached" in resumed.out
    assert torch.load(last, weights_only=True)["global_step"] == step + 3


@pytest.mark.slow
def test_last_ckpt_holds_the_final_step_when_training_ends_between_two_periodic_saves(tmp_path, tiny_model_dir,
                                                                                      capfd):  # fmt: skip
    """Lightning 2.6 saves last.ckpt at the end only when it saved nothing before: 13 steps saved every 10 left
    step 10 in last.ckpt, so a resume trained steps 11-13 again."""
    overrides = tiny_overrides(tmp_path, tiny_model_dir, max_steps=13)
    result = smolfactory(capfd, "fit", "--config", QUICKSTART, "--config", overrides)
    assert result.code == 0, result.err[-2000:]
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 13
    assert [path.name for path in last.parent.iterdir()] == ["last.ckpt"]
    again = smolfactory(capfd, "fit", "--config", QUICKSTART, "--config", overrides, "--ckpt_path=last")
    assert again.code == 0 and "`max_steps=13` reached" in again.out
    assert "trained no step" in again.out + again.err


@pytest.mark.slow
def test_a_checkpoint_that_saves_last_only_at_the_end_is_named_at_start(tmp_path, tiny_model_dir, capfd):
    only_at_end = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                   "init_args": {"save_last": True, "save_top_k": 0}}  # fmt: skip
    overrides = tiny_overrides(tmp_path, tiny_model_dir, max_steps=1)
    result = smolfactory(capfd, "fit", "--config", QUICKSTART, "--config", overrides,
                         f"--trainer.callbacks=[{json.dumps(only_at_end)}]")  # fmt: skip
    assert result.code == 0, result.err[-2000:]
    assert "the ModelCheckpoint writes last.ckpt only when fit ends, so a crash loses the steps since" in result.out
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1
    shipped = smolfactory(capfd, "fit", "--config", QUICKSTART, "--config", overrides,
                          f"--trainer.default_root_dir={tmp_path / 'shipped'}")  # fmt: skip
    assert shipped.code == 0 and "writes last.ckpt only" not in shipped.out
    # With no ModelCheckpoint the one added saves every 15 minutes of training, as the README says.
    default = smolfactory(capfd, "fit", "--config", QUICKSTART, "--config", overrides, "--trainer.callbacks=[]",
                          f"--trainer.default_root_dir={tmp_path / 'default'}")  # fmt: skip
    assert default.code == 0 and "writes last.ckpt only" not in default.out
    config = yaml.safe_load((tmp_path / "default" / "logs" / "version_0" / "config.yaml").read_text())
    [checkpoint] = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith(".ModelCheckpoint")]
    assert checkpoint["init_args"]["train_time_interval"] == "0:15:00" and checkpoint["init_args"]["save_last"]


@pytest.mark.slow
def test_ctrl_c_on_the_command_line_saves_and_says_how_to_resume(tmp_path, tiny_model_dir, capfd):
    """The same handler as SIGTERM; resuming after Ctrl-C is checked exactly, in-process, below."""
    overrides = tiny_overrides(tmp_path, tiny_model_dir, max_steps=100_000)
    ctrl_c = {"class_path": "tests.conftest.StopAtStep", "init_args": {"step": 2, "signum": int(signal.SIGINT)}}
    result = smolfactory(capfd, "fit", "--config", QUICKSTART, "--config", overrides,
                         f"--trainer.callbacks+={json.dumps(ctrl_c)}")  # fmt: skip
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert result.code == 0 and "Traceback" not in result.err
    assert f"Ctrl-C at step 2: saved {last}. Resume with the same command plus --ckpt_path last" in result.out
    assert torch.load(last, weights_only=True)["global_step"] == 2


@pytest.mark.slow
@pytest.mark.parametrize(
    "group_by_length, interruption, optimizer",
    [
        (False, "stop at 4", "adamw"),
        (True, "stop at 4", "adamw"),
        (False, "ctrl-c at 3", "adamw"),
        (False, "stop at 4", "adamw_8bit"),
        (False, "stop at 6", "adamw"),
    ],
    ids=["shuffled", "grouped", "ctrl-c-while-accumulating", "adamw-8bit", "at-the-end-of-an-epoch"],
)
def test_resume_mid_epoch_continues_exactly(tiny_model_dir, tmp_path, group_by_length, interruption, optimizer):
    """2N steps straight equal N steps, a stop, and N resumed steps: every loss and the final weights."""
    rows = [chat(f"Question number {i}?", "Answer " * (1 + i % 5) + f"{i}.") for i in range(12)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    # Ctrl-C comes in the middle of an accumulation window (2 micro-batches of 1 per step).
    # (6 steps an epoch: a stop after step 6 is the end of the first epoch, the resumed run starts the second.)
    ctrl_c = interruption.startswith("ctrl-c")
    batch_size, accumulate = (1, 2) if ctrl_c else (2, 1)
    step = int(interruption.split()[-1])
    stop_callback = StopAtStep(step, int(signal.SIGINT) if ctrl_c else None)
    # Ctrl-C after step 3 lands as step 4's micro-batches begin: SaveOnInterrupt finishes step 4, then saves.
    stopped_at = step + 1 if ctrl_c else step

    def run(root, ckpt_path=None, stop=False):
        L.seed_everything(0)
        # LoRA dropout draws random numbers at every step: the RNG state must resume too.
        lora = LoraSettings(r=4, dropout=0.1)
        module = SFTModule(
            model_name=tiny_model_dir, lora=lora, optimizer=adamw(1e-2, eight_bit=optimizer == "adamw_8bit")
        )
        data = SFTDataModule(
            tokenizer=tiny_model_dir, dataset=str(path), val_split=0, batch_size=batch_size,
            group_by_length=group_by_length,
        )  # fmt: skip
        losses = StepRecorder()
        trainer = trainer_with_checkpoints(root, max_steps=8)
        trainer.accumulate_grad_batches = accumulate
        trainer.callbacks += [losses, SaveOnInterrupt(), *([stop_callback] if stop else [])]
        if stop and ctrl_c:
            with pytest.raises(SystemExit):  # Lightning's graceful exit, status 0
                trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        else:
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return losses.losses, {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    # 6 optimizer steps an epoch: the stop at step 4 is mid-epoch, and the run goes on into the second epoch.
    straight, straight_weights = run(tmp_path / "straight")
    first, _ = run(tmp_path / "stopped", stop=True)
    last = tmp_path / "stopped/checkpoints/last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == stopped_at
    second, resumed_weights = run(tmp_path / "stopped", ckpt_path=str(last))
    assert len(straight) == 8 and len(first) == stopped_at and len(second) == 8 - stopped_at
    assert first + second == pytest.approx(straight, abs=1e-6)
    for name, weight in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], weight, atol=1e-6, rtol=0, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["sigterm", "max_steps"])
@pytest.mark.parametrize("streaming", [True, False], ids=["streamed", "map-style"])
def test_the_command_resumes_exactly_mid_epoch_and_past_max_steps(tmp_path, tiny_model_dir, capfd, streaming, stop):
    """4 steps straight = 2 steps, a stop (SIGTERM, or the end of a max_steps: 2 run), `--ckpt_path last`, 2 steps:
    the same loss at every step and the same final weights. 10 rows in batches of 4: the 4 steps cross an epoch."""
    rows = write_jsonl(
        tmp_path / "d.jsonl", [chat(f"Question {i}?", "Answer " * (1 + i % 4) + f"{i}.") for i in range(10)]
    )

    def fit(root: Path, max_steps: int, *extra: str) -> list[tuple[int, float]]:
        root.mkdir(exist_ok=True)
        losses = root / f"losses-{len(list(root.glob('losses-*')))}.txt"
        record = {"class_path": "tests.conftest.StepRecorder", "init_args": {"path": str(losses)}}
        result = smolfactory(
            capfd, "fit", "--config", QUICKSTART, "--config", tiny_overrides(root, tiny_model_dir, max_steps),
            f"--data.dataset={rows}", "--data.val_split=0", f"--data.streaming={streaming}",
            "--model.lora.dropout=0.1", f"--trainer.callbacks+={json.dumps(record)}", *extra,
        )  # fmt: skip
        assert result.code == 0, result.err[-3000:]
        return [(step["step"], step["train_loss"]) for step in recorded_steps(losses)]

    def weights(root: Path) -> dict[str, torch.Tensor]:
        return torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]

    straight = fit(tmp_path / "straight", 4)
    if stop == "sigterm":
        sigterm = {"class_path": "tests.conftest.StopAtStep", "init_args": {"step": 2, "signum": int(signal.SIGTERM)}}
        first = fit(tmp_path / "stopped", 4, f"--trainer.callbacks+={json.dumps(sigterm)}")
    else:
        first = fit(tmp_path / "stopped", 2)
    assert torch.load(tmp_path / "stopped/checkpoints/last.ckpt", weights_only=True)["global_step"] == 2
    second = fit(tmp_path / "stopped", 4, "--ckpt_path=last")
    assert [step for step, _ in straight] == [1, 2, 3, 4] and [step for step, _ in first + second] == [1, 2, 3, 4]
    assert [loss for _, loss in first + second] == pytest.approx([loss for _, loss in straight], abs=1e-6)
    for name, weight in weights(tmp_path / "straight").items():
        torch.testing.assert_close(weights(tmp_path / "stopped")[name], weight, atol=1e-6, rtol=0, msg=name)
