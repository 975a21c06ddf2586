"""Grouped-query attention under an explicit mask, without copying keys and values.

With grouped-query attention (Llama-3: 32 query heads, 8 key/value heads) and
a mask, torch's fused attention kernels need as many key/value heads as query
heads, so transformers' sdpa path copies the visible keys and values once per
query head of a group (`repeat_kv`) in every layer of every step that feeds
more than one token (the tree verification; also plain steps under
torch.compile): two copies of the whole visible cache per layer. Here the
query heads that share a key/value head become extra query rows instead;
keys and values are read in place and only the mask, one row per token, is
repeated.

`grouped_query_attention` serves the draft head's attention and, registered
through transformers' public `AttentionInterface` as "eagle_gto_sdpa", the
base model's (`use_for`).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

IMPLEMENTATION = "eagle_gto_sdpa"


def grouped_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            mask: torch.Tensor | None, scale: float | None = None) -> torch.Tensor:
    """Attention of query [b, H, n, d] over key/value [b, K, S, d] (H a
    multiple of K; query head h reads key/value head h // (H/K)) under a
    bool or additive mask broadcastable to [b, 1, n, S]. Returns [b, H, n, d]."""
    b, heads, n, _ = query.shape
    kv_heads, S = key.shape[1], key.shape[2]
    group = heads // kv_heads
    if group == 1:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
    # Query head kv*group + r, token i -> row r*n + i of key/value head kv.
    rows = query.reshape(b, kv_heads, group * n, query.shape[-1])
    if mask is not None and n > 1:  # one token: its one mask row serves all rows as it is
        mask = mask.expand(mask.shape[0], 1, n, S)[:, :, None].expand(-1, -1, group, -1, -1)
        mask = mask.reshape(mask.shape[0], 1, group * n, S)
    out = F.scaled_dot_product_attention(rows, key, value, attn_mask=mask, scale=scale)
    return out.reshape(b, heads, n, value.shape[-1])


def transformers_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs):
    """transformers' attention-function signature; returns ([b, n, H, d], None) as its sdpa does."""
    if dropout and module.training:
        raise ValueError(f"{IMPLEMENTATION} is for inference: no attention dropout")
    for name, what in (("softcap", "soft-capped scores"), ("s_aux", "attention sinks")):
        if kwargs.get(name) is not None:  # computing without them would give this model's layers other outputs
            raise ValueError(f"{IMPLEMENTATION} does not compute {what}, which this model's attention uses; load the "
                             "base model with attn_implementation='eager'")
    n, S = query.shape[2], key.shape[2]
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, :S]
    elif n > 1 and (kwargs.get("is_causal") if kwargs.get("is_causal") is not None
                    else getattr(module, "is_causal", True)):
        # transformers skips building a causal mask when sdpa's is_causal could do; the grouped rows need one
        attention_mask = torch.ones(n, S, dtype=torch.bool, device=query.device).tril(S - n)[None, None]
    out = grouped_query_attention(query, key, value, attention_mask, scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, transformers_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)  # masks built by transformers (training, tests)


def use_for(model) -> bool:
    """Switch a transformers model to this attention, unless it runs eager
    attention (which takes the tree mask as it is). Returns whether it switched.

    Flash attention kernels read a mask as padding or not at all: verifying a
    tree under them would let each draft token see its siblings and give
    wrong logits, so they are switched too, with a warning; to eager attention
    where the model has no SDPA path (attention sinks, soft-capping)."""
    current = getattr(model.config, "_attn_implementation", None)
    if current in (None, "eager", IMPLEMENTATION):
        return False
    # (a class may claim SDPA while its scores are soft-capped, as Gemma-2's did before transformers 5.23)
    softcapped = getattr(model.config, "attn_logit_softcapping", None)
    target = IMPLEMENTATION if getattr(model, "_supports_sdpa", True) and not softcapped else "eager"
    if target == IMPLEMENTATION:
        register()
    model.set_attn_implementation(target)  # (a model class that cannot switch leaves it as it was)
    if model.config._attn_implementation != target:
        if current == "sdpa":  # takes the mask: only without the grouped-query saving
            return False
        raise ValueError(f"the base model's {current!r} attention cannot take the draft tree's mask, and this "
                         "model cannot be switched to another; load it with attn_implementation='sdpa' or 'eager'")
    if current != "sdpa":
        warnings.warn(f"the base model's {current!r} attention cannot take the draft tree's mask; it runs "
                      f"{target!r} attention instead", stacklevel=3)
    return True
