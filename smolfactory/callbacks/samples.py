"""GenerationSamples: answers to a few fixed prompts at every validation, to watch the model change; for a recipe
that samples its own completions (GRPO), those completions with their rewards."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from smolfactory.chat import ChatSession


class GenerationSamples(L.Callback):
    def __init__(self, prompts: list[str] | None = None, max_new_tokens: int = 48) -> None:
        """Greedy answers to fixed prompts after each validation: printed, appended to generations.jsonl in the
        logger's folder, and sent to TensorBoard (text) or W&B (a table) when those log the run.

        Args:
            prompts: User messages, each answered on its own (no history); none or empty: nothing is generated.
            max_new_tokens: Longest answer.
        """
        self.prompts = list(prompts or [])
        self.max_new_tokens = max_new_tokens
        self._written: list | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        """GRPO: every completion of the step with its reward and advantage, appended to completions.jsonl."""
        samples = getattr(pl_module, "latest_samples", None)
        if samples and trainer.is_global_zero and samples is not self._written:  # a reused rollout: written already
            self._written = samples
            path = Path(trainer.log_dir or trainer.default_root_dir) / "completions.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as file:
                file.writelines(
                    json.dumps({"step": trainer.global_step} | row, ensure_ascii=False) + "\n" for row in samples
                )

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        samples = getattr(pl_module, "latest_samples", None)
        if samples and trainer.is_global_zero:  # GRPO: the last held-out prompt's completions, scored
            rank_zero_info(
                "\n".join(
                    [f"Completions of a held-out prompt at step {trainer.global_step}: {samples[0]['prompt']}"]
                    + [f"  reward {row['reward']:.3g}: {row['completion']!r}" for row in samples]
                )
            )
        if not self.prompts:
            return
        # Every rank generates (sharded weights are gathered by collective calls); rank 0 reports.
        session = ChatSession(pl_module.model, trainer.datamodule.tokenizer, max_new_tokens=self.max_new_tokens)
        rows = []
        for prompt in self.prompts:
            session.reset()
            rows.append({"step": trainer.global_step, "prompt": prompt, "answer": session.reply(prompt)})
        if trainer.is_global_zero:
            self._report(trainer, rows)

    def _report(self, trainer: L.Trainer, rows: list[dict]) -> None:
        step = trainer.global_step
        rank_zero_info(
            "\n".join([f"Generations at step {step}:"] + [f"  {r['prompt']} -> {r['answer']}" for r in rows])
        )
        path = Path(trainer.log_dir or trainer.default_root_dir) / "generations.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as file:  # one line per answer; a crash can cost at most the lines being written
            file.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                text = "\n\n".join(f"**{r['prompt']}**\n\n{r['answer']}" for r in rows)
                logger.experiment.add_text("generations", text, global_step=step)
            elif isinstance(logger, WandbLogger):
                logger.log_text(
                    "generations", columns=["step", "prompt", "answer"], data=[list(r.values()) for r in rows]
                )
