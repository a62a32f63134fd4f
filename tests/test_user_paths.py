"""The command line as users drive it: their own files, reruns, resumes with other settings, crashes, lengths.

Every test drives the `smolfactory` command (in-process through `cli.main`, or as a subprocess) with real files
and the shipped quickstart configs; each failed before these paths were made safe.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import datasets
import pytest
import torch

from smolfactory.cli import SmolFactoryCLI
from smolfactory.model.loss import IGNORE_INDEX
from tests.conftest import DPO_QUICKSTART, QUICKSTART, Run, smolfactory, stand_in_config, write_jsonl

ROWS = [{"instruction": f"Say the number {i}.", "output": f"The number is {i}."} for i in range(5)]


def fit(capfd, model_dir: str, root: Path, *args: object, steps: int = 2, config: str = QUICKSTART) -> Run:
    """`smolfactory fit` of a shipped recipe on the tiny model, in the run folder ``root``."""
    stand_in = stand_in_config(root.parent, model_dir)
    return smolfactory(
        capfd, "fit", "--config", config, "--config", stand_in, f"--trainer.default_root_dir={root}",
        f"--trainer.max_steps={steps}", *args,
    )  # fmt: skip


def digest(path: Path) -> str:
    """A fingerprint of a file, or of every file in a folder."""
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files if f.is_file())).hexdigest()


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Rows as the file type the suffix names: a JSON array, JSON lines, CSV or Parquet."""
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1))
    elif path.suffix == ".jsonl":
        write_jsonl(path, rows)
    elif path.suffix == ".csv":
        with path.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


# A path is a path -----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("where", ["command line", "yaml"])
@pytest.mark.parametrize("suffix", ["json", "jsonl", "csv", "parquet"])
def test_a_dataset_file_is_read_as_a_file_whatever_it_holds(tiny_model_dir, tmp_path, suffix, where):
    """A JSON array once became the list of sources (N rows trained as N x N) and a CSV's text the dataset name."""
    path = write_rows(tmp_path / f"rows.{suffix}", ROWS)
    setting = {"dataset": str(path), "val_split": 0}
    if where == "yaml":
        args = ["--config", stand_in_config(tmp_path, tiny_model_dir, data=setting)]
    else:
        args = ["--config", stand_in_config(tmp_path, tiny_model_dir), f"--data.dataset={path}", "--data.val_split=0"]
    cli = SmolFactoryCLI(args=["--config", QUICKSTART, *args], run=False)
    assert cli.datamodule.hparams.dataset == str(path)
    cli.datamodule.setup("fit")
    texts = sorted(cli.datamodule.tokenizer.decode(ids) for ids in cli.datamodule.train_data["input_ids"])
    assert len(texts) == len(ROWS)
    assert all(f"Say the number {i}." in text for i, text in enumerate(texts))


def test_a_yaml_list_of_files_still_mixes(tiny_model_dir, tmp_path):
    array, table = write_rows(tmp_path / "a.json", ROWS), write_rows(tmp_path / "b.csv", ROWS[:2])
    mix = {"dataset": [{"path": str(array), "num_samples": 3}, str(table)], "val_split": 0}
    config = stand_in_config(tmp_path, tiny_model_dir, data=mix)
    cli = SmolFactoryCLI(args=["--config", QUICKSTART, "--config", config], run=False)
    cli.datamodule.setup("fit")
    assert len(cli.datamodule.train_data) == 3 + 2


