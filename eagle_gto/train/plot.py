"""Training curves: loss and per-step accuracy from a metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from ..jsonl import read_jsonl


def plot_metrics(metrics_file: str | Path, png: str | Path) -> Path:
    """Two panels: the training loss (and held-out loss, when logged) and
    the accuracy of each unroll step, against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    records = read_jsonl(metrics_file)  # (a run still writing may end in half a line)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        left.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out")
    left.set(xlabel="optimizer step", ylabel="weighted TTT loss", title="loss")
    left.legend()
    steps = len(train[0]["acc"]) if train else 0
    for s in range(steps):
        right.plot([r["step"] for r in train], [r["acc"][s] for r in train], label=f"step {s}")
    right.set(xlabel="optimizer step", ylabel="top-1 accuracy", title="accuracy per unroll step", ylim=(0, 1))
    if steps:
        right.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return Path(png)
