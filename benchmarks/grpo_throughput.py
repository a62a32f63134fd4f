"""GRPO speed and memory: smolfactory's GRPOModule against TRL's GRPOTrainer (use_vllm=False), same model and work.

    python benchmarks/grpo_throughput.py [--model builtin:smollm2-135m-instruct] [--steps 10] [--prompts 2]
        [--num-generations 8] [--max-completion-length 16] [--device cpu|cuda]

Each run trains a fresh LoRA adapter (r=16, alpha 32, all linear layers) with GRPO (loss_type dapo, beta 0, one
update per rollout, constant learning rate 5e-5) on the prompts of the built-in GRPO quickstart (rendered with
the model's chat template up to the generation prompt), rewarded by ``smolfactory.rewards.exact_answer``. A step
samples ``--num-generations`` completions (temperature 1, at most ``--max-completion-length`` tokens) of each of
``--prompts`` prompts, scores them and takes one optimizer step on them. Weights are float32 (``--device cuda``:
bf16 autocast on float32 weights on both sides). Runs are timed from the end of their first step (which pays for
warm-up) to the end of the last; TRL runs twice, with its defaults (gradient checkpointing on) and without
checkpointing, as smolfactory trains. Every run is its own subprocess (``--only NAME``), so that peak memory is
its own. Reported per run:

- s/step, and step throughput relative to TRL's defaults (the goal: at least 1.5x);
- generation tokens/s: completion tokens sampled (up to and including the first end token) per second spent in
  generation (smolfactory's ``generate_completions``, TRL's ``_generate_single_turn``);
- training tokens/s: real tokens (prompt + completion) of the trained sequences per second of the rest of the
  step (scoring, loss forward and backward, optimizer);
- peak memory above the loaded model: on CPU the process's peak RSS (VmHWM, reset at the start of training)
  minus its RSS then (after reading every weight in: the checkpoint's are memory-mapped); on CUDA
  ``torch.cuda.max_memory_allocated`` minus the memory allocated then (the goal: 30% less than TRL's defaults).
  The absolute peak is shown too;
- the mean train reward over the timed steps and the prompt tokens per step: sanity checks that both sides did
  the same kind of work and learn alike, not claims (prompts are shuffled differently).

``--runs`` picks some of the runs (smolfactory, trl, trl-no-checkpointing). Each run prints its step times to
stderr as it goes. Run it on an otherwise idle machine: another process on the same cores makes torch's threads
wait on each other and step times vary tenfold. With the defaults the whole benchmark should take about 10
minutes on 2 idle CPU cores (three runs of ~30 s start-up and 10 steps of ~10-20 s each). Needs TRL
(``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from smolfactory.data.sources import builtin_split_path
from smolfactory.model.loading import resolve_model_path

LEARNING_RATE = 5e-5
RESULT_PREFIX = "GRPO_THROUGHPUT_RESULT "
RUNS = {
    "smolfactory": "smolfactory",
    "trl": "trl (defaults: checkpointing)",
    "trl-no-checkpointing": "trl (no checkpointing)",
}
BASELINE = "trl"


class Meter:
    """Per-step generation time and token counts, step end times, rewards and memory of one run."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.step_ends: list[float] = []
        self.generation: list[tuple[float, int, int]] = []  # per step: (seconds, completion tokens, prompt tokens)
        self.rewards: list[float] = []  # mean reward of each step's completions
        self.memory_at_start = self.peak_memory = 0
        self.started = time.perf_counter()

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def timed_generation(self, generate, count):
        """``generate`` timed; ``count(arguments, result)`` gives (completion tokens, prompt tokens)."""

        @functools.wraps(generate)
        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            result = generate(*args, **kwargs)
            self.sync()
            self.generation.append((time.perf_counter() - start, *count(args, kwargs, result)))
            return result

        return timed

    def record_reward(self, values) -> None:
        values = [float(value) for value in values if value is not None and not math.isnan(float(value))]
        self.rewards.append(sum(values) / max(len(values), 1))

    def step_end(self) -> None:
        self.sync()
        self.step_ends.append(time.perf_counter())
        seconds = self.step_ends[-1] - (self.step_ends[-2] if len(self.step_ends) > 1 else self.started)
        generation = self.generation[-1][0] if len(self.generation) == len(self.step_ends) else math.nan
        message = f"step {len(self.step_ends)}: {seconds:.1f} s ({generation:.1f} s generating)"
        print(message, file=sys.stderr, flush=True)

    def train_start(self, model: torch.nn.Module) -> None:
        """Memory once the model (with its adapter) is loaded; the peak is measured from here."""
        self.started = time.perf_counter()
        with torch.no_grad():  # weights memory-mapped from the checkpoint count in the RSS once read: read them now
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.sum()
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.memory_at_start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.memory_at_start = proc_status_kib("VmRSS") * 1024
            try:  # resets the peak RSS (VmHWM) to the current RSS (Linux)
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass

    def train_end(self) -> None:
        if self.device == "cuda":
            self.peak_memory = torch.cuda.max_memory_allocated()
        else:
            peak = proc_status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.peak_memory = peak * 1024

    def result(self) -> dict:
        steps = len(self.step_ends)
        if steps < 2 or len(self.generation) != steps:
            raise RuntimeError(f"expected one generation per step, got {len(self.generation)} in {steps} steps")
        timed = self.generation[1:]  # the steps after the first, as the clock
        seconds = self.step_ends[-1] - self.step_ends[0]
        generation_seconds = sum(entry[0] for entry in timed)
        completion_tokens = sum(entry[1] for entry in timed)
        prompt_tokens = sum(entry[2] for entry in timed)
        return {
            "steps": steps,
            "seconds_per_step": seconds / (steps - 1),
            "generation_seconds_per_step": generation_seconds / (steps - 1),
            "generation_tokens_per_second": completion_tokens / generation_seconds,
            "training_tokens_per_second": (completion_tokens + prompt_tokens) / (seconds - generation_seconds),
            "completion_tokens_per_step": completion_tokens / (steps - 1),
            "prompt_tokens_per_step": prompt_tokens / (steps - 1),
            "memory_at_start_mib": self.memory_at_start / 2**20,
            "peak_memory_mib": self.peak_memory / 2**20,
            "peak_above_start_mib": (self.peak_memory - self.memory_at_start) / 2**20,
            "reward": sum(self.rewards[1:]) / len(self.rewards[1:]),
            "last_reward": self.rewards[-1],
        }


