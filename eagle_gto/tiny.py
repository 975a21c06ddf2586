"""Small models with random weights, built from configs: for tests, for the
engine-overhead benchmark, and as starting points for training."""

from __future__ import annotations

import torch

from .head_config import HeadConfig
from .heads import HEAD_CLASSES, DraftHead
from .vocab import build_vocab_mapping

ARCHITECTURES = ("llama", "qwen2", "qwen3", "mixtral")


def base_config(arch: str = "llama", vocab_size: int = 256, hidden_size: int = 64, num_layers: int = 6,
                num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128, **extra):
    """A transformers config of the given architecture and size."""
    from transformers import LlamaConfig, MixtralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size,
        max_position_embeddings=4096, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return LlamaConfig(**common, **extra)
    if arch == "qwen2":
        return Qwen2Config(**common, **extra)
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=hidden_size // num_heads, **extra)
    if arch == "mixtral":
        return MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2, sliding_window=None, **extra)
    raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHITECTURES}")


def head_config(base, kind: str, draft_vocab_size: int | None = None, hidden_size: int | None = None) -> dict:
    """A config.json dict for a head drafting for `base` (a transformers config)."""
    hidden = hidden_size or base.hidden_size
    heads = base.num_attention_heads
    cfg = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=hidden,
        intermediate_size=hidden * 2, num_attention_heads=heads,
        num_key_value_heads=getattr(base, "num_key_value_heads", heads), num_hidden_layers=1,
        vocab_size=base.vocab_size, rms_norm_eps=1e-6, hidden_act="silu", rope_theta=10000.0,
    )
    if kind == "eagle3":
        cfg["draft_vocab_size"] = draft_vocab_size or base.vocab_size
        if hidden != base.hidden_size:
            cfg["target_hidden_size"] = base.hidden_size
    elif draft_vocab_size not in (None, base.vocab_size):
        raise ValueError("EAGLE-1 heads draft over the full target vocabulary")
    return cfg


def random_head(config: dict, seed: int = 0, token_counts: torch.Tensor | None = None) -> DraftHead:
    """A head with seeded random weights; EAGLE-3 heads get a draft
    vocabulary from `token_counts` (default: the lowest ids)."""
    kind = "eagle3" if "draft_vocab_size" in config else "eagle1"
    cfg = HeadConfig.from_dict(config, kind)
    torch.manual_seed(seed)
    head = HEAD_CLASSES[kind](cfg)
    for name, param in head.named_parameters():
        if name.endswith("norm.weight") or ".hidden_norm." in name:
            continue
        torch.nn.init.normal_(param, std=0.02) if param.dim() > 1 else torch.nn.init.zeros_(param)
    if kind == "eagle3":
        counts = token_counts if token_counts is not None else -torch.arange(cfg.vocab_size).float()
        d2t, t2d = build_vocab_mapping(counts, cfg.draft_vocab_size)
        head.d2t.copy_(d2t)
        head.t2d.copy_(t2d)
    return head.eval().requires_grad_(False)
