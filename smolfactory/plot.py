"""``smolfactory plot RUN_DIR``: the losses, rewards (GRPO) and learning rate of a run, from its CSV logs, to a PNG.

smolfactory plot outputs/quickstart                   # writes outputs/quickstart/curves.png
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from smolfactory.errors import SmolFactoryError
from smolfactory.export import atomic_file

Series = dict[str, list[tuple[int, float]]]


def find_metrics(run_dir: str) -> Path:
    """The newest ``metrics.csv`` (Lightning's CSVLogger) under a run folder."""
    found = sorted(Path(run_dir).rglob("metrics.csv"), key=lambda path: path.stat().st_mtime)
    if not found:
        raise SmolFactoryError(
            f"no metrics.csv under '{run_dir}'; give the run's folder (trainer.default_root_dir) of a run logged "
            "with lightning.pytorch.loggers.CSVLogger, the quickstart's logger"
        )
    return found[-1]


def read_series(path: Path) -> Series:
    """Every logged column as (step, value) pairs, in file order; empty cells (other rows' metrics) skipped."""
    series: Series = {}
    with path.open(newline="") as file:
        for row in csv.DictReader(file):
            step = int(row.get("step") or 0)
            for name, value in row.items():
                if name in ("step", "epoch") or value in ("", None):
                    continue
                series.setdefault(name, []).append((step, float(value)))
    return series


def draw(series: Series, output: Path, title: str) -> None:
    """Losses (log scale when they span a decade) above, rewards (GRPO) below them, then learning rates; written
    atomically."""
    from matplotlib.figure import Figure  # no pyplot: no display backend needed

    losses = {name: points for name, points in series.items() if name.endswith("loss")}  # not the _epoch means
    rewards = {name: points for name, points in series.items() if is_reward_curve(name)}
    rates: Series = {}
    for name, points in series.items():  # param groups with the same schedule (lr-AdamW/pg1, /pg2): one line
        if name.startswith("lr") and points not in rates.values():
            rates[name] = points
    if len({name.split("/")[0] for name in rates}) == len(rates):
        rates = {name.split("/")[0]: points for name, points in rates.items()}
    if not losses:
        raise SmolFactoryError(f"the logs of '{title}' hold no loss yet ({', '.join(series) or 'no metrics'})")
    panels = [(label, curves) for label, curves in (("loss", losses), ("reward", rewards), ("learning rate", rates))]
    panels = [(label, curves) for label, curves in panels if curves]
    figure = Figure(figsize=(8, 1.5 + 2.5 * len(panels)), layout="constrained")
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for axis, (label, curves) in zip(axes, panels, strict=True):
        for name, points in sorted(curves.items()):
            steps, values = zip(*points, strict=True)
            axis.plot(steps, values, marker="o" if len(points) < 20 else None, markersize=3, label=name)
        axis.set_ylabel(label)
        axis.legend()
        axis.grid(alpha=0.3)
    values = [value for points in losses.values() for _, value in points if value > 0]
    if values and max(values) / min(values) > 10:
        axes[0].set_yscale("log")
    axes[0].set_title(title)
    axes[-1].set_xlabel("optimizer step")
    with atomic_file(output) as staging:
        figure.savefig(staging, format="png", dpi=120)


def is_reward_curve(name: str) -> bool:
    """A reward's per-step or validation mean (train_reward, val_reward, train_reward_<function>), not its std."""
    return "_reward" in name and not name.endswith(("_std", "_epoch")) and not name.startswith("train_frac")


def main(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="smolfactory plot", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="the run's folder (trainer.default_root_dir), e.g. outputs/quickstart")
    parser.add_argument("--output", help="PNG to write (default: RUN_DIR/curves.png)")
    options = parser.parse_args(args)
    metrics = find_metrics(options.run_dir)
    series = read_series(metrics)
    output = Path(options.output or Path(options.run_dir) / "curves.png")
    draw(series, output, title=str(metrics.parent))
    summary = ", ".join(f"{name} {points[-1][1]:.4g}" for name, points in series.items() if name.endswith("loss"))
    print(f"wrote {output} from {metrics} (last: {summary})")
