"""Runs a draft head over the accepted prefix and expands the draft tree.

Draft cache layout: entry j pairs the target feature at position j with the
token at position j + 1 and sits at position j; its output predicts the token
at j + 2. While a tree is expanded, the frontier's entries are written after
the prefix as scratch and dropped afterwards.
"""

from __future__ import annotations

import torch

from .heads import DraftHead
from .kv_cache import KVBuffer
from .tree import DraftTree, select_tree


def prefix_mask(n: int, past: int, device) -> torch.Tensor:
    """Bool [1, 1, n, past + n]: the past is visible, the new entries causally."""
    new = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    old = torch.ones(n, past, dtype=torch.bool, device=device)
    return torch.cat((old, new), dim=1)[None, None]


class Drafter:
    def __init__(self, head: DraftHead, capacity: int):
        self.head = head
        self.caches = [KVBuffer(capacity) for _ in range(head.num_layers)]

    @property
    def length(self) -> int:
        return self.caches[0].length

    def _set_length(self, length: int) -> None:
        for cache in self.caches:
            cache.length = length

    def reset(self) -> None:
        self._set_length(0)

    @torch.no_grad()
    def extend(self, features: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """Append entries for target features [n, F] (positions L..L+n-1) and
        the tokens that follow them [n]; return the last output [h]."""
        device = self.head.fc.weight.device
        hidden = self.head.project_features(features.to(device, self.head.fc.weight.dtype))[None]
        past = self.length
        n = hidden.shape[1]
        positions = torch.arange(past, past + n, device=device)[None]
        out = self.head(hidden, next_tokens.to(device)[None], positions, prefix_mask(n, past, device), self.caches)
        return out[0, -1]

    @torch.no_grad()
    def draft_tree(self, last_out: torch.Tensor, root_token: torch.Tensor, total_token: int, depth: int, top_k: int) -> DraftTree:
        """Expand `depth` levels from the head output `last_out` [h] that
        follows the root, then keep the best `total_token - 1` candidates."""
        head, device = self.head, last_out.device
        prefix = self.length
        logp = torch.log_softmax(head.draft_logits(last_out[None]).float(), dim=-1)[0]
        scores, ids = logp.topk(top_k)
        tokens = head.to_target_ids(ids)
        cand_tokens, cand_scores = [tokens], [scores]
        cand_parents = [torch.zeros(top_k, dtype=torch.long, device=device)]
        # The frontier: hidden to feed, token, score, candidate number, and the
        # frontier-history slots it may attend to (its ancestors and itself).
        f_hidden = last_out.expand(top_k, -1)
        f_tokens, f_scores = tokens, scores
        f_numbers = torch.arange(top_k, device=device)
        history = torch.eye(top_k, dtype=torch.bool, device=device)
        visible_prefix = torch.ones(top_k, prefix, dtype=torch.bool, device=device)
        offset = top_k  # candidate number of the next level's first candidate
        for level in range(depth):
            positions = torch.full((1, top_k), prefix + level, device=device)
            mask = torch.cat((visible_prefix, history), dim=1)[None, None]
            out = head(f_hidden[None], f_tokens[None], positions, mask, self.caches)[0]  # [k, h]
            logp = torch.log_softmax(head.draft_logits(out).float(), dim=-1)
            child_p, child_ids = logp.topk(top_k, dim=-1)  # [k, k]
            cum = (child_p + f_scores[:, None]).flatten()  # [k*k]
            child_tokens = head.to_target_ids(child_ids).flatten()
            cand_tokens.append(child_tokens)
            cand_scores.append(cum)
            cand_parents.append((f_numbers + 1).repeat_interleave(top_k))
            f_scores, best = cum.topk(top_k)
            parent_slot = best // top_k
            f_hidden, f_tokens = out[parent_slot], child_tokens[best]
            f_numbers = offset + best
            history = torch.cat(
                (history[parent_slot], torch.eye(top_k, dtype=torch.bool, device=device)), dim=1
            )
            offset += top_k * top_k
        self._set_length(prefix)  # drop the frontier scratch entries
        return select_tree(
            root_token,
            torch.cat(cand_tokens),
            torch.cat(cand_scores),
            torch.cat(cand_parents),
            total_token,
            depth + 1,
        )
