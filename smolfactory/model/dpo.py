"""DPOModule: preference tuning of a causal LM on pairs of answers (DPO and its variants, ORPO, SimPO), with or
without LoRA.

A batch holds each pair's chosen sequences, then its rejected ones (``PreferenceDataModule``): one forward
pass runs both. The loss (``model.loss``, one class per loss in ``preference_losses``) turns the sequences'
log-probabilities into one loss per pair. Losses that need a reference model get one: the same model with its
adapter switched off (LoRA on a base), a frozen copy of the adapter the run started from (LoRA from an adapter
folder), or a second frozen model (full fine-tuning); or its log-probabilities are computed once before training
(``precompute_ref_log_probs``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, ClassVar

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from smolfactory.errors import SmolFactoryError
from smolfactory.model.build import causal_lm_of
from smolfactory.model.loss import IGNORE_INDEX, label_token_log_probs, row_sums
from smolfactory.model.preference_losses import DPOLoss, PairLogProbs, PreferenceLoss
from smolfactory.model.recipe import RecipeModule, Sum, class_path
from smolfactory.model.reference import load_reference, reference_of
from smolfactory.model.sft import WARMUP_COSINE

DPO_OPTIMIZER = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 5e-6, "weight_decay": 0.0}}
# Every preference loss reports these; a loss adds its own (ORPO: nll_loss, log_odds_ratio, log_odds_chosen).
PAIR_METRICS = (
    "loss", "rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin", "logps_chosen",
    "logps_rejected", "logits_chosen", "logits_rejected", "token_accuracy", "entropy",
)  # fmt: skip


class DPOModule(RecipeModule):
    """Preference tuning of a causal LM (DPO and TRL's pairwise variants, ORPO, SimPO): LoRA adapters or every
    weight."""

    PROGRESS_BAR: ClassVar[frozenset[str]] = frozenset({"loss", "reward_accuracy"})
    loss_count_name = "pairs"

    def __init__(
        self,
        loss: PreferenceLoss = DPOLoss(),  # noqa: B008 (frozen, so sharing is safe)
        precompute_ref_log_probs: bool = False,
        optimizer: OptimizerCallable = DPO_OPTIMIZER,  # noqa: B006 (never mutated)
        lr_scheduler: LRSchedulerCallable | None = WARMUP_COSINE,  # noqa: B006
        **kwargs: Any,
    ) -> None:
        """Train on pairs of answers so that the chosen one becomes likelier than the rejected one.

        Args:
            loss: The preference loss and its settings: smolfactory.model.preference_losses.DPOLoss {beta, loss_type,
                label_smoothing} (DPO, IPO, hinge, ... with TRL's formulas), ORPOLoss {beta} or SimPOLoss {beta,
                gamma_beta_ratio} (both without a reference model). Switching the class on the command line
                keeps same-named arguments (beta): give them again.
            precompute_ref_log_probs: Compute the reference log-probabilities once before training, then train
                without the reference model (full fine-tuning keeps no second copy).
            optimizer: Optimizer class path and arguments (see SFTModule); weight decay on matrices only.
            lr_scheduler: Learning-rate schedule class path, stepped every optimizer step; null keeps it constant.
            **kwargs: The model settings every recipe shares: model_name, lora, dtype, quantization, ...
        """
        # Before the base builds the epoch metrics: the loss adds its own.
        self.METRICS = PAIR_METRICS + tuple(name for name in loss.EXTRA_METRICS if name not in PAIR_METRICS)
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, **kwargs)
        self.pair_loss = loss
        # Plain values in hparams, so that checkpoints load with torch.load(weights_only=True).
        if not isinstance(self.hparams.loss, dict):
            self.hparams.loss = {"class_path": class_path(type(loss)), "init_args": dataclasses.asdict(loss)}
        if precompute_ref_log_probs and not loss.needs_reference:
            raise SmolFactoryError(
                f"model.precompute_ref_log_probs: {type(loss).__name__} uses no reference model; set it to false"
            )
        self.reference_model: torch.nn.Module | None = None
        self._precomputing = False

    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()
        if not self.pair_loss.needs_reference:
            return
        if self.lora is None and self.hparams.precompute_ref_log_probs:
            return  # the policy computes the reference log-probabilities once, before its first step
        self.reference_model = load_reference(self, no_copy_fix="set model.precompute_ref_log_probs: true")

    def reference(self) -> contextlib.AbstractContextManager[torch.nn.Module]:
        """The reference model for the duration of a block: without gradients, without dropout."""
        if self.lora is None and self.reference_model is None and not self._precomputing:
            raise SmolFactoryError("no reference model: set model.precompute_ref_log_probs: true, or train LoRA")
        return reference_of(self.model, self.reference_model, policy_is_reference=self._precomputing)

    def sequence_log_probs(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        """Summed log-probabilities of each sequence's trained tokens under ``model``, and per-token diagnostics."""
        hidden_states = self.final_hidden_states(model, batch)
        tokens = label_token_log_probs(hidden_states, causal_lm_of(model).get_output_embeddings(), batch["labels"])
        return row_sums(tokens.log_probs, batch["labels"]), tokens

    def reference_log_probs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) sequence log-probabilities under the reference model."""
        with self.reference() as reference:
            log_probs, _ = self.sequence_log_probs(reference, batch)
        return log_probs.chunk(2)

    def batch_sums(self, batch: dict[str, torch.Tensor]) -> dict[str, Sum]:
        """The summed loss of a batch of pairs (differentiable) and the sums behind every metric."""
        labels = batch["labels"]
        trained = labels[:, 1:] != IGNORE_INDEX
        chosen_tokens, rejected_tokens = trained.sum(1).chunk(2)
        reference = None
        if "ref_chosen_logps" in batch:
            reference = PairLogProbs(
                batch["ref_chosen_logps"], batch["ref_rejected_logps"], chosen_tokens, rejected_tokens
            )
        elif self.pair_loss.needs_reference:
            # First: switching adapters toggles requires_grad, which must not happen inside the policy's graph.
            reference = PairLogProbs(*self.reference_log_probs(batch), chosen_tokens, rejected_tokens)
        hidden_states = self.final_hidden_states(self.model, batch)
        head = self.causal_lm.get_output_embeddings()
        tokens = label_token_log_probs(hidden_states, head, labels)
        chosen, rejected = row_sums(tokens.log_probs, labels).chunk(2)
        policy = PairLogProbs(chosen, rejected, chosen_tokens, rejected_tokens)
        if self.pair_loss.needs_chosen_sequence:  # ORPO's NLL as TRL computes it: every token of the chosen rows
            every = torch.where(batch["attention_mask"] == 1, batch["input_ids"], IGNORE_INDEX)[: chosen.shape[0]]
            sequence = row_sums(label_token_log_probs(hidden_states[: chosen.shape[0]], head, every).log_probs, every)
            policy = policy._replace(
                chosen_sequence=sequence, chosen_sequence_tokens=(every[:, 1:] != IGNORE_INDEX).sum(1)
            )
        result = self.pair_loss(policy, reference)
        pairs = torch.tensor(chosen.shape[0], device=chosen.device)
        chosen_count, rejected_count = chosen_tokens.sum(), rejected_tokens.sum()
        is_chosen = trained.nonzero()[:, 0] < chosen.shape[0]  # per trained token: in a chosen sequence?
        sums = {
            "loss": Sum(result.losses.sum(), pairs),
            "rewards_chosen": Sum(result.rewards_chosen.sum(), pairs),
            "rewards_rejected": Sum(result.rewards_rejected.sum(), pairs),
            "reward_accuracy": Sum((result.rewards_chosen > result.rewards_rejected).sum(), pairs),
            "reward_margin": Sum((result.rewards_chosen - result.rewards_rejected).sum(), pairs),
            "logps_chosen": Sum(chosen.detach().sum(), pairs),
            "logps_rejected": Sum(rejected.detach().sum(), pairs),
            "logits_chosen": Sum(tokens.mean_logits[is_chosen].sum(), chosen_count),
            "logits_rejected": Sum(tokens.mean_logits[~is_chosen].sum(), rejected_count),
            "token_accuracy": Sum(tokens.is_top1[is_chosen].sum(), chosen_count),
            "entropy": Sum(tokens.entropy.sum(), chosen_count + rejected_count),
        }
        # A loss's own metrics are per pair; they may also redefine a shared one (ORPO's per-token logps).
        return sums | {name: Sum(values.detach().sum(), pairs) for name, values in result.extra.items()}

    def on_fit_start(self) -> None:
        if not self.hparams.precompute_ref_log_probs:
            return
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "add_reference_log_probs"):
            raise SmolFactoryError("model.precompute_ref_log_probs needs the data of a PreferenceDataModule")
        if self.lora is None and self.trainer.ckpt_path is not None:
            raise SmolFactoryError(
                "a resumed full fine-tuning run cannot recompute its reference log-probabilities (the weights have "
                "moved); resume with model.precompute_ref_log_probs: false, or train LoRA"
            )
        self._precomputing = True
        try:
            datamodule.add_reference_log_probs(
                lambda batch: self.reference_log_probs({key: value.to(self.device) for key, value in batch.items()})
            )
        finally:
            self._precomputing = False
