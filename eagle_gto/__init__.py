"""eagle-gto: lossless speculative decoding with EAGLE-1/2, EAGLE-3 and GTO draft heads."""

import importlib

__all__ = ["EaModel", "CheckpointError", "GenerationStats", "Step"]
__version__ = "0.1.0"

# Imported on first use, so that a tool needing none of the engine (the
# reference-engine benchmark runs under an older transformers) can import
# modules of this package.
_HOMES = {"EaModel": ".ea_model", "CheckpointError": ".model_files", "GenerationStats": ".generation",
          "Step": ".generation"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
