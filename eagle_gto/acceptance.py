"""Choosing target tokens and accepting the longest matching tree branch.

Verification, greedy or sampling, is one rule: at every tree node the target
picks its own next token y (argmax, or a sample from its processed
distribution p); starting at the root, move to the child whose draft token
equals y while one exists; the last y is the bonus token.

Why this is lossless for sampling: the drafts are deterministic (q(x) = 1), so
the reference's rule (try each child x in draft-rank order, accept it with
probability p(x), else zero p(x) and renormalise; if all fail, sample the
bonus from what is left) accepts child x with probability exactly p(x) and
otherwise yields a bonus distributed as p restricted to the other tokens,
which is the same as drawing y ~ p once and checking whether it is a child.
Every emitted token is therefore a draw from the target's own distribution
given the tokens before it. Drawing y for every node up front uses each draw
at most once along the accepted branch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tree import DraftTree, take

GREEDY_TEMPERATURE = 1e-5  # up to this temperature decoding is greedy (the reference samples above it only)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 0.0  # 0 or >= 1: off
    top_k: int = 0  # 0: off

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_TEMPERATURE

    def canonical(self) -> "SamplingParams":
        """The same draws with the settings that change nothing left out
        (top-p/top-k in greedy decoding, top_p >= 1): settings that compute
        the same share one key, so one CUDA graph (`generation.Decoder`)."""
        if self.greedy:
            return SamplingParams()
        return SamplingParams(self.temperature, 0.0 if self.top_p >= 1 else self.top_p, self.top_k)

    def validate(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 <= self.top_p:
            raise ValueError(f"top_p must be >= 0 (0 turns it off), got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution sampling draws from, [n, V] float32: temperature, then
    top-p, then top-k (the reference's processor order)."""
    logits = logits.float() / params.temperature
    if 0 < params.top_p < 1:
        # TopPLogitsWarper's (the reference's) ascending sort, reversed, rather than a descending sort: of the
        # tokens tied at the boundary the same ones stay (it drops them in its ascending order).
        ascending, order = logits.sort(dim=-1)
        sorted_logits, order = ascending.flip(-1), order.flip(-1)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # The top token always stays (its mass_before is exactly 0): a top_p that float32 rounds to 0 is
        # raised to its smallest number, on the host, so that the step stays free of host tensors.
        drop = mass_before >= max(params.top_p, torch.finfo(mass_before.dtype).tiny)
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if params.top_k > 0:
        k = min(int(params.top_k), logits.shape[-1])
        kth = logits.topk(k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits.softmax(dim=-1)


def choose_tokens(logits: torch.Tensor, params: SamplingParams,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The target's own next token at each of n positions: logits [n, V] -> [n].
    Greedy takes the argmax in the logits' own dtype: casting to float32 is
    exact and argmax keeps the first of equal values, so the token is the same."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = target_probs(logits, params)
    # argmax of p / E with E ~ Exp(1) i.i.d. is a draw from p (the exponential
    # race); unlike multinomial it never syncs with the host, so a CUDA graph
    # can hold it. The clamp keeps a zero-probability token at 0 / tiny = 0.
    noise = torch.empty_like(probs).exponential_(generator=generator).clamp_(min=torch.finfo(probs.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


@dataclass
class Acceptance:
    path: torch.Tensor  # [T] node indices of the accepted branch, root first, padded with T (static shape)
    num_accepted: torch.Tensor  # scalar long: draft tokens accepted (path length - 1)
    bonus: torch.Tensor  # scalar long: the target's token after the accepted branch


def accept(tree: DraftTree, choices: torch.Tensor) -> Acceptance:
    """Longest branch whose every draft token equals the target's choice at
    its parent; `choices` [T] holds the target's token at each node."""
    T = tree.size
    order = torch.arange(T, device=tree.mask.device)
    matches = (tree.tokens == choices[tree.parents]) | (order == 0)  # the root is the target's own token
    # A node is reachable when it and all its ancestors match.
    reachable = ~(tree.mask & ~matches[None, :]).any(dim=1)
    best = torch.where(reachable, tree.depths, -1).argmax()
    path = torch.where(take(tree.mask, best), order, T).sort().values
    return Acceptance(path=path, num_accepted=take(tree.depths, best), bonus=take(choices, best))
