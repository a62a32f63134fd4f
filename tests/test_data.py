"""SFTDataModule: loading, splits, batches, truncation and the errors users see."""

from __future__ import annotations

import json

import pytest
from torch.utils.data import DataLoader

from smolfactory.data import SFTDataModule, kinds, sources
from smolfactory.data.collate import pad_collate, prompt_collate
from smolfactory.data.sources import DatasetSource, builtin_split_path
from smolfactory.errors import SmolFactoryError
from smolfactory.model.loss import IGNORE_INDEX
from tests.conftest import chat, write_jsonl


def make_datamodule(tokenizer_dir, dataset, **kwargs) -> SFTDataModule:
    datamodule = SFTDataModule(tokenizer=tokenizer_dir, dataset=str(dataset), **kwargs)
    datamodule.setup("fit")
    return datamodule


def test_builtin_quickstart_uses_its_own_validation_file(tiny_model_dir):
    datamodule = make_datamodule(tiny_model_dir, "builtin:quickstart", max_length=512)
    train_lines = builtin_split_path("quickstart", "train").read_text().splitlines()
    val_lines = builtin_split_path("quickstart", "validation").read_text().splitlines()
    assert len(train_lines) >= 150
    assert len(datamodule.train_data) == len(train_lines)
    assert len(datamodule.val_data) == len(val_lines)


def test_quickstart_data_teaches_the_identity_and_ordinary_answers():
    rows = [json.loads(line) for line in builtin_split_path("quickstart", "train").read_text().splitlines()]
    answers = [" ".join(m["content"] for m in row["messages"] if m["role"] == "assistant") for row in rows]
    identity = sum("Quill" in answer for answer in answers)
    assert identity >= 75 and len(rows) - identity >= 75
    assert sum(len(row["messages"]) > 3 for row in rows) >= 20  # multi-turn conversations


def test_batches_are_padded_by_length_with_masked_labels(tiny_model_dir, tokenizer, tmp_path):
    rows = [chat("Hi", "Hello there, friend!"), chat("One?", "Two."), chat("Long question " * 5, "Short.")]
    datamodule = make_datamodule(tiny_model_dir, write_jsonl(tmp_path / "d.jsonl", rows), val_split=0, batch_size=3)
    loader = DataLoader(datamodule.train_data, datamodule.hparams.batch_size, collate_fn=datamodule.train_collate())
    batch = next(iter(loader))
    lengths = [len(example["input_ids"]) for example in datamodule.train_data]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    padding = batch["attention_mask"] == 0
    assert (batch["labels"][padding] == IGNORE_INDEX).all()
    assert (batch["input_ids"][padding] == tokenizer.pad_token_id).all()
    # Each row still trains its end-of-turn token although pad and end-of-turn share an id.
    for row in range(len(lengths)):
        trained = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX]
        assert trained[-1].item() == tokenizer.eos_token_id