# Resume only into the same run ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    """A 2-step LoRA run on q_proj and v_proj: its folder (checkpoints/last.ckpt, final/)."""
    root = tmp_path_factory.mktemp("finished") / "run"
    stand_in = stand_in_config(root.parent, tiny_model_dir)
    SmolFactoryCLI(args=["fit", "--config", QUICKSTART, "--config", stand_in, f"--trainer.default_root_dir={root}",
                         "--trainer.max_steps=2", "--model.lora.target_modules=[q_proj, v_proj]"])  # fmt: skip
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "difference"),
    [
        (["--ckpt_path=last", "--model.lora.target_modules=[o_proj]"], "model.lora.target_modules is ['q_proj', 'v_"),
        (["--ckpt_path=last", "--model.lora.target_modules=[v_proj, up_proj]"], "model.lora.target_modules is"),
        (["--ckpt_path=FILE", "--model.lora.r=8"], "model.lora.r is 16 there and 8 here"),
        (["--ckpt_path=last", "--model.lora.r=8"], "model.lora.r is 16 there and 8 here"),
        (["--ckpt_path=last", "--model.lora=null"], "model.lora is {'r': 16, 'alpha': 32, "),
        (["--ckpt_path=last", "--model.optimizer.lr=0.1"], "model.optimizer.init_args.lr is 0.001 there and 0.1 here"),
        (["--ckpt_path=last", "--data.batch_size=2"], "data.batch_size is 8 there and 2 here"),
        (["--ckpt_path=last", "--trainer.accumulate_grad_batches=2"], "trainer.accumulate_grad_batches is 1 there and"),
    ],
    ids=["other-targets", "other-targets-optimizer", "rank-file", "rank-last", "full", "learning-rate", "batch-size",
         "accumulation"],
)  # fmt: skip
def test_resuming_with_other_settings_refuses_and_keeps_the_run(finished_run, tiny_model_dir, capfd, args, difference):
    """Once: fresh adapters trained over the run ("Restored all states"), the checkpoint's r silently beat the
    command line's, or a 420-line state-dict traceback."""
    last, final = finished_run / "checkpoints" / "last.ckpt", finished_run / "final"
    before = digest(last), digest(final)
    args = [arg.replace("FILE", str(last)) for arg in args]
    result = fit(capfd, tiny_model_dir, finished_run, "--model.lora.target_modules=[q_proj, v_proj]", *args, steps=4)
    assert result.code == 2, result.err[-3000:]
    assert result.error.startswith(f"error: --ckpt_path {last} was saved by a run with other")
    assert difference in result.error and result.error.endswith("start a new run without --ckpt_path")
    assert "Traceback" not in result.err
    assert (digest(last), digest(final)) == before


@pytest.mark.slow
def test_settings_a_resume_may_change_come_from_the_command_line(finished_run, tiny_model_dir, tmp_path):
    """LightningCLI would quietly take the model settings saved in a --ckpt_path file over the command line's."""
    root = tmp_path / "run"
    shutil.copytree(finished_run, root)
    stand_in = stand_in_config(tmp_path, tiny_model_dir)
    last = root / "checkpoints" / "last.ckpt"
    args = ["fit", "--config", QUICKSTART, "--config", stand_in, f"--trainer.default_root_dir={root}",
            "--model.lora.target_modules=[q_proj, v_proj]", "--trainer.max_steps=3", f"--ckpt_path={last}"]  # fmt: skip
    cli = SmolFactoryCLI(args=[*args, "--model.max_new_tokens=7", "--model.gradient_checkpointing=true"])
    assert cli.trainer.global_step == 3
    assert (cli.model.hparams.max_new_tokens, cli.model.hparams.gradient_checkpointing) == (7, True)
    assert cli.model.causal_lm.is_activation_checkpointing


@pytest.mark.slow
def test_evaluating_a_checkpoint_with_other_weights_refuses(finished_run, tiny_model_dir, tmp_path, capfd):
    """validate/test/predict may change other settings, never the weights the checkpoint must fill."""
    last = finished_run / "checkpoints" / "last.ckpt"
    # validate logs under its run folder: a temporary one, not the config's outputs/quickstart in this checkout
    stand_in = stand_in_config(tmp_path, tiny_model_dir, trainer={"default_root_dir": str(tmp_path)})
    result = smolfactory(capfd, "validate", "--config", QUICKSTART, "--config", stand_in, f"--ckpt_path={last}",
                         "--model.lora.target_modules=[q_proj, v_proj]", "--model.lora.r=8")  # fmt: skip
    assert result.code == 2
    assert result.error.startswith(f"error: --ckpt_path {last} does not fit this model: ")
    assert "8 weights of another shape (such as model.base_model.model.model.layers.0.self_attn.q_proj.lora_A" in (
        result.error
    )
    assert result.error.endswith("use the settings it was saved with, or another checkpoint")
    result = smolfactory(capfd, "validate", "--config", QUICKSTART, "--config", stand_in, f"--ckpt_path={last}",
                         "--model.lora.target_modules=[q_proj]")  # fmt: skip
    assert result.code == 2 and "weights not in this model (such as " in result.error and "v_proj" in result.error


