"""Tree-attention verification: each tree node's logits from one target
forward over the whole tree equal those of a plain causal forward over the
prefix and that node's own branch; and KV compaction keeps exactly the
accepted branch."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from eagle_gto import attention
from eagle_gto.kv_cache import TargetKVCache
from eagle_gto.target import TargetRunner
from eagle_gto.tiny import base_config
from eagle_gto.tree import ancestor_mask

attention.register()  # the engine's grouped-query attention, checked like transformers' own


def random_tree(T, seed):
    g = torch.Generator().manual_seed(seed)
    parents = torch.zeros(T, dtype=torch.long)
    for i in range(1, T):  # any parent earlier in creation order
        parents[i] = int(torch.randint(0, i, (1,), generator=g))
    mask = ancestor_mask(parents, T)
    return parents, mask, mask.sum(1) - 1


@pytest.mark.parametrize("attn", ["eager", "sdpa", attention.IMPLEMENTATION])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mixtral"])
def test_tree_node_logits_equal_branch_forward(arch, attn):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(base_config(arch), attn_implementation=attn).float().eval()
    runner = TargetRunner(model, [2, 3, 3])
    prefix = torch.randint(0, 256, (9,))
    T = 12
    parents, mask, depths = random_tree(T, seed=5)
    tree_tokens = torch.randint(0, 256, (T,))

    cache = runner.new_cache(64)
    P = prefix.shape[0]
    runner.forward(prefix, torch.arange(P), torch.ones(P, P).tril().bool(), cache)
    visible = torch.cat((torch.ones(T, P, dtype=torch.bool), mask), dim=1)
    logits, feats = runner.forward(tree_tokens, P + depths, visible, cache, features=True)

    for node in range(T):
        branch = mask[node].nonzero().flatten()  # ancestors in depth order
        seq = torch.cat((prefix, tree_tokens[branch]))
        with torch.no_grad():
            out = model(seq[None], output_hidden_states=True)
        torch.testing.assert_close(logits[node], out.logits[0, -1].float(), atol=1e-4, rtol=1e-4)
        expected_feats = torch.cat([out.hidden_states[i][0, -1] for i in (2, 3, 3)])
        torch.testing.assert_close(feats[node], expected_feats, atol=1e-4, rtol=1e-4)


# Which layers share a KV stack: all (one device), two groups (a model
# sharded over two devices, here both on the CPU), none (one per layer).
STACKINGS = {"one": None, "two": ["a"] * 3 + ["b"] * 3, "per layer": list("abcdef")}


@pytest.mark.parametrize("stacking", STACKINGS)
def test_kv_compaction_keeps_the_accepted_branch(stacking):
    """After keeping a branch, decoding continues exactly as if only the
    prefix and that branch had ever been fed."""
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(base_config("llama")).float().eval()
    runner = TargetRunner(model, None)
    prefix = torch.randint(0, 256, (6,))
    parents, mask, depths = random_tree(10, seed=2)
    tokens = torch.randint(0, 256, (10,))
    cache = TargetKVCache(6, 40, STACKINGS[stacking])
    assert len(cache.stacks) == {"one": 1, "two": 2, "per layer": 6}[stacking]
    P = 6
    runner.forward(prefix, torch.arange(P), torch.ones(P, P).tril().bool(), cache)
    runner.forward(tokens, P + depths, torch.cat((torch.ones(10, P, dtype=torch.bool), mask), 1), cache)
    deepest = int(depths.argmax())
    branch = mask[deepest].nonzero().flatten()
    cache.keep(P, branch)
    assert cache.length == P + branch.numel()

    nxt = torch.tensor([17])
    L = cache.length
    logits, _ = runner.forward(nxt, torch.tensor([L]), torch.ones(1, L + 1, dtype=torch.bool), cache)
    with torch.no_grad():
        expected = model(torch.cat((prefix, tokens[branch], nxt))[None]).logits[0, -1]
    torch.testing.assert_close(logits[0], expected, atol=1e-4, rtol=1e-4)


def test_a_layer_that_does_not_fit_its_stack_keeps_its_own_buffers():
    """Layers share one storage when their entries match; a layer with
    another shape (or device, or dtype) falls back to buffers of its own,
    and compaction moves both kinds."""
    cache = TargetKVCache(3, 8)
    entries = [torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 1, 5, 6)]
    for layer, kv in zip(cache.layers, entries):
        layer.buffer.append(kv, -kv)
    stack = cache.stacks[0]
    assert stack.storage.shape == (3, 2, 1, 2, 8, 4)
    assert [layer.buffer.stack is stack for layer in cache.layers] == [True, True, False]
    assert cache.layers[1].buffer.keys.data_ptr() == stack.storage[1, 0].data_ptr()
    keep = torch.tensor([0, 1, 3])
    cache.keep(1, keep)
    for layer, kv in zip(cache.layers, entries):
        rows = torch.cat((torch.tensor([0]), keep + 1))
        torch.testing.assert_close(layer.buffer.keys[:, :, :4], kv[:, :, rows], rtol=0, atol=0)
        torch.testing.assert_close(layer.buffer.values[:, :, :4], -kv[:, :, rows], rtol=0, atol=0)
        assert layer.buffer.length == 4


def test_cache_bytes_are_what_the_cache_allocates_when_head_dim_is_given_apart():
    """Qwen3-style configs give head_dim apart from hidden_size / num_attention_heads (here 32, not 16):
    the max_length check must count the cache the forward really allocates."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(base_config("llama", head_dim=32)).float().eval()
    runner = TargetRunner(model, None)
    cache = runner.new_cache(16)
    runner.forward(torch.arange(5), torch.arange(5), torch.ones(5, 5, dtype=torch.bool).tril(), cache)
    allocated = sum(stack.storage.numel() * stack.storage.element_size() for stack in cache.stacks)
    assert runner.cache_bytes(16) == {torch.device("cpu"): allocated}
