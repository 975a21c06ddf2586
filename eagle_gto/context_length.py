"""max_length, the longest sequence (prompt and new tokens) a generation may
reach: its default, and the checks of what a base model can decode with (its
sliding window, a rope that depends on the length, its devices' memory, the
context it was trained for)."""

from __future__ import annotations

import warnings

from .memory import device_memory
from .target import TargetRunner, length_dependent_rope

MAX_LENGTH = 2048  # default total sequence budget (prompt + new tokens)


def sliding_window(config) -> int | None:
    """The window of a base whose attention (in some layers at least) is a sliding window, else None."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    sliding = "sliding_attention" in layer_types if layer_types else bool(window)
    return window if sliding and window else None


def default_max_length(config) -> int:
    """max_length when none is given: 2048, or the base's context
    (max_position_embeddings) or sliding window where smaller."""
    trained = getattr(config, "max_position_embeddings", None)
    return min(MAX_LENGTH, sliding_window(config) or MAX_LENGTH, trained or MAX_LENGTH)


def base_context(base_model_path: str | None) -> int | None:
    """default_max_length of a base model from its config.json alone, before its weights load (None: the demo
    base), read through the config class transformers builds for it, as the loaded model's is. None where
    transformers has no class for its model_type (custom code), or refuses its values: its context is known, or
    the load says what is wrong, once it loads."""
    from transformers import AutoConfig

    from .loading import read_base_config

    if base_model_path is None:
        from .demo import demo_paths

        base_model_path = demo_paths()[0]
    config = read_base_config(base_model_path)  # (a clear error for a wrong path or a head given as the base)
    if "model_type" not in config:
        return None
    try:
        built = AutoConfig.for_model(**config)
    except Exception:  # a model_type transformers does not know, or values it refuses: the load says which
        return None
    return default_max_length(causal_lm_config(built))


def causal_lm_config(config):
    """The config a base loaded by AutoModelForCausalLM has: a multimodal model's text_config where its causal LM
    class is the text model alone (Llama-4, Qwen3.5: their max_position_embeddings are in text_config)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if getattr(model_class, "config_class", type(config)) is type(config):
        return config
    return config.get_text_config()


def check_max_length(target: TargetRunner, max_length: int, speculative: bool = True) -> None:
    """A ValueError when the base model `target` runs cannot decode with this context
    (`speculative`: with draft trees), a warning when it was not trained
    for it (servers check their --max-length once, at startup)."""
    base_model = target.model
    window = sliding_window(base_model.config)
    if window and max_length > window:
        raise ValueError(
            f"this base model uses sliding-window attention (window {window}); the engine's tree mask is "
            f"full attention, so max_length must be <= {window}, got {max_length}"
        )
    config = base_model.config
    trained = getattr(config, "max_position_embeddings", None)
    kind = length_dependent_rope(base_model)
    # Past `limit`, such a rope rotates all tokens of a forward by the frequencies of its longest position: a draft
    # tree's forward would rotate the tokens it verifies otherwise than plain decoding's one-token forwards do.
    limit = trained
    if kind == "longrope":  # (it switches at the original context)
        limit = (getattr(config, "rope_parameters", None) or {}).get("original_max_position_embeddings") or trained
    if speculative and kind and limit and max_length > limit:
        raise ValueError(f"this base model's {kind!r} rope scaling picks its rotary frequencies from the longest "
                         f"position of each forward, so past {limit} positions speculative output would not equal "
                         f"plain decoding's; max_length must be <= {limit}, got {max_length} (plain decoding, "
                         "naivegenerate, has no such limit)")
    for device, needed in target.cache_bytes(max_length).items():
        memory = device_memory(device)
        if memory is not None and needed > memory:  # it fails at the prefill, in the allocator's words
            raise ValueError(f"max_length={max_length} needs {needed / 2**30:.1f} GiB of key/value cache on "
                             f"{device}, which has {memory / 2**30:.1f} GiB in all: lower max_length")
    if trained and max_length > trained:  # rotary positions go on, but quality is not known past them
        # stacklevel: the frame named when this was EaModel.check_max_length (stacklevel=3 there)
        warnings.warn(f"max_length={max_length} is beyond the base model's max_position_embeddings ({trained}): "
                      "positions past it were not trained for", stacklevel=4)
