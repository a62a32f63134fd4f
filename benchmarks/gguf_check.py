"""Does the exported GGUF run in a real client, and answer as the model it came from?

    make quickstart && .venv/bin/python benchmarks/gguf_check.py [--model outputs/quickstart/final] [--install]

1. Exports the model (an adapter folder is merged first) with `smolfactory export --gguf` at f32 and q8_0.
2. Answers the quickstart's held-out prompts greedily with `smolfactory chat` (transformers, fp32): the reference.
3. Answers them again with llama.cpp (llama-cpp-python) from each GGUF, through the chat template and end-of-turn
   token stored in the file, and with transformers loading the q8_0 file (``gguf_file=``).
4. Prints every answer side by side, then per client: answers equal to the reference, and identity and ordinary
   answers naming Quill.

--install builds llama-cpp-python from PyPI into this venv first (pip caches the wheel, so only the first build
is slow: about 25 minutes on 2 cores). Without it, and without llama_cpp installed, the llama.cpp columns are
skipped with a note. --check exits 1 unless llama.cpp from the f32 file gives the reference's answers to the five
ordinary prompts and the q8_0 file still names Quill in at least 80% of identity answers in both clients.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from importlib.resources import files
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from smolfactory.chat import ChatSession, load_chat_model

LLAMA_CPP = "llama-cpp-python==0.3.36"
MAX_NEW_TOKENS = 48


def export(model: str, file_type: str, folder: Path) -> Path:
    """The user's command: `smolfactory export --model MODEL --gguf TYPE --output FILE`."""
    path = folder / f"model-{file_type}.gguf"
    command = [sys.executable, "-m", "smolfactory.cli", "export", "--model", model, "--gguf", file_type]
    subprocess.run([*command, "--output", str(path)], check=True)
    return path


def chat_answers(model: str, prompts: list[str]) -> list[str]:
    """`smolfactory chat --prompt P` for each prompt: transformers, fp32, greedy."""
    loaded, tokenizer = load_chat_model(model, "cpu")
    answers = []
    for prompt in prompts:
        answers.append(ChatSession(loaded, tokenizer, max_new_tokens=MAX_NEW_TOKENS).reply(prompt))
    return answers


def transformers_gguf_answers(path: Path, prompts: list[str]) -> list[str]:
    """transformers' own GGUF reader (it dequantizes q8_0 to fp32), through the file's tokenizer and template."""
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    return [ChatSession(model, tokenizer, max_new_tokens=MAX_NEW_TOKENS).reply(prompt) for prompt in prompts]


def llama_cpp_answers(path: Path, prompts: list[str]) -> list[str]:
    """llama.cpp: the chat template, stop tokens and weights all come from the file alone."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=1024, n_threads=2, seed=0, verbose=False)
    answers = []
    for prompt in prompts:
        reply = llm.create_chat_completion(
            messages=[{"role": "user", "content": prompt}], temperature=0.0, top_k=1, max_tokens=MAX_NEW_TOKENS
        )
        answers.append(reply["choices"][0]["message"]["content"].strip())
    return answers


def install_llama_cpp() -> None:
    print(f"Building {LLAMA_CPP} (first time only: pip caches the wheel)...", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", LLAMA_CPP], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="outputs/quickstart/final", help="model or adapter folder, or builtin:...")
    parser.add_argument("--install", action="store_true", help=f"pip install {LLAMA_CPP} (a source build) first")
    parser.add_argument("--check", action="store_true", help="exit 1 unless the targets above are met")
    args = parser.parse_args()
    if args.install:
        install_llama_cpp()
    has_llama_cpp = importlib.util.find_spec("llama_cpp") is not None

    prompts = json.loads(files("smolfactory.data").joinpath("quickstart/eval_prompts.json").read_text())
    identity, ordinary = prompts["identity"], prompts["ordinary"]
    everything = identity + ordinary
    with tempfile.TemporaryDirectory(prefix="gguf-check-") as scratch:
        paths = {}
        for file_type in ("f32", "q8_0"):
            started = time.perf_counter()
            paths[file_type] = export(args.model, file_type, Path(scratch))
            size = paths[file_type].stat().st_size / 2**20
            print(f"exported {file_type}: {size:.0f} MiB in {time.perf_counter() - started:.1f} s")
        columns = {"smolfactory chat": chat_answers(args.model, everything)}
        columns["transformers q8_0"] = transformers_gguf_answers(paths["q8_0"], everything)
        if has_llama_cpp:
            columns["llama.cpp f32"] = llama_cpp_answers(paths["f32"], everything)
            columns["llama.cpp q8_0"] = llama_cpp_answers(paths["q8_0"], everything)
        else:
            print(f"llama_cpp is not installed: llama.cpp columns skipped (rerun with --install to build {LLAMA_CPP})")

    for index, prompt in enumerate(everything):
        print(f"\n{prompt}")
        for client, answers in columns.items():
            print(f"  [{client:17}] {answers[index]}")
    reference = columns["smolfactory chat"]
    print("\n| client | equal to smolfactory chat | identity answers naming Quill | ordinary answers naming Quill |")
    print("|---|---|---|---|")
    summary = {}
    for client, answers in columns.items():
        equal = sum(a == b for a, b in zip(answers, reference, strict=True))
        quill = sum("quill" in answer.lower() for answer in answers[: len(identity)])
        stray = sum("quill" in answer.lower() for answer in answers[len(identity) :])
        summary[client] = (answers, quill)
        print(f"| {client} | {equal}/{len(everything)} | {quill}/{len(identity)} | {stray}/{len(ordinary)} |")

    if args.check:
        targets = {"llama_cpp is not installed": has_llama_cpp}
        if has_llama_cpp:
            ordinary_f32 = summary["llama.cpp f32"][0][len(identity) :]
            same = ordinary_f32 == reference[len(identity) :]
            targets["llama.cpp (f32) answers an ordinary prompt differently"] = same
            targets["llama.cpp (q8_0) names Quill in under 80% of identity answers"] = summary["llama.cpp q8_0"][
                1
            ] >= 0.8 * len(identity)
        targets["transformers (q8_0) names Quill in under 80% of identity answers"] = summary["transformers q8_0"][
            1
        ] >= 0.8 * len(identity)
        failures = [problem for problem, met in targets.items() if not met]
        print("\ncheck:", "passed" if not failures else "FAILED: " + "; ".join(failures))
        raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
