"""The steps CUDA graphs record: with graphs on, a step's attention reads a
view of the caches rounded up to whole buckets (scratch slots masked out),
and the step runs from state kept on the device. Graphs need a GPU; here a
stand-in runs each recorded step eagerly, so the CPU checks that the
bucketed static-shape steps produce exactly what the tight eager steps do,
greedy and sampling, speculative and plain, across generations; and that a
step never reads a device value on the host (`.item()`, indexing by a 0-dim
tensor) nor makes a tensor from host data (which would be a host-to-device
copy): either breaks graph recording, and costs a synchronisation. A second
stand-in replays what it recorded, as a graph does, so that a step which
bakes in a host value (the host's cache length, a setting the graph key
lacks) decodes wrongly on the CPU too."""

import pytest
import torch
from tiny_pairs import VOCAB, trained_pair
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

import eagle_gto.ea_model as ea_model
import eagle_gto.generation as generation
from eagle_gto.generation import TreeParams


class NoHostValues(TorchDispatchMode):
    """Fails on the ops behind a host read of a device value and behind a
    tensor made from Python data."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.lift_fresh.default):
            raise AssertionError(f"a step must not run {func}")
        return func(*args, **(kwargs or {}))


class EagerGraphs:
    """StepGraphs without CUDA: runs the step under NoHostValues, records the keys it saw."""

    keys: list = []

    def __init__(self, device=None, max_graphs: int = 64):
        self.max_graphs = max_graphs

    def run(self, key, step):
        EagerGraphs.keys.append(key)
        with NoHostValues():
            return step()


class _Made:
    """Stands for the n-th tensor a recorded step made."""

    def __init__(self, n: int):
        self.n = n


class Recording(NoHostValues):
    """Records the ops a step runs (with NoHostValues' checks): each op with
    its arguments, where the tensors the step made stand as `_Made` and
    every other tensor (weights, caches, the decode state) and value stays as
    it was, as a CUDA graph records them: tensors at fixed addresses, host
    values baked in."""

    def __init__(self):
        super().__init__()
        self.ops, self.made = [], {}  # id(tensor) -> (number, tensor), the tensor kept alive meanwhile

    def ref(self, x):
        return _Made(self.made[id(x)][0]) if isinstance(x, torch.Tensor) and id(x) in self.made else x

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        inputs = {id(x) for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:  # (an in-place op returns its input: not made here)
            if isinstance(tensor, torch.Tensor) and id(tensor) not in self.made and id(tensor) not in inputs:
                self.made[id(tensor)] = (len(self.made), tensor)
        self.ops.append((func, tree_map(self.ref, (args, kwargs or {})), tree_map(self.ref, out)))
        return out


def replay(ops, result):
    made = {}

    def get(x):
        return made[x.n] if isinstance(x, _Made) else x

    for func, (args, kwargs), out in ops:
        value = func(*tree_map(get, args), **tree_map(get, kwargs))
        for spec, tensor in zip(tree_flatten(out)[0], tree_flatten(value)[0]):
            if isinstance(spec, _Made):
                made[spec.n] = tensor
    return get(result)


class ReplayingGraphs(EagerGraphs):
    """StepGraphs without CUDA, closer to them than EagerGraphs: the first
    step at a key runs and is recorded (`Recording`); every later one at that
    key replays the recording, not the step it is handed, as a CUDA graph
    replays its kernels. So a step that reads a host value which changes
    between replays (the host's cache length, the generation's settings or
    caches) decodes wrongly here, as it would on the GPU."""

    def __init__(self, device=None, max_graphs: int = 64):
        super().__init__(device, max_graphs)
        self.recorded = {}

    def run(self, key, step):
        EagerGraphs.keys.append(key)
        if key in self.recorded:
            return replay(*self.recorded[key])
        with Recording() as recording:
            out = step()
        self.recorded[key] = (recording.ops, recording.ref(out))
        return out


def test_host_value_detector_catches_what_it_should():
    x = torch.arange(5.0)
    with NoHostValues(), pytest.raises(AssertionError, match="_local_scalar_dense"):
        x[x.argmax()]  # a 0-dim index is read on the host
    with NoHostValues(), pytest.raises(AssertionError, match="lift_fresh"):
        x[torch.arange(2)] = torch.tensor(1.0)  # host data


def test_the_replaying_stand_in_replays_what_it_recorded():
    """As a CUDA graph: a replay runs the recorded ops on the same tensors
    (state kept there advances), with host values as they were recorded, and
    whatever step it is handed at that key."""
    graphs, state, host = ReplayingGraphs(), torch.zeros(2), [1.0]

    def step():
        return state.add_(host[0]).mul(2)

    assert graphs.run("key", step).tolist() == [2.0, 2.0]
    host[0] = 10.0
    assert graphs.run("key", step).tolist() == [4.0, 4.0]  # adds the recorded 1.0
    assert graphs.run("key", lambda: state.sub_(5)).tolist() == [6.0, 6.0]  # the recorded step, not this one
    assert graphs.run("other", step).tolist() == [26.0, 26.0]


@pytest.fixture
def graphs_on_cpu(monkeypatch):
    EagerGraphs.keys = []
    monkeypatch.setattr(ea_model, "StepGraphs", EagerGraphs)
    monkeypatch.setattr(generation, "VIEW_BUCKET", 32)  # several buckets within a short generation
    return EagerGraphs


def isolated(model, monkeypatch):
    """The cached tiny pair, with its graph settings restored after the test
    (other tests share the object)."""
    monkeypatch.setattr(model, "cuda_graphs", model.cuda_graphs)
    monkeypatch.setattr(model, "_graphs", model._graphs)
    return model


def generate(model, graphs: bool, speculative: bool, ids, seed: int | None = None, **options):
    model.cuda_graphs = graphs
    if seed is not None:
        torch.manual_seed(seed)
    run = model.eagenerate if speculative else model.naivegenerate
    out = run(ids, max_new_tokens=40, max_length=128, **options)
    return out.tolist(), [s.num_accepted for s in model.last_stats.steps]


@pytest.mark.parametrize("arch,kind", [("llama", "eagle3"), ("qwen3", "eagle1")])
def test_bucketed_steps_equal_eager_steps(arch, kind, graphs_on_cpu, monkeypatch):
    model = isolated(trained_pair(arch, kind), monkeypatch)
    g = torch.Generator().manual_seed(11)
    for _ in range(3):
        ids = torch.randint(0, VOCAB, (1, int(torch.randint(2, 20, (1,), generator=g))), generator=g)
        for speculative in (True, False):
            eager = generate(model, False, speculative, ids)
            graphed = generate(model, True, speculative, ids)
            assert graphed == eager
            # sampling: the same random draws in the same order, so the same tokens
            options = dict(temperature=0.9, top_p=0.95, top_k=20)
            assert generate(model, True, speculative, ids, seed=5, **options) == \
                generate(model, False, speculative, ids, seed=5, **options)
    keys = graphs_on_cpu.keys
    views = sorted({key[3] for key in keys})
    assert len(views) >= 2 and all(v % 32 == 0 or v == 128 for v in views)  # buckets, capped by max_length
    assert len(set(keys)) < len(keys) / 4  # few shapes: each would be one recorded graph


def test_replayed_steps_decode_as_eager_steps(monkeypatch):
    """Steps replayed as recorded (`ReplayingGraphs`) decode as eager ones:
    greedy and sampling, speculative and plain, after a max_length change
    (new caches) and a tree change (the same views); and a caller's generator
    (drawn from by the steps: eager ones) is the one drawn from."""
    model = isolated(trained_pair("llama", "eagle3"), monkeypatch)
    monkeypatch.setattr(model, "_tree", model.tree)  # (restored after the test)
    monkeypatch.setattr(EagerGraphs, "keys", [])
    monkeypatch.setattr(ea_model, "StepGraphs", ReplayingGraphs)
    monkeypatch.setattr(generation, "VIEW_BUCKET", 32)
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(8))
    sampling = dict(temperature=0.9, top_p=0.95, top_k=20)

    def decode(graphs, speculative, max_length, **options):
        model.cuda_graphs = graphs
        torch.manual_seed(5)
        run = model.eagenerate if speculative else model.naivegenerate
        out = run(ids, max_new_tokens=40, max_length=max_length, **options).tolist()
        return out, [s.num_accepted for s in model.last_stats.steps]

    model.cuda_graphs = True
    model._graphs = None
    for max_length, tree in ((128, model.tree), (96, model.tree), (96, TreeParams(16, 4, 3))):
        model.tree = tree
        for speculative in (True, False):
            for options in ({}, sampling):
                assert decode(True, speculative, max_length, **options) == \
                    decode(False, speculative, max_length, **options), (max_length, tree, speculative, options)
    assert len(set(EagerGraphs.keys)) < len(EagerGraphs.keys) / 4  # most steps were replays
    for speculative in (True, False):
        outs = []
        for graphs in (False, True):
            model.cuda_graphs = graphs
            steps = model.generate_steps(ids, max_new_tokens=30, max_length=96, speculative=speculative,
                                         generator=torch.Generator().manual_seed(3), **sampling)
            outs.append([token for step in steps for token in step.tokens])
        assert outs[0] == outs[1]


def test_state_does_not_leak_between_generations(graphs_on_cpu, monkeypatch):
    """Caches, state and graphs are reused: a short generation after a long
    one, and a prompt that ends at once, change nothing."""
    model = isolated(trained_pair("llama", "eagle3"), monkeypatch)
    long_prompt = torch.randint(0, VOCAB, (1, 25), generator=torch.Generator().manual_seed(1))
    short_prompt = long_prompt[:, :3]
    first = generate(model, True, True, short_prompt)
    generate(model, True, True, long_prompt)
    model.cuda_graphs = True
    model.eagenerate(short_prompt, max_new_tokens=1, max_length=128)
    assert generate(model, True, True, short_prompt) == first


def test_the_end_of_the_context_in_one_token_steps(graphs_on_cpu, monkeypatch):
    """Where a draft tree no longer fits, the graphed steps go on one token at
    a time (plain steps, their own graphs) and fill max_length as eager ones do."""
    model = isolated(trained_pair("llama", "eagle3"), monkeypatch)
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(2))
    for options in ({}, dict(temperature=0.9, top_p=0.95)):
        outs = []
        for graphs in (False, True):
            model.cuda_graphs = graphs
            torch.manual_seed(3)
            outs.append(model.eagenerate(ids, max_new_tokens=500, max_length=90, **options).tolist())
        assert outs[0] == outs[1] and len(outs[0][0]) == 90
    modes = [key[0] for key in graphs_on_cpu.keys]  # key[0]: speculative
    assert modes[0] is True and modes[-1] is False



@pytest.mark.parametrize("speculative,options", [(True, {}), (True, dict(temperature=0.8, top_p=0.9)),
                                                 (False, {})])
def test_warm_up_records_every_step_shape_a_generation_uses(speculative, options, graphs_on_cpu, monkeypatch):
    """`EaModel.warm_up` steps once at each view a generation with the same
    settings can reach (one graph each), and leaves nothing behind: later
    generations of any prompt length record no new graph and answer as
    without it."""
    model = isolated(trained_pair("llama", "eagle3"), monkeypatch)
    run = model.eagenerate if speculative else model.naivegenerate
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, VOCAB, (1, n), generator=g) for n in (2, 70, 126)]

    def answers():
        outs = []
        for ids in prompts:
            torch.manual_seed(6)
            outs.append(run(ids, max_new_tokens=500, max_length=128, **options).tolist())
        return outs

    model.cuda_graphs = False
    assert model.warm_up(max_length=128, speculative=speculative, **options) == 0  # eager: nothing to prepare
    eager = answers()
    model.cuda_graphs = True
    steps = model.warm_up(max_length=128, speculative=speculative, **options)
    warmed = set(graphs_on_cpu.keys)
    assert steps == len(graphs_on_cpu.keys) == len(warmed)  # one step per shape
    graphs_on_cpu.keys = []
    assert answers() == eager
    used = set(graphs_on_cpu.keys)
    assert used <= warmed and len(used) >= 3  # buckets of 32 slots up to 128, and the plain end
    # a warm-up with other settings prepares other shapes: the check above can fail
    model._graphs, graphs_on_cpu.keys = None, []
    model.warm_up(max_length=128, speculative=speculative, **{**options, "temperature": 0.5})
    assert not used <= set(graphs_on_cpu.keys)


@pytest.mark.parametrize("speculative", [True, False])
@pytest.mark.parametrize("max_length", [66, 87])
def test_warm_up_reaches_the_views_at_the_ends_of_each_phase(max_length, speculative, graphs_on_cpu, monkeypatch):
    """The last cache length of each phase may be the only one with its view
    (buckets of 32; a tree of 24): at 66 the last speculative step (41) and
    the last one-token step (64); at 87 the first one-token step after the
    trees (63). Prompts that start a generation there find their step warmed;
    and views_per_setting bounds what one setting warms."""
    model = isolated(trained_pair("llama", "eagle3"), monkeypatch)
    model.cuda_graphs = True
    steps = model.warm_up(max_length=max_length, speculative=speculative)
    warmed = set(graphs_on_cpu.keys)
    assert steps == len(warmed) <= generation.views_per_setting(max_length)
    width = model.tree.total_token
    g = torch.Generator().manual_seed(9)
    for length in (max_length - width - 1, max_length - width, max_length - 2):
        graphs_on_cpu.keys = []
        ids = torch.randint(0, VOCAB, (1, length), generator=g)
        (model.eagenerate if speculative else model.naivegenerate)(ids, max_new_tokens=2, max_length=max_length)
        assert len(graphs_on_cpu.keys) == 1 and set(graphs_on_cpu.keys) <= warmed, length


def test_warm_up_after_a_move_prepares_the_moved_models_steps(graphs_on_cpu, monkeypatch):
    """A model moved where graphs become possible (CPU to one GPU; here a cast
    stands in) turns them on with its new caches: warm_up must see that,
    not the old setting."""
    model = isolated(trained_pair("llama", "eagle3"), monkeypatch)
    monkeypatch.setattr(model, "_cuda_graphs_asked", None)
    model.cuda_graphs = False
    model.eagenerate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, max_length=128)  # caches for the old layout
    monkeypatch.setattr(ea_model.EaModel, "_check_graphs", lambda self, wanted: True)
    model.to(torch.float64)
    try:
        assert model.warm_up(max_length=128) > 0 and graphs_on_cpu.keys
        graphs_on_cpu.keys = []
        model.eagenerate(torch.tensor([[1, 2, 3]]), max_new_tokens=40, max_length=128)
        assert graphs_on_cpu.keys and model.cuda_graphs
    finally:  # back, with caches for that layout (the shared pair's next user finds them)
        model.to(torch.float32)
        model.eagenerate(torch.tensor([[1, 2, 3]]), max_new_tokens=1, max_length=128)


def test_warm_ups_of_long_contexts_keep_their_graphs(monkeypatch):
    """StepGraphs drops every graph once it holds `max_graphs`: the room it is
    given must hold a warm-up of both modes up to a long max_length, with
    room for more settings."""

    class ClearingGraphs(EagerGraphs):  # StepGraphs' bookkeeping, without CUDA
        def run(self, key, step):
            used.add(key)
            if key not in kept:
                if len(kept) >= self.max_graphs:
                    kept.clear()
                kept.add(key)
            return step()

    kept, used = set(), set()
    model = isolated(trained_pair("llama", "eagle3"), monkeypatch)
    monkeypatch.setattr(ea_model, "StepGraphs", ClearingGraphs)
    monkeypatch.setattr(generation, "VIEW_BUCKET", 32)
    model.cuda_graphs = True
    steps = sum(model.warm_up(max_length=4096, speculative=speculative) for speculative in (True, False))
    assert len(used) > 64 and kept == used  # more graphs than the old fixed room of 64, all kept
    assert model._graphs.max_graphs >= 4 * len(used) and steps >= len(used)



def test_warm_up_compiles_with_two_views_of_each_kind(monkeypatch):
    """Without step graphs the view grows one slot a step: compiled steps need
    only two shapes of each kind (speculative, plain) to go dynamic."""
    model = isolated(trained_pair("llama", "eagle3"), monkeypatch)
    model.cuda_graphs = False
    monkeypatch.setattr(model, "torch_compile", "default")  # (the steps stay eager: this counts them)
    monkeypatch.setattr(ea_model, "compile_drafter_steps", lambda drafter, mode: None)
    assert model.warm_up(max_length=128) == 4
    assert model.warm_up(max_length=128, speculative=False) == 2
    with pytest.raises(ValueError, match="temperature"):
        model.warm_up(temperature=-1)



@pytest.mark.parametrize("rope_type", ["dynamic", "default"])
def test_dynamic_rope_scaling_steps_eagerly(rope_type, graphs_on_cpu):
    """Dynamic NTK scaling picks its frequencies from the longest position, read on the host in every
    forward, which breaks a capture: such a base gets no CUDA graphs, and asking for them is refused."""
    from transformers import AutoModelForCausalLM

    from eagle_gto.tiny import base_config, head_config, random_head

    torch.manual_seed(0)
    config = base_config("llama", vocab_size=VOCAB)
    config.rope_parameters = {"rope_type": rope_type, "rope_theta": 10000.0, "factor": 2.0}
    base = AutoModelForCausalLM.from_config(config).eval()
    head = random_head(head_config(config, "eagle3"))
    model = ea_model.EaModel(base, head, None, total_token=8, depth=3, top_k=2)
    model.cuda_graphs = True  # the stand-in runs each step as a capture would see it
    if rope_type == "default":
        assert model._not_capturable() is None
        model.eagenerate(torch.tensor([[1, 2, 3]]), max_new_tokens=4)
        return
    assert model._not_capturable() == "'dynamic' rope scaling"  # so off, even on one CUDA device
    with pytest.raises(AssertionError, match="_local_scalar_dense"):
        model.eagenerate(torch.tensor([[1, 2, 3]]), max_new_tokens=4)
    with pytest.raises(ValueError, match="cuda_graphs=True is not supported for 'dynamic' rope scaling"):
        ea_model.EaModel(base, head, None, total_token=8, depth=3, top_k=2, cuda_graphs=True)


def test_per_layer_type_rope_is_checked_too():
    """Models that mix attention kinds (Gemma-3) keep one rope type per layer type."""
    from types import SimpleNamespace

    base = torch.nn.Module()
    base.config, base.rotary = SimpleNamespace(), torch.nn.Module()
    base.rotary.rope_type = {"full_attention": "dynamic", "sliding_attention": "default"}
    assert ea_model.EaModel._not_capturable(SimpleNamespace(base_model=base)) == "'dynamic' rope scaling"
    base.rotary.rope_type = {"full_attention": "linear", "sliding_attention": "default"}
    assert ea_model.EaModel._not_capturable(SimpleNamespace(base_model=base)) is None


def test_a_failure_while_making_new_caches_leaves_no_stale_graphs(monkeypatch):
    """Running out of memory while the caches for a new max_length are made
    (here: the drafter's) must not leave the new target cache beside the old
    drafter, state and graphs: the next generation at that max_length would
    replay graphs recorded on the old caches."""
    model = isolated(trained_pair("llama", "eagle3"), monkeypatch)
    monkeypatch.setattr(EagerGraphs, "keys", [])
    monkeypatch.setattr(ea_model, "StepGraphs", ReplayingGraphs)
    monkeypatch.setattr(generation, "VIEW_BUCKET", 32)
    first, ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(8))

    def decode(graphs, max_length, prompt=ids):
        model.cuda_graphs = graphs
        out = model.eagenerate(prompt[None], max_new_tokens=40, max_length=max_length).tolist()
        return out, [s.num_accepted for s in model.last_stats.steps]

    model._graphs = None
    decode(True, 128, first)  # records graphs on the caches for 128 (another prompt: other keys and values there)
    real_drafter = ea_model.Drafter

    class OutOfMemory(real_drafter):
        def __init__(self, *args, **kwargs):
            raise torch.OutOfMemoryError("no room for the drafter")

    monkeypatch.setattr(ea_model, "Drafter", OutOfMemory)
    with pytest.raises(torch.OutOfMemoryError):
        decode(True, 96)
    monkeypatch.setattr(ea_model, "Drafter", real_drafter)
    assert decode(True, 96) == decode(False, 96)
