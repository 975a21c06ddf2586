"""Draft-head checkpoints: found, read and validated at the door.

A head folder (local, or a hub id) holds `config.json` and `pytorch_model.bin`
(read with weights_only=True, tried first as the reference does) or
`model.safetensors`. The kind is told from the config (`draft_vocab_size`,
vLLM's `speculators_model_type`) and the weight keys (`midlayer.`), never from
`architectures`. Every tensor is checked against the shape the config implies
and the head is checked against the base model; each error names the file,
the tensor, the expected and the found shape.

The base model is loaded by transformers (`load_base`), but refused here when
its weights do not all load (transformers would leave missing tensors random
with only a logged report), with the folder or file named.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from .heads import EAGLE3_SWITCHES, HEAD_CLASSES, DraftHead, HeadConfig, config_section

WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors")


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


def read_weights(path_or_id: str, hub: dict | None = None) -> tuple[dict[str, torch.Tensor], Path]:
    """The head's tensors, from one weight file or from the shards an index names."""
    for name in WEIGHT_FILES:
        file = resolve_file(path_or_id, name, required=False, hub=hub)
        if file is not None:
            return _load_tensors(file), file
    for name in WEIGHT_FILES:
        index = resolve_file(path_or_id, f"{name}.index.json", required=False, hub=hub)
        if index is not None:
            return _load_shards(path_or_id, index, hub), index
    where = "" if Path(expand_path(path_or_id)).is_dir() else " in the repository or the local hub cache"
    raise CheckpointError(f"{path_or_id}: no draft weights ({' or '.join(WEIGHT_FILES)}, or a sharded "
                          f"one's .index.json){where}")


def _load_shards(path_or_id: str, index: Path, hub: dict | None) -> dict[str, torch.Tensor]:
    """The tensors of every shard a sharded checkpoint's index maps them to."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{index}: not a shard index (a JSON object with a weight_map): "
                              f"{type(err).__name__}: {err}") from None
    odd = [shard for shard in shards if not isinstance(shard, str)]  # (a path is built from each)
    if odd:
        raise CheckpointError(f"{index}: the weight_map maps tensors to {odd[0]!r}, not a shard's file name")
    state = {}
    for shard in shards:
        state.update(_load_tensors(resolve_file(path_or_id, shard, hub=hub)))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise CheckpointError(f"{index}: the shards lack tensors the index names: {_some(missing)}")
    return state


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    instead = not_weights(file)
    if instead:
        raise CheckpointError(f"{file}: {instead}")
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(file))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({err})") from None
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        with open(file, "rb") as f:
            start = f.read(4)
        if not (start.startswith(b"PK\x03\x04") or start.startswith(b"\x80")):  # a zip or legacy pickle
            raise CheckpointError(f"{file}: not a PyTorch checkpoint (corrupt, or another kind of file under "
                                  "this name, such as a failed download's error page)") from None
        raise CheckpointError(  # (torch's advice to load with weights_only=False is left out: unsafe)
            f"{file}: holds more than tensors, refused (only plain tensor state dicts are loaded): "
            f"{str(err).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{file}: corrupt or truncated checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: expected a dict of tensor names to tensors")
    return state


def detect_kind(cfg: dict, state: dict[str, torch.Tensor]) -> str:
    if "draft_vocab_size" in cfg or cfg.get("speculators_model_type") == "eagle3":
        return "eagle3"
    if any(k.startswith("midlayer.") or k.endswith("hidden_norm.weight") for k in state):
        return "eagle3"
    return "eagle1"


def normalise_keys(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """Accept vLLM speculators naming (`layers.0.` for `midlayer.`) and
    strip a leading `model.` some exports add."""
    out = {}
    for key, value in state.items():
        if key.endswith("rotary_emb.inv_freq"):  # a buffer old exports saved; recomputed from the config
            continue
        if key.startswith("model."):
            key = key[len("model.") :]
        if kind == "eagle3" and key.startswith("layers.0."):
            key = "midlayer." + key[len("layers.0.") :]
        out[key] = value
    return out


@dataclass
class HeadCheckpoint:
    config: HeadConfig
    state: dict[str, torch.Tensor]
    weights_file: Path


REQUIRED_CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")


def load_checkpoint(path_or_id: str, use_eagle3: bool | None = None, hub: dict | None = None) -> HeadCheckpoint:
    """Read and check a head's config and weights (`hub`: see resolve_file)."""
    cfg = read_config(path_or_id, hub)
    state, file = read_weights(path_or_id, hub)
    kind = detect_kind(cfg, state)
    if use_eagle3 is not None and use_eagle3 != (kind == "eagle3"):
        raise CheckpointError(
            f"{path_or_id}: use_eagle3={use_eagle3} but the checkpoint is an "
            f"{'EAGLE-3' if kind == 'eagle3' else 'EAGLE-1/2'} head (leave use_eagle3=None to detect it)"
        )
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in cfg]
    if missing:
        raise CheckpointError(f"{path_or_id}/config.json: missing {', '.join(missing)} needed by a {kind} head")
    state = normalise_keys(state, kind)
    if kind == "eagle3":  # SpecForge and gpt-oss heads: the tensors say it (the export writes the flag)
        for switch, tensor in (("fc_norm", "fc_norm.0.weight"), ("norm_before_fc", "input_norm.weight")):
            if tensor in state and switch not in cfg and switch not in config_section(cfg, "eagle_config"):
                cfg = {**cfg, switch: True}
    try:
        config = HeadConfig.from_dict(cfg, kind)
    except ValueError as err:
        raise CheckpointError(f"{path_or_id}/config.json: {err}") from None
    return HeadCheckpoint(config, state, file)