@pytest.mark.slow
@pytest.mark.parametrize("training", ["adapter", "full"])
def test_a_dpo_checkpoint_holds_no_reference_and_resumes(finished_run, tiny_model_dir, tmp_path, capfd, training):
    """DPO continuing an adapter keeps a frozen copy of it as the reference, full fine-tuning a frozen second
    model: neither is ever in a checkpoint, and the checkpoint resumes (nothing it lacks but the reference)."""
    root = tmp_path / "dpo"
    setting = f"--model.model_name={finished_run / 'final'}" if training == "adapter" else "--model.lora=null"
    assert fit(capfd, tiny_model_dir, root, setting, config=DPO_QUICKSTART).code == 0
    saved = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert saved and not any("reference" in name for name in saved)
    if training == "adapter":
        assert all("lora_" in name and ".default." in name for name in saved)
    resumed = fit(capfd, tiny_model_dir, root, setting, "--ckpt_path=last", steps=3, config=DPO_QUICKSTART)
    assert resumed.code == 0, resumed.err[-3000:]
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


# --ckpt_path: the newest complete checkpoint of this run, or one line ------------------------------------------


@pytest.mark.slow
def test_ckpt_path_last_skips_an_incomplete_file_and_a_bad_file_is_one_line(finished_run, tiny_model_dir, capfd):
    last = finished_run / "checkpoints" / "last.ckpt"
    cut = finished_run / "checkpoints" / "epoch=0-step=9.ckpt"  # newer, but written only halfway
    cut.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    try:
        stand_in = stand_in_config(finished_run.parent, tiny_model_dir)
        base = ["--config", QUICKSTART, "--config", stand_in, "--model.lora.target_modules=[q_proj, v_proj]",
                f"--trainer.default_root_dir={finished_run}"]  # fmt: skip
        result = smolfactory(capfd, "validate", *base, "--ckpt_path=last")
        assert result.code == 0 and f"--ckpt_path last: resuming from {last}" in result.out
        result = smolfactory(capfd, "fit", *base, f"--ckpt_path={cut}")
        assert result.code == 2 and result.error == (
            f"error: --ckpt_path {cut} is incomplete or not a checkpoint (a write cut short?); give an earlier "
            "checkpoint of the run, or start a new run without --ckpt_path"
        )
    finally:
        cut.unlink()


# One folder per run ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_root_dir_moves_every_artefact_and_last_never_finds_another_run(tiny_model_dir, tmp_path, capfd,
                                                                                monkeypatch):  # fmt: skip
    """The configs once repeated outputs/quickstart in the logger and checkpoint folders: a run elsewhere wrote its
    checkpoints there, and `--ckpt_path last` restored whichever run had written there last."""
    monkeypatch.chdir(tmp_path)  # where the config's own outputs/quickstart would be
    root = tmp_path / "elsewhere"
    assert fit(capfd, tiny_model_dir, root, "--trainer.log_every_n_steps=1").code == 0
    stand_in = stand_in_config(tmp_path, tiny_model_dir)
    base = ["--config", QUICKSTART, "--config", stand_in, f"--trainer.default_root_dir={root}"]
    assert smolfactory(capfd, "predict", *base, "--ckpt_path=last", "--model.max_new_tokens=2").code == 0
    assert smolfactory(capfd, "plot", root).code == 0
    assert {"checkpoints", "logs", "final", "predictions.jsonl", "curves.png"} <= {p.name for p in root.iterdir()}
    assert (root / "checkpoints" / "last.ckpt").is_file() and next(root.glob("logs/version_0/metrics.csv"))
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "lightning_logs").exists()

    other = tmp_path / "other"
    result = fit(capfd, tiny_model_dir, other, "--ckpt_path=last")
    assert result.code == 2 and result.error.startswith(
        f"error: --ckpt_path last: no complete checkpoint in {other / 'checkpoints'}"
    )


# A finished result is never overwritten by accident ------------------------------------------------------------


