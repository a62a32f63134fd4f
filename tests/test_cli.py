"""The smolfactory command: the printed config, a fit through the CLI, and one-line errors."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Literal

import lightning as L
import pytest
import yaml

from smolfactory.cli import SmolFactoryCLI, main
from smolfactory.data.sources import builtin_split_path
from smolfactory.errors import SmolFactoryError
from tests.conftest import DPO_QUICKSTART, QUICKSTART, ROOT, tiny_overrides


@pytest.mark.slow
def test_print_config_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    # A config without class_path configures the default recipe: SFT.
    assert config["model"]["class_path"] == "smolfactory.model.sft.SFTModule"
    assert config["data"]["class_path"] == "smolfactory.data.sft.SFTDataModule"
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    assert model["model_name"] == "builtin:smollm2-135m-instruct"
    assert model["lora"]["r"] == 16
    assert data["dataset"] == "builtin:quickstart"
    assert "tokenizer" not in data  # linked from model.model_name
    assert config["export"]["dirname"] == "final"
    assert "optimizer" not in config and "lr_scheduler" not in config
    assert_every_key_has_help(printed)


def assert_every_key_has_help(printed: str) -> None:
    """Every key of our own sections (model and data) comes right after a comment with its help and type."""
    lines = printed.splitlines()
    start = lines.index("model:")
    end = next(i for i, line in enumerate(lines) if line.startswith("ckpt_path"))
    free_form_indent = None  # inside a dict value (a reward's arguments): its keys are the user's, not options
    for index in range(start + 1, end):
        key = re.match(r"^(\s+)([a-z_]+):", lines[index])
        if not key or (free_form_indent is not None and len(key.group(1)) > free_form_indent):
            continue
        free_form_indent = len(key.group(1)) if key.group(2) == "arguments" else None
        if key.group(2) in ("class_path", "init_args"):  # init_args: the class docstring
            continue
        comment = lines[index - 1]
        following = next(line for line in lines[index + 1 :] if line.strip())
        if len(following) - len(following.lstrip()) > len(key.group(1)):  # a group (sampling): its help, no type
            assert re.match(r"^\s+# \S", comment), (key.group(2), comment)
        else:
            assert re.match(r"^\s+# \S.* \((required, )?type: .+\)$", comment), (key.group(2), comment)


LOSSES = "smolfactory.model.preference_losses"


@pytest.mark.parametrize(
    "config, overrides",
    [
        ("configs/dpo_quickstart.yaml", []),
        ("configs/dpo_quickstart.yaml", [f"--model.loss={LOSSES}.SimPOLoss"]),
        ("configs/dpo_quickstart.yaml", [f"--model.loss={LOSSES}.ORPOLoss"]),
        ("configs/grpo_quickstart.yaml", []),
        ("configs/grpo_quickstart.yaml", ["--model.loss=smolfactory.model.policy_losses.CISPOLoss"]),
    ],
    ids=["dpo", "simpo", "orpo", "grpo", "cispo"],
)
def test_print_config_documents_every_option_of_each_recipe_and_loss(capsys, config, overrides):
    # The settings dataclasses (LoRA, losses, sampling, rewards) carry their keys' help in their docstrings.
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / config), *overrides, "--print_config"])
    assert exit_info.value.code == 0
    assert_every_key_has_help(capsys.readouterr().out)


@pytest.mark.slow
def test_fit_through_the_cli_writes_final_folder_and_config(tmp_path, tiny_model_dir):
    main(["fit", "--config", QUICKSTART, "--config", tiny_overrides(tmp_path, tiny_model_dir)])
    final = tmp_path / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert (final / "tokenizer.json").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    saved = yaml.safe_load(next(tmp_path.glob("logs/version_*/config.yaml")).read_text())
    assert saved["model"]["init_args"]["model_name"] == tiny_model_dir
    metrics = next(tmp_path.glob("logs/version_*/metrics.csv")).read_text()
    assert "train_loss" in metrics and "val_loss" in metrics

    # The checkpoint restores into a freshly built module: validate and test report the held-out loss.
    overrides = tiny_overrides(tmp_path, tiny_model_dir)
    checkpoint = str(tmp_path / "checkpoints" / "last.ckpt")
    rows = list(csv.DictReader(io.StringIO(metrics)))
    final_val_loss = float([row for row in rows if row["val_loss"]][-1]["val_loss"])
    for subcommand, key in (("validate", "val_loss"), ("test", "test_loss")):
        cli = SmolFactoryCLI(
            args=[subcommand, "--config", QUICKSTART, "--config", overrides, "--ckpt_path", checkpoint]
        )
        # Same weights (base rebuilt + adapter from the checkpoint), same held-out data: same loss.
        assert cli.trainer.callback_metrics[key].item() == pytest.approx(final_val_loss, rel=1e-5)

    # predict: one JSON line per validation conversation, its prompt ending where the last answer starts.
    main(
        [
            "predict",
            "--config",
            QUICKSTART,
            "--config",
            overrides,
            "--ckpt_path",
            checkpoint,
            "--model.max_new_tokens=3",
        ]
    )
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    validation = builtin_split_path("quickstart", "validation").read_text().splitlines()
    expected = [json.loads(line)["messages"][-1]["content"] for line in validation]
    assert [row["reference"] for row in rows] == expected
    assert all(row["prompt"].endswith("<|im_start|>assistant\n") for row in rows)
    assert all(isinstance(row["generated"], str) for row in rows)


def test_model_name_also_chooses_the_tokenizer(tmp_path, tiny_model_dir):
    cli = SmolFactoryCLI(args=["--config", QUICKSTART, "--config", tiny_overrides(tmp_path, tiny_model_dir)], run=False)
    assert cli.model.hparams.model_name == tiny_model_dir
    assert cli.datamodule.hparams.tokenizer == tiny_model_dir


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--model.model_name=./missing-model", r"error: model './missing-model' is not a folder"),
        ("--data.dataset=missing.jsonl", r"error: dataset file not found: missing\.jsonl"),
        ("--model.lora.r=0", r"error: model\.lora\.r must be at least 1"),
    ],
)
def test_configuration_errors_end_with_one_line(tmp_path, tiny_model_dir, capsys, override, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, "--config", tiny_overrides(tmp_path, tiny_model_dir), override])
    assert exit_info.value.code == 2
    assert re.match(message, capsys.readouterr().err.strip().splitlines()[-1])


class FailingCallback(L.Callback):
    """Fails in its setup hook: with a SmolFactoryError, with a bug, or with a bug while handling one."""

    def __init__(self, failure: Literal["ours", "bug", "bug_while_handling_ours"]) -> None:
        self.failure = failure

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.failure == "ours":
            raise SmolFactoryError("the callback's setting is wrong")
        if self.failure == "bug":
            raise RuntimeError("a bug in the callback")
        try:
            raise SmolFactoryError("the callback's setting is wrong")
        except SmolFactoryError:
            {}["missing"]  # a KeyError, whose __context__ is the SmolFactoryError


@pytest.mark.slow
def test_our_error_in_a_hook_ends_with_one_line(tmp_path, tiny_model_dir, capsys):
    callback = f"--trainer.callbacks+={{class_path: {__name__}.FailingCallback, init_args: {{failure: ours}}}}"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, "--config", tiny_overrides(tmp_path, tiny_model_dir), callback])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: the callback's setting is wrong"


@pytest.mark.slow
@pytest.mark.parametrize(("failure", "error"), [("bug", RuntimeError), ("bug_while_handling_ours", KeyError)])
def test_a_bug_keeps_its_traceback(tmp_path, tiny_model_dir, capsys, failure, error):
    callback = f"--trainer.callbacks+={{class_path: {__name__}.FailingCallback, init_args: {{failure: {failure}}}}}"
    with pytest.raises(error):  # raised through main, not turned into one line
        main(["fit", "--config", QUICKSTART, "--config", tiny_overrides(tmp_path, tiny_model_dir), callback])
    assert "error:" not in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_prints_no_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    result = subprocess.run(
        [sys.executable, "-m", "smolfactory.cli", "fit", "--config", QUICKSTART, f"--data.dataset={bad}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "bad.jsonl, row 1: the conversation has no assistant turn" in last
    assert last.endswith("fix or remove the row, or set data.on_bad_row: skip")


@pytest.mark.slow
def test_preview_marks_the_trained_tokens_and_prints_statistics(tmp_path, tiny_model_dir, capsys):
    main(["preview", "--config", QUICKSTART, "--config", tiny_overrides(tmp_path, tiny_model_dir), "--num_examples=2"])
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in builtin_split_path("quickstart", "train").read_text().splitlines()[:2]]
    for row in rows:  # each assistant turn of the first examples appears marked, with its end-of-turn token
        for message in row["messages"]:
            if message["role"] == "assistant":
                assert f"[[{message['content']}<|im_end|>]]" in printed
            else:
                assert f"[[{message['content']}" not in printed
    assert "--- example 2 of 228" in printed and "--- example 3" not in printed
    for statistic in ("tokens per example: p50", "tokens trained:", "packing (data.packing: true):", "padding"):
        assert statistic in printed


def test_a_yaml_list_of_sources_mixes_datasets(tmp_path, tiny_model_dir):
    first = tmp_path / "a.jsonl"
    first.write_text("".join(json.dumps({"text": f"Document {i}."}) + "\n" for i in range(6)))
    mix = tmp_path / "mix.yaml"
    mix.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "dataset": [
                        {"path": str(first), "weight": 0.5},
                        {"path": "builtin:quickstart", "num_samples": 4, "format": "messages"},
                    ],
                    "val_split": 0,
                    "packing": True,
                }
            }
        )
    )
    args = ["--config", QUICKSTART, "--config", tiny_overrides(tmp_path, tiny_model_dir), "--config", str(mix)]
    cli = SmolFactoryCLI(args=args, run=False)
    cli.datamodule.setup("fit")
    texts = [cli.datamodule.tokenizer.decode(ids) for ids in cli.datamodule.train_data["input_ids"]]
    assert sum(text.startswith("Document") for text in texts) == 3
    assert sum("<|im_start|>" in text for text in texts) == 4


def test_the_default_logger_is_csv_under_the_run_folder(tmp_path, tiny_model_dir):
    overrides = tiny_overrides(tmp_path, tiny_model_dir, max_steps=1)
    cli = SmolFactoryCLI(args=["--config", QUICKSTART, "--config", overrides, "--trainer.logger=true"], run=False)
    assert type(cli.trainer.logger).__name__ == "CSVLogger"
    assert Path(cli.trainer.logger.log_dir).parent == tmp_path / "logs"
    cli = SmolFactoryCLI(args=["--config", QUICKSTART, "--config", overrides, "--trainer.logger=false"], run=False)
    assert cli.trainer.logger is None


@pytest.mark.slow
def test_dpo_recipe_through_the_cli_trains_an_adapter_and_logs_rewards(tmp_path, tiny_model_dir):
    """configs/dpo_quickstart.yaml with a tiny model (a fresh adapter: the reference is the adapter switched off)."""
    main(["fit", "--config", DPO_QUICKSTART, "--config", tiny_overrides(tmp_path, tiny_model_dir)])
    saved = yaml.safe_load(next(tmp_path.glob("logs/version_*/config.yaml")).read_text())
    assert saved["model"]["class_path"] == "smolfactory.DPOModule"
    assert saved["data"]["init_args"]["dataset"] == "builtin:quickstart-preference"
    rows = list(csv.DictReader(io.StringIO(next(tmp_path.glob("logs/version_*/metrics.csv")).read_text())))
    logged = {key for row in rows for key, value in row.items() if value}
    assert {"train_loss", "train_reward_accuracy", "val_loss", "val_reward_margin", "val_logps_chosen"} <= logged
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
    # `smolfactory export` rebuilds the module from the DPO checkpoint's hyperparameters.
    main(["export", "--checkpoint", str(tmp_path / "checkpoints" / "last.ckpt"), "--output", str(tmp_path / "out")])
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "preference tuning (DPOLoss (beta=0.1, loss_type=sigmoid, label_smoothing=0.0))" in card
