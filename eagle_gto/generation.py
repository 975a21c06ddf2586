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

`Decoder` does a step's device work. Its state (cache length, last token, the
head's last output) lives in device tensors that the step updates in place,
and the step's shapes depend only on the tree size and on `view`, the number
of cache slots attention reads: so one step can be recorded as a CUDA graph
and replayed (`graphs.StepGraphs`), and the eager run of the very same code
is the reference the tests check. The host learns one small tensor per step:
the accepted count, the branch's tokens and the bonus token.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .acceptance import SamplingParams, accept, choose_tokens
from .drafter import Drafter
from .graphs import StepGraphs, eager_layers
from .kv_cache import TargetKVCache, visible_slots
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


VIEW_BUCKET = 256  # with CUDA graphs, attention reads the cache in multiples of this many slots


def views_per_setting(max_length: int) -> int:
    """The most step shapes (so graphs) the generations of one setting use:
    a view per bucket, the draft's last, wider view, and the plain end."""
    return max_length // VIEW_BUCKET + 3


class DecodeState:
    """The device-side state one generation carries from step to step, in
    buffers that keep their addresses across generations (graphs read them)."""

    def __init__(self, device: torch.device, head_device: torch.device, hidden_size: int, dtype: torch.dtype):
        self.past = torch.zeros((), dtype=torch.long, device=device)  # cached positions; the last token sits at `past`
        self.head_past = self.past if head_device == device else torch.zeros((), dtype=torch.long, device=head_device)
        self.last = torch.zeros((), dtype=torch.long, device=device)  # the last token, not cached yet
        self.head_out = torch.zeros(hidden_size, dtype=dtype, device=head_device)  # the head's output after it

    def advance(self, count: torch.Tensor | int, last: torch.Tensor) -> None:
        self.past += count.to(self.past.device) if torch.is_tensor(count) else count
        if self.head_past is not self.past:
            self.head_past.copy_(self.past)
        self.last.copy_(last)

    def move_to(self, past: int) -> None:
        """Set the cache length (warm-up steps at chosen positions)."""
        self.past.fill_(past)
        self.head_past.fill_(past)


class Decoder:
    """Prefill and steps of one generation on the device (see the module
    docstring). `past` is the host's copy of the cache length."""

    def __init__(self, target: TargetRunner, drafter: Drafter | None, cache: TargetKVCache, state: DecodeState,
                 sampling: SamplingParams, tree: TreeParams, generator: torch.Generator | None,
                 graphs: StepGraphs | None):
        self.target, self.drafter, self.cache, self.state = target, drafter, cache, state
        self.sampling, self.tree, self.generator, self.graphs = sampling, tree, generator, graphs
        self.speculative = drafter is not None
        self.width = tree.total_token if self.speculative else 1  # slots one step writes
        self.reach = Drafter.view_needed(*dataclasses.astuple(tree)) if self.speculative else 1
        self.past = 0
        if self.speculative:  # what the steps call: compiled when the model is (the prefill stays eager)
            self.draft_tree, self.extend = drafter.compiled or (drafter.draft_tree, drafter.extend)

    def finish_plainly(self) -> None:
        """One-token steps from here on: for the end of the context, where a
        draft tree no longer fits but tokens still do (the target's state is
        the same in both modes; the head's is no longer needed)."""
        self.speculative = False
        self.width = self.reach = 1

    def prefill(self, prompt: torch.Tensor) -> int:
        """Feed the prompt [P]; return the first new token."""
        P = prompt.shape[0]
        slots = torch.arange(P, device=prompt.device)
        causal = torch.ones(P, P, dtype=torch.bool, device=prompt.device).tril()
        # Eager even when the layers are compiled: prompts come in every length, and one
        # compute-bound forward gains little from compilation against a recompile per length.
        with eager_layers():
            logits, features = self.target.forward(prompt, slots, causal, self.cache, self.speculative, P - 1,
                                                   slots=slots)
        first = choose_tokens(logits, self.sampling, self.generator)[0]
        state = self.state
        state.past.zero_()
        state.advance(P, first)
        if self.speculative:
            after = torch.cat((prompt[1:], first[None].to(prompt.device)))
            state.head_out.copy_(self.drafter.extend(features, after, start=0, view=P))
        self.past = P
        return int(first)

    def views(self, past: int) -> tuple[int, int]:
        """The cache slots attention reads in a step at cache length `past`:
        (the target's, the head's; 0 in a plain step)."""
        view = past + self.reach
        if self.graphs is not None:  # a few graph shapes: round the view up
            view = -(-view // VIEW_BUCKET) * VIEW_BUCKET
        return min(view, self.cache.capacity), min(view, self.drafter.caches[0].capacity) if self.speculative else 0

    def step(self) -> tuple[list[int], int]:
        """One iteration: (new tokens, accepted draft tokens)."""
        view_target, view_draft = self.views(self.past)
        run = self._speculative_step if self.speculative else self._plain_step
        if self.graphs is None:
            out = run(view_target, view_draft)
        else:
            key = (self.speculative, self.sampling, self.tree, view_target, view_draft)
            out = self.graphs.run(key, lambda: run(view_target, view_draft))
        host = out.tolist()  # the step's one host synchronisation
        if not self.speculative:
            self.past += 1
            return host, 0
        num_accepted = host[0]
        self.past += num_accepted + 1
        return host[2 : 2 + num_accepted] + host[-1:], num_accepted

    def _plain_step(self, view: int, _view_draft: int) -> torch.Tensor:
        state = self.state
        slot = state.past[None]
        visible = (torch.arange(view, device=slot.device) <= state.past)[None]
        logits, _ = self.target.forward(state.last[None], slot, visible, self.cache, slots=slot)
        token = choose_tokens(logits, self.sampling, self.generator)[0]
        state.advance(1, token)
        return token[None]

    def _speculative_step(self, view_target: int, view_draft: int) -> torch.Tensor:
        state, tree = self.state, self.tree
        draft = self.draft_tree(state.head_out, state.last, tree.total_token, tree.depth, tree.top_k,
                                start=state.head_past, view=view_draft)
        device = draft.tokens.device
        T = draft.size
        slots = torch.arange(T, device=device) + state.head_past
        visible = visible_slots(state.head_past, view_target, draft.mask)
        logits, features = self.target.forward(draft.tokens, state.head_past + draft.depths, visible, self.cache,
                                               True, slots=slots)
        result = accept(draft, choose_tokens(logits, self.sampling, self.generator).to(device))
        # The accepted branch, padded to its longest possible length (depth + 2
        # nodes) so that shapes stay static; the padding lands in scratch slots.
        path = result.path[: tree.depth + 2].clamp(max=T - 1)
        self.cache.keep(state.past, path)
        branch = draft.tokens[path]
        after = torch.cat((branch[1:], result.bonus[None]))  # the token that follows each branch node
        after = torch.where(torch.arange(path.shape[0], device=device) == result.num_accepted, result.bonus, after)
        head_out = self.extend(features[path.to(features.device)], after, start=state.head_past, view=view_draft,
                               last=result.num_accepted)
        state.head_out.copy_(head_out)
        state.advance(result.num_accepted + 1, result.bonus)
        return torch.cat((result.num_accepted[None], branch, result.bonus[None]))


def _truncate(tokens: list[int], produced: int, max_new_tokens: int,
              stop_ids: set[int]) -> tuple[list[int], str | None]:
    """Cut new tokens at the token budget, then after the first stop token
    within it (a stop token past the budget is never reached, as in plain
    decoding)."""
    room = max_new_tokens - produced
    tokens = tokens[:room]
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: i + 1], "stop"
    return tokens, "length" if len(tokens) == room else None


