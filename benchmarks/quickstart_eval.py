"""Does the quickstart model know its new name, and still answer ordinary questions?

    make quickstart && .venv/bin/python benchmarks/quickstart_eval.py [--adapter outputs/quickstart/final] [--check]

Greedy generation from the base model and the fine-tuned one on held-out prompts (worded differently from
anything in the training data), printed side by side, with the count of identity answers naming Quill.
--check exits 1 unless the fine-tuned model names Quill in at least 80% of identity answers, the base
model in none, no ordinary answer names Quill, and both models put Paris in the answer about France.
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
    parser.add_argument("--check", action="store_true", help="exit 1 unless the targets above are met")
    args = parser.parse_args()

    prompts = json.loads(files("smolfactory.data").joinpath("quickstart/eval_prompts.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(args.adapter)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(DEFAULT_MODEL)).eval()
    tuned = AutoPeftModelForCausalLM.from_pretrained(args.adapter).eval()

    named, france = {}, {}
    for kind in ("identity", "ordinary"):
        named[kind] = {"base": 0, "tuned": 0}
        print(f"\n## {kind} prompts\n")
        for prompt in prompts[kind]:
            answers = {"base": generate(base, tokenizer, prompt), "tuned": generate(tuned, tokenizer, prompt)}
            for who, answer in answers.items():
                named[kind][who] += "quill" in answer.lower()
                print(f"[{who:5}] {prompt}\n        -> {answer}")
            if "France" in prompt:
                france = answers
        print(
            f"\n{kind}: answers naming Quill: base {named[kind]['base']}/{len(prompts[kind])}, "
            f"fine-tuned {named[kind]['tuned']}/{len(prompts[kind])}"
        )
    if args.check:
        targets = {
            "the fine-tuned model names Quill in under 80% of identity answers": named["identity"]["tuned"]
            >= 0.8 * len(prompts["identity"]),
            "the base model already names Quill": named["identity"]["base"] == 0,
            "the fine-tuned model names Quill in an ordinary answer": named["ordinary"]["tuned"] == 0,
            "an answer about France lacks Paris": all("Paris" in answer for answer in france.values()),
        }
        failures = [problem for problem, met in targets.items() if not met]
        print("\ncheck:", "passed" if not failures else "FAILED: " + "; ".join(failures))
        raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
