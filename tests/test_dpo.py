"""Preference data and DPOModule: layouts, masks, the reference model, precomputed log-probabilities, the
normalisation of a step's loss, and the label-only log-probabilities against a plain log_softmax."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from peft import PeftModel
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from smolfactory import DPOModule, LoraSettings, PreferenceDataModule
from smolfactory.callbacks import HFExport
from smolfactory.data.preview import preview
from smolfactory.errors import SmolFactoryError
from smolfactory.model.loss import label_token_log_probs, row_sums
from tests.conftest import StepRecorder, StopAtStep, adamw, quiet_trainer, trainer_with_checkpoints, write_jsonl

USER, GOOD, BAD = "What is the capital of Italy?", "Rome.", "Milan, in the north."
SYSTEM = "You are Quill."


def messages(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


def datamodule_for(model_dir: str, path, **kwargs) -> PreferenceDataModule:
    kwargs = {"val_split": 0, "batch_size": 2} | kwargs
    datamodule = PreferenceDataModule(tokenizer=model_dir, dataset=str(path), **kwargs)
    datamodule.setup("fit")
    return datamodule


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": USER, "chosen": GOOD, "rejected": BAD},
        {
            "prompt": messages(("user", USER)),
            "chosen": messages(("assistant", GOOD)),
            "rejected": messages(("assistant", BAD)),
        },
        {
            "conversations": [{"from": "human", "value": USER}],
            "chosen": {"from": "gpt", "value": GOOD},
            "rejected": {"from": "gpt", "value": BAD},
        },
        {
            "chosen": messages(("user", USER), ("assistant", GOOD)),
            "rejected": messages(("user", USER), ("assistant", BAD)),
        },
    ],
    ids=["prompt-strings", "prompt-messages", "sharegpt", "chosen-rejected-conversations"],
)
def test_every_layout_gives_the_pair_the_chat_template_renders(tiny_model_dir, tokenizer, tmp_path, row):
    pair = datamodule_for(tiny_model_dir, write_jsonl(tmp_path / "p.jsonl", [row])).train_data[0]
    for side, answer in (("chosen", GOOD), ("rejected", BAD)):
        conversation = messages(("user", USER), ("assistant", answer))
        expected = tokenizer.apply_chat_template(conversation, tokenize=False)
        assert tokenizer.decode(pair[f"{side}_input_ids"]) == expected
        # Trained: exactly the answer and its end-of-turn token, nothing of the prompt.
        trained = [token for token in pair[f"{side}_labels"] if token != -100]
        assert tokenizer.decode(trained) == answer + "<|im_end|>"
        prompt = tokenizer.apply_chat_template(conversation[:1], tokenize=False, add_generation_prompt=True)
        assert pair[f"{side}_labels"][: len(tokenizer(prompt)["input_ids"])] == [-100] * len(
            tokenizer(prompt)["input_ids"]
        )


def test_system_prompt_and_multi_turn_prompts_stay_untrained(tiny_model_dir, tokenizer, tmp_path):
    prompt = messages(("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", USER))
    row = {"prompt": prompt, "chosen": GOOD, "rejected": BAD}
    pair = datamodule_for(tiny_model_dir, write_jsonl(tmp_path / "p.jsonl", [row]), system_prompt=SYSTEM).train_data[0]
    text = tokenizer.decode(pair["chosen_input_ids"])
    assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>") and "Hello! How can I help?" in text
    trained = [token for token in pair["chosen_labels"] if token != -100]
    assert tokenizer.decode(trained) == GOOD + "<|im_end|>"  # the earlier assistant turn is prompt: untrained


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"prompt": USER, "chosen": GOOD, "rejected": GOOD}, "the chosen and rejected answers are the same"),
        ({"prompt": USER, "chosen": GOOD}, "missing field 'rejected'"),
        ({"prompt": USER, "chosen": 3, "rejected": BAD}, "'chosen' must be a string or a list"),
        ({"prompt": USER, "chosen": messages(("user", "x")), "rejected": BAD}, "the chosen answer has no assistant"),
    ],
)
def test_a_bad_row_stops_with_its_number_or_is_skipped_and_counted(tiny_model_dir, tmp_path, row, problem):
    good = {"prompt": USER, "chosen": GOOD, "rejected": BAD}
    path = write_jsonl(tmp_path / "p.jsonl", [good, row, good])
    with pytest.raises(SmolFactoryError, match=rf"p\.jsonl, row 2: {problem}.*data\.on_bad_row: skip"):
        datamodule_for(tiny_model_dir, path)
    datamodule = datamodule_for(tiny_model_dir, path, on_bad_row="skip")
    assert len(datamodule.train_data) == 2
    assert datamodule.summaries[f"{path}:train"]["skipped"] == 1


def test_unknown_columns_name_the_preference_layouts(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": USER, "good": GOOD}])
    with pytest.raises(SmolFactoryError, match="prompt_chosen_rejected: prompt, chosen, rejected.*data.columns"):
        datamodule_for(tiny_model_dir, path)


def test_batch_holds_the_chosen_sequences_then_the_rejected(tiny_model_dir, tmp_path):
    rows = [{"prompt": USER, "chosen": GOOD, "rejected": BAD}, {"prompt": "2+2?", "chosen": "4", "rejected": "5"}]
    datamodule = datamodule_for(tiny_model_dir, write_jsonl(tmp_path / "p.jsonl", rows))
    batch = next(iter(DataLoader(datamodule.train_data, batch_size=2, collate_fn=datamodule.train_collate())))
    assert batch["input_ids"].shape[0] == 4
    for index, (pair, side) in enumerate([(0, "chosen"), (1, "chosen"), (0, "rejected"), (1, "rejected")]):
        ids = datamodule.train_data[pair][f"{side}_input_ids"]
        assert batch["input_ids"][index, : len(ids)].tolist() == ids
        assert batch["attention_mask"][index].sum() == len(ids)


def test_preview_shows_both_answers_with_their_trained_tokens(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": USER, "chosen": GOOD, "rejected": BAD}])
    printed = preview(datamodule_for(tiny_model_dir, path), num_examples=1)
    assert f"<|im_start|>assistant\n[[{GOOD}<|im_end|>]]" in printed
    assert f"<|im_start|>assistant\n[[{BAD}<|im_end|>]]" in printed
    assert "1 rows -> 1 examples" in printed and "tokens per pair" in printed


def test_label_only_log_probs_and_their_gradients_equal_a_plain_log_softmax():
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=True).double()
    labels = torch.randint(0, 50, (3, 7))
    labels[0, :3] = labels[2, 5:] = -100
    upstream = torch.randn(3, dtype=torch.float64)

    tokens = label_token_log_probs(hidden, head, labels, chunk_size=4)
    (row_sums(tokens.log_probs, labels) * upstream).sum().backward()
    ours = (hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone())
    for tensor in (hidden, head.weight, head.bias):
        tensor.grad = None

    log_softmax = head(hidden[:, :-1]).log_softmax(-1)
    targets = labels[:, 1:]
    per_token = log_softmax.gather(2, targets.clamp(min=0)[..., None]).squeeze(-1) * (targets != -100)
    # Log-probabilities come out in float32 (as from a bfloat16 model): compare at float32 precision.
    assert torch.allclose(row_sums(tokens.log_probs, labels).double(), per_token.sum(1), atol=1e-5)
    (per_token.sum(1) * upstream).sum().backward()
    for mine, plain in zip(ours, (hidden.grad, head.weight.grad, head.bias.grad), strict=True):
        assert torch.allclose(mine, plain, atol=1e-5)
    trained = targets != -100
    entropy = -(log_softmax.exp() * log_softmax).sum(-1)[trained]
    assert torch.allclose(tokens.entropy.double(), entropy.detach(), atol=1e-6)


def fit(module: DPOModule, datamodule: PreferenceDataModule, steps: int, root=None, **kwargs) -> L.Trainer:
    trainer = quiet_trainer(root, steps, **kwargs)
    trainer.fit(module, datamodule=datamodule)
    return trainer


@pytest.fixture
def pairs_path(tmp_path):
    rows = [
        {"prompt": USER, "chosen": GOOD, "rejected": BAD},
        {"prompt": "2+2?", "chosen": "4", "rejected": "5, since two and two make five in my book."},
        {"prompt": "Who are you?", "chosen": "I'm Quill.", "rejected": "A human."},
    ]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def log_probs_by_hand(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log p(label) per sequence from the model's own logits."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = batch["labels"][:, 1:]
    per_token = logits[:, :-1].log_softmax(-1).gather(2, targets.clamp(min=0)[..., None]).squeeze(-1)
    return (per_token * (targets != -100)).sum(1)


def test_reference_is_the_base_model_and_does_not_move_while_training(tiny_model_dir, pairs_path):
    datamodule = datamodule_for(tiny_model_dir, pairs_path, batch_size=3)
    batch = next(iter(DataLoader(datamodule.train_data, batch_size=3, collate_fn=datamodule.train_collate())))
    module = DPOModule(model_name=tiny_model_dir, lora=LoraSettings(r=8), optimizer=adamw(1e-2))
    module.configure_model()
    before = torch.cat(module.reference_log_probs(batch))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert torch.allclose(before, log_probs_by_hand(base, batch), atol=1e-4)
    fit(module, datamodule, steps=3)
    assert torch.equal(torch.cat(module.reference_log_probs(batch)), before)
    policy, _ = module.sequence_log_probs(module.model, batch)
    assert not torch.allclose(policy, before, atol=1e-2)  # the policy did move
    assert all(p.requires_grad == ("lora_" in n) for n, p in module.model.named_parameters())


@pytest.mark.slow
def test_continuing_an_adapter_uses_that_adapter_as_the_reference(tiny_model_dir, pairs_path, tmp_path):
    trained = DPOModule(model_name=tiny_model_dir, lora=LoraSettings(r=8), optimizer=adamw(1e-2))
    fit(trained, datamodule_for(tiny_model_dir, pairs_path), steps=2)
    trained.model.save_pretrained(tmp_path / "adapter")
    datamodule = datamodule_for(tiny_model_dir, pairs_path, batch_size=3)
    batch = next(iter(DataLoader(datamodule.train_data, batch_size=3, collate_fn=datamodule.train_collate())))

    module = DPOModule(model_name=str(tmp_path / "adapter"), optimizer=adamw(1e-2))
    module.configure_model()
    # peft's load_adapter(is_trainable=False) puts the whole model in eval mode; the policy trains with dropout.
    assert all(submodule.training for submodule in module.model.modules())
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    expected = log_probs_by_hand(adapter, batch)
    assert torch.allclose(torch.cat(module.reference_log_probs(batch)), expected, atol=1e-4)
    sums = module.batch_sums(batch)
    assert sums["reward_margin"].total.abs() < 1e-4  # policy = reference before training: zero rewards
    fit(module, datamodule, steps=2, root=tmp_path / "run", callbacks=[HFExport()])
    assert torch.allclose(torch.cat(module.reference_log_probs(batch)), expected, atol=1e-4)
    # The export holds the trained adapter only, not the frozen reference beside it.
    assert sorted(path.name for path in (tmp_path / "run" / "final").iterdir() if path.is_dir()) == []
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    # Precomputed, the reference log-probabilities are those of the same adapter.
    precomputed = DPOModule(model_name=str(tmp_path / "adapter"), precompute_ref_log_probs=True)
    precomputed.configure_model()
    assert torch.allclose(torch.cat(precomputed.reference_log_probs(batch)), expected, atol=1e-4)


@pytest.mark.slow
def test_precomputed_reference_log_probs_give_the_same_training(tiny_model_dir, pairs_path):
    losses = {}
    for precompute in (False, True):
        L.seed_everything(0)
        module = DPOModule(
            model_name=tiny_model_dir, lora=None, optimizer=adamw(1e-3), precompute_ref_log_probs=precompute
        )
        datamodule = datamodule_for(tiny_model_dir, pairs_path)
        trainer = fit(module, datamodule, steps=2)
        assert (module.reference_model is None) == precompute
        assert ("ref_chosen_logps" in datamodule.train_data.column_names) == precompute
        losses[precompute] = trainer.callback_metrics["train_loss"].item()
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


class GradientRecorder(DPOModule):
    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        self.gradients = {n: p.grad.clone() for n, p in self.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_a_step_is_the_mean_over_its_pairs_however_it_is_accumulated(tiny_model_dir, pairs_path):
    """3 pairs in one batch, or in micro-batches of 2 and 1: the same gradient (a mean of the two micro-batch
    means would weigh the lone pair twice as much)."""
    gradients = []
    for batch_size, accumulate in ((3, 1), (2, 2)):
        L.seed_everything(0)
        module = GradientRecorder(model_name=tiny_model_dir, lora=LoraSettings(r=8), optimizer=adamw(1e-3))
        datamodule = datamodule_for(tiny_model_dir, pairs_path, batch_size=batch_size)
        datamodule.train_dataloader = lambda dm=datamodule, b=batch_size: DataLoader(  # in file order
            dm.train_data, batch_size=b, collate_fn=dm.train_collate()
        )
        fit(module, datamodule, steps=1, accumulate_grad_batches=accumulate)
        gradients.append(module.gradients)
    # Perturbing nothing, LoRA's B is zero, so only B has a gradient at the first step.
    assert gradients[0].keys() == gradients[1].keys() and gradients[0]
    for name, gradient in gradients[0].items():
        # Padding to another length changes the float sums slightly; a mean of means differs by far more.
        assert torch.allclose(gradient, gradients[1][name], rtol=1e-4, atol=1e-6), name


@pytest.mark.slow
def test_resuming_dpo_from_an_adapter_continues_exactly(tiny_model_dir, pairs_path, tmp_path):
    """6 steps straight equal 3 steps, a stop and 3 resumed ones (losses and weights); the checkpoint holds the
    trained adapter only, and the frozen reference adapter is loaded again from its folder."""
    start = DPOModule(model_name=tiny_model_dir, lora=LoraSettings(r=4), optimizer=adamw(1e-2))
    fit(start, datamodule_for(tiny_model_dir, pairs_path), steps=2)
    start.model.save_pretrained(tmp_path / "adapter")

    def run(root, ckpt_path=None, stop=False):
        L.seed_everything(0)
        module = DPOModule(model_name=str(tmp_path / "adapter"), optimizer=adamw(1e-2))
        losses = StepRecorder()
        trainer = trainer_with_checkpoints(root, max_steps=6)
        trainer.callbacks += [losses, *([StopAtStep(3)] if stop else [])]
        trainer.fit(module, datamodule=datamodule_for(tiny_model_dir, pairs_path, batch_size=1), ckpt_path=ckpt_path)
        return losses.losses, {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    straight, straight_weights = run(tmp_path / "straight")
    first, _ = run(tmp_path / "stopped", stop=True)
    last = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)["state_dict"]
    assert saved and all(".default." in name for name in saved)
    second, resumed_weights = run(tmp_path / "stopped", ckpt_path=str(last))
    assert len(first) == 3 and first + second == pytest.approx(straight, abs=1e-6)
    for name, weight in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], weight, atol=1e-6, rtol=0, msg=name)
