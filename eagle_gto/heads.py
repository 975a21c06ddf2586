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
`state_dict()` is directly the exportable checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .attention import grouped_query_attention
from .kv_cache import KVBuffer
from .target import eagle3_feature_layers

ACTIVATIONS = ("silu", "swish")
ROPE_TYPES = ("default", "linear", "llama3")


def _positive_int(name: str, value, default: int | None = None) -> int:
    """A config value that must be an int >= 1; None (absent) gives `default` when there is one."""
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, found {value!r}")
    return value


def _positive_number(name: str, value, default: float | None = None) -> float:
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, found {value!r}")
    return float(value)


def _flag(cfg: dict, name: str, default: bool) -> bool:
    """A true/false config value (absent: `default`); a string "false" would otherwise read as true."""
    value = cfg.get(name, default)
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, found {value!r}")
    return value


def rope_type(scaling: dict | None) -> str:
    """"default", "linear", "llama3", ... from a rope_scaling dict (old configs say "type")."""
    scaling = scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def _check_rope_scaling(scaling) -> None:
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be an object, found {scaling!r}")
    kind = rope_type(scaling)
    if kind not in ROPE_TYPES:
        raise ValueError(f"unsupported rope scaling type {kind!r} (supported: {', '.join(ROPE_TYPES)})")
    if kind != "default":
        _positive_number("rope_scaling factor", scaling.get("factor"))
    for name in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if kind == "llama3" and name in scaling:  # numbers in rope_inverse_frequencies (absent: Llama-3.1's)
            _positive_number(f"rope_scaling {name}", scaling[name])


@dataclass
class HeadConfig:
    """What a head needs from its config.json (one source of defaults)."""

    kind: str  # "eagle1" or "eagle3"
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int  # target vocabulary
    draft_vocab_size: int  # == vocab_size for EAGLE-1
    target_hidden_size: int  # width of one target feature
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    fc_bias: bool = True  # EAGLE-1 `bias`; EAGLE-3 fc has none
    qkv_bias: bool = False
    hidden_act: str = "silu"
    num_layers: int = 1  # EAGLE-1 heads may stack layers; EAGLE-3 always has one
    # EAGLE-3 variants (SpecForge, vLLM speculators); all False is the EAGLE reference's head.
    norm_before_residual: bool = False  # the residual is hidden_norm(hidden), not hidden
    fc_norm: bool = False  # one RMSNorm per target feature before `fc` (tensors fc_norm.{i}.weight)
    norm_before_fc: bool = False  # one RMSNorm over the three features together before `fc` (input_norm.weight)
    norm_output: bool = False  # deeper steps are fed the normed output, not the pre-norm one
    feature_layers: tuple[int, ...] | None = None  # target layers whose inputs `fc` reads; None: 2, N//2, N-3
    raw: dict = field(default_factory=dict)  # the config.json as read, written back on export

    @property
    def head_dim(self) -> int:
        return self.raw.get("head_dim") or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, cfg: dict, kind: str) -> "HeadConfig":
        """Read a config.json dict; a missing or bad value is a ValueError
        that names the key (callers add the file)."""
        hidden = _positive_int("hidden_size", cfg.get("hidden_size"))
        heads = _positive_int("num_attention_heads", cfg.get("num_attention_heads"))
        kv_heads = _positive_int("num_key_value_heads", cfg.get("num_key_value_heads"), heads)
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        if cfg.get("head_dim") is not None:
            head_dim = _positive_int("head_dim", cfg["head_dim"])
        elif hidden % heads:
            raise ValueError(f"hidden_size={hidden} is not a multiple of num_attention_heads={heads} "
                             "(and no head_dim is given)")
        else:
            head_dim = hidden // heads
        if head_dim % 2:
            raise ValueError(f"the head dimension {head_dim} is odd: rotary embeddings rotate pairs of channels")
        vocab = _positive_int("vocab_size", cfg.get("vocab_size"))
        variants = {}
        if kind == "eagle3":
            draft_vocab = _positive_int("draft_vocab_size", cfg.get("draft_vocab_size"), vocab)
            fc_bias = False
            layers = 1  # the reference builds one layer whatever num_hidden_layers says
            variants = eagle3_variants(cfg)
        else:
            draft_vocab = vocab
            fc_bias = _flag(cfg, "bias", True)
            layers = _positive_int("num_hidden_layers", cfg.get("num_hidden_layers"), 1)
        theta = cfg.get("rope_theta")
        rope_scaling = cfg.get("rope_scaling")
        if rope_scaling is None and isinstance(cfg.get("rope_parameters"), dict):
            params = cfg["rope_parameters"]
            theta = params.get("rope_theta", theta)
            if params.get("rope_type", "default") != "default":
                rope_scaling = params
        if rope_scaling is not None:
            _check_rope_scaling(rope_scaling)
            theta = theta if theta is not None else rope_scaling.get("rope_theta")  # (transformers 5 writes it there)
        hidden_act = cfg.get("hidden_act", "silu")
        if hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {hidden_act!r} (supported: {', '.join(ACTIVATIONS)})")
        return cls(
            kind=kind,
            hidden_size=hidden,
            intermediate_size=_positive_int("intermediate_size", cfg.get("intermediate_size")),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            vocab_size=vocab,
            draft_vocab_size=draft_vocab,
            target_hidden_size=_positive_int("target_hidden_size", cfg.get("target_hidden_size"), hidden),
            rms_norm_eps=_positive_number("rms_norm_eps", cfg.get("rms_norm_eps"), 1e-6),
            rope_theta=_positive_number("rope_theta", theta, 10000.0),
            rope_scaling=rope_scaling,
            fc_bias=fc_bias,
            qkv_bias=_flag(cfg, "qkv_bias", False),
            hidden_act=hidden_act,
            num_layers=layers,
            raw=dict(cfg),
            **variants,
        )


