"""The processes `accelerate launch` (or torchrun) started, as accelerate sees them."""

from __future__ import annotations

import torch


def process_state():
    """The processes `accelerate launch` (or torchrun) started; the state train's Accelerator takes up."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    """Under `accelerate launch` every process runs main(): what is written or
    said once, the main process does."""
    return process_state().is_main_process
