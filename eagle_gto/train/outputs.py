"""The files a run writes in --out (and elsewhere), checked before it starts: a new run must not overwrite a
finished one's, and a file written at the end must be writable."""

from __future__ import annotations

import os
from pathlib import Path

HEAD_FILES = ("config.json", "model.safetensors", "pytorch_model.bin")  # what save_head writes
STARTED_OUTPUTS = ("metrics.jsonl", "checkpoints")  # what a run writes before its first complete checkpoint


def check_new_out(out: str | Path, outputs: tuple[str, ...] = ()) -> None:
    """--out must be a folder (or not exist yet) that holds none of a
    finished run's `outputs`: a new run would overwrite them."""
    out = Path(out)
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"--out {out}: {folder} is a file, not a folder")
            break
    found = [name for name in outputs if (out / name).exists()]
    if found:
        raise ValueError(f"{out} already holds the output of an earlier run ({', '.join(found)}): "
                         "choose another --out (or clear this one)")


def check_writable(path: str | Path, option: str) -> None:
    """A file written at the end of a long run is checked at its start."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path}: a folder, not a file")
    if not path.parent.is_dir():
        raise ValueError(f"{option} {path}: there is no folder {path.parent}")
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise ValueError(f"{option} {path}: not writable")