def generate_steps(decoder: Decoder, prompt: torch.Tensor, max_new_tokens: int, stop_ids: set[int],
                   stats: GenerationStats) -> Iterator[Step]:
    """Yield one `Step` per iteration (prefill first) until a stop token, the
    token budget or the cache capacity ends the generation. `prompt` [P].
    Appends each step to `stats`."""
    produced = 0
    step: Step | None = None
    while step is None or not step.finished:
        started = time.perf_counter()
        if step is None:
            tokens, num_accepted = [decoder.prefill(prompt)], 0
        else:
            tokens, num_accepted = decoder.step()
        tokens, reason = _truncate(tokens, produced, max_new_tokens, stop_ids)
        produced += len(tokens)
        # The next step writes `width` slots and returns one token more than
        # it caches: stop while the sequence still fits in the cache. Where only
        # a tree no longer fits, finish with one-token steps, as plain decoding does.
        if reason is None and decoder.past + decoder.width >= decoder.cache.capacity:
            if decoder.speculative and decoder.past + 1 < decoder.cache.capacity:
                decoder.finish_plainly()
            else:
                reason = "length"
        step = Step(tokens, num_accepted, time.perf_counter() - started, reason)
        stats.steps.append(step)
        yield step


def warm_up_steps(decoder: Decoder, prompt: torch.Tensor) -> int:
    """Run a step at every attention view (`Decoder.views`) that a generation
    with this decoder's settings can reach: speculative steps at each cache
    length where a tree still fits, then the plain steps that finish the
    context. With step graphs each new view records its graph, so no later
    generation records one; without them the view grows a slot a step, and
    two views of each kind are enough for compiled steps (a second shape
    makes torch.compile's shapes dynamic). What it leaves in the caches lies
    past the next prefill's length. Returns the number of steps run."""
    decoder.prefill(prompt)
    capacity = decoder.cache.capacity
    phases = [range(decoder.past, capacity - 1)]  # a plain step at each length where a token fits
    if decoder.speculative:  # a tree fits; then plain steps finish the context
        phases = [range(decoder.past, capacity - decoder.width),
                  range(max(decoder.past, capacity - decoder.width), capacity - 1)]
    steps = 0
    for phase, positions in enumerate(phases):
        if phase == len(phases) - 1:
            decoder.finish_plainly()
        seen: set[tuple[int, int]] = set()
        for past in positions:
            if decoder.graphs is None and len(seen) == 2:
                break
            views = decoder.views(past)
            if views in seen:
                continue
            seen.add(views)
            decoder.past = past
            decoder.state.move_to(past)
            decoder.step()
            steps += 1
    return steps
