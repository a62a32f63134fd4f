"""PromptDataModule (GRPO's prompts): layouts, the columns the rewards get, padding, lengths, repeats and resume."""

from __future__ import annotations

import datasets
import pytest
import yaml
from torch.utils.data import SequentialSampler

from smolfactory import PromptDataModule
from smolfactory.data.collate import rollout_prompt_collate
from smolfactory.data.loaders import RepeatedBatches
from smolfactory.errors import SmolFactoryError
from tests.conftest import smolfactory, user, write_jsonl

GENERATION_PROMPT = "<|im_start|>assistant\n"


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


def prompts(tmp_path, tokenizer_dir, rows, name="prompts.jsonl", **kwargs) -> PromptDataModule:
    """A set-up PromptDataModule over ``rows`` written to a file (``rows`` a dict: one file per name)."""
    files = rows if isinstance(rows, dict) else {name: rows}
    paths = [str(write_jsonl(tmp_path / file, file_rows)) for file, file_rows in files.items()]
    datamodule = PromptDataModule(dataset=paths if len(paths) > 1 else paths[0], tokenizer=tokenizer_dir, **kwargs)
    datamodule.setup("fit")
    return datamodule


def batch_of(datamodule: PromptDataModule) -> dict:
    """Every training prompt in dataset order, as one training batch."""
    return datamodule.train_collate()([datamodule.train_data[i] for i in range(len(datamodule.train_data))])


# (row, the messages the template renders, the prompt as the rewards see it, the columns the rewards get)
LAYOUTS = {
    "messages, the last user turn answered": (
        {"messages": [user("Hi"), assistant("Hello!"), user("What is 2 + 2?"), assistant("4")], "level": 1},
        [user("Hi"), assistant("Hello!"), user("What is 2 + 2?")],
        [user("Hi"), assistant("Hello!"), user("What is 2 + 2?")],
        {"level": 1, "answer": "4"},
    ),
    "sharegpt": (
        {"conversations": [{"from": "human", "value": "Name a colour."}], "system": "Be brief.", "answer": "blue"},
        [system("Be brief."), user("Name a colour.")],
        [system("Be brief."), user("Name a colour.")],
        {"answer": "blue"},
    ),
    "prompt as text": (
        {"prompt": "What is 2 + 2?", "answer": "4"},
        [user("What is 2 + 2?")],
        "What is 2 + 2?",
        {"answer": "4"},
    ),
    "prompt as messages": (
        {"prompt": [system("Answer in French."), user("Hello?")], "answer": "Bonjour"},
        [system("Answer in French."), user("Hello?")],
        [system("Answer in French."), user("Hello?")],
        {"answer": "Bonjour"},
    ),
    "alpaca": (
        {"instruction": "Translate.", "input": "chat", "output": "cat", "system": "You translate."},
        [system("You translate."), user("Translate.\n\nchat")],
        "Translate.\n\nchat",
        {"output": "cat"},
    ),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_renders_its_prompt_up_to_the_generation_prompt(tmp_path, tiny_model_dir, tokenizer, layout):
    row, rendered, shown, columns = LAYOUTS[layout]
    batch = batch_of(prompts(tmp_path, tiny_model_dir, [row]))
    expected = tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)
    text = tokenizer.decode(batch["prompt_ids"][0])
    assert text == expected and text.endswith(GENERATION_PROMPT)
    assert batch["input_ids"][0].tolist() == batch["prompt_ids"][0]
    assert batch["prompts"] == [shown]
    assert batch["conversational"] == [isinstance(shown, list)]
    assert batch["columns"] == {name: [value] for name, value in columns.items()}


def test_system_prompt_column_renames_and_template_kwargs(tmp_path, tiny_model_dir, tokenizer):
    rows = [{"question": "Why?", "answer": "Because."}, {"question": "How?", "answer": "So."}]
    datamodule = prompts(
        tmp_path,
        tiny_model_dir,
        rows,
        format="prompt",
        columns={"prompt": "question"},
        system_prompt="Be kind.",
        chat_template="chatml",
    )
    batch = batch_of(datamodule)
    assert tokenizer.decode(batch["prompt_ids"][0]) == (
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n" + GENERATION_PROMPT
    )
    # A text prompt reaches the rewards as its text; the renamed column is the prompt, not a reward column.
    assert batch["prompts"] == ["Why?", "How?"] and batch["columns"] == {"answer": ["Because.", "So."]}


