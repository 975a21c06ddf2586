"""A draft head's config.json, read and checked: `HeadConfig` (what a head
needs from it, one source of defaults), the EAGLE-3 variant switches
(SpecForge, vLLM speculators, gpt-oss exports), the target layers a head reads
and its RoPE scaling. A missing or bad value is a ValueError naming the key.
The head modules these configure are in heads.py; the formats are in
../shared/docs/formats.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
