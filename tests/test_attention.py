"""Grouped-query attention that folds each key/value head's query heads into
rows (attention.py) against the plain way: keys and values repeated for
every query head, then sdpa."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from eagle_gto import EaModel, attention
from eagle_gto.tiny import base_config, head_config, random_head


def repeated_kv_attention(q, k, v, mask):
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                          attn_mask=mask)


@pytest.mark.parametrize("batch,heads,kv_heads,n,S", [(1, 8, 2, 1, 20), (1, 8, 2, 7, 20), (3, 4, 1, 5, 9),
                                                      (2, 4, 4, 3, 6)])
def test_grouped_rows_equal_repeated_keys_and_values(batch, heads, kv_heads, n, S):
    g = torch.Generator().manual_seed(n * S)
    q = torch.randn(batch, n, heads, 16, generator=g).transpose(1, 2)  # a strided query, as models make it
    k, v = torch.randn(2, batch, kv_heads, S, 16, generator=g)
    bool_mask = torch.rand(batch, 1, n, S, generator=g) > 0.4
    bool_mask[..., 0] = True  # every row sees something
    additive = torch.zeros(bool_mask.shape).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    for mask in (None, bool_mask, bool_mask[:1], additive):
        expected = repeated_kv_attention(q, k, v, mask)
        torch.testing.assert_close(attention.grouped_query_attention(q, k, v, mask), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,S", [(4, 4), (3, 9)])
def test_without_a_mask_the_new_tokens_attend_causally_after_the_cached_ones(n, S):
    """transformers leaves the mask out where sdpa's is_causal would do; the grouped rows need it written out:
    the n new tokens are the last n of the S keys (bottom-right causal), whatever the cache holds before them."""
    g = torch.Generator().manual_seed(S)
    q = torch.randn(1, 8, n, 16, generator=g)
    k, v = torch.randn(2, 1, 2, S, 16, generator=g)
    module = torch.nn.Module()
    out, _ = attention.transformers_attention(module, q, k, v, None, is_causal=True)
    expected = repeated_kv_attention(q, k, v, torch.ones(n, S, dtype=torch.bool).tril(S - n))
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_engine_switches_sdpa_models_and_leaves_others_alone():
    torch.manual_seed(0)
    cfg = base_config("llama")
    head = random_head(head_config(cfg, "eagle3"))
    for chosen, expected in (("sdpa", attention.IMPLEMENTATION), ("eager", "eager")):
        base = AutoModelForCausalLM.from_config(cfg, attn_implementation=chosen).eval()
        EaModel(base, head, None, total_token=8, depth=2, top_k=2)
        assert base.config._attn_implementation == expected


def causal_only(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """What a flash attention kernel does with the engine's mask when it has no padding: reads it not at
    all and attends causally, so a tree token would see its siblings."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    n, S = query.shape[2], key.shape[2]
    causal = torch.ones(n, S, dtype=torch.bool, device=query.device).tril(S - n)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=causal, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def test_an_attention_that_cannot_take_the_tree_mask_is_switched():
    """A base model on such an attention (flash attention 2/3/4, a kernel from the hub) decodes plainly
    as it should but would verify trees wrongly: the engine runs its own attention instead, and says so."""
    from tiny_pairs import fit_head, make_base
    from transformers import AttentionInterface

    AttentionInterface.register("causal_only", causal_only)
    base = make_base("llama", residual_scale=0.5)  # attention weighs enough that a sibling changes the argmax
    head = fit_head(base, "eagle3")
    base.set_attn_implementation("causal_only")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, base.config.vocab_size, (1, 12), generator=g) for _ in range(6)]
    expected = [base.generate(ids, max_new_tokens=24, do_sample=False, attention_mask=torch.ones_like(ids),
                              pad_token_id=0).tolist() for ids in prompts]
    with pytest.warns(UserWarning, match="'causal_only' attention cannot take the draft tree's mask"):
        model = EaModel(base, head, None, total_token=24, depth=5, top_k=4)
    assert base.config._attn_implementation == attention.IMPLEMENTATION
    assert [model.eagenerate(ids, max_new_tokens=24).tolist() for ids in prompts] == expected
    # (Without the switch, the fourth prompt's answer differs: its tree's tokens saw their siblings.)



# (Gemma-2 passes its softcap as a float; sinks are a parameter of one value per head, which has no truth value)
@pytest.mark.parametrize("name,used", [("softcap", torch.tensor(50.0)), ("softcap", 50.0),
                                       ("s_aux", torch.tensor(50.0)), ("s_aux", torch.zeros(2))])
def test_attention_it_does_not_compute_is_refused_not_dropped(name, used):
    q, k, v = (torch.randn(1, 2, 3, 8) for _ in range(3))
    module = torch.nn.Module()
    out, _ = attention.transformers_attention(module, q, k, v, None, **{name: None})  # not used by this model
    assert out.shape == (1, 3, 2, 8)
    with pytest.raises(ValueError, match="does not compute .*load the base model with attn_implementation='eager'"):
        attention.transformers_attention(module, q, k, v, None, **{name: used})

def test_a_model_without_sdpa_gets_eager_attention_and_one_that_cannot_switch_is_refused():
    """Gemma-2's attention scores are soft-capped, which SDPA does not compute (transformers before 5.23
    claimed an SDPA path for it all the same): eager attention takes the tree mask. A model class that
    ignores the switch (remote modelling code) would verify trees wrongly: a clear error instead."""
    from transformers import AttentionInterface, Gemma2Config

    AttentionInterface.register("causal_only", causal_only)
    config = Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=16, vocab_size=64)
    gemma = AutoModelForCausalLM.from_config(config, attn_implementation="causal_only")
    with pytest.warns(UserWarning, match="runs 'eager' attention instead"):
        assert attention.use_for(gemma)
    assert gemma.config._attn_implementation == "eager"
    gemma = AutoModelForCausalLM.from_config(config, attn_implementation="causal_only")
    type(gemma)._supports_sdpa, claimed = True, type(gemma)._supports_sdpa  # as transformers 5.17 has it
    try:
        with pytest.warns(UserWarning, match="runs 'eager' attention instead"):
            assert attention.use_for(gemma)
    finally:
        type(gemma)._supports_sdpa = claimed
    assert gemma.config._attn_implementation == "eager"
    # Scores that are not soft-capped (only the final logits are): the engine's SDPA attention computes them.
    config.attn_logit_softcapping = None
    gemma = AutoModelForCausalLM.from_config(config, attn_implementation="causal_only")
    type(gemma)._supports_sdpa = True
    try:
        with pytest.warns(UserWarning, match=f"runs '{attention.IMPLEMENTATION}' attention instead"):
            assert attention.use_for(gemma)
    finally:
        type(gemma)._supports_sdpa = claimed
    assert gemma.config._attn_implementation == attention.IMPLEMENTATION and config.final_logit_softcapping
    llama = AutoModelForCausalLM.from_config(base_config("llama"), attn_implementation="causal_only")
    llama.set_attn_implementation = lambda name: None  # as a class that cannot switch does
    with pytest.raises(ValueError, match="'causal_only' attention cannot take the draft tree's mask, and this model "
                                         "cannot be switched"):
        attention.use_for(llama)