def test_every_other_column_reaches_the_rewards_unchanged_across_datasets(tmp_path, tiny_model_dir):
    tests = {"cases": [{"input": [1, 2], "output": 3}, {"input": [0, 0], "output": 0}], "timeout": 1.5}
    files = {
        "code.jsonl": [
            {"prompt": "Write add.", "tests": tests, "language": "python"},
            {"prompt": "Write sub.", "tests": tests, "language": "rust"},
        ],
        "math.jsonl": [{"messages": [user("1 + 1?"), assistant("2")], "answer": "two", "tags": ["easy", "sum"]}],
    }
    batch = batch_of(prompts(tmp_path, tiny_model_dir, files))
    assert batch["prompts"] == ["Write add.", "Write sub.", [user("1 + 1?")]]
    assert batch["conversational"] == [False, False, True]
    # The row's own answer wins over its final assistant turn; a column a dataset lacks is None for its rows.
    assert batch["columns"] == {
        "tests": [tests, tests, None],
        "language": ["python", "rust", None],
        "answer": [None, None, "two"],
        "tags": [None, None, ["easy", "sum"]],
    }


def test_prompts_are_left_padded_for_generation(tmp_path, tiny_model_dir):
    rows = [{"prompt": "Hi"}, {"prompt": "Tell me everything about the history of the world, please."}]
    batch = batch_of(prompts(tmp_path, tiny_model_dir, rows, chat_template="chatml"))
    short, long = batch["prompt_ids"]
    assert len(short) < len(long) == batch["input_ids"].shape[1]
    padding = len(long) - len(short)
    assert batch["input_ids"][0, padding:].tolist() == short
    assert batch["attention_mask"].tolist() == [[0] * padding + [1] * len(short), [1] * len(long)]


