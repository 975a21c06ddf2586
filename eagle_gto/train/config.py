"""TrainConfig: the options of an EAGLE-3 training run, their defaults and their checks (also those GTOConfig
shares)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .checkpoints import check_checkpointing

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # (GTO's too)


# The checks TrainConfig and GTOConfig share, one message for both.
def check_not_negative(cfg, *names: str) -> None:
    """The options `names` of `cfg` must be >= 0 (nan too is refused)."""
    for name in names:
        if not getattr(cfg, name) >= 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")


def check_choice(name: str, value, choices) -> None:
    """argparse checks choices; a config built in code (or a sweep point) does not."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


@dataclass
class TrainConfig:
    ttt_steps: int = 7
    step_weight: float = 0.8
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 4  # sequences per process per micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.0
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 0.5  # 0: no clipping (as in HF Trainer)
    seed: int = 0
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate at the end only
    export_dtype: str = "bfloat16"
    pytorch_bin: bool = False

    def __post_init__(self) -> None:
        for name in ("ttt_steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        check_checkpointing(self.save_every, self.keep_checkpoints)
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if not 0 < self.epochs < math.inf:  # (inf or nan: no step count, an error only once the base has loaded)
            raise ValueError(f"epochs must be a finite number above 0, got {self.epochs}")
        if not self.lr > 0:  # (a zero rate trains nothing, a negative one climbs the loss)
            raise ValueError(f"lr must be above 0, got {self.lr}")
        if not self.max_grad_norm >= 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        check_not_negative(self, "step_weight")  # (a negative weight would train against the later steps' losses)
        check_not_negative(self, "weight_decay")  # (AdamW refuses it only once the base model has loaded)
        check_choice("export_dtype", self.export_dtype, tuple(DTYPES))  # (else a KeyError after training)
        for name in ("min_lr_ratio", "warmup_ratio"):  # fractions of lr and of the steps (below 0: a negative lr)
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
