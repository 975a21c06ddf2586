"""Model shapes the benchmarks build with random weights. Imports nothing of
the engine, so that the reference-engine benchmark can use it under the
older transformers the reference needs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    draft_vocab_size: int | None = None  # None: the full target vocabulary
    llama3_rope: bool = False


SHAPES = {
    "tiny": Shape(64, 6, 4, 2, 128, 256),
    # Llama-3-8B's proportions scaled to hidden 512 (MLP 3.5x, 4 query heads
    # per KV head, vocab ~31x and draft vocab ~8x the width), small enough for a CPU.
    "small": Shape(512, 8, 8, 2, 1792, 16000, draft_vocab_size=4000),
    "llama3-8b": Shape(4096, 32, 32, 8, 14336, 128256, draft_vocab_size=32000, llama3_rope=True),
}


def llama_config(shape: Shape):
    from transformers import LlamaConfig

    rope = {}
    if shape.llama3_rope:
        rope = dict(rope_theta=500000.0, max_position_embeddings=131072,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    return LlamaConfig(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                       num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
                       num_key_value_heads=shape.num_kv_heads, intermediate_size=shape.intermediate_size,
                       bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False, **rope)
