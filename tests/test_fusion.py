"""Sibling projections fused into one matrix product (`eagle_gto.fusion`,
done by `EaModel.enable_torch_compile`): the model computes what it did, in
fewer products, keeps its state_dict, and decodes losslessly."""

import collections
import copy

import pytest
import torch
from tiny_pairs import VOCAB, make_base, trained_pair
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from eagle_gto import EaModel
from eagle_gto.fusion import FusedLinear, LinearPart, fuse_sibling_linears
from eagle_gto.target import decoder_layers
from eagle_gto.tiny import head_config, random_head

# fused groups per decoder layer: q/k/v, and gate/up where the MLP is not a mixture of experts
GROUPS_PER_LAYER = {"llama": 2, "qwen2": 2, "qwen3": 2, "mixtral": 1}


class MatrixProducts(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ in ("mm", "addmm", "bmm", "linear")
        return func(*args, **(kwargs or {}))


def products_and_logits(model, ids):
    with torch.no_grad(), MatrixProducts() as products:
        logits = model(ids).logits
    return products.count, logits


@pytest.mark.parametrize("arch", sorted(GROUPS_PER_LAYER))
def test_fused_base_computes_the_same_logits_in_fewer_products(arch):
    stock = make_base(arch, num_layers=3)
    fused = copy.deepcopy(stock)
    groups = fuse_sibling_linears(fused)
    layers = len(decoder_layers(fused))
    assert groups == GROUPS_PER_LAYER[arch] * layers
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    stock_products, expected = products_and_logits(stock, ids)
    fused_products, found = products_and_logits(fused, ids)
    # each group of n linears: one product instead of n
    saved = layers * (2 + (GROUPS_PER_LAYER[arch] == 2))
    assert fused_products == stock_products - saved
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-5)
    assert fuse_sibling_linears(fused) == 0  # fusing again changes nothing
    attn = decoder_layers(fused)[0].self_attn
    assert isinstance(attn.q_proj, LinearPart) and isinstance(attn.qkv_proj, FusedLinear)
    assert attn.k_proj.weight.dtype == torch.float32  # code reading a part's weight still finds one
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in stock.parameters())


def test_state_dict_keeps_the_stock_keys_and_loads_back():
    stock = make_base("qwen2", num_layers=2)  # q/k/v with biases
    fused = copy.deepcopy(stock)
    fuse_sibling_linears(fused)
    expected, found = stock.state_dict(), fused.state_dict()
    assert set(found) == set(expected)
    for key, value in expected.items():
        assert torch.equal(found[key], value), key
    # a stock state_dict loads into the fused model, weights and biases
    other = make_base("qwen2", seed=3, num_layers=2)
    assert not fused.load_state_dict(other.state_dict()).missing_keys
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(products_and_logits(fused, ids)[1], products_and_logits(other, ids)[1],
                               rtol=1e-5, atol=1e-5)
    # some parts only: they replace their rows; the others are missing
    prefix = "model.layers.0.self_attn."
    result = fused.load_state_dict({prefix + "k_proj.weight": stock.state_dict()[prefix + "k_proj.weight"]},
                                   strict=False)
    assert prefix + "q_proj.weight" in result.missing_keys and prefix + "v_proj.weight" in result.missing_keys
    assert prefix + "k_proj.weight" not in result.missing_keys
    assert torch.equal(fused.state_dict()[prefix + "k_proj.weight"], stock.state_dict()[prefix + "k_proj.weight"])
    assert torch.equal(fused.state_dict()[prefix + "q_proj.weight"], other.state_dict()[prefix + "q_proj.weight"])
    with pytest.raises(RuntimeError, match="size mismatch for model.layers.0.self_attn.v_proj.weight"):
        fused.load_state_dict({prefix + "v_proj.weight": torch.zeros(3, 3)}, strict=False)
    # missing and misshapen parts are reported under their stock keys, as the stock model reports them
    partial = {k: v for k, v in other.state_dict().items() if not k.startswith(prefix)}
    expected_missing = stock.load_state_dict(partial, strict=False).missing_keys
    assert sorted(fused.load_state_dict(partial, strict=False).missing_keys) == sorted(expected_missing)
    swapped = dict(other.state_dict())  # q one row short, k one row long: the same total
    swapped[prefix + "q_proj.weight"] = swapped[prefix + "q_proj.weight"][:-1]
    k_weight = swapped[prefix + "k_proj.weight"]
    swapped[prefix + "k_proj.weight"] = torch.cat((k_weight, k_weight[:1]))
    for model in (stock, fused):
        with pytest.raises(RuntimeError, match="size mismatch for model.layers.0.self_attn.q_proj.weight"):
            model.load_state_dict(swapped)