def t2d_from_d2t(d2t: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """The bool [vocab_size] mask of the target ids `d2t` maps to (target =
    draft + d2t[draft]); None where d2t is no such mapping (the checks below name it)."""
    if d2t.dim() != 1 or d2t.dtype.is_floating_point or d2t.dtype == torch.bool:
        return None
    ids = torch.arange(d2t.shape[0]) + d2t.long()
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size):
        return None
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[ids] = True
    return t2d


def d2t_from_t2d(t2d: torch.Tensor, draft_vocab_size: int) -> torch.Tensor | None:
    """d2t for a head that ships only t2d: the draft vocabulary is the marked
    target ids in ascending order (formats.md), so d2t[i] = used[i] - i; None
    where t2d is no mask of `draft_vocab_size` ids (the checks below name it)."""
    if t2d.dim() != 1 or t2d.dtype != torch.bool or int(t2d.sum()) != draft_vocab_size:
        return None
    used = t2d.nonzero().flatten()
    return used - torch.arange(draft_vocab_size)


def not_finite(name: str, tensor: torch.Tensor) -> str | None:
    """A problem when a weight holds NaN or infinity (a diverged training run's
    export): the engine's output would stay right, but no draft would be accepted."""
    low, high = torch.aminmax(tensor)  # one fast pass; NaN anywhere makes both NaN
    if torch.isfinite(low) and torch.isfinite(high):
        return None
    nan, inf = int(tensor.isnan().sum()), int(tensor.isinf().sum())
    return f"tensor {name}: {nan} NaN and {inf} infinite values (of {tensor.numel()})"