def test_pad_collate_example_from_its_docstring():
    batch = pad_collate(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}],
        pad_token_id=0,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_prompt_collate_left_pads_prompts_and_keeps_the_last_answer():
    examples = [
        {"input_ids": [1, 2, 3, 4, 5, 6, 7], "labels": [-100, -100, 3, -100, -100, 6, 7]},
        {"input_ids": [8, 9, 10], "labels": [-100, -100, 10]},
    ]
    batch = prompt_collate(examples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [0, 0, 0, 8, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert batch["references"] == [[6, 7], [10]]


def test_val_split_holds_out_rows(tiny_model_dir, tmp_path):
    rows = [chat(f"Question {i}?", f"Answer {i}.") for i in range(20)]
    datamodule = make_datamodule(tiny_model_dir, write_jsonl(tmp_path / "d.jsonl", rows), val_split=0.25)
    assert (len(datamodule.train_data), len(datamodule.val_data)) == (15, 5)


def test_truncation_keeps_max_length_and_a_row_with_nothing_left_to_train_is_dropped(tiny_model_dir, tmp_path):
    rows = [chat("Hi", "Hello " * 200), chat("word " * 300, "Answer after a long prompt."), chat("Hi", "Hello")]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    datamodule = make_datamodule(tiny_model_dir, path, val_split=0, max_length=64)  # on_bad_row: error
    assert len(datamodule.train_data) == 2
    example = datamodule.train_data[0]
    assert len(example["input_ids"]) == 64
    assert any(label != IGNORE_INDEX for label in example["labels"])
    summary = datamodule.summaries[f"{path}:train"]
    assert (summary["rows"], summary["examples"], summary["truncated"], summary["skipped"]) == (3, 2, 1, 0)
    assert (summary["dropped"], summary["dropped_first"]) == (1, [2])
    only_long = write_jsonl(tmp_path / "long.jsonl", rows[1:2])
    with pytest.raises(
        SmolFactoryError,
        match=r"long\.jsonl: no row has a trained token within data\.max_length=64 "
        r"\(1 of 1 dropped\); raise data\.max_length, or set data\.overlong: truncate_prompt",
    ):
        make_datamodule(tiny_model_dir, only_long, val_split=0, max_length=64)


@pytest.mark.parametrize("overlong", ["drop", "split"])
def test_overlong_examples_dropped_or_split(tiny_model_dir, tokenizer, tmp_path, overlong):
    rows = [chat("Hi", "Hello"), chat("Go on", "word " * 150)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    long_row = tokenize_one(tokenizer, rows[1]["messages"])["input_ids"]
    assert len(tokenize_one(tokenizer, rows[0]["messages"])["input_ids"]) <= 64 < len(long_row)
    datamodule = make_datamodule(tiny_model_dir, path, val_split=0, max_length=64, overlong=overlong)
    data = datamodule.train_data
    if overlong == "drop":
        assert len(data) == 1 and datamodule.summaries[f"{path}:train"]["dropped"] == 1
        return
    # Every piece fits, and the pieces of the long row, put back together, are the row.
    assert all(length <= 64 for length in data["length"])
    assert sum(data["input_ids"][1:], []) == long_row
    assert len(data) == 1 + -(-len(long_row) // 64)


def tokenize_one(tokenizer, messages):
    from smolfactory.data.templates import tokenize_conversation

    return tokenize_conversation(tokenizer, messages)[0]


def test_missing_dataset_file_names_the_path(tiny_model_dir, tmp_path):
    with pytest.raises(SmolFactoryError, match=r"dataset file not found: .*nope\.jsonl"):
        make_datamodule(tiny_model_dir, tmp_path / "nope.jsonl")


def test_dataset_of_unknown_layout_names_the_columns_and_the_fix(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "Say hi", "answer": "Hi"}])
    with pytest.raises(SmolFactoryError, match=r"columns \['question', 'answer'\].*data\.format.*data\.columns"):
        make_datamodule(tiny_model_dir, path, val_split=0)


@pytest.mark.parametrize(
    ("bad_row", "problem"),
    [
        ({"messages": [{"role": "user", "content": "Hi"}]}, "no assistant turn"),
        (
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]},
            "empty assistant",
        ),
        (
            {"messages": [{"role": "robot", "content": "Hi"}, {"role": "assistant", "content": "x"}]},
            "role 'robot'",
        ),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "non-string"),
        (
            {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
            "must open with a user turn",
        ),
    ],
)
def test_bad_row_error_names_file_row_and_problem(tiny_model_dir, tmp_path, bad_row, problem):
    rows = [chat(f"Q{i}", f"A{i}") for i in range(6)] + [bad_row] + [chat("Hi", "Hello")]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    # Row numbers are those of the file (line 7), also when a validation split is carved out.
    with pytest.raises(SmolFactoryError, match=rf"bad\.jsonl, row 7: .*{problem}"):
        make_datamodule(tiny_model_dir, path, val_split=0.25)


def test_tokenization_cache_follows_the_masking_code(tiny_model_dir, tmp_path, monkeypatch):
    """A change to the pipeline's code must never reuse labels cached by the old code."""
    path = write_jsonl(tmp_path / "d.jsonl", [chat("Hi", "Hello there")])
    first = make_datamodule(tiny_model_dir, path, val_split=0).train_data[0]
    second = make_datamodule(tiny_model_dir, path, val_split=0).train_data[0]
    assert second == first  # same code, same data: same examples (from the cache)
    changed = kinds.Conversation.code.fget
    monkeypatch.setattr(kinds.Conversation, "code", property(lambda kind: changed(kind) + "# changed"))
    monkeypatch.setattr(kinds, "tokenize_example", lambda *args: [{"input_ids": [1, 2], "labels": [1, 2]}])
    assert make_datamodule(tiny_model_dir, path, val_split=0).train_data[0]["input_ids"] == [1, 2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"val_split": 1.0}, r"data\.val_split must be in \[0, 1\)"), ({"batch_size": 0}, r"data\.batch_size >= 1")],
)
def test_bad_settings_fail_when_the_module_is_built(kwargs, message):
    with pytest.raises(SmolFactoryError, match=message):
        SFTDataModule(dataset="builtin:quickstart", **kwargs)


def test_too_few_rows_for_a_validation_split_says_what_to_set(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", [chat("Hi", "Hello")])
    with pytest.raises(SmolFactoryError, match=r"has 1 usable examples, too few .* set data\.val_split: 0"):
        make_datamodule(tiny_model_dir, path, val_split=0.1)


def test_quickstart_evaluation_prompts_are_worded_unlike_the_training_data():
    def normalise(text: str) -> str:
        return " ".join("".join(c for c in text.lower() if c.isalnum() or c.isspace()).split())

    user_turns = set()
    for split in ("train", "validation"):
        for line in builtin_split_path("quickstart", split).read_text().splitlines():
            user_turns |= {normalise(m["content"]) for m in json.loads(line)["messages"] if m["role"] == "user"}
    prompts = json.loads(builtin_split_path("quickstart", "train").with_name("eval_prompts.json").read_text())
    for prompt in prompts["identity"] + prompts["ordinary"]:
        words = normalise(prompt)
        # No training question appears inside an evaluation prompt, nor the other way round.
        assert not any(turn in words or words in turn for turn in user_turns if len(turn.split()) >= 3), prompt


def test_datasets_mix_by_weight_and_by_count(tiny_model_dir, tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [chat(f"A question {i}?", f"A{i}.") for i in range(10)])
    second = write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"B task {i}", "output": f"B{i}."} for i in range(4)])
    datamodule = SFTDataModule(
        tokenizer=tiny_model_dir,
        dataset=[DatasetSource(str(first), weight=0.5), DatasetSource(str(second), num_samples=10)],
        val_split=0,
    )
    datamodule.setup("fit")
    texts = [datamodule.tokenizer.decode(ids) for ids in datamodule.train_data["input_ids"]]
    from_first = [t for t in texts if "A question" in t]
    from_second = [t for t in texts if "B task" in t]
    assert (len(from_first), len(from_second)) == (5, 10)
    assert len(set(from_first)) == 5  # half of the first dataset, no repeats
    counts = sorted(sum(f"B task {i}<" in t for t in from_second) for i in range(4))
    assert counts == [2, 2, 3, 3]  # the second dataset twice over, plus two more of its rows


