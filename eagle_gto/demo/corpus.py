"""Training corpus for the demo models: the running interpreter's own stdlib sources.

Why the stdlib: every machine that can run this package already has these files,
so the demo models can be rebuilt offline, deterministically, without downloading
any data set. The train / held-out split depends only on each file's relative path,
so it is stable across machines and Python patch releases.
"""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

# Test suites are huge and repetitive, the others are odd (GUI demos, a deprecated
# fixer framework full of Python 2 snippets); leaving them out keeps the corpus "normal" code.
_SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"}
_MAX_BYTES = 200_000  # a few generated tables are megabytes of literals: not useful to learn from
_HELDOUT_MOD = 20  # about 1 file in 20 (5%) held out


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_utf8(path: Path) -> bool:
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _all_files() -> list[tuple[str, Path]]:
    """(relative posix path, absolute path) of every usable stdlib .py file, sorted by relpath."""
    root = _stdlib_root()
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS for part in rel.parts[:-1]):
            continue
        if not path.is_file() or path.stat().st_size > _MAX_BYTES or not _is_utf8(path):
            continue
        out.append((rel.as_posix(), path))
    return sorted(out)


def _is_heldout(relpath: str) -> bool:
    # crc32 rather than hash(): Python's str hash is salted per process.
    return zlib.crc32(relpath.encode("utf-8")) % _HELDOUT_MOD == 0


def stdlib_files(split: str) -> list[Path]:
    """Stdlib source files of one split ("train" or "heldout"), in a deterministic order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    want_heldout = split == "heldout"
    return [path for rel, path in _all_files() if _is_heldout(rel) == want_heldout]


def read_texts(paths: list[Path]) -> list[str]:
    """File contents as str (the files were checked to be UTF-8)."""
    return [Path(p).read_text(encoding="utf-8") for p in paths]