@pytest.mark.slow
def test_a_new_run_in_a_used_folder_refuses_unless_told_to_overwrite(finished_run, tiny_model_dir, tmp_path, capfd):
    root = tmp_path / "run"
    assert fit(capfd, tiny_model_dir, root).code == 0
    final, last = root / "final", root / "checkpoints" / "last.ckpt"
    kept = digest(final)
    result = fit(capfd, tiny_model_dir, root)
    assert result.code == 2 and result.error == (
        f"error: {root} holds another run ({final}, {last}); continue it with --ckpt_path last, start this run in "
        "another --trainer.default_root_dir, or pass --overwrite true to replace it"
    )
    assert digest(final) == kept
    other = finished_run / "checkpoints" / "last.ckpt"  # resuming another run's checkpoint into this folder
    result = fit(capfd, tiny_model_dir, root, f"--ckpt_path={other}", "--model.lora.target_modules=[q_proj, v_proj]")
    assert result.code == 2 and result.error.startswith(f"error: {root} holds another run (")
    assert digest(final) == kept
    result = fit(capfd, tiny_model_dir, root, "--overwrite=true", steps=3)
    assert result.code == 0
    assert digest(final) != kept
    assert [path.name for path in (root / "checkpoints").iterdir()] == ["last.ckpt"]  # no last-v1.ckpt beside it
    assert torch.load(last, weights_only=True)["global_step"] == 3


@pytest.mark.slow
def test_final_is_written_only_by_a_run_that_trained(tiny_model_dir, tmp_path, capfd):
    """`--trainer.max_steps 0`, or a resume that had already reached its end, once wrote an untrained adapter."""
    root = tmp_path / "run"
    result = fit(capfd, tiny_model_dir, root, steps=0)
    assert result.code == 0 and not (root / "final").exists()
    assert f"so {root / 'final'} was not written" in result.out
    shutil.rmtree(root)
    assert fit(capfd, tiny_model_dir, root).code == 0
    kept = digest(root / "final")
    result = fit(capfd, tiny_model_dir, root, "--ckpt_path=last")  # already at max_steps: nothing to train
    assert result.code == 0 and digest(root / "final") == kept
    assert "This fit trained no step (it ended at step 2)" in result.out


# A failed checkpoint write stops the run -----------------------------------------------------------------------


@contextmanager
def read_only(folder: Path):
    """``folder`` made unwritable: by its mode, or for root (whom modes do not stop) by the immutable attribute."""
    as_root = os.geteuid() == 0
    if as_root:
        locked = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    else:
        folder.chmod(0o555)
        locked = True
    try:
        probe = folder / ".probe"
        try:
            probe.touch()
            probe.unlink()
            locked = False
        except OSError:
            pass
        if not locked:
            pytest.skip("cannot make a folder read-only on this machine")
        yield folder
    finally:
        if as_root:
            subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        else:
            folder.chmod(0o755)


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_stops_the_run(tiny_model_dir, tmp_path, capfd):
    """Lightning's writer dropped the PermissionError: fit exited 0 with no checkpoint at all."""
    root = tmp_path / "run"
    checkpoints = root / "checkpoints"
    checkpoints.mkdir(parents=True)
    with read_only(checkpoints):
        result = fit(capfd, tiny_model_dir, root)
    assert result.code == 2, result.err[-3000:]
    assert result.error.startswith(f"error: could not write checkpoint last.ckpt in {checkpoints} (")
    assert result.error.endswith("then resume with --ckpt_path last")
    assert not (root / "final").exists()


@pytest.mark.slow
def test_sigterm_reports_a_save_only_when_the_file_exists(tiny_model_dir, tmp_path, capfd):
    """On SIGTERM the run once printed "saved .../last.ckpt" and the folder stayed empty."""
    root = tmp_path / "run"
    checkpoints = root / "checkpoints"
    checkpoints.mkdir(parents=True)
    sigterm = {"class_path": "tests.conftest.StopAtStep", "init_args": {"step": 2, "signum": int(signal.SIGTERM)}}
    with read_only(checkpoints):
        result = fit(capfd, tiny_model_dir, root, f"--trainer.callbacks+={json.dumps(sigterm)}", steps=100)
    assert result.code == 2, result.err[-3000:]
    assert "saved" not in result.out + result.err
    assert result.error.startswith(f"error: could not write checkpoint last.ckpt in {checkpoints} (")


