"""Score the held-out prompts of the GRPO quickstart before and after training, with its own reward function.

    python benchmarks/grpo_quickstart_eval.py [ADAPTER ...]      (default: outputs/grpo_quickstart/final)

For the built-in model and each adapter: the mean reward (exact_answer, last number) of the greedy answer to each
of the 64 held-out prompts (never trained on), and of 8 sampled answers per prompt (temperature 1, as in
training), each with a 95% Wilson interval.
"""

from __future__ import annotations

import json
import math
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
        rewards = exact_answer(
            prompts, answers(model, tokenizer, prompts, sample), [r for r in references for _ in range(repeats)]
        )
        mean = sum(rewards) / len(rewards)
        result[name] = (mean, *wilson(sum(rewards), len(rewards)))
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
    print(f"{len(rows)} held-out prompts; reward = exact_answer (last number); 95% Wilson intervals")
    print(f"{'model':<40} {'greedy (64)':>24} {'sampled (8 x 64, T=1)':>26}")
    for name, load in models.items():
        result = score(load(), tokenizer, rows)
        cells = [f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in result.values()]
        print(f"{name:<40} {cells[0]:>24} {cells[1]:>26}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["outputs/grpo_quickstart/final"])
