"""Did DPO move the held-out preferences? The quickstart's SFT adapter against the DPO adapter trained on top.

    make dpo-quickstart && .venv/bin/python benchmarks/dpo_quickstart_eval.py [--check]

On the 24 held-out pairs of builtin:quickstart-preference (never trained on), prints for each model how
often it gives the chosen answer a higher log-probability than the rejected one, and the mean gap; for the
DPO model also the DPO reward accuracy (its log-ratio to the SFT model larger for the chosen answer) and
margin. --check exits 1 unless the DPO model prefers the chosen answer more often than the SFT model did and
its reward accuracy is at least 75%.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.utils.data import DataLoader

from smolfactory import PreferenceDataModule
from smolfactory.chat import load_chat_model
from smolfactory.model.loss import IGNORE_INDEX


def sequence_log_probs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probability of each sequence's trained tokens, from the model's full logits."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = batch["labels"][:, 1:]
    per_token = logits[:, :-1].log_softmax(-1).gather(2, targets.clamp(min=0)[..., None]).squeeze(-1)
    return (per_token * (targets != IGNORE_INDEX)).sum(1)


def pair_log_probs(folder: str, pairs: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probabilities of every held-out pair under the model in ``folder``."""
    model, _ = load_chat_model(folder, "cpu")
    chosen, rejected = zip(*(sequence_log_probs(model, batch).chunk(2) for batch in pairs), strict=True)
    return torch.cat(chosen), torch.cat(rejected)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft", default="outputs/quickstart/final", help="the model DPO started from")
    parser.add_argument("--dpo", default="outputs/dpo_quickstart/final", help="the model DPO trained")
    parser.add_argument("--beta", type=float, default=0.1, help="beta of the run, for the rewards")
    parser.add_argument("--check", action="store_true", help="exit 1 unless the targets above are met")
    args = parser.parse_args()

    data = PreferenceDataModule(tokenizer=args.sft, dataset="builtin:quickstart-preference", max_length=256)
    data.setup("fit")
    pairs = DataLoader(data.val_data, batch_size=8, collate_fn=data.train_collate())
    sft_chosen, sft_rejected = pair_log_probs(args.sft, pairs)
    dpo_chosen, dpo_rejected = pair_log_probs(args.dpo, pairs)

    count = len(sft_chosen)
    print(f"{count} held-out pairs | prefers the chosen answer | mean log p(chosen) - log p(rejected)")
    for name, chosen, rejected in (("SFT", sft_chosen, sft_rejected), ("DPO", dpo_chosen, dpo_rejected)):
        prefers = int((chosen > rejected).sum())
        print(f"{name:>16} | {prefers}/{count} | {(chosen - rejected).mean():.3f}")
    rewards = args.beta * ((dpo_chosen - sft_chosen) - (dpo_rejected - sft_rejected))
    accuracy = (rewards > 0).float().mean().item()
    print(f"DPO reward accuracy {accuracy:.1%}, mean reward margin {rewards.mean():.3f} (beta {args.beta})")
    if args.check:
        better = (dpo_chosen > dpo_rejected).sum() > (sft_chosen > sft_rejected).sum()
        if not (better and accuracy >= 0.75):
            print("check failed: DPO must prefer the chosen answer more often than SFT, with reward accuracy >= 75%")
            sys.exit(1)
        print("check passed")


if __name__ == "__main__":
    main()
