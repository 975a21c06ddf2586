"""The draft head's compiled step functions (`EaModel(torch_compile=True)`
compiles them, with the base model's layers, for GPUs): compiled with
torch.compile on the CPU here, they must decode exactly as the eager ones,
greedy and sampling. The base model's layers are left uncompiled: the tiny
pair is shared with other tests, and compiling stock transformers layers is
torch's business."""

import threading

import pytest
import torch
from test_static_steps import generate
from tiny_pairs import VOCAB, trained_pair

import eagle_gto.ea_model as ea_model
import eagle_gto.generation as generation
from eagle_gto import EaModel
from eagle_gto.graphs import compile_drafter_steps, eager_layers, eager_or_compiled


class BucketedEager:
    """StepGraphs without CUDA: the steps run as graphs would record them (bucketed views), eagerly."""

    def __init__(self, device=None, max_graphs: int = 64):
        pass

    def run(self, key, step):
        return step()


def test_compiled_draft_steps_decode_as_the_eager_ones(monkeypatch):
    pair = trained_pair("llama", "eagle3")
    monkeypatch.setattr(ea_model, "StepGraphs", BucketedEager)
    monkeypatch.setattr(generation, "VIEW_BUCKET", 128)  # one view: one compilation per function
    eager = EaModel(pair.base_model, pair.ea_layer, None, **vars(pair.tree))
    compiled = EaModel(pair.base_model, pair.ea_layer, None, **vars(pair.tree))
    compiled._caches(128)
    compile_drafter_steps(compiled._drafter)
    torch._dynamo.utils.counters.clear()
    g = torch.Generator().manual_seed(4)
    for _ in range(2):
        ids = torch.randint(0, VOCAB, (1, int(torch.randint(2, 20, (1,), generator=g))), generator=g)
        assert generate(compiled, True, True, ids) == generate(eager, True, True, ids)
        options = dict(temperature=0.9, top_p=0.95, top_k=20)
        assert generate(compiled, True, True, ids, seed=5, **options) == \
            generate(eager, True, True, ids, seed=5, **options)
    # both functions were compiled as one graph each, once (no recompilation per step)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_compile_modes_that_record_their_own_graphs_are_refused():
    """reduce-overhead and max-autotune record CUDA graphs themselves, which
    cannot happen inside the step graphs: refused before anything compiles."""
    pair = trained_pair("llama", "eagle3")
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(ValueError, match="max-autotune-no-cudagraphs"):
            EaModel(pair.base_model, pair.ea_layer, None, torch_compile=mode)
    assert not hasattr(pair.base_model.model.layers[0].forward, "compiled")


def test_compiled_layers_beneath_accelerate_device_hooks():
    """A base model sharded over GPUs has accelerate's device hooks around
    every layer's forward (not traceable: dynamo would break the graph on
    both sides of each layer). The layers compile beneath the hooks, so the
    hooks still run (here on one device, where they move nothing), every
    layer is whole, and decoding equals the uncompiled model's."""
    import copy

    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    from eagle_gto.placement import attach_head
    from eagle_gto.target import decoder_layers

    pair = trained_pair("llama", "eagle3")
    base, head = copy.deepcopy(pair.base_model), copy.deepcopy(pair.ea_layer)  # the shared pair stays uncompiled
    moved = []
    for layer in decoder_layers(base):
        add_hook_to_module(layer, AlignDevicesHook(execution_device=torch.device("cpu"), io_same_device=True))
        pre_forward = layer._hf_hook.pre_forward
        layer._hf_hook.pre_forward = lambda *a, _pre=pre_forward, **k: (moved.append(1), _pre(*a, **k))[1]
    attach_head(base, head)
    eager = EaModel(pair.base_model, pair.ea_layer, None, **vars(pair.tree))
    compiled = EaModel(base, head, None, torch_compile=True, **vars(pair.tree))
    torch._dynamo.utils.counters.clear()
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    assert compiled.eagenerate(ids, max_new_tokens=30).tolist() == eager.eagenerate(ids, max_new_tokens=30).tolist()
    assert moved, "the device hooks did not run"
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0


def test_a_compiled_eagle1_head_drafts_through_a_hooked_lm_head():
    """An EAGLE-1 head drafts with the base's lm_head, which carries an
    accelerate device hook on a sharded base: the compiled draft steps
    (whole graphs) must not trace into the hook, and decode as eager ones."""
    import copy

    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    from eagle_gto.placement import attach_head

    pair = trained_pair("llama", "eagle1")
    base, head = copy.deepcopy(pair.base_model), copy.deepcopy(pair.ea_layer)  # the shared pair stays as it is
    add_hook_to_module(base.lm_head, AlignDevicesHook(execution_device=torch.device("cpu"), io_same_device=True))
    attach_head(base, head)
    eager = EaModel(pair.base_model, pair.ea_layer, None, **vars(pair.tree))
    compiled = EaModel(base, head, None, **vars(pair.tree))
    compiled._caches(128)
    compile_drafter_steps(compiled._drafter)
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    assert generate(compiled, False, True, ids) == generate(eager, False, True, ids)


def test_one_set_of_compiled_graphs_serves_every_layer():
    """A layer's index is not baked into its compiled code, so a base twice
    as deep compiles no more graphs (an 8B model once compiled 96 layer
    graphs, minutes), and a second prompt length compiles none (the prefill
    runs eagerly)."""
    from transformers import AutoModelForCausalLM

    from eagle_gto.placement import attach_head
    from eagle_gto.tiny import base_config, head_config, random_head

    def graphs_compiled(num_layers: int) -> list[int]:  # graphs after each of two generations
        torch.manual_seed(0)
        cfg = base_config("llama", vocab_size=VOCAB, hidden_size=32, num_layers=num_layers)
        base = AutoModelForCausalLM.from_config(cfg).eval()
        head = random_head(head_config(cfg, "eagle1"))
        attach_head(base, head)
        model = EaModel(base, head, None, total_token=8, depth=3, top_k=2, torch_compile=True)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        counts = []
        for length in (5, 9):
            model.naivegenerate(torch.arange(length)[None], max_new_tokens=6)
            counts.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        return counts

    shallow, deep = graphs_compiled(3), graphs_compiled(6)
    assert shallow == deep
    assert 0 < deep[0] == deep[1]


def test_a_prefill_runs_the_layers_eagerly_in_its_own_thread_only():
    """The prefill's switch to eager layers is per thread: a process-wide one
    (torch.compiler.set_stance) made other threads' steps eager meanwhile,
    and two prefills ending out of order left it on for good."""
    calls = []
    forward = eager_or_compiled(lambda: calls.append("eager"), lambda: calls.append("compiled"))
    inside, release = threading.Event(), threading.Event()

    def prefill():
        with eager_layers():
            inside.set()
            release.wait(60)
            forward()

    thread = threading.Thread(target=prefill)
    thread.start()
    assert inside.wait(60)
    with eager_layers():  # this thread's prefill starts after the other's and ends first
        forward()
    forward()  # a step here while the other thread still prefills
    release.set()
    thread.join(60)
    forward()
    assert calls == ["eager", "compiled", "eager", "compiled"]


def test_eager_layers_nest():
    """Leaving an inner `eager_layers` (a prefill inside a caller's own)
    leaves the outer one in force."""
    calls = []
    forward = eager_or_compiled(lambda: calls.append("eager"), lambda: calls.append("compiled"))
    with eager_layers():
        with eager_layers():
            forward()
        forward()
    forward()
    assert calls == ["eager", "eager", "compiled"]
