"""A new EAGLE-3 head for a base model: its config.json from the base's (width, heads, RoPE) and its first weights
(the draft vocabulary, the norm and lm_head taken from the target)."""

from __future__ import annotations

import warnings

import torch

from ..head_config import ROPE_TYPES, HeadConfig, rope_type
from ..heads import Eagle3Head
from ..vocab import build_vocab_mapping


def text_config(base_config):
    return base_config.get_text_config() if hasattr(base_config, "get_text_config") else base_config  # multimodal


def head_options(base_config, draft_vocab_size: int, intermediate_size: int | None) -> dict:
    """The options that shape the head, resolved against the base as the
    head is made (the draft vocabulary capped at the base's, the base's MLP
    width by default): a checkpoint only loads into a head made with the
    same. Resolving is idempotent, so resolved values resolve to themselves."""
    text = text_config(base_config)
    if intermediate_size is None:
        intermediate_size = getattr(text, "intermediate_size", None)
        if not isinstance(intermediate_size, int):
            raise ValueError("the base's config has no intermediate_size to copy: give the head's MLP width "
                             "with --intermediate-size")
    return {"draft_vocab_size": min(draft_vocab_size, text.vocab_size), "intermediate_size": intermediate_size}


def head_rope(text, warn: bool = True) -> tuple[float, dict | None]:
    """The base's RoPE theta and, when the head implements its scaling, the
    scaling. Another scaling (yarn, dynamic, longrope) is dropped with a
    warning: the head gets default RoPE. It is trained and run with the
    RoPE of its own config.json (which the engine loads back), so it need
    not be the base's; what is lost is the scaling's long-context reach."""
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    if all(isinstance(value, dict) for value in rope.values()):  # one per attention kind (Gemma-3)
        rope = rope.get("full_attention") or next(iter(rope.values()), {})
    theta = float(rope.get("rope_theta", getattr(text, "rope_theta", None)) or 10000.0)
    kind = rope_type(rope)
    if kind == "default":
        return theta, None
    if kind not in ROPE_TYPES:
        if warn:
            warnings.warn(f"the draft head does not implement the base's {kind!r} RoPE scaling (supported: "
                          f"{', '.join(ROPE_TYPES)}): the head uses default RoPE with theta {theta:g}, without "
                          f"the base's scaling {rope}")
        return theta, None
    return theta, dict(rope)


def head_config_for(base_config, draft_vocab_size: int, intermediate_size: int | None = None,
                    warn: bool = True) -> dict:
    """config.json of an EAGLE-3 head for this base: the base's width, heads,
    head width and RoPE, one layer, a draft vocabulary of `draft_vocab_size`
    (`warn`: about a RoPE scaling it drops)."""
    text = text_config(base_config)
    theta, scaling = head_rope(text, warn)
    cfg = dict(
        architectures=["LlamaForCausalLMEagle3"], model_type="llama", hidden_size=text.hidden_size,
        **head_options(base_config, draft_vocab_size, intermediate_size),
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        num_hidden_layers=1, vocab_size=text.vocab_size, rms_norm_eps=getattr(text, "rms_norm_eps", 1e-6),
        hidden_act="silu", rope_theta=theta,
        max_position_embeddings=getattr(text, "max_position_embeddings", 2048), tie_word_embeddings=False,
    )
    if isinstance(getattr(text, "head_dim", None), int):  # not always hidden / heads (Gemma: 256, gpt-oss: 64)
        cfg["head_dim"] = text.head_dim
    if scaling is not None:
        cfg["rope_scaling"] = scaling
    return cfg


def check_head_sizes(draft_vocab_size: int, intermediate_size: int | None) -> None:
    if draft_vocab_size < 1:
        raise ValueError(f"--draft-vocab-size must be at least 1, got {draft_vocab_size}")
    if intermediate_size is not None and intermediate_size < 1:
        raise ValueError(f"--intermediate-size must be at least 1, got {intermediate_size}")


def new_head(base, counts: torch.Tensor, draft_vocab_size: int, intermediate_size: int | None = None,
             seed: int = 0) -> Eagle3Head:
    """A fresh head whose draft vocabulary is the most frequent tokens of
    `counts`. Its norm and lm_head start as the target's final norm (norm_scale)
    and the target's lm_head rows of the draft vocabulary: the head's output
    lives in the target's hidden space, so that is a far better start than noise."""
    check_head_sizes(draft_vocab_size, intermediate_size)
    cfg = HeadConfig.from_dict(head_config_for(base.config, draft_vocab_size, intermediate_size), "eagle3")
    torch.manual_seed(seed)
    head = Eagle3Head(cfg)
    d2t, t2d = build_vocab_mapping(counts, cfg.draft_vocab_size)
    with torch.no_grad():
        head.d2t.copy_(d2t)
        head.t2d.copy_(t2d)
        head.lm_head.weight.copy_(base.get_output_embeddings().weight[t2d.to(base.device)].float())
        scale = norm_scale(getattr(base.get_decoder(), "norm", None), head.norm)
        if scale is not None:
            head.norm.weight.copy_(scale)
    return head


@torch.no_grad()
def norm_scale(norm, head_norm) -> torch.Tensor | None:
    """The head norm's weight that gives the base's final norm's output, or
    None when that norm is no RMSNorm of the head's width. Read from what the
    norm does, not from its weight: Gemma's RMSNorm scales by (1 + weight)."""
    weight = getattr(norm, "weight", None)
    if weight is None or weight.shape != head_norm.weight.shape:
        return None
    ones = torch.ones(weight.shape, device=weight.device)
    unit = torch.nn.functional.rms_norm(ones, ones.shape, eps=head_norm.eps)
    scale = norm(ones).float() / unit
    probe = torch.linspace(-2.0, 3.0, weight.numel(), device=weight.device)  # (LayerNorm would not fit)
    expected = scale * torch.nn.functional.rms_norm(probe, probe.shape, eps=head_norm.eps)
    if not torch.allclose(norm(probe).float(), expected, rtol=1e-2, atol=1e-3 * float(scale.abs().max())):
        return None
    return scale.cpu()


def attach_target_embedding(head: Eagle3Head, base) -> None:
    weight = base.get_input_embeddings().weight.detach()
    device = head.fc.weight.device
    head.attach_embedding(weight if weight.device == device else weight.to(device))