def test_left_padding_example_from_the_collate_docstring():
    examples = [
        {"prompt_ids": [5, 6, 7], "prompt": '"What is 2 + 2?"', "reward_columns": '{"answer": "4"}'},
        {"prompt_ids": [8, 9], "prompt": '[{"role": "user", "content": "Hi"}]', "reward_columns": "{}"},
    ]
    batch = rollout_prompt_collate(examples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 8, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert batch["prompts"] == ["What is 2 + 2?", [user("Hi")]] and batch["conversational"] == [False, True]
    assert batch["columns"] == {"answer": ["4", None]}


def test_truncate_prompt_keeps_the_last_tokens(tmp_path, tiny_model_dir, tokenizer):
    long = "Please read this carefully. " * 10 + "What is 2 + 2?"
    datamodule = prompts(tmp_path, tiny_model_dir, [{"prompt": long}, {"prompt": "Hi"}], max_length=40)
    full = tokenizer.apply_chat_template([user(long)], tokenize=False, add_generation_prompt=True)
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    batch = batch_of(datamodule)
    assert len(full_ids) > 40 and batch["prompt_ids"][0] == full_ids[-40:]
    assert batch["prompts"][0] == long  # the rewards see the prompt whole
    assert next(iter(datamodule.summaries.values()))["truncated"] == 1


def test_drop_leaves_out_long_prompts_and_counts_them(tmp_path, tiny_model_dir):
    rows = [{"prompt": "word " * 50}, {"prompt": "Hi"}, {"prompt": "word " * 60}]
    datamodule = prompts(tmp_path, tiny_model_dir, rows, max_length=40, overlong="drop")
    assert batch_of(datamodule)["prompts"] == ["Hi"]
    summary = next(iter(datamodule.summaries.values()))
    assert (summary["rows"], summary["examples"], summary["dropped"], summary["dropped_first"]) == (3, 1, 2, [1, 3])


@pytest.mark.parametrize(
    ("good", "bad", "problem"),
    [
        ({"messages": [user("Hi")]}, {"messages": [assistant("Hello")]}, "the conversation has no user turn to answer"),
        ({"prompt": "Hi"}, {"prompt": [user("Hi"), assistant("Hello")]}, "the prompt must end with a user turn"),
        ({"prompt": "Hi"}, {"prompt": 3}, "'prompt' must be a string or a list of {role, content} messages"),
    ],
)
def test_a_bad_row_stops_with_one_line_naming_it(tmp_path, tiny_model_dir, good, bad, problem):
    with pytest.raises(SmolFactoryError) as error:
        prompts(tmp_path, tiny_model_dir, [good, bad, good])
    assert str(error.value).startswith(f"{tmp_path / 'prompts.jsonl'}, row 2: {problem}")
    assert "\n" not in str(error.value)


def test_repeated_batches_give_each_steps_batches_again():
    batches = RepeatedBatches(SequentialSampler(range(9)), batch_size=2, drop_last=False, group=2, times=2)
    expected = [[0, 1], [2, 3], [0, 1], [2, 3], [4, 5], [6, 7], [4, 5], [6, 7]]  # [8] alone is no whole step
    assert list(batches) == expected and len(batches) == len(expected) and batches.left_out == 1
    # A short last batch still makes a whole step of `group` batches.
    short = RepeatedBatches(SequentialSampler(range(7)), batch_size=2, drop_last=False, group=2, times=2)
    assert list(short) == [[0, 1], [2, 3], [0, 1], [2, 3], [4, 5], [6], [4, 5], [6]] and short.left_out == 0
    plain = RepeatedBatches(SequentialSampler(range(5)), batch_size=2, drop_last=False)
    assert list(plain) == [[0, 1], [2, 3], [4]] and len(plain) == 3 and plain.left_out == 0


def test_repeated_batches_resume_exactly_even_inside_a_repeat(tmp_path, tiny_model_dir, caplog):
    rows = [{"prompt": f"Question {i}?", "number": i} for i in range(9)]
    datamodule = prompts(tmp_path, tiny_model_dir, rows)
    datamodule.repeat_batches(group=2, times=3)
    loader = datamodule.train_dataloader()
    assert "leaves out its last 1 (of 9)" in caplog.text
    numbers = [batch["columns"]["number"] for batch in loader]
    assert len(loader) == len(numbers) == 12  # two steps of two batches of two prompts, each taken three times
    assert numbers[:6] == numbers[0:2] * 3 and numbers[6:] == numbers[6:8] * 3
    assert sorted(n for batch in numbers[0:2] + numbers[6:8] for n in batch) == sorted({*sum(numbers, [])})
    for k in (1, 2, 3, 5, 7, 11):  # inside a repeat, between repeats, between steps
        first = datamodule.train_dataloader()
        batches = iter(first)
        for _ in range(k):
            next(batches)
            first.batch_taken()  # as the training loop does before a checkpoint
        resumed = datamodule.train_dataloader()
        resumed.load_state_dict(first.state_dict())
        assert [batch["columns"]["number"] for batch in resumed] == numbers[k:], k


def test_preview_shows_a_prompt_and_its_columns(tmp_path, tiny_model_dir, capfd):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What is 2 + 2?", "answer": "4"}] * 3)
    config = tmp_path / "grpo.yaml"
    # (A data class_path keeps same-named values of the default SFTDataModule's: val_split 0.05 unless given.)
    arguments = {"dataset": str(path), "max_length": 64, "val_split": 0}
    data = {"class_path": "smolfactory.PromptDataModule", "init_args": arguments}
    config.write_text(yaml.safe_dump({"model": {"model_name": tiny_model_dir}, "data": data}))
    run = smolfactory(capfd, "preview", "--config", config, "--num_examples=1")
    assert run.code == 0, run.err
    assert "--- prompt 1 of 3" in run.out and "--- prompt 2" not in run.out
    assert "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n" + GENERATION_PROMPT in run.out
    assert 'answer: "4"' in run.out and "tokens per prompt: p50" in run.out


def test_predict_references_are_the_answer_tokens(tmp_path, tiny_model_dir, tokenizer):
    datamodule = prompts(tmp_path, tiny_model_dir, [{"prompt": "What is 2 + 2?", "answer": "four"}, {"prompt": "Hi"}])
    batch = next(iter(datamodule.predict_dataloader()))
    assert batch["input_ids"][0].tolist() == datamodule.train_data[0]["prompt_ids"]
    assert batch["references"] == [tokenizer("four", add_special_tokens=False)["input_ids"], []]


def test_a_column_json_cannot_hold_names_the_column(tmp_path, tiny_model_dir):
    path = tmp_path / "prompts.parquet"
    datasets.Dataset.from_list([{"prompt": "Hi", "blob": b"\x00\x01"}]).to_parquet(path)
    with pytest.raises(SmolFactoryError, match=r"prompts\.parquet, row 1: column 'blob' holds a bytes"):
        PromptDataModule(dataset=str(path), tokenizer=tiny_model_dir).setup("fit")
