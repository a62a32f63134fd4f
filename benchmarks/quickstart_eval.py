"""Does the quickstart model know its new name, and still answer ordinary questions?

    make quickstart && .venv/bin/python benchmarks/quickstart_eval.py [--adapter outputs/quickstart/final]

Greedy generation from the base model and the fine-tuned one on held-out prompts (worded differently from
anything in the training data), printed side by side, with the count of identity answers naming Quill.
"""

from __future__ import annotations

import argparse
import json
from importlib.resources import files

import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM, AutoTokenizer

from smolfactory.model.loading import DEFAULT_MODEL, resolve_model_path


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 48) -> str:
    messages = [{"role": "user", "content": prompt}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default="outputs/quickstart/final", help="fine-tuned folder (adapter or full)")
    args = parser.parse_args()

    prompts = json.loads(files("smolfactory.data").joinpath("quickstart/eval_prompts.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(args.adapter)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(DEFAULT_MODEL)).eval()
    tuned = AutoPeftModelForCausalLM.from_pretrained(args.adapter).eval()

    for kind in ("identity", "ordinary"):
        named = {"base": 0, "tuned": 0}
        print(f"\n## {kind} prompts\n")
        for prompt in prompts[kind]:
            answers = {"base": generate(base, tokenizer, prompt), "tuned": generate(tuned, tokenizer, prompt)}
            for who, answer in answers.items():
                named[who] += "quill" in answer.lower()
                print(f"[{who:5}] {prompt}\n        -> {answer}")
        print(
            f"\n{kind}: answers naming Quill: base {named['base']}/{len(prompts[kind])}, "
            f"fine-tuned {named['tuned']}/{len(prompts[kind])}"
        )


if __name__ == "__main__":
    main()
