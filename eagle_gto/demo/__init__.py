"""The embedded demo pair: a small Llama trained on the Python stdlib sources
(assets/base) and draft heads for it (assets/eagle3, and assets/gto once
GTO fine-tuning has produced it), all rebuilt offline by
`python -m eagle_gto.demo.build`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..model_files import CheckpointError

ASSETS = Path(__file__).resolve().parent / "assets"
HEADS = ("eagle3", "gto")


def default_head() -> str:
    """The head named by assets/heads.json ({"default": ...}), else eagle3."""
    index = ASSETS / "heads.json"
    if index.is_file():
        name = json.loads(index.read_text()).get("default", "eagle3")
        if name in HEADS and (ASSETS / name / "config.json").is_file():
            return name
    return "eagle3"


def demo_paths(head: str | None = None) -> tuple[str, str]:
    """Local folders (base, head) of the demo pair. head: "eagle3", "gto",
    or None for the better one (see `default_head`)."""
    name = default_head() if head is None else head
    if name not in HEADS:
        raise ValueError(f"unknown demo head {name!r}; choose from {', '.join(HEADS)} (or None for the default)")
    base, folder = ASSETS / "base", ASSETS / name
    if not (base / "model.safetensors").is_file():
        raise CheckpointError(f"{base}: the demo base model is not built; run python -m eagle_gto.demo.build")
    if not (folder / "config.json").is_file():
        how = ("it is made by GTO fine-tuning of the eagle3 head" if name == "gto"
               else "run python -m eagle_gto.demo.build")
        raise CheckpointError(f"{folder}: the demo {name} head is not built ({how}); head='eagle3' is the other one")
    return str(base), str(folder)
