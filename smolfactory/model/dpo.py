"""DPOModule: preference tuning (DPO and its variants) of a causal LM, with or without LoRA.

A batch holds each pair's chosen sequences, then its rejected ones (``PreferenceDataModule``): one forward
pass runs both. The reference model is the same model with its adapter switched off (LoRA on a base), a
frozen copy of the adapter the run started from (LoRA from an adapter folder), or a second frozen model (full
fine-tuning); or its log-probabilities are computed once before training (``precompute_ref_log_probs``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from peft import PeftModel
from torchmetrics import MeanMetric

from smolfactory.errors import SmolFactoryError
from smolfactory.model.dpo_loss import DPOLossType, check_loss_settings, preference_loss
from smolfactory.model.loading import adapter_base_model, resolve_model_path
from smolfactory.model.loss import IGNORE_INDEX, label_token_log_probs, row_sums
from smolfactory.model.sft import CausalLMModule

REFERENCE_ADAPTER = "reference"


class PreferenceSums(NamedTuple):
    """Sums over a batch (or step, or epoch) of pairs; each metric is a sum divided by its count."""

    loss: torch.Tensor
    pairs: torch.Tensor
    rewards_chosen: torch.Tensor
    rewards_rejected: torch.Tensor
    reward_accuracy: torch.Tensor
    reward_margin: torch.Tensor
    logps_chosen: torch.Tensor
    logps_rejected: torch.Tensor
    logits_chosen: torch.Tensor
    logits_rejected: torch.Tensor
    token_accuracy: torch.Tensor
    entropy: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def counts(self) -> dict[str, torch.Tensor]:
        """What each metric is a mean over: pairs, chosen tokens, rejected tokens, or all answer tokens."""
        per_token = {"logits_chosen": self.chosen_tokens, "token_accuracy": self.chosen_tokens}
        per_token |= {"logits_rejected": self.rejected_tokens, "entropy": self.chosen_tokens + self.rejected_tokens}
        return {name: per_token.get(name, self.pairs).clamp(min=1) for name in METRIC_NAMES}

    def means(self) -> dict[str, torch.Tensor]:
        """Every metric as a mean."""
        return {name: getattr(self, name) / count for name, count in self.counts().items()}


METRIC_NAMES = [name for name in PreferenceSums._fields if name not in ("pairs", "chosen_tokens", "rejected_tokens")]


class PreferenceMetrics(torch.nn.Module):
    """Epoch means of the preference metrics (torchmetrics: synchronised across devices when computed)."""

    def __init__(self) -> None:
        super().__init__()
        self.means = torch.nn.ModuleDict({name: MeanMetric() for name in METRIC_NAMES})

    def update(self, sums: PreferenceSums) -> None:
        for name, count in sums.counts().items():
            self.means[name].update((getattr(sums, name) / count).detach().float(), weight=count.float())


class DPOModule(CausalLMModule):
    """Preference tuning of a causal LM (DPO, IPO and TRL's other pairwise losses): LoRA adapters or every weight."""

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: DPOLossType = "sigmoid",
        label_smoothing: float = 0.0,
        precompute_ref_log_probs: bool = False,
        learning_rate: float = 5e-6,
        **kwargs: Any,
    ) -> None:
        """Train on pairs of answers so that the chosen one becomes likelier than the rejected, relative to a reference.

        Args:
            beta: Strength of the pull towards the reference model (IPO's tau); 0.1 is TRL's default.
            loss_type: sigmoid (DPO), ipo, hinge, robust, exo_pair, bco_pair, nca_pair, sppo_hard, apo_zero,
                apo_down or sigmoid_norm, with TRL's formulas.
            label_smoothing: Probability that a pair's preference is wrong: conservative DPO with sigmoid, or the
                robust and exo_pair losses.
            precompute_ref_log_probs: Compute the reference log-probabilities once before training, then train
                without the reference model (full fine-tuning keeps no second copy).
            learning_rate: Peak AdamW learning rate, reached after the warm-up.
            **kwargs: Every other option of CausalLMModule (model_name, lora, optimizer, warmup_steps, ...).
        """
        check_loss_settings(loss_type, beta, label_smoothing)
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.reference_model: torch.nn.Module | None = None
        self._precomputing = False
        self.train_metrics, self.val_metrics, self.test_metrics = (PreferenceMetrics() for _ in range(3))
        # The reference model is rebuilt, never saved (on_save_checkpoint), so its keys are missing when a
        # checkpoint loads; on_load_checkpoint checks that nothing else is.
        self.strict_loading = False

    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()
        path = resolve_model_path(self.hparams.model_name)
        if self.lora is not None and adapter_base_model(path) is not None:
            # Training continues an adapter: the reference is that adapter as loaded, kept frozen beside it.
            self.model.load_adapter(path, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
            self.model.train()  # peft switched the whole model to eval mode (dropout off) for the frozen adapter
        elif self.lora is None and not self.hparams.precompute_ref_log_probs:
            if self.device_mesh is not None:
                raise SmolFactoryError(
                    "full fine-tuning DPO with a sharded model has no frozen reference copy yet; set "
                    "model.precompute_ref_log_probs: true"
                )
            # A second model, frozen; loaded again, as the policy may already be sharded or compiled.
            self.reference_model = self._build_model().requires_grad_(False).eval()

    @contextlib.contextmanager
    def reference(self) -> Iterator[torch.nn.Module]:
        """The reference model for the duration of the block: without gradients, without dropout."""
        if self.reference_model is not None:
            with torch.no_grad():
                yield self.reference_model
            return
        if isinstance(self.model, PeftModel) and REFERENCE_ADAPTER in self.model.peft_config:
            switch = _active_adapter(self.model, REFERENCE_ADAPTER)
        elif isinstance(self.model, PeftModel):
            switch = self.model.disable_adapter()
        elif self._precomputing:  # full fine-tuning, before the first step: the policy is the reference
            switch = contextlib.nullcontext()
        else:
            raise SmolFactoryError("no reference model: set model.precompute_ref_log_probs: true, or train LoRA")
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), switch:
                yield self.model
        finally:
            self.model.train(training)

    def sequence_log_probs(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        """Summed log-probabilities of each sequence's trained tokens under ``model``, and per-token diagnostics."""
        hidden_states = self.final_hidden_states(model, batch)
        causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
        tokens = label_token_log_probs(hidden_states, causal_lm.get_output_embeddings(), batch["labels"])
        return row_sums(tokens.log_probs, batch["labels"]), tokens

    def reference_log_probs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) sequence log-probabilities under the reference model."""
        with self.reference() as reference:
            log_probs, _ = self.sequence_log_probs(reference, batch)
        return log_probs.chunk(2)

    def preference_sums(self, batch: dict[str, torch.Tensor]) -> PreferenceSums:
        """The summed loss of a batch of pairs (differentiable) and the sums behind every metric."""
        hparams, labels = self.hparams, batch["labels"]
        if "ref_chosen_logps" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:  # first: switching adapters toggles requires_grad, which must not happen inside the policy's graph
            ref_chosen, ref_rejected = self.reference_log_probs(batch)
        log_probs, tokens = self.sequence_log_probs(self.model, batch)
        chosen, rejected = log_probs.chunk(2)
        trained = labels[:, 1:] != IGNORE_INDEX
        chosen_tokens, rejected_tokens = trained.sum(1).chunk(2)
        chosen_logratios, rejected_logratios = chosen - ref_chosen, rejected - ref_rejected
        losses = preference_loss(
            hparams.loss_type, chosen_logratios, rejected_logratios, hparams.beta, hparams.label_smoothing,
            chosen_tokens, rejected_tokens,
        )  # fmt: skip
        rewards_chosen = hparams.beta * chosen_logratios.detach()
        rewards_rejected = hparams.beta * rejected_logratios.detach()
        is_chosen = trained.nonzero()[:, 0] < chosen.shape[0]  # per trained token: in a chosen sequence?
        return PreferenceSums(
            loss=losses.sum(),
            pairs=torch.tensor(chosen.shape[0], device=chosen.device),
            rewards_chosen=rewards_chosen.sum(),
            rewards_rejected=rewards_rejected.sum(),
            reward_accuracy=(rewards_chosen > rewards_rejected).sum(),
            reward_margin=(rewards_chosen - rewards_rejected).sum(),
            logps_chosen=chosen.detach().sum(),
            logps_rejected=rejected.detach().sum(),
            logits_chosen=tokens.mean_logits[is_chosen].sum(),
            logits_rejected=tokens.mean_logits[~is_chosen].sum(),
            token_accuracy=tokens.is_top1[is_chosen].sum(),
            entropy=tokens.entropy.sum(),
            chosen_tokens=chosen_tokens.sum(),
            rejected_tokens=rejected_tokens.sum(),
        )

    def on_train_start(self) -> None:
        self._step_totals = torch.zeros(len(PreferenceSums._fields), device=self.device)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The summed loss of the micro-batch's pairs; ``on_before_optimizer_step`` makes it a mean over the step's."""
        sums = self.preference_sums(batch)
        self._step_totals += torch.stack([value.detach().float() for value in sums])
        return sums.loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Make the gradient that of the mean loss over every pair of the step, on every rank (see CausalLMModule)."""
        totals = PreferenceSums(*self.trainer.strategy.reduce(self._step_totals, reduce_op="sum"))
        self.normalize_gradients(totals.loss, totals.pairs)
        means = totals.means()
        self.log("train_loss", means["loss"], prog_bar=True)
        for name in METRIC_NAMES[1:]:
            self.log(f"train_{name}", means[name], prog_bar=name == "reward_accuracy")
        self._step_totals.zero_()

    def _log_eval_loss(self, name: str, batch: dict[str, torch.Tensor]) -> None:
        stage = name.removesuffix("_loss")
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        metrics.update(self.preference_sums(batch))
        for metric_name, metric in metrics.means.items():
            self.log(f"{stage}_{metric_name}", metric, on_step=False, on_epoch=True, prog_bar=metric_name == "loss")

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

    def checkpoint_state_names(self) -> set[str]:
        return {name for name in super().checkpoint_state_names() if not name.startswith("reference_model.")}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["state_dict"] = {
            key: value for key, value in checkpoint["state_dict"].items() if not key.startswith("reference_model.")
        }


@contextlib.contextmanager
def _active_adapter(model: PeftModel, name: str) -> Iterator[None]:
    """Make adapter ``name`` the active one for the block; the trained adapter stays trainable afterwards."""
    previous = model.active_adapter
    model.set_adapter(name, inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter(previous)
