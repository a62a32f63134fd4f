"""GRPO the way users run it: the shipped recipe on the command line, rewards named in YAML that get every column,
rollouts reused for several steps, SIGTERM and exact resume, the reference model, one-line reward errors."""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from smolfactory import GRPOModule, LoraSettings, PromptDataModule, Reward, SamplingSettings
from smolfactory.callbacks.throughput import attention_pairs
from smolfactory.model.policy_losses import GRPOLoss
from smolfactory.rewards import completion_text
from tests.conftest import (
    StepRecorder,
    StopAtStep,
    recorded_steps,
    smolfactory,
    stand_in_config,
    trainer_with_checkpoints,
    write_jsonl,
)

ROOT = Path(__file__).parents[1]
RECIPE = str(ROOT / "configs/grpo_quickstart.yaml")
SEEN: list[dict] = []  # what recording_reward was called with


def letter_count(prompts, completions, **kwargs) -> list[float]:
    """A reward a random tiny model's completions differ in (so advantages, and gradients, are not zero)."""
    return [float(sum(ch.isalpha() for ch in completion_text(c))) for c in completions]


def recording_reward(prompts, completions, completion_ids, answer, trainer_state, **columns) -> list[float | None]:
    SEEN.append({"prompts": prompts, "completions": completions, "ids": completion_ids, "answer": answer} | columns)
    return [None if a == "skip" else 1.0 for a in answer]


def broken_reward(prompts, completions, **kwargs) -> list[float]:
    raise KeyError("no such field")


def prompt_rows(count: int = 8) -> list[dict]:
    return [{"prompt": f"Which number is larger, {i} or {i + 3}?", "answer": str(i + 3)} for i in range(count)]


def grpo(model_dir: str, rewards: list[str], **kwargs) -> GRPOModule:
    sampling = SamplingSettings(num_generations=4, max_completion_length=6)
    return GRPOModule(
        rewards=[Reward(f"tests.test_grpo.{name}") for name in rewards],
        model_name=model_dir,
        lora=LoraSettings(r=4),
        sampling=sampling,
        optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2}},
        **kwargs,
    )


def test_rewards_get_the_prompts_completions_and_every_column(tiny_model_dir, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "2 + 2?"}], "answer": "4", "case": {"inputs": [1, 2]}},
        {"messages": [{"role": "user", "content": "3 + 3?"}], "answer": "skip", "case": {"inputs": []}},
    ]
    data = PromptDataModule(dataset=str(write_jsonl(tmp_path / "p.jsonl", rows)), tokenizer=tiny_model_dir)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module = grpo(tiny_model_dir, ["recording_reward"])
    module.configure_model()
    SEEN.clear()
    rollout = module.rollout(batch)
    seen = SEEN[-1]
    order = [row["answer"] for row in rows for _ in range(4)]  # the loader's order may differ from the file's
    assert sorted(seen["answer"]) == sorted(order) and len(seen["prompts"]) == 8
    for prompt, answer, case in zip(seen["prompts"], seen["answer"], seen["case"], strict=True):
        row = next(r for r in rows if r["answer"] == answer)
        assert prompt == row["messages"] and case == row["case"]  # nested columns unchanged
    assert all(c[0]["role"] == "assistant" for c in seen["completions"])  # conversational prompts: messages
    texts = [module.tokenizer.decode(ids, skip_special_tokens=True) for ids in seen["ids"]]
    assert texts == [c[0]["content"] for c in seen["completions"]]
    # None (not applicable) for the skipped row: no reward, advantage 0, left out of the reward mean.
    skipped = torch.tensor([a == "skip" for a in seen["answer"]])
    assert (rollout.advantages[skipped] == 0).all()
    total, count = rollout.scores["reward"]
    assert (total, count) == (4.0, 4.0)


