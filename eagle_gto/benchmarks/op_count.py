"""How many tensor operations one decoding step runs, by part of the step.

    python -m eagle_gto.benchmarks.op_count [--layers 32] [--total-token 60] [--depth 7] [--top-k 10] [--json OUT]

On the lent GPUs each eager operation costs about 12 us of host time, and
even inside a CUDA graph every kernel costs a few microseconds of GPU time:
the number of operations a step runs is what the engine's overhead is made
of. That number depends on the model's structure (its layer count), not its
width, so this runs on any machine, a CPU included: a Llama-3-8B-structured
model (32 layers, grouped-query attention, llama3 rope) at a tiny width with
a random EAGLE-3 head, eager, counting the operations that reach a kernel
(views and allocations excluded) in one plain step and one speculative
iteration, split into the parts of the iteration. Kernel counts on a GPU
differ a little (a fused kernel there may be several ops on a CPU), and
compiled layers (`EaModel(torch_compile=True)`) fuse many of them.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .. import generation
from ..cli_help import show_defaults
from ..drafter import Drafter
from ..generation import TreeParams
from ..kv_cache import TargetKVCache
from ..target import TargetRunner
from ..tree import check_tree_params
from .common import check_output_file, write_json
from .engine_overhead import build_model, check_layers
from .shapes import Shape

# The parts of a step, each the function that runs it (see generation.Decoder).
PARTS = {
    "draft tree": (Drafter, "draft_tree"),
    "verify (target forward)": (TargetRunner, "forward"),
    "pick tokens": (generation, "choose_tokens"),
    "accept": (generation, "accept"),
    "compact KV": (TargetKVCache, "keep"),
    "extend head": (Drafter, "extend"),
}
NOT_KERNELS = {"empty", "empty_strided", "detach", "_unsafe_view", "alias", "t", "lift_fresh", "_local_scalar_dense"}


class OpCounter(TorchDispatchMode):
    """Counts the operations that launch work, per current part."""

    def __init__(self):
        super().__init__()
        self.part = "other"
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ not in NOT_KERNELS:
            self.counts[self.part] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def attributed(self):
        """Within the block, operations inside each part's function count for that part."""
        with contextlib.ExitStack() as stack:
            for part, (owner, name) in PARTS.items():
                stack.enter_context(mock.patch.object(owner, name, self._wrap(part, getattr(owner, name))))
            yield

    def _wrap(self, part, function):
        def counted(*args, **kwargs):
            outer, self.part = self.part, part
            try:
                return function(*args, **kwargs)
            finally:
                self.part = outer
        return counted


def count_step(model, prompt: torch.Tensor, speculative: bool) -> collections.Counter:
    """Operations of the first step after the prefill, by part."""
    counter = OpCounter()
    with counter.attributed():
        steps = model.generate_steps(prompt, max_new_tokens=4, speculative=speculative)
        next(steps)  # the prefill
        with counter:
            next(steps)
        steps.close()
    return counter.counts


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m eagle_gto.benchmarks.op_count", description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=32, help="decoder layers of the base model (Llama-3-8B: 32)")
    p.add_argument("--total-token", type=int, default=60)
    p.add_argument("--depth", type=int, default=7)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--json", help="write the counts here")
    show_defaults(p)
    args = p.parse_args(argv)
    check_layers(p, "--layers", args.layers)
    check_output_file(p, "--json", args.json)
    shape = Shape(64, args.layers, 8, 2, 128, 2048, draft_vocab_size=512, llama3_rope=True)
    try:  # (the head's vocabulary too: a larger --top-k failed once the model was built)
        check_tree_params(args.total_token, args.depth, args.top_k, shape.draft_vocab_size)
    except ValueError as err:
        p.error(str(err))
    torch.manual_seed(0)
    tree = TreeParams(args.total_token, args.depth, args.top_k)
    model = build_model(shape, torch.device("cpu"), torch.float32, tree)
    model.cuda_graphs = False
    prompt = torch.randint(0, shape.vocab_size, (1, 16))
    plain = count_step(model, prompt, speculative=False)
    iteration = count_step(model, prompt, speculative=True)
    result = {"layers": args.layers, "tree": vars(tree), "plain_step": dict(plain), "iteration": dict(iteration),
              "plain_total": sum(plain.values()), "iteration_total": sum(iteration.values())}
    print(f"operations per step, {args.layers}-layer Llama-3-structured base, EAGLE-3 head, tree "
          f"{tree.total_token}/{tree.depth}/{tree.top_k} (eager; views and allocations not counted)\n")
    print("| part | plain step | draft-and-verify iteration |\n|---|---|---|")
    for part in list(PARTS) + ["other"]:
        print(f"| {part} | {plain.get(part, 0)} | {iteration.get(part, 0)} |")
    print(f"| **total** | **{result['plain_total']}** | **{result['iteration_total']}** |")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