EAGLE3_SWITCHES = ("norm_before_residual", "fc_norm", "norm_before_fc", "norm_output")


def eagle3_variants(cfg: dict) -> dict:
    """The EAGLE-3 variant switches of a config, each a bool."""
    # vLLM reads a speculators config without `norm_before_residual` as true; EAGLE and SpecForge configs as false.
    speculators = cfg.get("speculators_model_type") == "eagle3"
    values = {
        "norm_before_residual": cfg.get("norm_before_residual", speculators),
        "fc_norm": cfg.get("fc_norm", False),
        # NVIDIA's gpt-oss heads write it under `eagle_config`, as vLLM reads it
        "norm_before_fc": config_section(cfg, "eagle_config").get("norm_before_fc", cfg.get("norm_before_fc", False)),
        "norm_output": cfg.get("norm_output", False),
    }
    for name, value in values.items():
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, found {value!r}")
    if values["fc_norm"] and values["norm_before_fc"]:
        raise ValueError("fc_norm and norm_before_fc are both true: a head normalises its features one way or the "
                         "other before fc, never both")
    values["feature_layers"] = _feature_layers(cfg)
    return values


def config_section(cfg: dict, key: str) -> dict:
    """cfg[key] where it is an object (some exports nest settings), else {}."""
    return cfg[key] if isinstance(cfg.get(key), dict) else {}


def _feature_layers(cfg: dict) -> tuple[int, ...] | None:
    """Target layers a head was trained on, as the index of the layer whose
    input it reads (transformers' hidden_states[j]). vLLM reads a top-level
    `eagle_aux_hidden_state_layer_ids` that way; SGLang reads the one under
    `eagle_config` as layer outputs (j + 1 here)."""
    ids, shift = cfg.get("eagle_aux_hidden_state_layer_ids"), 0
    if ids is None:
        ids, shift = config_section(cfg, "eagle_config").get("eagle_aux_hidden_state_layer_ids"), 1
    if ids is None:
        return None
    if (not isinstance(ids, list) or len(ids) != 3
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
        raise ValueError(f"eagle_aux_hidden_state_layer_ids must be three layer numbers >= 0, found {ids!r}")
    return tuple(i + shift for i in ids)


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