# Lengths are counted, not errors ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_rows_too_long_to_train_are_dropped_and_counted_and_prompts_can_be_cut(tiny_model_dir, tmp_path, capfd):
    """A ShareGPT set with one very long prompt once stopped at load: "nothing is left to train after truncation"."""
    long_prompt = "Read this first. " * 200
    rows = [
        {"conversations": [{"from": "human", "value": f"Question {i}?"}, {"from": "gpt", "value": f"Answer {i}."}]}
        for i in range(4)
    ]
    rows[2]["conversations"][0]["value"] = long_prompt
    path = write_jsonl(tmp_path / "sharegpt.jsonl", rows)
    base = ["--config", QUICKSTART, "--config", stand_in_config(tmp_path, tiny_model_dir), f"--data.dataset={path}",
            "--data.max_length=128", "--data.val_split=0"]  # fmt: skip
    result = smolfactory(capfd, "preview", *base, "--num_examples=1")
    assert result.code == 0, result.err[-3000:]
    assert "4 rows -> 3 examples (0 truncated to 128 tokens, 1 too long to train dropped (rows 3)" in result.out

    cli = SmolFactoryCLI(args=[*base, "--data.overlong=truncate_prompt"], run=False)
    cli.datamodule.setup("fit")
    data, tokenizer = cli.datamodule.train_data, cli.datamodule.tokenizer
    assert len(data) == 4
    cut = next(example for example in data if len(example["input_ids"]) == 128)
    trained = [token for token in cut["labels"] if token != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "Answer 2.<|im_end|>"
    assert tokenizer.decode(cut["input_ids"]).endswith(
        "Read this first. <|im_end|>\n<|im_start|>assistant\nAnswer 2.<|im_end|>\n"
    )


@pytest.mark.slow
def test_preference_pairs_too_long_are_dropped_or_keep_their_answers(tiny_model_dir, tmp_path, capfd):
    pairs = [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad {i}."} for i in range(4)]
    pairs[1]["prompt"] = "Some context. " * 100
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    base = ["--config", DPO_QUICKSTART, "--config", stand_in_config(tmp_path, tiny_model_dir),
            f"--data.dataset={path}", "--data.max_length=96", "--data.val_split=0"]  # fmt: skip
    result = smolfactory(capfd, "preview", *base, "--num_examples=1")
    assert result.code == 0, result.err[-3000:]
    assert "1 too long to train dropped (rows 2)" in result.out

    cli = SmolFactoryCLI(args=[*base, "--data.overlong=truncate_prompt"], run=False)
    cli.datamodule.setup("fit")
    data, tokenizer = cli.datamodule.train_data, cli.datamodule.tokenizer
    assert len(data) == 4
    pair = next(pair for pair in data if max(len(pair["chosen_input_ids"]), len(pair["rejected_input_ids"])) == 96)
    for side, answer in (("chosen", "Good answer 1."), ("rejected", "Bad 1.")):
        trained = [token for token in pair[f"{side}_labels"] if token != IGNORE_INDEX]
        assert tokenizer.decode(trained) == answer + "<|im_end|>"
    prompt = pair["chosen_labels"].index(next(t for t in pair["chosen_labels"] if t != IGNORE_INDEX))
    assert pair["chosen_input_ids"][:prompt] == pair["rejected_input_ids"][:prompt]  # the same prompt tokens cut


# kill -9 --------------------------------------------------------------------------------------------------------


NOISE = ("Warning", "warn(", "kernels-community", "litlogger", "TPU available", "/-2", "v_num")


@pytest.mark.slow
def test_after_kill_9_last_resumes_from_the_newest_periodic_checkpoint_and_the_command_prints_no_noise(
    tiny_model_dir, tmp_path, capfd
):
    """Lightning's `last` looks only for last*.ckpt: after a crash with periodic checkpoints it warned and started
    again from step 0. Every command also opened with bitsandbytes' kernels-community line and a transformers
    FutureWarning, and the progress bar of a max_steps run read `Epoch 0/-2`, and `7/1` after a resume."""
    periodic = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"every_n_train_steps": 1, "save_top_k": -1}}  # fmt: skip
    trainer = {"callbacks": [periodic], "enable_progress_bar": True}
    stand_in = stand_in_config(tmp_path, tiny_model_dir, trainer=trainer)
    root = tmp_path / "run"
    command = [str(Path(sys.executable).parent / "smolfactory"), "fit", "--config", QUICKSTART, "--config", stand_in,
               f"--trainer.default_root_dir={root}"]  # fmt: skip
    with (tmp_path / "killed.log").open("w") as log:
        process = subprocess.Popen([*command, "--trainer.max_steps=100000"], cwd=tmp_path, stdout=log, stderr=log)
        deadline = time.time() + 120
        while len(list(root.glob("checkpoints/*.ckpt"))) < 3 and time.time() < deadline:
            time.sleep(0.2)
        process.kill()
        process.wait(timeout=60)
    saved = sorted(root.glob("checkpoints/*.ckpt"), key=lambda path: path.stat().st_mtime)
    assert len(saved) >= 3 and not list(root.glob("checkpoints/last*.ckpt"))
    newest = saved[-1]
    step = torch.load(newest, weights_only=True)["global_step"]
    killed = (tmp_path / "killed.log").read_text()
    for noise in NOISE:  # the start of a command, and its progress bar
        assert noise not in killed, (noise, killed[-3000:])
    resumed = smolfactory(capfd, *command[1:], f"--trainer.max_steps={step + 1}", "--ckpt_path=last")
    assert resumed.code == 0, resumed.err[-3000:]
    assert f"--ckpt_path last: resuming from {newest}" in resumed.out
    assert f"Restored all states from the checkpoint at {newest}" in resumed.out
    assert f"`max_steps={step + 1}` reached" in resumed.out
    assert f"{step + 1}/{step + 1}" in resumed.out  # the bar counts the run's steps, from the restored one


