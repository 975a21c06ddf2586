"""What a draft head learns from: the target model's features and its next-token logits.

The target runs on the fly, batch by batch, instead of writing features to
disk first (as the EAGLE reference trainer does). At the sizes this project
trains (the demo base, 7B-8B targets on a GPU) a target forward costs less
than the seven-step head unroll that follows it, so a cache would save little
time while costing gigabytes of disk (3 x hidden floats + a logit row per
token); and features computed by the very model the head will draft for, in
the dtype it will run in, keep the training target exact (no stale or
quantised caches when the data or the base change).

EAGLE-3 features are the hidden states entering decoder layers 2, N//2 and
N-3, taken with forward pre-hooks exactly as the engine's `TargetRunner`
takes them at decoding time, so the head sees the same tensors in training
and in use. Only those three are kept (output_hidden_states would hold all
N+1 layers in memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..target import decoder_layers, eagle3_feature_layers, layer_input_tap


@dataclass
class TargetOutputs:
    features: torch.Tensor  # [b, n, 3 * hidden]: the EAGLE-3 features of each position
    logits: torch.Tensor  # [b, n, V]: the target's next-token logits at each position


@torch.no_grad()
def target_outputs(model: nn.Module, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> TargetOutputs:
    """Run the target once over a right-padded batch [b, n] and return the
    EAGLE-3 features and the logits, both on the device of `input_ids`."""
    indices = eagle3_feature_layers(len(decoder_layers(model)))
    device = model.get_input_embeddings().weight.device
    with layer_input_tap(model).capturing(indices) as captured:
        out = model(
            input_ids=input_ids.to(device),
            attention_mask=None if attention_mask is None else attention_mask.to(device),
            use_cache=False,
        )
    features = torch.cat([captured[i].to(input_ids.device) for i in indices], dim=-1)
    return TargetOutputs(features, out.logits.to(input_ids.device))
