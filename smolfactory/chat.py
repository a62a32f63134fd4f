"""``smolfactory chat``: talk to a model folder, an adapter folder or a Hub model through its chat template.

smolfactory chat --model outputs/quickstart/final                   # interactive: /reset, /exit
smolfactory chat --model outputs/quickstart/final --prompt "Who are you?"   # one answer, for scripts
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TextStreamer

from smolfactory.model.loading import DEFAULT_MODEL, adapter_base_model, load_model, load_tokenizer, resolve_model_path

HELP = "/reset clears the history, /exit (or Ctrl-D) quits"


def load_chat_model(name: str, device: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (base + adapter for an adapter folder) in eval mode on ``device``, and its tokenizer."""
    path = resolve_model_path(name)
    base = adapter_base_model(path)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = load_model(base or path, dtype)
    if base is not None:
        model = PeftModel.from_pretrained(model, path)
    # An exported adapter folder carries the tokenizer it was trained with; a bare adapter uses its base's.
    has_tokenizer = Path(path, "tokenizer_config.json").is_file() or base is None
    tokenizer = load_tokenizer(path if has_tokenizer else base)
    return model.to(device).eval(), tokenizer


class ChatSession:
    """A conversation with a model: the history so far, rendered by the chat template at every turn."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        system: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.system, self.max_new_tokens, self.temperature = system, max_new_tokens, temperature
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    @torch.no_grad()
    def reply(self, text: str, stream: bool = False) -> str:
        """The model's answer to ``text`` after the history (printed token by token when ``stream``)."""
        self.messages.append({"role": "user", "content": text})
        inputs = self.tokenizer.apply_chat_template(
            self.messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(self.model.device)
        sampling = (
            {"do_sample": True, "temperature": self.temperature}
            if self.temperature > 0
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        )
        output = self.model.generate(
            **inputs,
            max_new_tokens=self.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            streamer=TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None,
            **sampling,
        )
        answer = self.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def interact(session: ChatSession) -> None:
    """Read a line, stream the answer, until /exit or end of input."""
    print(f"({HELP})")
    while True:
        try:
            text = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text == "/exit":
            return
        if text == "/reset":
            session.reset()
            print("(history cleared)")
        elif text:
            print("assistant> ", end="", flush=True)
            session.reply(text, stream=True)


def main(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="smolfactory chat", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model folder, adapter folder, Hub id or builtin:...")
    parser.add_argument("--prompt", help="answer this one message and exit (no interactive session)")
    parser.add_argument("--system", help="a system message that starts the conversation")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy decoding")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    options = parser.parse_args(args)
    model, tokenizer = load_chat_model(options.model, options.device)
    session = ChatSession(model, tokenizer, options.system, options.max_new_tokens, options.temperature)
    if options.prompt is not None:
        print(session.reply(options.prompt))
        return
    interact(session)