# Quiet, readable output ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("num_proc", ["null", 2])
def test_a_bad_row_found_inside_datasets_map_is_one_line(tiny_model_dir, tmp_path, capfd, num_proc):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 3)
    result = fit(capfd, tiny_model_dir, tmp_path / "run", f"--data.dataset={path}", f"--data.num_proc={num_proc}")
    assert result.code == 2
    assert result.error == (
        f"error: {path}, row 1: the conversation has no assistant turn to train on; fix or remove the row, or set "
        "data.on_bad_row: skip"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b'{"messages": [{"role": "user", "content": "Q\xff?"}, {"role": "assistant", "content": "A."}]}',
         "byte 0xff at column 45 is not UTF-8"),
        (b'{"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]',
         "not valid JSON at column 89 (Expecting ',' delimiter)"),
    ],
    ids=["not-utf-8", "not-json"],
)  # fmt: skip
def test_an_unreadable_line_is_named_or_skipped_and_counted(tiny_model_dir, tmp_path, capfd, content, problem):
    """Bytes that are not UTF-8 once ended in a UnicodeDecodeError traceback, even with on_bad_row: skip."""
    good = json.dumps({"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]})
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join([good.encode(), content, good.encode()]) + b"\n")
    base = ["--config", QUICKSTART, "--config", stand_in_config(tmp_path, tiny_model_dir), f"--data.dataset={path}",
            "--data.val_split=0", "--num_examples=1"]  # fmt: skip
    result = smolfactory(capfd, "preview", *base)
    assert result.code == 2
    assert result.error == f"error: {path}, line 2: {problem}; fix or remove the line, or set data.on_bad_row: skip"
    result = smolfactory(capfd, "preview", *base, "--data.on_bad_row=skip")
    assert result.code == 0, result.err[-3000:]
    assert "3 rows -> 2 examples (0 truncated to 512 tokens, 0 too long to train dropped, 1 bad rows skipped)" in (
        result.out
    )
    assert f"skipped {path}, row 2: {problem}" in result.out


@pytest.mark.slow
def test_a_json_array_with_a_syntax_error_names_its_line(tiny_model_dir, tmp_path, capfd):
    path = write_rows(tmp_path / "rows.json", ROWS)
    text = path.read_text().splitlines()
    text[5] += ","  # a trailing comma inside the second object
    path.write_text("\n".join(text))
    stand_in = stand_in_config(tmp_path, tiny_model_dir)
    result = smolfactory(capfd, "preview", "--config", QUICKSTART, "--config", stand_in, f"--data.dataset={path}",
                         "--data.on_bad_row=skip")  # fmt: skip
    assert result.code == 2
    assert result.error.startswith(f"error: {path}, line 6: not valid JSON at column ")
    assert result.error.endswith("; fix the file")


@pytest.mark.slow
def test_an_unwritable_run_folder_is_one_line(tiny_model_dir, tmp_path, capfd):
    root = tmp_path / "run"
    root.mkdir()
    with read_only(root):
        result = fit(capfd, tiny_model_dir, root)
    assert result.code == 2
    assert result.error.startswith(f"error: cannot write to the run folder {root} (")
    assert result.error.endswith("set --trainer.default_root_dir to a folder you can write to")