def test_a_fused_model_copies_and_pickles():
    import pickle

    stock = make_base("llama", num_layers=2)
    fused = copy.deepcopy(stock)
    fuse_sibling_linears(fused)
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    expected = products_and_logits(fused, ids)[1]
    for twin in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        attn = decoder_layers(twin)[0].self_attn
        assert attn.q_proj.fused is attn.qkv_proj  # the parts use their own model's fused linear
        assert attn.qkv_proj.weight.data_ptr() != decoder_layers(fused)[0].self_attn.qkv_proj.weight.data_ptr()
        torch.testing.assert_close(products_and_logits(twin, ids)[1], expected, rtol=0, atol=0)
        assert set(twin.state_dict()) == set(stock.state_dict())


def test_save_pretrained_of_a_fused_base_loads_as_the_stock_model(tmp_path):
    from transformers import AutoModelForCausalLM

    stock = make_base("llama", num_layers=2)
    fused = copy.deepcopy(stock)
    fuse_sibling_linears(fused)
    fused.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for key, value in stock.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_parts_called_out_of_pattern_still_get_their_own_products():
    """The first part called with an input computes the group's product; a
    part called with another tensor, or twice, computes its own. What the
    stock pattern leaves is nothing."""
    torch.manual_seed(0)
    parent = nn.Module()
    parent.q_proj, parent.k_proj, parent.v_proj = nn.Linear(8, 6), nn.Linear(8, 4), nn.Linear(8, 4)
    stock = copy.deepcopy(parent)
    assert fuse_sibling_linears(parent) == 1
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    for name, x in (("q_proj", a), ("k_proj", b), ("v_proj", a), ("k_proj", a), ("k_proj", a), ("q_proj", b),
                    ("v_proj", b), ("v_proj", b), ("q_proj", a), ("k_proj", a), ("v_proj", a)):
        torch.testing.assert_close(getattr(parent, name)(x), getattr(stock, name)(x))
    assert parent.qkv_proj._pending is None  # the stock pattern (q, k, v of one input) took every slice


def test_a_parts_weight_and_bias_are_its_own_rows_of_the_fused_ones():
    """Code that reads `k_proj.weight` (or its bias) of a fused model finds the
    stock linear's values, as views into the fused parameters."""
    torch.manual_seed(0)
    parent = nn.Module()
    parent.q_proj, parent.k_proj, parent.v_proj = nn.Linear(8, 6), nn.Linear(8, 4), nn.Linear(8, 4)
    stock = copy.deepcopy(parent)
    fuse_sibling_linears(parent)
    storage = parent.qkv_proj.weight.untyped_storage().data_ptr()
    for name in ("q_proj", "k_proj", "v_proj"):
        part, linear = getattr(parent, name), getattr(stock, name)
        assert torch.equal(part.weight, linear.weight) and torch.equal(part.bias, linear.bias), name
        assert part.weight.untyped_storage().data_ptr() == storage