def proc_status_kib(field: str) -> int:
    """A memory field of /proc/self/status in KiB (0 where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def completion_tokens(completions: torch.Tensor, end_token_ids: list[int]) -> int:
    """Tokens of right-padded completions up to and including their first end token (all where none)."""
    is_end = torch.isin(completions, torch.tensor(end_token_ids, device=completions.device))
    ended = is_end.any(dim=1)
    lengths = torch.where(ended, is_end.int().argmax(dim=1) + 1, completions.shape[1])
    return int(lengths.sum())


def smolfactory_run(args: argparse.Namespace, data: str) -> dict:
    import lightning as L

    from smolfactory import GRPOModule, LoraSettings, PromptDataModule, SamplingSettings
    from smolfactory.model.policy_losses import GRPOLoss
    from smolfactory.rewards import Reward

    meter = Meter(args.device)

    class Clock(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            meter.train_start(pl_module)

        def on_train_batch_end(self, trainer, *rest) -> None:
            meter.step_end()

        def on_train_end(self, trainer, pl_module) -> None:
            meter.train_end()

    optimizer = {"class_path": "torch.optim.AdamW", "init_args": {"lr": LEARNING_RATE, "weight_decay": 0.0}}
    module = GRPOModule(
        rewards=[Reward("smolfactory.rewards.exact_answer")],
        loss=GRPOLoss(loss_type="dapo", beta=0.0),
        sampling=SamplingSettings(
            num_generations=args.num_generations, max_completion_length=args.max_completion_length, temperature=1.0
        ),
        num_iterations=1,
        lora=LoraSettings(r=16, alpha=32),
        optimizer=optimizer,
        lr_scheduler=None,
        model_name=args.model,
    )

    def count(call_args, call_kwargs, completions):
        batch = call_args[0] if call_args else call_kwargs["batch"]
        prompt_tokens = int(batch["attention_mask"].sum()) * args.num_generations
        return completion_tokens(completions, module.end_token_ids), prompt_tokens

    module.generate_completions = meter.timed_generation(module.generate_completions, count)
    score = module.score

    def recorded_score(*score_args, **score_kwargs):
        rewards = score(*score_args, **score_kwargs)
        meter.record_reward(rewards.float().nanmean(dim=1).tolist())
        return rewards

    module.score = recorded_score
    datamodule = PromptDataModule(dataset=data, tokenizer=args.model, val_split=0, batch_size=args.prompts)
    trainer = L.Trainer(
        max_steps=args.steps, accelerator="gpu" if args.device == "cuda" else "cpu", devices=1,
        precision="bf16-mixed" if args.device == "cuda" else "32-true", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[Clock()],
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    return meter.result()


def trl_run(args: argparse.Namespace, data: str, checkpointing: bool) -> dict:
    import datasets
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from smolfactory.rewards import Reward

    meter = Meter(args.device)

    class Clock(TrainerCallback):
        def on_train_begin(self, *rest, model, **kwargs) -> None:
            meter.train_start(model)

        def on_step_end(self, *rest, **kwargs) -> None:
            meter.step_end()

        def on_train_end(self, *rest, **kwargs) -> None:
            meter.train_end()

    exact_answer = Reward("smolfactory.rewards.exact_answer").load()

    @functools.wraps(exact_answer)
    def reward(*reward_args, **reward_kwargs):
        values = exact_answer(*reward_args, **reward_kwargs)
        meter.record_reward(values)
        return values

    rows = [json.loads(line) for line in Path(data).read_text().splitlines() if line.strip()]
    dataset = datasets.Dataset.from_list(
        [{"prompt": [{"role": "user", "content": row["prompt"]}], "answer": row["answer"]} for row in rows]
    )
    path = str(resolve_model_path(args.model))
    config = GRPOConfig(
        output_dir="/tmp/grpo_throughput_trl", max_steps=args.steps,
        per_device_train_batch_size=args.prompts * args.num_generations, num_generations=args.num_generations,
        max_completion_length=args.max_completion_length, temperature=1.0, learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant", loss_type="dapo", beta=0.0, num_iterations=1, use_vllm=False,
        model_init_kwargs={"dtype": "float32"}, bf16=args.device == "cuda", use_cpu=args.device == "cpu",
        gradient_checkpointing=checkpointing, report_to=[], save_strategy="no", logging_steps=1,
        disable_tqdm=True,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=path,
        reward_funcs=[reward],
        args=config,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(path),
        peft_config=LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
        callbacks=[Clock()],
    )

    def count(call_args, call_kwargs, result):
        prompt_ids = call_args[0] if call_args else call_kwargs["prompt_ids"]
        completion_ids = result[0]  # lists, already cut after the first end token
        return sum(len(ids) for ids in completion_ids), sum(len(ids) for ids in prompt_ids)

    trainer._generate_single_turn = meter.timed_generation(trainer._generate_single_turn, count)
    trainer.train()
    return meter.result()


def run_one(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    data = str(builtin_split_path("quickstart-grpo", "train"))
    if args.only == "smolfactory":
        return smolfactory_run(args, data)
    return trl_run(args, data, checkpointing=args.only == "trl")


def run_subprocess(name: str, argv: list[str]) -> dict:
    """One run in a fresh Python process (its own peak memory); its output goes to stderr."""
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--only", name]
    print(f"running {RUNS[name]}: {' '.join(command)}", file=sys.stderr, flush=True)
    process = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    lines = process.stdout.splitlines()
    results = [line[len(RESULT_PREFIX) :] for line in lines if line.startswith(RESULT_PREFIX)]
    print("\n".join(line for line in lines if not line.startswith(RESULT_PREFIX)), file=sys.stderr, flush=True)
    if process.returncode != 0 or not results:
        raise SystemExit(f"{RUNS[name]} failed (exit status {process.returncode})")
    return json.loads(results[-1])


def print_table(args: argparse.Namespace, results: dict[str, dict]) -> None:
    baseline = results.get(BASELINE)
    memory = "GPU memory allocated" if args.device == "cuda" else "RSS"
    print(
        f"\nGRPO (dapo, beta 0), LoRA r=16, {args.prompts} prompts x {args.num_generations} completions of at most "
        f"{args.max_completion_length} tokens per step, {'bf16 autocast' if args.device == 'cuda' else 'float32'} "
        f"on {args.device}, {args.steps} steps (first one not timed)"
    )
    print(
        f"| run | s/step | step throughput vs TRL defaults | generation s/step | generation tokens/s | "
        f"training tokens/s | peak {memory} above the loaded model (MiB) | vs TRL defaults | peak {memory} (MiB) | "
        "prompt / completion tokens per step | mean train reward |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for name, result in results.items():
        speed = f"{baseline['seconds_per_step'] / result['seconds_per_step']:.2f}x" if baseline else "-"
        memory_ratio = f"{result['peak_above_start_mib'] / baseline['peak_above_start_mib']:.2f}x" if baseline else "-"
        print(
            f"| {RUNS[name]} | {result['seconds_per_step']:.2f} | {speed} | "
            f"{result['generation_seconds_per_step']:.2f} | {result['generation_tokens_per_second']:.1f} | "
            f"{result['training_tokens_per_second']:.1f} | {result['peak_above_start_mib']:.0f} | {memory_ratio} | "
            f"{result['peak_memory_mib']:.0f} | {result['prompt_tokens_per_step']:.0f} / "
            f"{result['completion_tokens_per_step']:.0f} | {result['reward']:.3f} |"
        )
    if baseline and "smolfactory" in results:
        ours = results["smolfactory"]
        speedup = baseline["seconds_per_step"] / ours["seconds_per_step"]
        saving = 1 - ours["peak_above_start_mib"] / baseline["peak_above_start_mib"]
        print(
            f"\nsmolfactory vs TRL defaults: {speedup:.2f}x step throughput (goal >= 1.5x), "
            f"{abs(saving):.0%} {'less' if saving >= 0 else 'more'} peak memory above the loaded model "
            "(goal: >= 30% less)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step")
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--max-completion-length", type=int, default=16)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--only", choices=list(RUNS), help="run this configuration in this process and print its result as JSON"
    )
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS), help="configurations to run")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is not timed)")
    if args.only:
        print(RESULT_PREFIX + json.dumps(run_one(args)), flush=True)
        return
    argv = [
        "--model", args.model, "--steps", str(args.steps), "--prompts", str(args.prompts),
        "--num-generations", str(args.num_generations), "--max-completion-length", str(args.max_completion_length),
        "--device", args.device,
    ]  # fmt: skip
    results = {name: run_subprocess(name, argv) for name in args.runs}
    print_table(args, results)


if __name__ == "__main__":
    main()
