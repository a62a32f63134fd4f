"""Write the GRPO quickstart's data: "Which number is larger, a or b?" with the answer, a verifiable task.

Training and held-out prompts never share a pair of numbers (in either order). Seeded: running it again writes the
same files. python benchmarks/grpo_quickstart_data.py [folder]   (default: smolfactory/data/quickstart)
"""

from __future__ import annotations

import itertools
import json
import random
import sys
from pathlib import Path

LOW, HIGH = 1, 40
TRAIN_ROWS, VALIDATION_ROWS = 480, 64
QUESTION = "Which number is larger, {a} or {b}? Reply with only the number."


def rows(pairs: list[tuple[int, int]], rng: random.Random) -> list[dict]:
    """One row per pair, in a random order of its two numbers."""
    out = []
    for pair in pairs:
        a, b = rng.sample(pair, 2)
        out.append({"prompt": QUESTION.format(a=a, b=b), "answer": str(max(a, b))})
    return out


def main(folder: Path) -> None:
    rng = random.Random(0)
    pairs = list(itertools.combinations(range(LOW, HIGH + 1), 2))
    rng.shuffle(pairs)
    splits = {
        "grpo_train.jsonl": rows(pairs[:TRAIN_ROWS], rng),
        "grpo_validation.jsonl": rows(pairs[TRAIN_ROWS : TRAIN_ROWS + VALIDATION_ROWS], rng),
    }
    for name, split in splits.items():
        with (folder / name).open("w") as file:
            file.writelines(json.dumps(row) + "\n" for row in split)
        print(f"{folder / name}: {len(split)} rows")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parents[1] / "smolfactory/data/quickstart")
