"""`smolfactory chat` on tiny real models: answers equal a hand-written greedy loop over the chat template;
history, /reset and /exit; adapter folders answer like their merged model."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from smolfactory.chat import ChatSession, interact, load_chat_model
from smolfactory.cli import main
from tests.conftest import greedy_by_hand, user

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def adapter_and_merged(tiny_model_dir, tokenizer, tmp_path_factory):
    """An adapter folder with random (non-zero) LoRA weights, and the same model merged."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    folder = tmp_path_factory.mktemp("chat")
    model.save_pretrained(folder / "adapter")
    tokenizer.save_pretrained(folder / "adapter")
    model.merge_and_unload().save_pretrained(folder / "merged")
    tokenizer.save_pretrained(folder / "merged")
    return str(folder / "adapter"), str(folder / "merged")


def test_one_shot_prompt_prints_the_greedy_answer(tiny_model_dir, capsys):
    main(["chat", "--model", tiny_model_dir, "--prompt", "What is your name?", "--max-new-tokens", str(NEW_TOKENS)])
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    model, tokenizer = load_chat_model(tiny_model_dir, "cpu")
    expected = greedy_by_hand(model, tokenizer, [user("What is your name?")])
    assert expected and printed == expected


def test_interactive_session_keeps_history_until_reset(tiny_model_dir, monkeypatch, capsys):
    model, tokenizer = load_chat_model(tiny_model_dir, "cpu")
    lines = iter(["Hello there", "Tell me more", "/reset", "Hello there", "/exit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    session = ChatSession(model, tokenizer, max_new_tokens=NEW_TOKENS)
    interact(session)
    output = capsys.readouterr().out
    answers = [part.splitlines()[0].strip() for part in output.split("assistant> ")[1:]]
    assert len(answers) == 3 and "(history cleared)" in output
    first = greedy_by_hand(model, tokenizer, [user("Hello there")])
    second = greedy_by_hand(
        model, tokenizer, [user("Hello there"), {"role": "assistant", "content": first}, user("Tell me more")]
    )
    assert answers == [first, second, first]  # streamed text = the answer; after /reset the history is gone
    assert session.messages == [user("Hello there"), {"role": "assistant", "content": first}]
    assert next(lines) == "never read"  # /exit stopped reading


@pytest.mark.slow
def test_adapter_folder_answers_like_its_merged_model(adapter_and_merged, tiny_model_dir):
    adapter, merged = adapter_and_merged
    answers = {}
    for name, folder in {"adapter": adapter, "merged": merged, "base": tiny_model_dir}.items():
        model, tokenizer = load_chat_model(folder, "cpu")
        answers[name] = ChatSession(model, tokenizer, max_new_tokens=NEW_TOKENS).reply("Say a colour.")
        if name == "adapter":
            assert type(model).__name__.startswith("Peft")
            probe = tokenizer("Say a colour.", return_tensors="pt")
            adapter_logits = model(**probe).logits
        if name == "merged":
            torch.testing.assert_close(model(**probe).logits, adapter_logits, atol=1e-4, rtol=1e-4)
        if name == "base":
            assert (model(**probe).logits - adapter_logits).abs().max() > 1e-2  # the adapter matters
    assert answers["adapter"] == answers["merged"]


def test_system_message_starts_the_conversation_and_survives_reset(tiny_model_dir):
    model, tokenizer = load_chat_model(tiny_model_dir, "cpu")
    session = ChatSession(model, tokenizer, system="You are Quill.", max_new_tokens=2)
    session.reply("Hi")
    session.reset()
    assert session.messages == [{"role": "system", "content": "You are Quill."}]


def test_a_missing_model_folder_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", "--model", str(tmp_path / "nowhere"), "--prompt", "Hi"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: model '")
