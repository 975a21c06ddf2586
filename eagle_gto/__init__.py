"""eagle-gto: lossless speculative decoding with EAGLE-1/2, EAGLE-3 and GTO draft heads."""

from .checkpoint import CheckpointError
from .ea_model import EaModel
from .generation import GenerationStats, Step

__all__ = ["EaModel", "CheckpointError", "GenerationStats", "Step"]
__version__ = "0.1.0"
