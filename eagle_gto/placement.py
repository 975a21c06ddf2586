"""Where a draft head sits: beside the base model's last decoder layer, in the
base's dtype, with the base's embedding (and, for EAGLE-1, its lm_head)."""

from __future__ import annotations

import torch
from torch import nn

from .heads import DraftHead
from .target import decoder_layers


def head_device(base: nn.Module) -> torch.device:
    """The device of the base model's last decoder layer (where its final
    features are produced)."""
    return next(decoder_layers(base)[-1].parameters()).device


def attach_head(base: nn.Module, head: DraftHead, dtype: torch.dtype | None = None) -> None:
    """Place the head beside the base's last layer, in the base's dtype (or
    `dtype`: trainers keep float32), and give it the base's embedding (and
    lm_head for EAGLE-1) when it has none (a head may come attached to
    another copy of the base)."""
    weights = next(head.parameters())
    place = (head_device(base), dtype or next(base.parameters()).dtype)
    if (weights.device, weights.dtype) != place:
        head.to(*place)
    share_base_weights(base, head)


def share_base_weights(base: nn.Module, head: DraftHead) -> None:
    """Give the head the base's embedding (unless it has its own) and, for
    EAGLE-1, its lm_head; again after `model.to(...)`, which gives the base
    new tensors."""
    if head.embed_tokens is None:
        weight = base.get_input_embeddings().weight.detach()
        device = next(head.parameters()).device
        head.attach_embedding(weight if weight.device == device else weight.to(device))
    if head.kind == "eagle1":
        head.attach_lm_head(base.get_output_embeddings())