def build_head(ckpt: HeadCheckpoint) -> DraftHead:
    """Instantiate the head and load the weights, checking every tensor."""
    cfg = ckpt.config
    with torch.device("meta"):
        head = HEAD_CLASSES[cfg.kind](cfg)
    expected = {k: v.shape for k, v in head.state_dict().items()}
    floating = [k for k, v in head.state_dict().items() if v.is_floating_point()]
    state = dict(ckpt.state)
    embedding = state.pop("embed_tokens.weight", None)
    if cfg.kind == "eagle3" and cfg.draft_vocab_size == cfg.vocab_size:
        # A full draft vocabulary needs no mapping (formats.md): heads may ship without d2t/t2d.
        state.setdefault("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        state.setdefault("t2d", torch.ones(cfg.vocab_size, dtype=torch.bool))
    if cfg.kind == "eagle3" and "t2d" not in state and "d2t" in state:
        # t2d follows from d2t (the reference never reads it): the target ids d2t maps to.
        t2d = t2d_from_d2t(state["d2t"], cfg.vocab_size)
        if t2d is not None:
            state["t2d"] = t2d
    if cfg.kind == "eagle3" and "d2t" not in state and "t2d" in state:  # and d2t from t2d, the other way round
        d2t = d2t_from_t2d(state["t2d"], cfg.draft_vocab_size)
        if d2t is not None:
            state["d2t"] = d2t
    problems = []
    for key, shape in expected.items():
        if key not in state:
            problems.append(f"missing tensor {key} (expected shape {list(shape)})")
        elif state[key].shape != shape:
            problems.append(f"tensor {key}: expected shape {list(shape)}, found {list(state[key].shape)}")
    unknown = sorted(set(state) - set(expected))
    if unknown:
        problems.append(f"unexpected tensors {', '.join(unknown)}")
    if embedding is not None and tuple(embedding.shape) != (cfg.vocab_size, cfg.hidden_size):
        problems.append(
            f"tensor embed_tokens.weight: expected shape {[cfg.vocab_size, cfg.hidden_size]}, "
            f"found {list(embedding.shape)}"
        )
    # Loading would cast integer tensors (a quantized export's, without its scales) into the float weights silently,
    # and take NaN weights (drafts never accepted) without a word.
    for key, tensor in [(k, state.get(k)) for k in floating] + [("embed_tokens.weight", embedding)]:
        if tensor is not None and not tensor.is_floating_point():
            problems.append(f"tensor {key}: expected floating-point weights, found {tensor.dtype}")
        elif tensor is not None and tensor.numel() and (problem := not_finite(key, tensor)):
            problems.append(problem)
    if problems:
        if "fc.weight" not in state:
            problems.append("no fc.weight: not an EAGLE draft head (a base model? are base_model_path and "
                            "ea_model_path swapped?)")
        raise CheckpointError(f"{ckpt.weights_file}: " + "; ".join(problems))
    head = HEAD_CLASSES[cfg.kind](cfg)
    head.load_state_dict(state)
    if embedding is not None:
        head.embed_tokens = torch.nn.Embedding.from_pretrained(embedding, freeze=True)
    if cfg.kind == "eagle3":
        check_vocab_mapping(head, ckpt.weights_file)
    head.eval().requires_grad_(False)
    return head


def check_vocab_mapping(head: DraftHead, file) -> None:
    """d2t must map the draft vocabulary onto distinct target ids, and t2d
    (used in training) must mark exactly those."""
    targets = torch.arange(head.config.draft_vocab_size) + head.d2t
    if targets.min() < 0 or targets.max() >= head.config.vocab_size:
        raise CheckpointError(f"{file}: d2t maps draft ids outside the target vocabulary")
    if targets.unique().numel() != targets.numel():
        raise CheckpointError(f"{file}: d2t maps two draft ids to the same target id")
    marked = head.t2d.nonzero().flatten()
    if marked.numel() != targets.numel() or not torch.equal(marked, targets.sort().values):
        raise CheckpointError(f"{file}: t2d marks {marked.numel()} target ids, which are not the "
                              f"{targets.numel()} that d2t maps the draft vocabulary to")


def check_against_base(head: DraftHead, base_config, where: str) -> None:
    """The head must fit the base model it drafts for."""
    cfg = head.config
    base_hidden = base_config.hidden_size
    base_vocab = base_config.vocab_size
    if cfg.vocab_size != base_vocab:
        raise CheckpointError(f"{where}: head vocab_size {cfg.vocab_size} != base model vocab_size {base_vocab}")
    if cfg.kind == "eagle1" and cfg.hidden_size != base_hidden:
        raise CheckpointError(f"{where}: EAGLE-1 head hidden_size {cfg.hidden_size} != base hidden_size {base_hidden}")
    if cfg.kind == "eagle3" and cfg.target_hidden_size != base_hidden:
        raise CheckpointError(
            f"{where}: EAGLE-3 head expects target features of width {cfg.target_hidden_size} "
            f"(target_hidden_size, or hidden_size when absent), base hidden_size is {base_hidden}"
        )
    layers = getattr(base_config, "num_hidden_layers", None)
    if isinstance(layers, int):
        try:
            head.feature_layers(layers)
        except ValueError as err:
            raise CheckpointError(f"{where}: {err}") from None
    if head.embed_tokens is None and cfg.hidden_size != base_hidden:
        raise CheckpointError(
            f"{where}: head hidden_size {cfg.hidden_size} != base hidden_size {base_hidden} and the head "
            "carries no embed_tokens.weight of its own"
        )


def looks_like_head(cfg: dict, keys=()) -> bool:
    """An EAGLE draft head's config.json or weight names (to catch swapped paths)."""
    architectures = str(cfg.get("architectures", "")).lower()
    return "eagle" in architectures or detect_kind(cfg, keys) == "eagle3" or "fc.weight" in keys


def read_base_config(path_or_id: str, hub: dict | None = None) -> dict:
    cfg = read_config(path_or_id, hub)
    if looks_like_head(cfg):
        raise CheckpointError(f"{path_or_id}: config.json describes an EAGLE draft head, not a base model "
                              "(are base_model_path and ea_model_path swapped?)")
    _check_generation_config(path_or_id, hub)
    return cfg


def _check_generation_config(path_or_id: str, hub: dict | None) -> None:
    """A local base's generation_config.json must read: transformers takes one that does not for a missing
    one (with an info log line), and the eos ids it lists would then not stop generation."""
    file = Path(expand_path(path_or_id)) / (hub or {}).get("subfolder", "") / "generation_config.json"
    if file.is_dir():  # (transformers passes over it as over a missing one)
        raise CheckpointError(f"{file}: a folder, not a generation config")
    if not file.is_file():
        return
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file}: not valid JSON ({err}); transformers would ignore it, and the stop "
                              "token ids it lists with it") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{file}: expected a JSON object")


