"""The one generation loop, speculative or plain, written as a generator of steps.

Every public way to generate (`eagenerate`, `ea_generate`, `naivegenerate`,
`naive_generate`, the web UI, the HTTP API, the benchmarks) drains or streams
`generate_steps`; none of them re-implements the loop.

A speculative step:
  1. draft a tree from the head's last output (Drafter.draft_tree);
  2. verify it in one target forward with the tree-attention mask;
  3. pick the target's own token at every node, accept the longest matching
     branch and take the bonus token (acceptance.accept);
  4. compact the target cache onto the accepted branch;
  5. feed the accepted features and tokens to the head (Drafter.extend).
A plain step feeds the last token and picks the next one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .acceptance import SamplingParams, accept, choose_tokens
from .drafter import Drafter, prefix_mask
from .target import TargetRunner


@dataclass(frozen=True)
class TreeParams:
    total_token: int = 60
    depth: int = 7
    top_k: int = 10


@dataclass
class Step:
    """What one iteration produced. `tokens` are the new tokens (after
    stop/length truncation); `num_accepted` counts accepted draft tokens, so
    a step emits num_accepted + 1 tokens unless truncated."""

    tokens: list[int]
    num_accepted: int
    seconds: float
    finish_reason: str | None = None  # "stop" (stop token), "length" (token or context budget), None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class GenerationStats:
    """Per-iteration record of one generation. Iterations are target forward
    passes, the prefill included (it yields the first token)."""

    prompt_length: int
    steps: list[Step] = field(default_factory=list)

    @property
    def new_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.steps)

    @property
    def iterations(self) -> int:
        return len(self.steps)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.steps)

    @property
    def mean_accepted_length(self) -> float:
        """tau: new tokens per target forward, the bonus token counted
        (exactly 1.0 for plain decoding)."""
        return self.new_tokens / max(self.iterations, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def finish_reason(self) -> str | None:
        return self.steps[-1].finish_reason if self.steps else None


def _truncate(tokens: list[int], produced: int, max_new_tokens: int, stop_ids: set[int]) -> tuple[list[int], str | None]:
    """Cut new tokens after the first stop token or at the token budget."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: i + 1], "stop"
    room = max_new_tokens - produced
    if len(tokens) >= room:
        return tokens[:room], "length"
    return tokens, None


def generate_steps(
    target: TargetRunner,
    drafter: Drafter | None,
    cache,
    prompt: torch.Tensor,
    sampling: SamplingParams,
    tree: TreeParams,
    max_new_tokens: int,
    stop_ids: set[int],
    stats: GenerationStats,
    generator: torch.Generator | None = None,
) -> Iterator[Step]:
    """Yield one `Step` per iteration (prefill first) until a stop token, the
    token budget or the cache capacity ends the generation. `prompt` [P];
    `drafter` None means plain decoding. Appends each step to `stats`."""
    speculative = drafter is not None
    width = tree.total_token if speculative else 1  # slots one iteration writes
    produced = 0

    def truncate(tokens: list[int]) -> tuple[list[int], str | None]:
        nonlocal produced
        tokens, reason = _truncate(tokens, produced, max_new_tokens, stop_ids)
        produced += len(tokens)
        # The next iteration writes `width` slots and returns one token more
        # than it caches: stop while the sequence still fits in the cache.
        if reason is None and cache.length + width >= cache.capacity:
            reason = "length"
        return tokens, reason

    def record(tokens: list[int], num_accepted: int, started: float, reason: str | None) -> Step:
        step = Step(tokens, num_accepted, time.perf_counter() - started, reason)
        stats.steps.append(step)
        return step

    started = time.perf_counter()
    P = prompt.shape[0]
    cache.truncate(0)
    positions = torch.arange(P)
    logits, features = target.forward(prompt, positions, prefix_mask(P, 0, "cpu")[0, 0], cache, speculative, P - 1)
    last = choose_tokens(logits, sampling, generator)[0]
    tokens, reason = truncate([int(last)])
    if speculative and reason is None:
        drafter.reset()
        head_out = drafter.extend(features, torch.cat((prompt[1:].to(last.device), last[None])))
    step = record(tokens, 0, started, reason)
    yield step

    while not step.finished:
        started = time.perf_counter()
        past = cache.length  # the last token is not in the cache yet: it sits at position `past`
        if speculative:
            draft = drafter.draft_tree(head_out, last, tree.total_token, tree.depth, tree.top_k)
            visible = torch.cat((torch.ones(draft.size, past, dtype=torch.bool, device=draft.mask.device), draft.mask), dim=1)
            logits, features = target.forward(draft.tokens, past + draft.depths, visible, cache, True)
            result = accept(draft, choose_tokens(logits, sampling, generator).to(draft.tokens.device))
            # The step's one host transfer: the accepted count, the branch's tokens and the bonus.
            branch_tokens = draft.tokens[result.path.clamp(max=draft.size - 1)]
            host = torch.cat((result.num_accepted[None], branch_tokens, result.bonus[None])).tolist()
            num_accepted = host[0]
            tokens = host[2 : 2 + num_accepted] + host[-1:]
            path = result.path[: num_accepted + 1]
            cache.keep(past, path)
            last = result.bonus
            new = torch.cat((draft.tokens[path[1:]], last[None]))  # the same tokens, kept on the device
        else:
            visible = torch.ones(1, past + 1, dtype=torch.bool)
            logits, _ = target.forward(last[None], torch.tensor([past]), visible, cache)
            last = choose_tokens(logits, sampling, generator)[0]
            num_accepted = 0
            tokens = [int(last)]
        tokens, reason = truncate(tokens)
        if speculative and reason is None:
            head_out = drafter.extend(features[path.to(features.device)], new)
        step = record(tokens, num_accepted, started, reason)
        yield step
