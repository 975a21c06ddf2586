"""Draft heads: EAGLE-1/2 (also HASS) and EAGLE-3 (also SpecForge and GTO).

A head is one Llama-style decoder layer that reads the target model's hidden
features and the next token, and predicts the token after it. Both kinds share
the interface the engine and the trainers use:

- `project_features(features)`: target features -> the head's hidden width
  (EAGLE-3: `fc` over the three concatenated layers; EAGLE-1: unchanged, its
  `fc` mixes embedding and feature inside `forward`).
- `forward(hidden, input_ids, position_ids, attention_mask, caches=None, rope=None)`:
  the head's layer(s) over n entries (`caches`: a `KVBuffer` per layer, or
  none); returns the output that deeper draft steps feed
  back as `hidden` (pre-norm, or normed for `norm_output` heads). `rope`, the
  (cos, sin) of `rope(position_ids)`, may be passed instead of position ids
  when computed ahead.
- `draft_logits(out)`: logits over the head's draft vocabulary;
  `to_target_ids(ids)` maps draft-vocabulary ids to target ids.

Key names follow the official checkpoints exactly (see ../shared/docs/formats.md), so
`state_dict()` is directly the exportable checkpoint. Each module is built
from a `HeadConfig` (head_config.py: a config.json read and checked).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import grouped_query_attention
from .head_config import ACTIVATIONS, HeadConfig, rope_type
from .kv_cache import KVBuffer
from .target import eagle3_feature_layers


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) in float32, as the official heads; one fused kernel where torch has one
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse RoPE frequencies, with the `linear` and `llama3` scalings heads ship with."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = rope_type(scaling)
    if kind == "default":
        return inv_freq.float()
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        medium = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        return torch.where(medium, blended, scaled).float()
    raise ValueError(f"unsupported rope scaling type {kind!r} in the draft head config")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: HeadConfig, in_dim: int):
        super().__init__()
        hd = cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = nn.Linear(in_dim, self.num_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(in_dim, self.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(in_dim, self.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, attention_mask, cache: KVBuffer | None):
        """x [b, n, in_dim]; cos/sin [b, n, head_dim]; attention_mask bool
        [b or 1, 1, n, kv_len] (True = visible) over cache + new keys."""
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.append(k, v)
        out = grouped_query_attention(q, k, v, attention_mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r} in the draft head config")

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """A Llama decoder layer. EAGLE-1's first layer has no input norm (the
    `fc` output goes straight in); EAGLE-3's attention reads [embedding,
    hidden] of width 2h, each with its own norm."""

    def __init__(self, cfg: HeadConfig, eagle3: bool, has_input_norm: bool):
        super().__init__()
        self.eagle3 = eagle3
        self.norm_before_residual = cfg.norm_before_residual
        in_dim = 2 * cfg.hidden_size if eagle3 else cfg.hidden_size
        self.self_attn = Attention(cfg, in_dim)
        self.mlp = MLP(cfg)
        if has_input_norm:
            self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if eagle3:
            self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, hidden, embeds, cos, sin, attention_mask, cache):
        residual = hidden
        if self.eagle3:
            normed = self.hidden_norm(hidden)
            if self.norm_before_residual:
                residual = normed
            x = torch.cat((self.input_layernorm(embeds), normed), dim=-1)
        else:
            x = self.input_layernorm(hidden) if hasattr(self, "input_layernorm") else hidden
        hidden = residual + self.self_attn(x, cos, sin, attention_mask, cache)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class DraftHead(nn.Module):
    """Common part of both head kinds; see the module docstring."""

    kind = ""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.config = cfg
        self.register_buffer(
            "inv_freq", rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), persistent=False
        )
        # A checkpoint's own embedding becomes the `embed_tokens` module; else
        # the target's is attached by reference (kept out of state_dict()).
        self.embed_tokens: nn.Embedding | None = None
        self._shared_embedding: list[torch.Tensor] = []

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # The rotary frequencies stay float32 in a half-precision head, as transformers keeps its
        # own (and the reference its cos/sin table): rounded to bf16, the angles a thousand
        # positions in are off by radians.
        cfg = self.config
        self.inv_freq = rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(
            self.inv_freq.device)
        return self

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype):
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def attach_embedding(self, weight: torch.Tensor) -> None:
        self._shared_embedding[:] = [weight]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.embed_tokens is not None else self._shared_embedding[0]
        return F.embedding(input_ids, weight)

    def run_layers(self, hidden, embeds, position_ids, attention_mask, caches, rope=None):
        cos, sin = rope if rope is not None else self.rope(position_ids, hidden.dtype)
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, embeds, cos, sin, attention_mask, caches[i] if caches else None)
        return hidden

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids

    def feature_layers(self, num_layers: int) -> list[int] | None:
        """The target layers whose inputs this head reads, for a base with
        `num_layers` decoder layers; None: the final normed hidden state (EAGLE-1)."""
        return None


class Eagle1Head(DraftHead):
    """EAGLE-1/2 head: fc(cat(embed(token), feature)) -> layer(s); logits
    come from the TARGET's lm_head applied to the output."""

    kind = "eagle1"

    def __init__(self, cfg: HeadConfig):
        super().__init__(cfg)
        h = cfg.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=cfg.fc_bias)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, eagle3=False, has_input_norm=i > 0) for i in range(cfg.num_layers)
        )
        self._target_lm_head: list[nn.Module] = []  # a list keeps it out of state_dict()

    def attach_lm_head(self, lm_head: nn.Module) -> None:
        self._target_lm_head[:] = [lm_head]

    def project_features(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def forward(self, hidden, input_ids, position_ids, attention_mask, caches=None, rope=None):
        x = self.fc(torch.cat((self.embed(input_ids).to(hidden.dtype), hidden), dim=-1))
        return self.run_layers(x, None, position_ids, attention_mask, caches, rope)

    def draft_logits(self, out: torch.Tensor) -> torch.Tensor:
        lm_head = self._target_lm_head[0]
        x = out.to(lm_head.weight.device)
        if type(lm_head) is nn.Linear:
            # Its weights, not its forward: a base sharded by accelerate has a device hook
            # around the forward that compiled draft steps (fullgraph) cannot trace. In their
            # dtype: a head kept in float32 beside a half-precision base (as EAGLE-3 heads may be).
            return F.linear(x.to(lm_head.weight.dtype), lm_head.weight, lm_head.bias).to(out.device)
        return lm_head(x).to(out.device)


class Eagle3Head(DraftHead):
    """EAGLE-3 head: fc over three target layers on the first step, one
    `midlayer`, own norm and lm_head over a draft vocabulary (d2t maps it to
    target ids)."""

    kind = "eagle3"

    def __init__(self, cfg: HeadConfig):
        super().__init__(cfg)
        h = cfg.hidden_size
        self.fc = nn.Linear(3 * cfg.target_hidden_size, h, bias=False)
        if cfg.fc_norm:
            self.fc_norm = nn.ModuleList(RMSNorm(cfg.target_hidden_size, cfg.rms_norm_eps) for _ in range(3))
        if cfg.norm_before_fc:
            self.input_norm = RMSNorm(3 * cfg.target_hidden_size, cfg.rms_norm_eps)
        self.midlayer = DecoderLayer(cfg, eagle3=True, has_input_norm=True)
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(h, cfg.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.ones(cfg.vocab_size, dtype=torch.bool))

    @property
    def layers(self):
        return [self.midlayer]

    def project_features(self, features: torch.Tensor) -> torch.Tensor:
        if self.config.fc_norm:
            parts = features.chunk(3, dim=-1)
            features = torch.cat([norm(part) for norm, part in zip(self.fc_norm, parts)], dim=-1)
        elif self.config.norm_before_fc:
            features = self.input_norm(features)
        return self.fc(features)

    def forward(self, hidden, input_ids, position_ids, attention_mask, caches=None, rope=None):
        embeds = self.embed(input_ids).to(hidden.dtype)
        out = self.run_layers(hidden, embeds, position_ids, attention_mask, caches, rope)
        return self.norm(out) if self.config.norm_output else out

    def draft_logits(self, out: torch.Tensor) -> torch.Tensor:
        return self.lm_head(out if self.config.norm_output else self.norm(out))

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    def feature_layers(self, num_layers: int) -> list[int]:
        if self.config.feature_layers is None:
            return eagle3_feature_layers(num_layers)
        if max(self.config.feature_layers) >= num_layers:  # (vLLM and SGLang capture layer inputs only)
            raise ValueError(f"the head reads the inputs of target layers {list(self.config.feature_layers)} "
                             f"(eagle_aux_hidden_state_layer_ids), but the base model has {num_layers} layers")
        return list(self.config.feature_layers)


HEAD_CLASSES = {"eagle1": Eagle1Head, "eagle3": Eagle3Head}
