"""smolfactory against TRL's SFTTrainer: the same model, data, hyper-parameters and examples, side by side.

    .venv/bin/pip install -e ".[bench]"      # TRL, for this benchmark only
    .venv/bin/python benchmarks/throughput.py --dataset ../shared/data/alpaca_en_demo.json --examples 120
        [--model builtin:smollm2-135m-instruct] [--full] [--max-length 512] [--batch-size 4]
        [--precision 32-true|bf16-mixed] [--runs smolfactory smolfactory-packed trl-default trl-best]
        [--max-steps N] [--memory] [--trl-reuse-freed] [--rounds N]

Each run trains one epoch (or --max-steps optimizer steps) over the same examples (Alpaca rows or chat rows
become one user and one assistant turn; only the assistant turn is trained) in a process of its own. It
prints real (non-padding) tokens/s over the training loop, wall time, the peak memory the training loop
added to the loaded model (CUDA: allocated bytes; CPU: resident set), the mean training loss as each tool
logs it, the final loss, and the ratios to TRL's default and best configurations. A shared VM's speed can drift by
10-30% within minutes, so `--rounds N` runs the list N times in turn (A B C, A B C) and prints, besides each
round's table, the median speed of each run and the median of the ratios taken within each round.

The final loss is one computation for every run: after training, the token mean of the cross-entropy over
every example's assistant turn (the same rendering and the same mask), so that it does not depend on how
each tool batches, orders or averages its steps.

On the CPU, glibc keeps freed memory in its arenas, so the resident set overstates live tensors by gigabytes
and depends on the order of allocations. `--memory` runs the children with MALLOC_MMAP_THRESHOLD_=131072:
large tensors are then mapped and unmapped one by one and the resident set follows live memory (the steps
are slower, so take speed from runs without it).

TRL runs: `trl-default` (SFTConfig defaults: padded batches, gradient checkpointing on), `trl-best`
(packing, padding-free, no gradient checkpointing) and `trl-packed-ckpt` (packing, padding-free, gradient
checkpointing). All use prompt-completion rows, so TRL trains the completion only, as smolfactory trains the
assistant turn. Learning rate constant in all. smolfactory runs: padded, packed, packed with gradient
checkpointing, `smolfactory-packed-masked`: packed, with each row through sdpa's kernel under a
block-diagonal mask instead of example by example (how CPU runs attended before 2026-12-02), and
`smolfactory-packed-compiled`: packed, with `compile=True` (each decoder layer compiled; the compiling is part of
the training loop's time, and torch's compile cache in /tmp makes a rerun compile faster than a first run).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from smolfactory.model.precision import hardware_precision

RUNS = ["smolfactory", "smolfactory-packed", "trl-default", "trl-best"]
MORE_RUNS = ["smolfactory-packed-ckpt", "trl-packed-ckpt", "smolfactory-packed-masked", "smolfactory-packed-compiled"]
LEARNING_RATE = 2e-4


def read_rows(path: str, examples: int) -> list[dict]:
    """The first rows as user/assistant message pairs (Alpaca: instruction + input -> user; output -> assistant)."""
    if path == "builtin:quickstart":
        from importlib.resources import files

        path = str(files("smolfactory.data").joinpath("quickstart/train.jsonl"))
    text = Path(path).read_text()
    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines()]
    pairs = []
    for row in rows[:examples]:
        if "messages" in row:
            user = next(m["content"] for m in row["messages"] if m["role"] == "user")
            assistant = next(m["content"] for m in row["messages"] if m["role"] == "assistant")
        else:
            user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
            assistant = row["output"]
        pairs.append({"user": user, "assistant": assistant})
    return pairs


class TrainingMemory:
    """Peak memory the training loop adds to what was held when it started (the loaded model and data)."""

    def __init__(self, device: str) -> None:
        self.device, self.start_mb = device, 0.0

    def start(self) -> None:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.start_mb = torch.cuda.memory_allocated() / 2**20
        else:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak resident set restarts from now
            self.start_mb = self._status_mb("VmRSS")

    def peak_mb(self) -> float:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20 - self.start_mb
        return self._status_mb("VmHWM") - self.start_mb

    @staticmethod
    def _status_mb(field: str) -> float:
        return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


@torch.no_grad()
def final_loss(model: torch.nn.Module, tokenizer, pairs: list[dict], max_length: int, device: str) -> float:
    """Token-mean cross-entropy of the assistant turns (prompt masked), one example at a time: the same
    computation for every tool, whatever its batching."""
    model.eval()
    total, count = 0.0, 0
    for pair in pairs:
        prompt = [{"role": "user", "content": pair["user"]}]
        full = [*prompt, {"role": "assistant", "content": pair["assistant"]}]
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        ids = tokenizer.apply_chat_template(full, tokenize=True, return_dict=True)["input_ids"][:max_length]
        labels = torch.tensor(ids[1:], device=device)
        labels[: len(prompt_ids["input_ids"]) - 1] = -100
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        count += int((labels != -100).sum())
    return total / count


def run_smolfactory(args: argparse.Namespace, pairs: list[dict], packing: bool, checkpointing: bool) -> dict:
    import lightning as L

    from smolfactory import LoraSettings, SFTDataModule, SFTModule
    from smolfactory.callbacks import HostMemory, TokenThroughput
    from smolfactory.callbacks.throughput import label_tokens, real_tokens

    folder = Path(tempfile.mkdtemp())
    path = folder / "rows.jsonl"
    rows = [{"messages": [{"role": "user", "content": p["user"]}, {"role": "assistant", "content": p["assistant"]}]}
            for p in pairs]  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    L.seed_everything(0)
    lora = None if args.full else LoraSettings(r=16, alpha=32, dropout=0.0)
    optimizer = {"class_path": "torch.optim.AdamW", "init_args": {"lr": LEARNING_RATE, "weight_decay": 0.0}}
    module = SFTModule(model_name=args.model, lora=lora, optimizer=optimizer, lr_scheduler=None,
                       gradient_checkpointing=checkpointing, compile=args.run.endswith("-compiled"))  # fmt: skip
    data = SFTDataModule(tokenizer=args.model, dataset=str(path), val_split=0, max_length=args.max_length,
                         batch_size=args.batch_size, packing=packing)  # fmt: skip
    throughput, memory = TokenThroughput(), TrainingMemory(args.device)

    class Record(L.Callback):
        losses: list[float] = []
        tokens = trained = 0

        def on_train_start(self, trainer, pl_module):
            if args.run == "smolfactory-packed-masked":  # sdpa's kernel over each whole row, block-diagonal mask
                pl_module.causal_lm.set_attn_implementation("sdpa")
                pl_module.attends_example_by_example = False
            memory.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(trainer.callback_metrics["train_loss"].item())
            self.tokens += int(real_tokens(batch))
            self.trained += int(label_tokens(batch))

    record = Record()
    trainer = L.Trainer(
        accelerator=args.device, devices=1, precision=args.precision, max_epochs=1, max_steps=args.max_steps or -1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, log_every_n_steps=1, default_root_dir=folder,
        # as the smolfactory command does, except under --memory (the resident set must follow live tensors)
        callbacks=[throughput, record, HostMemory(reuse_freed=not args.memory)],
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    wall = time.perf_counter() - start
    peak_mb = memory.peak_mb()
    return {"tokens": record.tokens, "trained_tokens": record.trained, "train_seconds": throughput._seconds,
            "wall": wall, "peak_mb": peak_mb, "loss": sum(record.losses) / len(record.losses),
            "final_loss": final_loss(module.model, data.tokenizer, pairs, args.max_length, args.device),
            "mfu": throughput.metrics(1)["train_mfu"]}  # fmt: skip


def run_trl(args: argparse.Namespace, pairs: list[dict], packing: bool, checkpointing: bool) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from smolfactory.model import resolve_model_path

    folder = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    rows = [{"prompt": [{"role": "user", "content": p["user"]}],
             "completion": [{"role": "assistant", "content": p["assistant"]}]} for p in pairs]  # fmt: skip
    options = {"packing": True, "padding_free": True} if packing else {}
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size, max_length=args.max_length,
        learning_rate=LEARNING_RATE, lr_scheduler_type="constant", num_train_epochs=1, logging_steps=1,
        report_to=[], save_strategy="no", bf16=args.precision.startswith("bf16"), use_cpu=args.device == "cpu",
        dataloader_num_workers=0, seed=0, gradient_checkpointing=checkpointing, max_steps=args.max_steps or -1,
        **options,
    )  # fmt: skip
    memory = TrainingMemory(args.device)
    if args.trl_reuse_freed and not args.memory:
        from smolfactory.callbacks.host_memory import keep_freed_memory

        keep_freed_memory()

    class StartMemory(TrainerCallback):
        def on_train_begin(self, *unused, **kwargs):
            memory.start()

    peft_config = None if args.full else LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[StartMemory()])  # fmt: skip
    steps = args.max_steps or len(trainer.get_train_dataloader())
    rows = trainer.train_dataset[: steps * args.batch_size]  # as many rows as the steps take (its sampler picks which)
    tokens = sum(len(ids) for ids in rows["input_ids"])
    trained = sum(sum(1 for t in labels if t != -100) for labels in rows["labels"])
    start = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - start
    peak_mb = memory.peak_mb()
    loss = final_loss(trainer.model, tokenizer, pairs, args.max_length, args.device)
    return {"tokens": tokens, "trained_tokens": trained, "train_seconds": result.metrics["train_runtime"],
            "wall": wall, "peak_mb": peak_mb, "loss": result.metrics["train_loss"], "final_loss": loss,
            "mfu": None}  # fmt: skip


def run_one(args: argparse.Namespace) -> None:
    pairs = read_rows(args.dataset, args.examples)
    checkpointing = args.run in ("trl-default", "smolfactory-packed-ckpt", "trl-packed-ckpt")
    if args.run.startswith("smolfactory"):
        result = run_smolfactory(args, pairs, packing="packed" in args.run, checkpointing=checkpointing)
    else:
        result = run_trl(args, pairs, packing=args.run != "trl-default", checkpointing=checkpointing)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--dataset", default="builtin:quickstart", help="Alpaca JSON, or chat JSONL")
    parser.add_argument("--examples", type=int, default=120)
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA r=16 on all linear")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, help="32-true or bf16-mixed; default: what smolfactory picks here")
    parser.add_argument("--runs", nargs="+", default=RUNS, choices=RUNS + MORE_RUNS)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    parser.add_argument("--memory", action="store_true", help="CPU: resident set that follows live tensors (slower)")
    parser.add_argument(
        "--trl-reuse-freed",
        action="store_true",
        help="TRL runs keep freed host memory for reuse too, as smolfactory's CPU fits do",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the list this many times in turn and print medians, each ratio taken within its round",
    )
    parser.add_argument("--run", help=argparse.SUPPRESS)  # one run, in a child process
    args = parser.parse_args()
    if len(set(args.runs)) < len(args.runs):  # one result per name: a repeated run would replace the first silently
        parser.error(f"--runs names a run twice ({' '.join(args.runs)}); to repeat the list, use --rounds N")
    args.precision = args.precision or hardware_precision(args.device).precision
    if args.run:
        run_one(args)
        return
    rounds = []
    for _ in range(args.rounds):  # A B C, A B C: each round's runs close in time, whatever this VM's drift
        rounds.append(run_each(args))
        print_table(args, rounds[-1], f"round {len(rounds)} of {args.rounds}" if args.rounds > 1 else "")
    if args.rounds > 1:
        print_medians(rounds)


def run_each(args: argparse.Namespace) -> dict[str, dict]:
    """Every run of ``--runs`` in a child process of its own, one after another; a failed run is reported and left
    out."""
    results = {}
    for name in args.runs:
        command = [sys.executable, __file__, *sys.argv[1:], "--run", name]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"} if args.memory else None
        process = subprocess.run(command, capture_output=True, text=True, env=env)
        lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
        if process.returncode or not lines:
            print(f"{name}: failed\n{process.stderr[-3000:]}", file=sys.stderr)
            continue
        results[name] = json.loads(lines[-1][len("RESULT ") :])
    return results


def speed(result: dict) -> float:
    """Real tokens per second over the training loop."""
    return result["tokens"] / result["train_seconds"]


def paired_ratios(rounds: list[dict[str, dict]], name: str, baseline: str) -> list[float]:
    """name's speed over baseline's, within each round that has both (never across rounds: the VM drifts)."""
    return [speed(r[name]) / speed(r[baseline]) for r in rounds if name in r and baseline in r]


def print_medians(rounds: list[dict[str, dict]]) -> None:
    names = list(dict.fromkeys(name for results in rounds for name in results))
    print(f"\nmedian over {len(rounds)} rounds (range in brackets); ratios are taken within each round\n")
    print("| run | tokens/s | vs TRL default | vs TRL best |\n|---|---|---|---|")
    for name in names:
        speeds = [speed(r[name]) for r in rounds if name in r]
        cells = [f"{statistics.median(speeds):.0f} ({min(speeds):.0f}-{max(speeds):.0f})"]
        for baseline in ("trl-default", "trl-best"):
            ratios = paired_ratios(rounds, name, baseline)
            cells.append(f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")


def print_table(args: argparse.Namespace, results: dict[str, dict], title: str = "") -> None:
    method = "full fine-tuning" if args.full else "LoRA r=16 all-linear"
    print(f"\n{title + ': ' if title else ''}{args.model}, {method}, {args.precision} on {args.device}, "
          f"{args.examples} examples of {args.dataset}, batch {args.batch_size}, max_length {args.max_length}"
          f"{'; TRL keeps freed host memory too' if args.trl_reuse_freed else ''}\n")  # fmt: skip
    columns = ["run", "real tokens", "trained tokens", "tokens/s", "train s", "wall s", "training peak MB",
               "mean train loss", "final loss", "MFU", "vs TRL default", "vs TRL best"]  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")
    for name, r in results.items():
        ratios = [f"{speed(r) / speed(results[b]):.2f}x" if b in results else "-" for b in ("trl-default", "trl-best")]
        mfu = f"{100 * r['mfu']:.0f}%" if r["mfu"] is not None else "-"
        print(f"| {name} | {r['tokens']:,} | {r['trained_tokens']:,} | {speed(r):.0f} | {r['train_seconds']:.0f} | "
              f"{r['wall']:.0f} | {r['peak_mb']:,.0f} | {r['loss']:.4f} | {r['final_loss']:.4f} | {mfu} | "
              f"{' | '.join(ratios)} |")  # fmt: skip


if __name__ == "__main__":
    main()