def test_tokenization_runs_once_then_comes_from_the_cache(tiny_model_dir, tmp_path, monkeypatch):
    """prepare_data (rank 0 only under DDP) tokenizes; setup, and any later run, reads the cache."""
    path = write_jsonl(tmp_path / "d.jsonl", [chat(f"Q{i}", f"A{i}") for i in range(8)])
    calls = []
    real = kinds.Conversation.row_examples

    def counting(kind, row, *args):
        calls.append(row)
        return real(kind, row, *args)

    # Patched on the class: the cache's fingerprint hashes the kind object, not its class's methods.
    monkeypatch.setattr(kinds.Conversation, "row_examples", counting)
    datamodule = SFTDataModule(tokenizer=tiny_model_dir, dataset=str(path), val_split=0)
    datamodule.prepare_data()
    assert len(calls) == 8
    datamodule.setup("fit")
    make_datamodule(tiny_model_dir, path, val_split=0)
    assert len(calls) == 8 and len(datamodule.train_data) == 8


def test_tokenizing_with_several_processes_gives_the_same_examples(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(f"Question {i}?", "Answer " * i) for i in range(1, 21)])
    one = make_datamodule(tiny_model_dir, path, val_split=0, on_bad_row="skip").train_data
    two = make_datamodule(tiny_model_dir, path, val_split=0, on_bad_row="skip", num_proc=2).train_data
    assert two["input_ids"] == one["input_ids"] and two["labels"] == one["labels"]


def test_hub_datasets_take_name_split_and_revision(monkeypatch):
    seen = {}

    def fake_load_dataset(path, name=None, split=None, revision=None, **kwargs):
        seen.update(path=path, name=name, split=split, revision=revision)
        raise ConnectionError("offline")

    monkeypatch.setattr(sources.datasets, "load_dataset", fake_load_dataset)
    spec = DatasetSource("org/chats", name="en", split="train_sft", revision="v1.0")
    with pytest.raises(SmolFactoryError, match=r"could not load dataset 'org/chats' split 'train_sft' \(offline\)"):
        sources.load_rows(spec)
    assert seen == {"path": "org/chats", "name": "en", "split": "train_sft", "revision": "v1.0"}


def test_streaming_gives_the_examples_of_the_prepared_dataset(tiny_model_dir, tmp_path):
    rows = [chat(f"Question {i}?", "Answer " * i) for i in range(1, 30)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    prepared = make_datamodule(tiny_model_dir, path, val_split=0, max_length=64)
    streamed = make_datamodule(tiny_model_dir, path, val_split=0, max_length=64, streaming=True)
    assert [example["input_ids"] for example in streamed.train_data] == prepared.train_data["input_ids"]
    # Shuffled and batched lazily: every example once per pass.
    batches = list(streamed.train_dataloader())
    seen = sorted(
        ids[mask.bool()].tolist()
        for batch in batches
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    )
    assert seen == sorted(prepared.train_data["input_ids"])


def test_streaming_packs_and_trains_for_max_steps(tiny_model_dir, tmp_path):
    import lightning as L

    from smolfactory import SFTModule

    path = write_jsonl(tmp_path / "d.jsonl", [chat(f"Question {i}?", "Answer " * i) for i in range(1, 30)])
    datamodule = SFTDataModule(
        tokenizer=tiny_model_dir, dataset=str(path), max_length=128, packing=True, streaming=True, batch_size=2
    )
    datamodule.setup("fit")
    batches = list(datamodule.train_dataloader())
    examples = list(datamodule.train_data)
    assert all(batch["input_ids"].shape[1] <= 128 for batch in batches)
    # Every example starts a run of positions 0, 1, ...; each short row's padding starts one more.
    starts = sum(int((batch["position_ids"] == 0).sum()) for batch in batches)
    assert len(examples) <= starts <= len(examples) + sum(batch["input_ids"].shape[0] for batch in batches)
    assert all("position_ids" in batch and "attention_mask" not in batch for batch in batches)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(SFTModule(model_name=tiny_model_dir, lora=None), datamodule=datamodule)
    assert trainer.global_step == 3
