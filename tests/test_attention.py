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


def test_engine_switches_sdpa_models_and_leaves_others_alone():
    torch.manual_seed(0)
    cfg = base_config("llama")
    head = random_head(head_config(cfg, "eagle3"))
    for chosen, expected in (("sdpa", attention.IMPLEMENTATION), ("eager", "eager")):
        base = AutoModelForCausalLM.from_config(cfg, attn_implementation=chosen).eval()
        EaModel(base, head, None, total_token=8, depth=2, top_k=2)
        assert base.config._attn_implementation == expected