def load_base(path_or_id: str, **kwargs):
    """The base model by transformers' `AutoModelForCausalLM.from_pretrained`
    (kwargs go there). transformers only logs the tensors a checkpoint lacks
    (they stay random), drops tensors config.json has no place for, and raises
    bare errors for a corrupt file or shapes that contradict config.json; here
    each is a CheckpointError naming the folder or file."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    path_or_id = expand_path(path_or_id)
    read_base_config(path_or_id, hub_options(kwargs))  # a clear error for a wrong path or a head
    _check_local_weight_files(path_or_id, kwargs.get("subfolder"))
    keep_mismatched = kwargs.pop("ignore_mismatched_sizes", False)  # the caller's explicit choice to reinitialise
    try:
        base, info = AutoModelForCausalLM.from_pretrained(path_or_id, output_loading_info=True,
                                                          ignore_mismatched_sizes=True, **kwargs)
    except SafetensorError as err:
        file = _unreadable_safetensors(path_or_id, hub_options(kwargs))
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({err})") from None
    except (torch.OutOfMemoryError, KeyboardInterrupt):
        raise
    except Exception as err:  # corrupt pickles, bad index files, config values transformers refuses, ...
        raise CheckpointError(f"{path_or_id}: cannot load the base model: {type(err).__name__}: {err}") from None
    problems = []
    if info["missing_keys"]:
        problems.append(f"missing tensors, which would stay random: {_some(info['missing_keys'])}")
    if info["mismatched_keys"] and not keep_mismatched:
        shapes = [f"{key} {list(found)} where config.json implies {list(expected)}"
                  for key, found, expected in info["mismatched_keys"]]
        problems.append(f"tensors of the wrong shape: {_some(shapes)}")
    unexpected = info["unexpected_keys"]
    dropped = [k for k in unexpected if ".layers." in f".{k}" and not k.endswith("inv_freq")]
    if dropped:  # e.g. more decoder layers, or q/k norms, than config.json describes: they would be ignored
        problems.append(f"decoder-layer tensors config.json has no place for (ignored by transformers): "
                        f"{_some(dropped)}")
    if problems:
        if unexpected and not dropped:  # often the reason: the weights of another model
            problems.append(f"unexpected tensors: {_some(unexpected)}")
        hint = " (they look like an EAGLE draft head's: are base_model_path and ea_model_path swapped?)"
        raise CheckpointError(f"{path_or_id}: the weights do not fit config.json: " + "; ".join(problems)
                              + (hint if looks_like_head({}, unexpected) else ""))
    check_not_offloaded(base, path_or_id)
    return base


def check_not_offloaded(base, name: str) -> None:
    """Weights accelerate offloaded (to disk, or to the CPU beside GPUs) sit on the meta device between forwards;
    the engine reads weights and their devices directly (the head's place and embedding, the caches, EAGLE-1's
    lm_head), which fails mid-generation on them, or moves a head to meta, losing its weights."""
    offloaded = sorted({key for key, p in list(base.named_parameters()) + list(base.named_buffers())
                        if p.device.type == "meta"})
    if offloaded:
        raise CheckpointError(f"{name}: device_map left weights offloaded, on disk or unloaded "
                              f"({_some(offloaded)}); accelerate offloads a 'cpu' entry beside GPUs too. The engine "
                              "needs every weight in the memory of the device that runs it (give max_memory more "
                              "room, or another device_map)")


def _check_local_weight_files(path_or_id, subfolder=None) -> None:
    """A local folder's weight files that are LFS pointers or empty, named
    before transformers fails on them with an unpickling error."""
    folder = Path(path_or_id) / (subfolder or "")
    if not folder.is_dir():
        return
    for file in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        if file.is_dir():
            raise CheckpointError(f"{file}: a folder, not a weights file")
        instead = not_weights(file)
        if instead:
            raise CheckpointError(f"{file}: {instead}")


def _some(names, shown: int = 5) -> str:
    names = sorted(names)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _unreadable_safetensors(path_or_id: str, hub: dict) -> str:
    """The first .safetensors file of the model's folder whose header does not read (else the folder)."""
    from safetensors import safe_open

    folder = resolve_file(path_or_id, "config.json", hub=hub).parent  # (read before: it exists)
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception:  # SafetensorError, OSError: this is the file
            return str(file)
    return str(folder)


