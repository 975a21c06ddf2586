"""Runs a draft head over the accepted prefix and expands the draft tree.

Draft cache layout: entry j pairs the target feature at position j with the
token at position j + 1 and sits at position j; its output predicts the token
at j + 2. While a tree is expanded, the frontier's entries are written after
the prefix as scratch and dropped afterwards.

Both methods take the prefix length either from the drafter's own host-side
`length` (the default) or, as the decoding engine does, as `start`, a device
tensor, with a fixed attention `view` over the first cache slots: then no
host value enters the computation and the shapes are static (CUDA graphs).
"""

from __future__ import annotations

import torch

from .heads import DraftHead
from .kv_cache import KVBuffer, write_plan
from .tree import DraftTree, select_tree, take


def vocab_chunk(vocab: int) -> int:
    """The chunk length `vocab_top_k` splits rows of `vocab` entries into:
    the largest divisor of `vocab` up to 2560 that leaves at least two chunks
    (1 when there is none)."""
    return next((c for c in range(min(2560, vocab // 2), 1, -1) if vocab % c == 0), 1)


def vocab_top_k(logp: torch.Tensor, k: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`logp.topk(k)` over the last dimension (largest first), taken in two
    rounds when `chunk` (a divisor of its length, `vocab_chunk`) holds at
    least k entries: the top k of each chunk of the row, then the top k of
    those. Equal values may come out in another order than torch.topk's.

    Why: on CUDA, torch.topk over a few rows of 20000+ entries (a draft
    vocabulary) takes its multi-block path, about 20 small kernels: with 8
    per tree that was 0.4-0.5 ms of an 11 ms iteration on the H100
    (docs/perf/2026-11-23-h100-b). Rows of at most 2560 entries, fewer than
    800 of them, take the one-kernel single-block path, as does the second
    round over k entries per chunk."""
    vocab = logp.shape[-1]
    if chunk < k or chunk == vocab:
        return logp.topk(k, dim=-1)
    lead = logp.shape[:-1]
    rows = logp.reshape(-1, vocab // chunk, chunk)
    values, within = rows.topk(k, dim=-1, sorted=False)  # [n, chunks, k]
    best, pos = values.flatten(1).topk(k, dim=-1)  # [n, k]; pos // k is the chunk
    ids = within.flatten(1).gather(1, pos) + (pos // k) * chunk
    return best.reshape(*lead, k), ids.reshape(*lead, k)


def prefix_mask(n: int, past: int, device) -> torch.Tensor:
    """Bool [1, 1, n, past + n]: the past is visible, the new entries causally."""
    new = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    old = torch.ones(n, past, dtype=torch.bool, device=device)
    return torch.cat((old, new), dim=1)[None, None]


class Drafter:
    def __init__(self, head: DraftHead, capacity: int):
        self.head = head
        self.caches = [KVBuffer(capacity) for _ in range(head.num_layers)]
        self.vocab_chunk = vocab_chunk(head.config.draft_vocab_size)  # for vocab_top_k
        # (draft_tree, extend) compiled for decoding steps (graphs.compile_drafter_steps)
        self.compiled: tuple | None = None

    @property
    def length(self) -> int:
        return self.caches[0].length

    def _set_length(self, length: int) -> None:
        for cache in self.caches:
            cache.length = length

    @staticmethod
    def view_needed(total_token: int, depth: int, top_k: int) -> int:
        """Slots after the prefix that one engine step touches: the frontier
        scratch, and the padded accepted branch that `extend` writes."""
        return max(total_token, depth * top_k, depth + 2)

    @torch.no_grad()
    def extend(self, features: torch.Tensor, next_tokens: torch.Tensor, start: torch.Tensor | None = None,
               view: int | None = None, last: torch.Tensor | None = None) -> torch.Tensor:
        """Add entries for target features [n, F] (positions start..start+n-1)
        and the tokens that follow them [n]; return the output [h] of entry
        `last` (default: the last one). Without `start` the entries go after
        `length`, which grows by n."""
        device = self.head.fc.weight.device
        hidden = self.head.project_features(features.to(device, self.head.fc.weight.dtype))[None]
        n = hidden.shape[1]
        own_length = start is None
        if own_length:
            start, view = self.length, self.length + n
        slots = torch.arange(n, device=device) + start
        causal = torch.arange(view, device=device)[None] <= slots[:, None]
        with write_plan(self.caches, slots, view):
            out = self.head(hidden, next_tokens.to(device)[None], slots[None], causal[None, None], self.caches)
        if own_length:
            self._set_length(start + n)
        return out[0, n - 1] if last is None else take(out[0], last)

    @torch.no_grad()
    def draft_tree(self, last_out: torch.Tensor, root_token: torch.Tensor, total_token: int, depth: int, top_k: int,
                   start: torch.Tensor | None = None, view: int | None = None) -> DraftTree:
        """Expand `depth` levels from the head output `last_out` [h] that
        follows the root, then keep the best `total_token - 1` candidates.
        The prefix is `start` entries long (default: `length`)."""
        head, device, k = self.head, last_out.device, top_k
        if start is None:
            start, view = self.length, self.length + depth * k
        logp = torch.log_softmax(head.draft_logits(last_out[None]).float(), dim=-1)[0]
        scores, ids = vocab_top_k(logp, k, self.vocab_chunk)
        tokens = head.to_target_ids(ids)
        cand_tokens, cand_scores = [tokens], [scores]
        # Made once for all levels (fewer small kernels per level): level l
        # writes its k entries at slots start + l*k ..., all at position
        # start + l; every prefix slot is visible to every entry.
        slots = torch.arange(depth * k, device=device) + start
        cos, sin = head.rope((torch.arange(depth, device=device) + start)[:, None].expand(depth, k), last_out.dtype)
        prefix = (torch.arange(view, device=device) < start).expand(k, view)
        eye = torch.eye(k, dtype=torch.bool, device=device)
        # The frontier: hidden to feed, token, score, candidate number, and the
        # frontier-history slots it may attend to (its ancestors and itself).
        f_hidden = last_out.expand(k, -1)
        f_tokens, f_scores = tokens, scores
        f_numbers = [torch.arange(k, device=device)]
        history = eye
        offset = k  # candidate number of the next level's first candidate
        for level in range(depth):
            written = slots[: (level + 1) * k]  # the frontier history's slots
            mask = prefix.clone().scatter_(1, written.expand(k, -1), history)[None, None]
            with write_plan(self.caches, written[level * k :], view):
                out = head(f_hidden[None], f_tokens[None], None, mask, self.caches,
                           rope=(cos[level][None], sin[level][None]))[0]  # [k, h]
            logp = torch.log_softmax(head.draft_logits(out).float(), dim=-1)
            child_p, child_ids = vocab_top_k(logp, k, self.vocab_chunk)  # [k, k]
            cum = (child_p + f_scores[:, None]).flatten()  # [k*k]
            child_tokens = head.to_target_ids(child_ids).flatten()
            cand_tokens.append(child_tokens)
            cand_scores.append(cum)
            if level == depth - 1:  # the last level's children are candidates, never parents
                break
            f_scores, best = cum.topk(k)
            parent_slot = best // k
            f_hidden, f_tokens = out[parent_slot], child_tokens[best]
            f_numbers.append(offset + best)
            history = torch.cat((history[parent_slot], eye), dim=1)
            offset += k * k
        # Level l's k*k children have the level's frontier as parents, each k
        # times (numbers + 1: 0 stands for the root, parent of level 0).
        parents = (torch.stack(f_numbers) + 1).repeat_interleave(k, dim=1).flatten()
        return select_tree(
            root_token,
            torch.cat(cand_tokens),
            torch.cat(cand_scores),
            torch.cat((torch.zeros(k, dtype=torch.long, device=device), parents)),
            total_token,
            depth + 1,
        )
