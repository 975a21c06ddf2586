"""The EAGLE-3 draft vocabulary: the Vd most frequent target tokens.

d2t[i] = used[i] - i, so that target_id = draft_id + d2t[draft_id]; t2d[j] is
True when target id j is in the draft vocabulary. With Vd == V the mapping is
the identity (d2t all zero, t2d all True).
"""

from __future__ import annotations

import torch


def build_vocab_mapping(token_counts: torch.Tensor, draft_vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """token_counts [V] -> (d2t [Vd] long, t2d [V] bool). Ties are broken by
    the lower token id so the mapping is deterministic."""
    vocab = token_counts.shape[0]
    if not 0 < draft_vocab_size <= vocab:
        raise ValueError(f"draft_vocab_size must be in [1, {vocab}], got {draft_vocab_size}")
    order = torch.sort(token_counts.double(), descending=True, stable=True).indices
    used = torch.sort(order[:draft_vocab_size]).values
    d2t = used - torch.arange(draft_vocab_size)
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[used] = True
    return d2t, t2d


def target_to_draft(d2t: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[vocab_size] long: the draft id of each target id (target = draft +
    d2t[draft]), -1 outside the draft vocabulary. Read from d2t, not t2d: a
    checkpoint's d2t may list its target ids in any order (t2d has none)."""
    draft = torch.arange(d2t.shape[0], device=d2t.device)
    index = torch.full((vocab_size,), -1, dtype=torch.long, device=d2t.device)
    index[draft + d2t] = draft
    return index