def save_head(head: DraftHead, folder: str | os.PathLike, pytorch_bin: bool = False) -> Path:
    """Write a head as config.json + model.safetensors (+ pytorch_model.bin),
    with the official key names so other engines load it too."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = head.config
    config = dict(cfg.raw)
    config.update(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        vocab_size=cfg.vocab_size, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        hidden_act=cfg.hidden_act, model_type=config.get("model_type", "llama"),
    )
    if cfg.kind == "eagle3":
        config.update(architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=cfg.draft_vocab_size,
                      num_hidden_layers=1)
        if cfg.target_hidden_size != cfg.hidden_size:
            config["target_hidden_size"] = cfg.target_hidden_size
    else:
        config.update(architectures=["LlamaForCausalLM"], bias=cfg.fc_bias, num_hidden_layers=cfg.num_layers)
        if cfg.qkv_bias:
            config["qkv_bias"] = True
    for key in ("speculators_model_type", "speculators_config", "speculators_version"):
        config.pop(key, None)  # written in EAGLE-3's flat format, with the variant switches spelled out
    if cfg.kind == "eagle3":
        for switch in EAGLE3_SWITCHES:
            if getattr(cfg, switch) or switch in config:
                config[switch] = getattr(cfg, switch)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in head.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    stale = folder / "pytorch_model.bin"
    if pytorch_bin:
        torch.save(state, stale)
    elif stale.exists():  # loaders try it first: an old one would shadow the new weights
        stale.unlink()
    return folder
