"""Drives a stock transformers causal LM through its public forward.

The engine hands the decoder a ready 4-D additive attention mask, explicit
position ids and the project's own `TargetKVCache`; transformers passes a
4-D mask through unchanged, which is all tree attention needs. The features a
draft head reads are taken without touching model code: the final (normed)
hidden state from the decoder's output (EAGLE-1), or the hidden states
entering three decoder layers from forward pre-hooks (EAGLE-3).
"""

from __future__ import annotations

import inspect
import threading
import weakref
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from .kv_cache import TargetKVCache


def eagle3_feature_layers(num_layers: int) -> list[int]:
    """Layers whose input EAGLE-3 reads: 2, N//2 and N-3 (../shared/docs/formats.md)."""
    layers = [2, num_layers // 2, num_layers - 3]
    if min(layers) < 0 or max(layers) >= num_layers:
        raise ValueError(f"EAGLE-3 heads need a base model with at least 3 decoder layers, got {num_layers}")
    return layers


def model_logits(lm_head_output: torch.Tensor, config) -> torch.Tensor:
    """What a model's own forward makes of its lm_head's output (Cohere's
    logit_scale, Granite's logits_scaling, Gemma-2's final_logit_softcapping):
    sampling, and GTO's rewards, must use the distribution the model defines."""
    logits = lm_head_output
    scale = float(getattr(config, "logit_scale", None) or 1.0) / float(getattr(config, "logits_scaling", None) or 1.0)
    if scale != 1.0:
        logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: cannot find the decoder layers (expected `.layers`)")
    return layers


def cache_keyword(decoder: nn.Module) -> str:
    """The name under which `decoder.forward` takes the KV cache: transformers
    5.24 renamed `past_key_values` to `cache` (the old name warns until 5.40),
    one model family at a time."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def length_dependent_rope(model: nn.Module) -> str | None:
    """The rope scaling of a base whose rotary frequencies depend on the longest position of each forward
    (dynamic NTK, LongRoPE), else None."""
    for module in model.modules():
        rope_type = getattr(module, "rope_type", None)
        # (a dict per layer type in models that mix attention kinds, e.g. Gemma-3)
        for kind in rope_type.values() if isinstance(rope_type, dict) else [rope_type]:
            if isinstance(kind, str) and ("dynamic" in kind or "longrope" in kind):
                return kind
    return None


class LayerInputTap:
    """Keeps the hidden states entering chosen decoder layers, from forward
    pre-hooks. One tap per model (`layer_input_tap`), shared by all that read
    features from it (several EaModels on one base, training), so hooks never
    pile up; what the hooks keep is per thread and only while a caller is
    `capturing`, so two generations on one base, or a user's own forward
    beside one, never see each other's features."""

    def __init__(self, layers: nn.ModuleList):
        # Weakly: a strong reference from the tap, a value of the module-wide `_TAPS`, would keep its key, the
        # layers (most of a model's weights), alive after the model is dropped.
        self._layers = weakref.ref(layers)
        self._hooked: set[int] = set()
        self._local = threading.local()

    @contextmanager
    def capturing(self, indices):
        """Yields a dict that the forwards run inside fill: {index: input of layer index}."""
        for index in set(indices) - self._hooked:
            self._layers()[index].register_forward_pre_hook(self._keeper(index), with_kwargs=True)
            self._hooked.add(index)
        outer = getattr(self._local, "captured", None)
        self._local.captured = captured = {}
        try:
            yield captured
        finally:
            self._local.captured = outer

    def _keeper(self, index: int):
        # The input of layer i is transformers' hidden_states[i].
        def keep_input(module, args, kwargs):
            captured = getattr(self._local, "captured", None)
            if captured is not None:
                captured[index] = args[0] if args else kwargs["hidden_states"]

        return keep_input


_TAPS: weakref.WeakKeyDictionary[nn.ModuleList, LayerInputTap] = weakref.WeakKeyDictionary()
_TAPS_LOCK = threading.Lock()


def layer_input_tap(model: nn.Module) -> LayerInputTap:
    layers = decoder_layers(model)
    with _TAPS_LOCK:
        if layers not in _TAPS:
            _TAPS[layers] = LayerInputTap(layers)
        return _TAPS[layers]


class TargetRunner:
    def __init__(self, model: nn.Module, feature_layers: list[int] | None):
        """feature_layers: EAGLE-3 layer indices, or None for EAGLE-1's final
        hidden state (also fine when no head is used)."""
        self.model = model
        self.decoder = model.get_decoder()
        self._cache_keyword = cache_keyword(self.decoder)
        self.lm_head = model.get_output_embeddings()
        self.layers = decoder_layers(model)
        self.feature_layers = feature_layers
        self.dtype = next(model.parameters()).dtype
        self.input_device = model.get_input_embeddings().weight.device
        self._check_logits()
        self._tap = layer_input_tap(model)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return model_logits(self.lm_head(hidden), self.model.config)

    @torch.no_grad()
    def _check_logits(self) -> None:
        """The engine computes logits as lm_head(decoder output), post-processed
        by `model_logits`; a model whose forward does something else would be sampled
        from the wrong distribution, so it is refused (two tokens, once)."""
        ids = torch.zeros(1, 2, dtype=torch.long, device=self.input_device)
        training = self.model.training
        self.model.eval()  # (dropout would make the two forwards differ)
        try:
            expected = self.model(input_ids=ids, use_cache=False).logits[0].float()
            found = self.logits(self.decoder(input_ids=ids, use_cache=False).last_hidden_state[0]).float()
        finally:
            self.model.train(training)
        scale = expected.abs().max().item() or 1.0
        if not torch.allclose(found, expected.to(found.device), rtol=1e-2, atol=1e-2 * scale):
            raise ValueError(f"{type(self.model).__name__}: its forward computes logits other than lm_head(decoder "
                             "output) (with the logit scaling and soft-capping configs this engine applies); "
                             "this engine cannot decode it losslessly")

    def layer_devices(self) -> list[torch.device]:
        return [next(layer.parameters()).device for layer in self.layers]

    def new_cache(self, capacity: int) -> TargetKVCache:
        return TargetKVCache(len(self.layers), capacity, self.layer_devices())

    def cache_bytes(self, capacity: int) -> dict[torch.device, int]:
        """What `new_cache(capacity)` will allocate on each device: a key and a value row per layer and position."""
        config = self.model.config
        heads = getattr(config, "num_attention_heads", None)
        if not heads:  # (a config of other names: nothing is claimed)
            return {}
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        itemsize = next(self.model.parameters()).dtype.itemsize  # (read now: the model may have been cast since)
        per_layer = 2 * kv_heads * head_dim * capacity * itemsize
        sizes: dict[torch.device, int] = {}
        for device in self.layer_devices():
            sizes[device] = sizes.get(device, 0) + per_layer
        return sizes

    def additive_mask(self, visible: torch.Tensor) -> torch.Tensor:
        """bool [n, kv_len] (True = visible) -> float [1, 1, n, kv_len]."""
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.input_device)
        return mask.masked_fill(~visible.to(self.input_device), torch.finfo(self.dtype).min)[None, None]

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        visible: torch.Tensor,
        cache: TargetKVCache,
        features: bool = False,
        logits_from: int = 0,
        slots: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """input_ids, position_ids [n]; visible bool [n, cache.length + n]
        (appending), or with `slots` (device long [n], where the new keys go)
        bool [n, view] over the cache's first `view` slots. Returns logits
        [n - logits_from, V] (in the model's dtype: greedy argmax needs no
        float32 copy of them, sampling makes its own) and, when asked, the head's features [n, F]."""
        taps = features and self.feature_layers is not None
        plan = cache.write_plan(slots, visible.shape[1]) if slots is not None else nullcontext()
        with plan, self._tap.capturing(self.feature_layers) if taps else nullcontext() as captured:
            out = self.decoder(
                input_ids=input_ids.to(self.input_device)[None],
                attention_mask=self.additive_mask(visible),
                position_ids=position_ids.to(self.input_device)[None],
                use_cache=True,
                **{self._cache_keyword: cache},
            )
        hidden = out.last_hidden_state[0]
        feats = None
        if taps:
            feats = torch.cat([captured[i][0].to(hidden.device) for i in self.feature_layers], dim=-1)
        elif features:
            feats = hidden
        return self.logits(hidden[logits_from:]), feats
