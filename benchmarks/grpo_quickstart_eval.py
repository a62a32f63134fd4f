"""Score the held-out prompts of the GRPO quickstart before and after training, with its own reward function.

    python benchmarks/grpo_quickstart_eval.py [ADAPTER ...]      (default: outputs/grpo_quickstart/final)

For the built-in model and each adapter: the mean reward (the recipe's exact_answer, first number) of the greedy
answer to each of the 64 held-out prompts (never trained on), and of 8 sampled answers per prompt (temperature 1,
as in training), each with a 95% Wilson interval; and, as a check that the reward is not gamed, how many greedy
answers name the larger number and never the smaller one.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from smolfactory.model.loading import DEFAULT_MODEL, resolve_model_path
from smolfactory.rewards import exact_answer

PROMPTS = Path(__file__).parents[1] / "smolfactory/data/quickstart/grpo_validation.jsonl"
SAMPLES, NEW_TOKENS = 8, 16


def wilson(successes: float, total: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion."""
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return centre - half, centre + half


def answers(model, tokenizer, prompts: list[str], sample: bool) -> list[str]:
    """Greedy answers (one per prompt) or SAMPLES sampled ones per prompt, in prompt order."""
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    repeats = SAMPLES if sample else 1
    batch = {key: value.repeat_interleave(repeats, 0) for key, value in batch.items()}
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(
            **batch,
            do_sample=sample,
            temperature=1.0 if sample else None,
            top_p=None,
            top_k=0 if sample else None,
            max_new_tokens=NEW_TOKENS,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def score(model, tokenizer, rows: list[dict]) -> dict[str, tuple[float, float, float]]:
    prompts, references = [row["prompt"] for row in rows], [row["answer"] for row in rows]
    result = {}
    for name, sample in (("greedy", False), ("sampled", True)):
        repeats = SAMPLES if sample else 1
        texts = answers(model, tokenizer, prompts, sample)
        expected = [r for r in references for _ in range(repeats)]
        rewards = exact_answer(prompts, texts, expected, extract="first_number")
        mean = sum(rewards) / len(rewards)
        result[name] = (mean, *wilson(sum(rewards), len(rewards)))
        if not sample:
            smaller = [str(min(map(int, re.findall(r"\d+", p)))) for p in prompts]
            clean = [
                r in re.findall(r"\d+", t) and s not in re.findall(r"\d+", t)
                for t, r, s in zip(texts, references, smaller, strict=True)
            ]
            result["greedy, larger named, smaller not"] = (sum(clean) / len(clean), *wilson(sum(clean), len(clean)))
    return result


def main(adapters: list[str]) -> None:
    torch.set_num_threads(2)
    base_path = resolve_model_path(DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines()]
    models = {"built-in (before)": lambda: AutoModelForCausalLM.from_pretrained(base_path).eval()}
    for adapter in adapters:
        models[adapter] = lambda a=adapter: PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base_path), a
        ).eval()
    print(f"{len(rows)} held-out prompts; reward = exact_answer (first number); 95% Wilson intervals")
    print("| model | greedy reward (64) | greedy: larger named, smaller not | sampled reward (8 x 64, T=1) |")
    print("|---|---|---|---|")
    for name, load in models.items():
        result = score(load(), tokenizer, rows)
        greedy, clean, sampled = (f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in result.values())
        print(f"| {name} | {greedy} | {clean} | {sampled} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["outputs/grpo_quickstart/final"])