def test_throughput_counts_the_attention_of_shared_prompts_once(tiny_model_dir, tmp_path):
    """Without checkpointing a group's prompt runs once and its completions attend to it through the cache:
    the attention pairs counted for MFU are those of every completion after its own copy of the prompt, less
    the copies' own pairs."""
    data = PromptDataModule(dataset=str(write_jsonl(tmp_path / "p.jsonl", prompt_rows(2))), tokenizer=tiny_model_dir)
    data.setup("fit")
    module = grpo(tiny_model_dir, ["letter_count"])
    module.configure_model()
    rollout = module.rollout(next(iter(data.train_dataloader())))
    module._rollouts.append(rollout)  # as the training step keeps it
    prompts = rollout.prompt_mask.sum(-1)
    copies = module.sampling.num_generations - 1
    expected = attention_pairs(rollout.sequences) - copies * (prompts * (prompts + 1) // 2).sum()
    assert attention_pairs(module.trained_batch({})) == expected


def test_the_kl_reference_under_lora_is_the_base_model_without_a_copy(tiny_model_dir, tmp_path):
    module = grpo(tiny_model_dir, ["letter_count"], loss=GRPOLoss(beta=0.04))
    module.configure_model()
    assert module.reference_model is None  # the adapter switched off: no second model
    with torch.no_grad():  # move the adapter away from zero, so that policy and reference differ
        for name, parameter in module.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    batch = {
        "input_ids": torch.tensor([[1, 2, 3, 4]]),
        "attention_mask": torch.ones(1, 4, dtype=torch.long),
        "prompts": ["p"],
        "conversational": [False],
        "columns": {},
    }
    rollout = module.rollout(batch)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids, labels = rollout.sequences["input_ids"], rollout.sequences["labels"]
    with torch.no_grad():
        log_probs = base(input_ids=ids, attention_mask=rollout.sequences["attention_mask"]).logits.log_softmax(-1)
    expected = log_probs[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)[labels[:, 1:] != -100]
    torch.testing.assert_close(rollout.ref_log_probs[rollout.mask], expected, rtol=1e-4, atol=1e-5)
    policy, _ = module.completion_log_probs(module.model, rollout)
    assert not torch.allclose(policy[rollout.mask], expected, atol=1e-3)  # the policy itself is not the reference


@pytest.mark.slow
def test_rollouts_are_reused_for_num_iterations_and_a_mid_reuse_resume_is_exact(tiny_model_dir, tmp_path):
    """Two micro-batches a step, each rollout trained on twice: the second step must see the same completions
    (one generation per micro-batch every other step), and a run stopped between the two steps must resume with
    the saved rollouts and the loader's repeated prompts, giving the uninterrupted run's losses."""
    path = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows())

    def run(root: Path, max_steps: int, stop: int | None = None, resume: bool = False) -> list[float]:
        torch.manual_seed(0)
        module = grpo(tiny_model_dir, ["letter_count"], num_iterations=2)
        data = PromptDataModule(dataset=str(path), tokenizer=tiny_model_dir, batch_size=1)
        calls = []
        generate = module.generate_completions
        module.generate_completions = lambda batch: calls.append(1) or generate(batch)
        recorder = StepRecorder()
        callbacks = [recorder] + ([StopAtStep(stop)] if stop else [])
        trainer = trainer_with_checkpoints(root, max_steps, accumulate_grad_batches=2)
        for callback in callbacks:
            trainer.callbacks.append(callback)
        ckpt = str(root / "checkpoints" / "last.ckpt") if resume else None
        trainer.fit(module, datamodule=data, ckpt_path=ckpt)
        run.calls = len(calls)
        return recorder.steps

    whole = run(tmp_path / "whole", max_steps=4)
    assert run.calls == 4  # 4 steps x 2 micro-batches, each rollout used by 2 steps
    assert whole[1]["train_reward"] == whole[0]["train_reward"]  # the same completions, trained on again
    assert whole[1]["train_loss"] != whole[0]["train_loss"]  # through the importance ratio of an updated policy
    run(tmp_path / "parts", max_steps=4, stop=1)  # stopped in the middle of a reuse
    resumed = run(tmp_path / "parts", max_steps=4, resume=True)
    assert run.calls == 2  # step 2 reused the checkpoint's rollouts, step 3 generated
    assert [s["step"] for s in resumed] == [2, 3, 4]
    for got, expected in zip(resumed, whole[1:], strict=True):
        assert got["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-6, abs=1e-7)
        assert got["train_reward"] == expected["train_reward"]


@pytest.mark.slow
def test_the_shipped_recipe_runs_on_the_command_line_and_logs_rewards(tiny_model_dir, tmp_path, capfd):
    steps_file = tmp_path / "steps.jsonl"
    recorder = {"class_path": "tests.conftest.StepRecorder", "init_args": {"path": str(steps_file)}}
    override = stand_in_config(
        tmp_path,
        tiny_model_dir,
        trainer={
            "max_steps": 2,
            "val_check_interval": 2,
            "limit_val_batches": 1,
            "log_every_n_steps": 1,
            "default_root_dir": str(tmp_path),
        },
    )
    result = smolfactory(
        capfd, "fit", "--config", RECIPE, "--config", override, f"--trainer.callbacks+={json.dumps(recorder)}"
    )
    assert result.code == 0, result.err[-2000:]
    assert (tmp_path / "final" / "adapter_config.json").exists()
    steps = recorded_steps(steps_file)
    assert [s["step"] for s in steps] == [1, 2]
    # The recipe's own settings: 2 prompts x 8 completions, each at most 16 tokens.
    assert all(s["train_completion_length_max"] <= 16 and "train_reward_exact_answer" in s for s in steps)
    metrics = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    assert any(row.get("val_reward") for row in metrics) and any(row.get("train_reward") for row in metrics)
    completions = [json.loads(line) for line in next(tmp_path.rglob("completions.jsonl")).read_text().splitlines()]
    assert len(completions) == 2 * 16 and {"prompt", "completion", "reward", "advantage"} <= completions[0].keys()
    assert "Completions of a held-out prompt at step 2" in result.out
    plot = smolfactory(capfd, "plot", tmp_path)
    assert plot.code == 0 and (tmp_path / "curves.png").exists()


@pytest.mark.slow
def test_sigterm_saves_and_the_resumed_command_continues_exactly(tiny_model_dir, tmp_path, capfd):
    def command(root: Path, *extra: str) -> list[str]:
        recorder = {"class_path": "tests.conftest.StepRecorder", "init_args": {"path": str(root / "steps.jsonl")}}
        override = stand_in_config(
            root,
            tiny_model_dir,
            trainer={"max_steps": 3, "limit_val_batches": 0, "default_root_dir": str(root)},
            model={"sampling": {"num_generations": 4, "max_completion_length": 6}, "num_iterations": 2},
        )
        return ["fit", "--config", RECIPE, "--config", override, f"--trainer.callbacks+={json.dumps(recorder)}", *extra]

    for root in (tmp_path / "whole", tmp_path / "parts"):
        root.mkdir()
    assert smolfactory(capfd, *command(tmp_path / "whole")).code == 0
    sigterm = {"class_path": "tests.conftest.StopAtStep", "init_args": {"step": 1, "signum": int(signal.SIGTERM)}}
    stopped = smolfactory(capfd, *command(tmp_path / "parts", f"--trainer.callbacks+={json.dumps(sigterm)}"))
    assert stopped.code == 0 and "SIGTERM at step 1" in stopped.out
    resumed = smolfactory(capfd, *command(tmp_path / "parts", "--ckpt_path=last"))
    assert resumed.code == 0, resumed.err[-2000:]
    whole, parts = (
        recorded_steps(tmp_path / "whole" / "steps.jsonl"),
        recorded_steps(tmp_path / "parts" / "steps.jsonl"),
    )
    assert [s["step"] for s in parts] == [1, 2, 3]
    for got, expected in zip(parts, whole, strict=True):
        assert got["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-6, abs=1e-7)
        assert got["train_reward"] == expected["train_reward"]


@pytest.mark.slow
def test_a_reward_that_raises_is_one_line_naming_it_and_the_prompt(tiny_model_dir, tmp_path, capfd):
    data = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(2))
    override = stand_in_config(
        tmp_path,
        tiny_model_dir,
        trainer={"max_steps": 1, "limit_val_batches": 0, "default_root_dir": str(tmp_path)},
        model={"rewards": [{"function": "tests.test_grpo.broken_reward"}]},
        data={"dataset": str(data), "validation_dataset": None},
    )
    result = smolfactory(capfd, "fit", "--config", RECIPE, "--config", override)
    assert result.code == 2 and "Traceback" not in result.err
    assert "broken_reward" in result.error and "Which number is larger" in result.error, result.error
    assert len(yaml.safe_load(Path(override).read_text())["model"]["rewards"]) == 1