def test_a_state_dict_under_the_fused_names_loads_as_it_is():
    """A state_dict of a fused model's own parameters (`qkv_proj.weight`, as
    named_parameters names them) loads without the stock keys being reported
    missing, and its weights are the ones the model then computes with."""
    fused, other = (make_base("qwen2", seed=seed, num_layers=2) for seed in (0, 3))  # q/k/v with biases
    expected = products_and_logits(other, torch.arange(9)[None])[1]
    for model in (fused, other):
        fuse_sibling_linears(model)
    result = fused.load_state_dict(dict(other.named_parameters()), strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(products_and_logits(fused, torch.arange(9)[None])[1], expected, rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_fused_weights():
    torch.manual_seed(0)
    parent = nn.Module()
    parent.gate_proj, parent.up_proj = nn.Linear(8, 5, bias=False), nn.Linear(8, 5, bias=False)
    stock = copy.deepcopy(parent)
    fuse_sibling_linears(parent)
    x = torch.randn(4, 8)
    (parent.gate_proj(x) * parent.up_proj(x)).sum().backward()
    (stock.gate_proj(x) * stock.up_proj(x)).sum().backward()
    expected = torch.cat([stock.gate_proj.weight.grad, stock.up_proj.weight.grad])
    torch.testing.assert_close(parent.gate_up_proj.weight.grad, expected)


def test_a_frozen_group_stays_frozen():
    """The fused weights took requires_grad from nothing: a frozen pair came out trainable."""
    parent = nn.Module()
    parent.gate_proj, parent.up_proj = nn.Linear(8, 5), nn.Linear(8, 5)
    parent.requires_grad_(False)
    assert fuse_sibling_linears(parent) == 1
    assert not any(p.requires_grad for p in parent.parameters())


def test_what_is_not_fused():
    """Linears it cannot stand in for stay as they are: a subclass (e.g. a
    quantized linear), one with hooks (accelerate's offload, a user's), a
    mismatch in dtype or bias, weights on the meta device, an incomplete group."""
    def group(**changes):
        parent = nn.Module()
        parent.q_proj, parent.k_proj, parent.v_proj = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4)
        for name, value in changes.items():
            setattr(parent, name, value)
        return parent

    class QuantizedLinear(nn.Linear):
        pass

    hooked = nn.Linear(8, 4)
    hooked.register_forward_hook(lambda *args: None)
    backward_hooked = nn.Linear(8, 4)
    backward_hooked.register_full_backward_hook(lambda *args: None)
    offloaded = nn.Linear(8, 4)
    offloaded._hf_hook = object()
    frozen_bias = nn.Linear(8, 4)
    frozen_bias.bias.requires_grad_(False)
    frozen_weight = nn.Linear(8, 4)  # (fused, it would become trainable with its siblings)
    frozen_weight.weight.requires_grad_(False)
    tied = nn.Linear(8, 4)
    for changes in ({"k_proj": QuantizedLinear(8, 4)}, {"k_proj": hooked}, {"v_proj": offloaded},
                    {"k_proj": backward_hooked}, {"v_proj": frozen_bias}, {"v_proj": frozen_weight},
                    {"v_proj": tied, "other": tied},
                    {"v_proj": nn.Linear(8, 4).double()}, {"v_proj": nn.Linear(8, 4, bias=False)},
                    {"v_proj": nn.Linear(8, 4, device="meta")}, {"v_proj": None}, {"k_proj": nn.Linear(6, 4)}):
        parent = group(**changes)
        assert fuse_sibling_linears(parent) == 0, changes
        assert not isinstance(parent.q_proj, LinearPart)
    assert fuse_sibling_linears(group()) == 1


@pytest.mark.parametrize("kind", ["eagle3", "eagle1"])
def test_a_fused_pair_decodes_as_plain_greedy_decoding(kind):
    """Greedy speculative decoding of a fused base and head equals plain
    greedy decoding, and equals what the stock pair decodes."""
    pair = trained_pair("llama", kind)
    base, head = copy.deepcopy(pair.base_model), copy.deepcopy(pair.ea_layer)
    assert fuse_sibling_linears(base) > 0 and fuse_sibling_linears(head) > 0
    from eagle_gto.placement import attach_head

    attach_head(base, head)
    fused = EaModel(base, head, None, **vars(pair.tree))
    stock = EaModel(pair.base_model, pair.ea_layer, None, **vars(pair.tree))
    g = torch.Generator().manual_seed(7)
    accepted = collections.Counter()
    for _ in range(3):
        ids = torch.randint(0, VOCAB, (1, int(torch.randint(3, 15, (1,), generator=g))), generator=g)
        speculative = fused.eagenerate(ids, max_new_tokens=40).tolist()
        accepted[kind] += fused.last_stats.mean_accepted_length > 1
        assert speculative == fused.naivegenerate(ids, max_new_tokens=40).tolist()
        assert speculative == stock.eagenerate(ids, max_new_tokens=40).tolist()
    assert accepted[kind] > 0  # drafts were accepted: the fused head was exercised


def test_enable_torch_compile_fuses_unless_asked_not_to():
    pair = trained_pair("llama", "eagle3")
    for fuse in (True, False):
        base, head = copy.deepcopy(pair.base_model), copy.deepcopy(pair.ea_layer)
        model = EaModel(base, head, None, **vars(pair.tree))
        model.enable_torch_compile(fuse_projections=fuse)
        assert isinstance(decoder_layers(base)[0].self_attn.q_proj, LinearPart) == fuse
        assert isinstance(head.layers[0].self_attn.q_proj, LinearPart) == fuse


def test_a_fused_head_saves_the_eagle3_keys():
    from eagle_gto.tiny import base_config

    head = random_head(head_config(base_config("llama", vocab_size=VOCAB), "eagle3"))
    expected = {k: v.clone() for k, v in head.state_dict().items()}
    fuse_sibling_linears(head)
    found = head.state_dict()
    assert set(found) == set(expected) and all(torch.equal(found[k], v) for k, v in expected.items())
