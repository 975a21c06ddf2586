"""A model's folder, local or a hub id: its files found and its config.json read, for the draft head
(checkpoint.py) and the base model (loading.py) alike, and the error that names what cannot be used."""

from __future__ import annotations

import json
import os
from pathlib import Path


class CheckpointError(ValueError):
    """A draft head or base model that cannot be used, with the reason."""


HUB_OPTIONS = ("cache_dir", "revision", "token", "local_files_only", "subfolder")


def hub_options(kwargs: dict) -> dict:
    """The `from_pretrained` arguments that say where a file comes from (also read here)."""
    return {k: kwargs[k] for k in HUB_OPTIONS if kwargs.get(k) is not None}


def expand_path(path_or_id):
    """`~/model` as the folder it names (transformers would take it for a hub id)."""
    text = str(path_or_id)
    return os.path.expanduser(text) if text.startswith("~") else path_or_id


def resolve_file(path_or_id: str, filename: str, required: bool = True, hub: dict | None = None) -> Path | None:
    """A local file of a folder, or a file downloaded from (or cached from) a
    hub repository. `hub`: `cache_dir`, `revision`, `token`,
    `local_files_only`, `subfolder`, as transformers takes them. Not
    required: None when the folder or repository has no such file."""
    hub = dict(hub or {})
    local = Path(expand_path(path_or_id))
    if hub.get("subfolder") and local.is_dir():
        local = local / hub["subfolder"]
    if local.is_dir():
        candidate = local / filename
        if candidate.is_file():
            return candidate
        if required:
            raise CheckpointError(f"{local}: no {filename} in this folder")
        return None
    if local.is_file():
        raise CheckpointError(f"{local}: a file, not a folder (give the model's folder, which holds {filename})")
    if local.exists() or str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") > 1:
        raise CheckpointError(f"{path_or_id}: no such folder")
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(str(path_or_id), filename, **hub))
    except LocalEntryNotFoundError as err:  # before EntryNotFoundError, its base class
        if not required:  # maybe cached under another name (model.safetensors for pytorch_model.bin)
            return None
        tried_network = not (constants.HF_HUB_OFFLINE or hub.get("local_files_only"))
        hint = ", HF_HUB_OFFLINE=1 fails at once, without the retries" if tried_network else ""
        raise CheckpointError(
            f"{path_or_id}: not a local folder, and the hub could not be reached to download "
            f"{filename} (offline?{hint}): {err}"
        ) from None
    except EntryNotFoundError:
        if required:
            raise CheckpointError(f"{path_or_id}: the hub repository has no {filename}") from None
        return None
    except Exception as err:  # repository missing, auth, network: report and stop
        raise CheckpointError(f"{path_or_id}: not a local folder and not downloadable from the hub: {err}") from None


def not_weights(file: Path) -> str | None:
    """What a weights file holds instead of weights, when it is something
    recognisable: empty, a Git LFS pointer, a web page."""
    with open(file, "rb") as handle:
        start = handle.read(64)
    if not start:
        return "an empty file"
    if start.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the weights (fetch them with `git lfs pull`)"
    if start.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return "a web page, not weights (a failed download?)"
    return None


def read_config(path_or_id: str, hub: dict | None = None) -> dict:
    file = resolve_file(path_or_id, "config.json", hub=hub)
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    # vLLM "speculators" configs nest the layer's settings; the speculator's own (top level) win, as in vLLM.
    nested = cfg.get("transformer_layer_config")
    if isinstance(nested, dict):
        cfg = {**nested, **{k: v for k, v in cfg.items() if k != "transformer_layer_config"}}
    return cfg


def short_list(names, shown: int = 5) -> str:
    """The first names (sorted) for an error message, and how many more there are."""
    names = sorted(names)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more

