"""CUDA graphs of decoding steps: the one place where the engine records and
replays device work.

On the lent GPUs a PyTorch op costs about 12 us of host time, and one
speculative step issues thousands of them: launched one by one, the host, not
the GPU, sets the pace. A `Decoder` step has static shapes for a given key
(tree size, sampling settings, attention view) and keeps its state in
tensors it updates in place, so it can be recorded once per key and replayed
with a single launch. Compilation (`EaModel(torch_compile=True)`) fuses the
kernels a step records: the base model's decoder layers (one set of graphs
shared by all) and the draft head's step work as whole functions.
"""

from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from typing import Callable, Hashable, Iterator

import torch


class StepGraphs:
    """One CUDA graph per key, all in one memory pool, on the model's
    `device`. Keys include the sampling settings, so a server whose clients
    vary them could collect graphs without end: past `max_graphs` all are
    dropped and re-recorded."""

    def __init__(self, device: torch.device, max_graphs: int = 64) -> None:
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self.device = device
        self.max_graphs = max_graphs

    def __len__(self) -> int:
        return len(self._graphs)

    def latest(self) -> torch.cuda.CUDAGraph:
        """The most recently recorded graph (benchmarks time its replays)."""
        return next(reversed(self._graphs.values()))[0]

    def run(self, key: Hashable, step: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run `step` (it returns a tensor) through its graph. The first call
        at a key runs it eagerly, which is both a real step and the warm-up
        that recording needs, then records it: recording executes nothing."""
        # Streams, captures and replays belong to the current device: make it the model's
        # (a model on cuda:1 would otherwise be recorded on cuda:0's streams, capturing nothing).
        with torch.cuda.device(self.device):
            return self._run(key, step)

    def _run(self, key: Hashable, step: Callable[[], torch.Tensor]) -> torch.Tensor:
        recorded = self._graphs.get(key)
        if recorded is not None:
            graph, output = recorded
            graph.replay()
            return output
        if len(self._graphs) >= self.max_graphs:
            self._graphs.clear()
            self._pool = None  # a fresh pool for the graphs recorded from now on
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            result = step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = step()
        self._pool = graph.pool()
        self._graphs[key] = (graph, output)
        return result


# torch.compile modes that leave CUDA graphs to the step graphs: the others
# record graphs of their own, which cannot be recorded inside ours.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def check_compile_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise ValueError(f"torch_compile mode {mode!r}: choose from {COMPILE_MODES} (the step graphs are CUDA "
                         "graphs already; modes that record their own cannot run inside them)")
    return mode


_layers_eager = threading.local()


@contextmanager
def eager_layers() -> Iterator[None]:
    """Compiled decoder layers run their eager forward in this thread
    meanwhile (the prefill: prompts come in every length). Per thread:
    `torch.compiler.set_stance` is process-wide, and two threads' prefills
    ending out of order once left every later step eager."""
    before = getattr(_layers_eager, "on", False)
    _layers_eager.on = True
    try:
        yield
    finally:
        _layers_eager.on = before


def eager_or_compiled(eager: Callable, compiled: Callable) -> Callable:
    """A layer forward that runs `compiled`, or `eager` inside `eager_layers`."""

    @functools.wraps(eager)
    def forward(*args, **kwargs):
        return (eager if getattr(_layers_eager, "on", False) else compiled)(*args, **kwargs)

    forward.compiled = compiled
    return forward


def _raise_recompile_limits() -> None:
    """Let dynamo keep more compiled graphs per function than its default 8
    (one per step shape). Process-wide, as dynamo's settings are."""
    import torch._dynamo

    config = torch._dynamo.config
    config.cache_size_limit = max(config.cache_size_limit, 64)
    config.accumulated_cache_size_limit = max(config.accumulated_cache_size_limit, 256)


def compile_decoder_layers(base, mode: str = "default") -> None:
    """`torch.compile` every decoder layer of a base model, so that the many
    small kernels of its norms, rotary embeddings and activations are fused
    before the step graphs record them. They compile per step shape on
    first use; the prefill runs them eagerly (`eager_layers`)."""
    import torch._dynamo

    from .target import decoder_layers

    config = torch._dynamo.config
    layers = decoder_layers(base)
    # One set of compiled graphs serves every layer: a layer's index (it only
    # says where in the KV stack the layer writes and reads, `TargetKVCache.update`)
    # is a symbolic integer, not a constant per layer. Graphs per layer took 3.5 minutes on
    # an 8B model (96 compilations) and recompiled every layer for each new
    # input shape. Process-wide, as dynamo's settings are.
    config.allow_unspec_int_on_nn_module = True
    _raise_recompile_limits()
    for layer in layers:
        # A model sharded over devices has accelerate's hooks around each forward: they move
        # tensors between devices and are not traceable, so compile the forward beneath them.
        name = "_old_forward" if hasattr(layer, "_hf_hook") else "forward"
        forward = getattr(layer, name)
        # Compiled already (a second EaModel on the same base, or the user): keep that compilation.
        if not (hasattr(forward, "compiled") or hasattr(forward, "_torchdynamo_orig_callable")):
            setattr(layer, name, eager_or_compiled(forward, torch.compile(forward, mode=check_compile_mode(mode))))


def compile_drafter_steps(drafter, mode: str = "default") -> None:
    """`torch.compile` what a decoding step asks of the draft head, each as
    one graph: the tree expansion (`draft_tree`: a head forward per level and the
    top-k bookkeeping between them) and the extension by the accepted branch
    (`extend`). The decoder calls them through `drafter.compiled`; the
    prefill and the trainers keep the eager functions."""
    # One entry per tree size and drafter (a new one comes with a new max_length): more than the default 8.
    _raise_recompile_limits()
    mode = check_compile_mode(mode)
    drafter.compiled = (torch.compile(drafter.draft_tree, fullgraph=True, mode=mode),
                        torch.compile(drafter.extend, fullgraph=True, mode=mode))
