"""Draft-head checkpoints: found, read and validated at the door.

A head folder (local, or a hub id) holds `config.json` and `pytorch_model.bin`
(read with weights_only=True, tried first as the reference does) or
`model.safetensors`. The kind is told from the config (`draft_vocab_size`,
vLLM's `speculators_model_type`) and the weight keys (`midlayer.`), never from
`architectures`. Every tensor is checked against the shape the config implies
and the head is checked against the base model; each error names the file,
the tensor, the expected and the found shape.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from .head_config import EAGLE3_SWITCHES, HeadConfig, config_section
from .heads import HEAD_CLASSES, DraftHead
from .model_files import CheckpointError, expand_path, not_weights, read_config, resolve_file, short_list

WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors")


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
        raise CheckpointError(f"{index}: the shards lack tensors the index names: {short_list(missing)}")
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
