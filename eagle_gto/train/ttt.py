"""The EAGLE-3 objective with training-time test (TTT): the head is unrolled
on its own outputs for several steps, as it runs when it drafts.

Layout (the engine's drafter uses the same one): entry i of step 0 pairs the
target feature of token i with token i+1 and predicts token i+2. Step s
feeds, at every position i, the head's own step s-1 output together with
token i+1+s and predicts token i+2+s, at RoPE position i+s: it stands for
the depth-s node of a draft chain rooted after token i+1.

Attention mirrors decoding-time tree attention exactly: at decoding, that
node sees the cached entries of the accepted prefix (step-0 entries 0..i,
computed from real target features) and its own ancestors in the tree
(steps 1..s-1 at position i) plus itself. Here the keys of every step are
kept and step s attends with the bool mask [causal over step 0 | diagonal
over steps 1..s]. (The EAGLE reference trainer also hides the last s step-0
entries from step s; the engine's drafter shows them, so we do too.)

Loss at step s: cross-entropy of the head's draft-vocabulary distribution
against the target's next-token distribution restricted to the draft
vocabulary, over positions whose predicted token i+2+s exists, carries loss
(loss mask) and whose target top-1 token is in the draft vocabulary (else
no draft can be right there); steps are weighted step_weight**s. Accuracy at
step s is the head's top-1 (as a target id) against the target's top-1 over
all loss positions, i.e. the chance that a single draft chain is accepted
at that depth given the previous tokens were.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..heads import Eagle3Head


class StepKeys:
    """Keys and values of all unrolled steps, concatenated along the key
    axis. Duck-types the engine's `KVBuffer.append` so the head's own
    attention runs unchanged, and keeps the graph differentiable (no
    in-place writes into a pre-allocated buffer)."""

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None:
            self.keys, self.values = key, value
        else:
            self.keys = torch.cat((self.keys, key), dim=2)
            self.values = torch.cat((self.values, value), dim=2)
        return self.keys, self.values


def step_mask(n: int, step: int, device=None) -> torch.Tensor:
    """Bool [1, 1, n, (step + 1) * n]: what the queries of unroll step
    `step` see: step-0 keys causally, then the keys of steps 1..step at
    their own position only."""
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    diagonal = torch.eye(n, dtype=torch.bool, device=device)
    return torch.cat([causal] + [diagonal] * step, dim=1)[None, None]


def shift(x: torch.Tensor, s: int) -> torch.Tensor:
    """x[:, s:] padded with zeros at the end back to the same length."""
    if s == 0:
        return x
    pad = x.new_zeros((x.shape[0], min(s, x.shape[1])) + x.shape[2:])
    return torch.cat((x[:, s:], pad), dim=1)


def unroll(head: Eagle3Head, hidden: torch.Tensor, input_ids: torch.Tensor, steps: int):
    """Yield the head's output [b, n, h] of each unroll step s = 0..steps-1,
    starting from the projected features `hidden` [b, n, h]."""
    b, n = input_ids.shape
    keys = StepKeys()
    for s in range(steps):
        positions = torch.arange(s, n + s, device=input_ids.device).expand(b, n)
        hidden = head(hidden, shift(input_ids, 1 + s), positions, step_mask(n, s, input_ids.device), [keys])
        yield hidden


@dataclass
class TTTOutput:
    loss: torch.Tensor  # weighted sum of the step losses (differentiable)
    step_losses: list[torch.Tensor]  # per unroll step (differentiable)
    step_accuracy: list[float]  # per unroll step: head top-1 == target top-1 over loss positions
    step_counts: list[int]  # loss positions per step (weights for averaging accuracies)
    loss_counts: list[float]  # positions each step's loss is the mean over (weights for averaging losses)


def ttt_loss(head: Eagle3Head, features: torch.Tensor, input_ids: torch.Tensor, target_logits: torch.Tensor,
             loss_mask: torch.Tensor, attention_mask: torch.Tensor | None = None, steps: int = 7,
             step_weight: float = 0.8) -> TTTOutput:
    """features [b, n, 3H], input_ids [b, n], target_logits [b, n, V] (the
    target's logits at each position), loss_mask [b, n] (1 on tokens whose
    prediction is trained), attention_mask [b, n] (1 on real tokens; right
    padding). See the module docstring for the layout and the masks."""
    device = input_ids.device
    valid = loss_mask.bool()
    if attention_mask is not None:
        valid = valid & attention_mask.bool()
    t2d = head.t2d.to(device)
    target_top = target_logits.argmax(-1)  # [b, n] target ids
    draftable = t2d[target_top]
    # The target id of each draft id, in draft-id order: a checkpoint's d2t need not list them ascending as t2d does.
    draft_targets = head.to_target_ids(torch.arange(int(t2d.sum()), device=device))
    losses, accuracy, counts, loss_counts = [], [], [], []
    total = features.new_zeros((), dtype=torch.float32)
    outputs = unroll(head, head.project_features(features), input_ids, steps)
    for s, out in enumerate(outputs):
        # Position i predicts token i+2+s from the target's logits at i+1+s.
        counted = shift(valid, 2 + s)
        weight = (counted & shift(draftable, 1 + s)).float()
        logp = torch.log_softmax(head.draft_logits(out).float(), dim=-1)
        with torch.no_grad():
            target_p = torch.softmax(shift(target_logits, 1 + s)[..., draft_targets].float(), dim=-1)
        per_position = -(target_p * logp).sum(-1)
        loss_counts.append(float(weight.sum()))
        loss = (per_position * weight).sum() / weight.sum().clamp(min=1)
        with torch.no_grad():
            hit = head.to_target_ids(logp.argmax(-1)) == shift(target_top, 1 + s)
            count = int(counted.sum())
            accuracy.append(float((hit & counted).sum()) / max(count, 1))
        losses.append(loss)
        counts.append(count)
        total = total + step_weight**s * loss
    return TTTOutput(total, losses, accuracy, counts, loss_counts)


class TTTObjective(nn.Module):
    """The head and its loss as one module, so that a data-parallel wrapper
    (accelerate/DDP) sees every use of the parameters in one forward."""

    def __init__(self, head: Eagle3Head, steps: int = 7, step_weight: float = 0.8):
        super().__init__()
        self.head = head
        self.steps = steps
        self.step_weight = step_weight

    def forward(self, features, input_ids, target_logits, loss_mask, attention_mask=None) -> TTTOutput:
        return ttt_loss(self.head, features, input_ids, target_logits, loss_mask, attention_mask,
                        self.steps, self.step_weight)
