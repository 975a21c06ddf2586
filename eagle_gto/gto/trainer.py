"""GTO fine-tuning (Phase II): L = L_token + omega * L_GTO.

One step on a batch of windows:
  1. one target forward: features, logits and the keys/values of the windows;
  2. L_token: the EAGLE-3 training-time-test loss (eagle_gto.train.ttt);
  3. groups of m adjacent roots; the trees of M and of the frozen M0 at
     every root (batched drafting), verified together in one target forward;
  4. tree rewards, debiased by M0's, standardised within each group;
  5. the greedy accepted branch of each M tree, its log-probability under M
     (with gradients) and M0, the ratio s and the clipped surrogate L_GTO;
  6. backward and an AdamW step on M.
`objective="token"` runs steps 1, 2 and 6 only: the control that continues
token-level training on the same data. With `checkpointing` (the CLI's
--save-every, --keep-checkpoints, --resume) a run writes checkpoints and
resumes from them (checkpoints.py).
"""

from __future__ import annotations

import copy
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..chat import MODEL_TYPES, model_type_arg
from ..devices import device_problem
from ..dtype_option import DTYPE_HELP, resolve_dtype
from ..generation import TreeParams
from ..heads import DraftHead
from ..train.checkpoints import check_not_stopped, checkpoints_to_resume, read_progress
from ..train.config import DTYPES, check_choice, check_not_negative
from ..train.errors import TrainingDiverged, check_gradient_norm
from ..train.outputs import check_new_out
from ..tree import check_tree_params
from .checkpoints import (Checkpointing, check_same_data, check_same_run_options, data_fingerprint, load_checkpoint,
                          run_options, save_checkpoint)
from .data import TokenStream, generated_stream, jsonl_stream, stdlib_split, text_stream
from .parallel import Share, process_device
from .policy import (accepted_paths, clipped_surrogate, debiased_rewards, group_advantages, group_roots, path_logprob,
                     ratio, root_eligible)
from .reward import AGGREGATIONS, tree_reward
from .trees import Roots, TargetPass, TreeBatch, draft_trees, feature_layers_for, head_pass, target_pass, verify_trees


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class GTOConfig:
    """Every option of `python -m eagle_gto.gto`, with its default (the CLI is built from these fields)."""

    out: str = _opt("runs/gto", "output folder: head/, metrics.jsonl, metrics.png, config.json, summary.json")
    base: str | None = _opt(None, "base model folder or hub id; none: the demo base")
    head: str | None = _opt(None, "EAGLE-3 head to fine-tune; none: the demo EAGLE-3 head")
    reference: str | None = _opt(None, "frozen reference head M0, with --head's draft vocabulary; none: a frozen "
                                 "copy of --head")
    data: str = _opt("generated", "'generated' (the base's greedy continuations of demo-corpus prompts), 'stdlib' "
                     "(the demo corpus's training split) or a jsonl file (eagle_gto.train formats)")
    generated: int = _opt(512, "generated: how many continuations to train on")
    prompt_tokens: int = _opt(64, "generated: prompt length")
    new_tokens: int = _opt(128, "generated: continuation length")
    model_type: str = _opt("auto", "prompt format of jsonl conversations (eagle_gto.chat)", choices=MODEL_TYPES,
                            type=model_type_arg)
    system: str | None = _opt(None, "system prompt for jsonl conversations that have none (as eagle_gto.train's)")
    validation_every: int = _opt(10, "every n-th demo-corpus file (jsonl: the last 1/n) is kept out for validation")
    objective: str = _opt("gto", "'gto': L_token + omega*L_GTO; 'token': L_token only (the control)",
                          choices=("gto", "token"))
    reward: str = _opt("smoothmax", "branch aggregation of the tree reward", choices=AGGREGATIONS)
    eta: float = _opt(1.0, "smooth-max temperature of the tree reward")
    debias: bool = _opt(True, "subtract the reference tree's reward (off: ablation)")
    group_size: int = _opt(4, "m: adjacent root positions per group (paper: 4..8)")
    eps: float = _opt(0.2, "PPO clip range of the ratio s")
    omega: float = _opt(2.0, "weight of L_GTO")
    delta: float = _opt(1e-2, "added to the group std when standardising advantages")
    ttt_steps: int = _opt(7, "L_token: training-time-test unroll steps")
    step_weight: float = _opt(0.8, "L_token: the loss weight of unroll step s is step_weight**s")
    lr: float = _opt(3e-5, "AdamW learning rate (constant)")
    steps: int = _opt(300, "optimizer steps")
    windows: int = _opt(2, "windows per step per process (the global batch: windows x processes)")
    window_length: int = _opt(192, "tokens per window")
    groups_per_window: int = _opt(2, "groups drawn per window per step")
    grad_clip: float = _opt(1.0, "gradient norm clip")
    total_token: int = _opt(60, "training trees: total_token (engine default 60)")
    depth: int = _opt(7, "training trees: depth (engine default 7)")
    top_k: int = _opt(10, "training trees: top_k (engine default 10)")
    tree_chunk: int = _opt(64, "trees per verification forward (memory bound)")
    eval_every: int = _opt(100, "validation every n steps (0: start and end only)")
    eval_windows: int = _opt(16, "validation windows (trees every 8th position, 60/7/10)")
    export_dtype: str = _opt("float32", "dtype of the exported head", choices=tuple(DTYPES))
    device: str | None = _opt(None, "torch device; none: cuda if available, else cpu")
    dtype: str = _opt("auto", f"base model {DTYPE_HELP}; the head trains in float32", choices=("auto", *DTYPES))
    seed: int = _opt(0, "seed of the data order and the group draws")

    def __post_init__(self):
        if self.reward not in AGGREGATIONS:
            raise ValueError(f"reward must be one of {AGGREGATIONS}, got {self.reward!r}")
        if self.objective not in ("gto", "token"):
            raise ValueError(f"objective must be 'gto' or 'token', got {self.objective!r}")
        for f in fields(self):
            if f.metadata.get("choices"):
                check_choice(f.name, getattr(self, f.name), f.metadata["choices"])
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages are standardised within a group), "
                             f"got {self.group_size}")
        if self.group_size > self.window_length - 2:  # else no group ever fits: GTO would train L_token only
            raise ValueError(f"group_size ({self.group_size}) must be at most window_length - 2 "
                             f"({self.window_length - 2}): roots are positions 1 .. window_length - 2 (a root "
                             "needs a token before it and a trained token after it)")
        for name in ("eta", "eps", "delta", "lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        check_not_negative(self, "omega", "step_weight")  # (negative weights would train against their losses)
        for name in ("steps", "windows", "eval_windows", "groups_per_window", "generated", "prompt_tokens",
                     "new_tokens", "tree_chunk", "ttt_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.system is not None and self.data in ("generated", "stdlib"):  # it would be silently ignored
            raise ValueError(f"system: only with a jsonl --data (conversations), not with data {self.data!r}")
        if self.validation_every < 2:  # 1 would keep every file (all of a jsonl) out for validation
            raise ValueError(f"validation_every must be >= 2, got {self.validation_every}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if self.window_length <= EVAL_STRIDE:
            raise ValueError(f"window_length must be > {EVAL_STRIDE} (validation trees are rooted every "
                             f"{EVAL_STRIDE}th position), got {self.window_length}")
        check_tree_params(self.total_token, self.depth, self.top_k)  # top_k against the head's vocabulary: load_models
        check_device(self.device)

    @property
    def base_dtype(self) -> str:
        """The dtype the base loads in: --dtype, auto resolved for --device. Resolved where read, not kept: a
        config made with dataclasses.replace(cfg, device=...) resolves auto for its own device."""
        return resolve_dtype(self.dtype, base_on_gpu(self.device), self.base)

    def recorded_options(self) -> dict:
        """Every option as config.json, a checkpoint, a sweep point and an experiment's kept results record it:
        --dtype as the dtype the base loads in, so a resume compares that, not the spelling (a run started with
        --dtype float32, the default before auto, resumes with auto wherever auto loads float32: on a CPU)."""
        return {**asdict(self), "dtype": self.base_dtype}


def base_on_gpu(device: str | None) -> bool:
    """Whether the base goes to a CUDA GPU (--device, or left out where there is one): what --dtype auto reads."""
    return torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")


def check_device(device: str | None) -> None:
    """A device torch cannot use fails only at the first tensor placed there, deep in a traceback."""
    if device is None:
        return
    try:
        place = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device {device!r}: {err}") from None
    if place.type == "cpu":
        return
    backend = getattr(torch, place.type, None)  # torch.cuda, torch.xpu, torch.mps, ...
    if not hasattr(backend, "is_available"):  # e.g. meta (tensors without data), or a backend torch lacks
        raise ValueError(f"device {device!r}: not a device GTO can train on; use cpu, cuda, xpu or mps")
    if not backend.is_available():
        raise ValueError(f"device {device!r}: {place.type} is not available (torch {torch.__version__}); "
                         "leave --device out, or use cpu")
    problem = device_problem(place)  # a GPU, XPU or MPS device this machine lacks: named as every command does
    if problem:
        raise ValueError(f"device {device!r}: {problem}")
    count = getattr(backend, "device_count", None)
    if place.index is not None and count is not None and place.index >= count():
        raise ValueError(f"device {device!r}: there are {count()} {place.type} devices")


def resolve_device(cfg: GTOConfig) -> str:
    """The device the base (and the heads) train on: --device, or this process's own (its GPU under several
    processes), or cuda when available, else cpu. Under several processes --device cuda is this process's GPU:
    the device as given (cuda, cuda:0) put every process on the first GPU."""
    own = process_device()
    if cfg.device is None or own is None or torch.device(cfg.device).type == "cpu":
        return cfg.device or str(own or ("cuda" if torch.cuda.is_available() else "cpu"))
    if torch.device(cfg.device) not in (torch.device(own.type), own):
        raise ValueError(f"--device {cfg.device}: under several processes each trains on its own device (this "
                         f"one: {own}); leave --device out")
    return str(own)


EVAL_TREE = TreeParams()  # validation always uses the engine's decoding defaults
EVAL_STRIDE = 8


@dataclass
class Models:
    base: torch.nn.Module
    head: DraftHead  # M, trained, float32
    reference: DraftHead  # M0, frozen, float32
    tokenizer: object
    feature_layers: list[int] | None


def _read_head(path, cfg: GTOConfig) -> DraftHead:
    """An EAGLE-3 head whose draft vocabulary holds the training trees' top_k."""
    from ..checkpoint import build_head, load_checkpoint

    head = build_head(load_checkpoint(path))
    if head.kind != "eagle3":
        raise ValueError(f"{path}: GTO fine-tunes EAGLE-3 heads (L_token is the EAGLE-3 objective), got {head.kind}")
    check_tree_params(cfg.total_token, cfg.depth, cfg.top_k, head.config.draft_vocab_size)
    return head


def _attach_head(head: DraftHead, path, base) -> None:
    from ..checkpoint import check_against_base
    from ..placement import attach_head

    check_against_base(head, base.config, str(path))
    attach_head(base, head, torch.float32)  # M trains, and M0 scores, in float32 from the exact weights


BASE_OPTIONS = ("base", "device", "dtype")  # what load_models reads for the base (not for the heads)


def load_models(cfg: GTOConfig, reuse: Models | None = None) -> Models:
    """Base, tokenizer, trainable head M and frozen reference M0 as `cfg`
    names them; `reuse` supplies an already loaded base and tokenizer (the
    heads are always read afresh). The heads are read first: they are small."""
    from transformers import AutoTokenizer

    from ..loading import load_base

    base_path, head_path = cfg.base, cfg.head
    if base_path is None or head_path is None:
        from ..demo import demo_paths

        demo_base, demo_head = demo_paths(head="eagle3")
        base_path, head_path = base_path or demo_base, head_path or demo_head
    reference_path = cfg.reference or head_path
    head, reference = _read_head(head_path, cfg), _read_head(reference_path, cfg)
    if not (torch.equal(head.d2t, reference.d2t) and torch.equal(head.t2d, reference.t2d)):
        # path_logprob reads M's branches in the draft ids of the head it scores with
        raise ValueError(f"reference {cfg.reference} drafts over another draft vocabulary (d2t/t2d) than the head "
                         f"{head_path}: M0 must share M's draft vocabulary")
    if reuse is None:
        # load_base refuses a head given as the base
        base = load_base(base_path, dtype=getattr(torch, cfg.base_dtype)).to(resolve_device(cfg))
        base.eval().requires_grad_(False)
        tokenizer = AutoTokenizer.from_pretrained(base_path)
    else:
        base, tokenizer = reuse.base, reuse.tokenizer
    _attach_head(head, head_path, base)
    _attach_head(reference, reference_path, base)
    layers, reference_layers = feature_layers_for(head, base), feature_layers_for(reference, base)
    if reference_layers != layers:  # one target pass, with M's layers, feeds both heads
        raise ValueError(f"reference {reference_path} reads the inputs of target layers {reference_layers} "
                         f"(eagle_aux_hidden_state_layer_ids), the head {head_path} those of {layers}: M0 must read "
                         "M's feature layers")
    reference.eval()
    head.train()
    for name, param in head.named_parameters():
        param.requires_grad_(not name.startswith("embed_tokens."))
    return Models(base, head, reference, tokenizer, layers)


def check_data(cfg: GTOConfig) -> None:
    """A missing, malformed or empty --data file fails here, before any model loads."""
    from ..train.data import read_records

    if cfg.data not in ("generated", "stdlib") and not read_records(cfg.data):
        raise ValueError(f"{cfg.data}: no records")


# The options load_streams reads: runs that agree on them can share the streams.
STREAM_OPTIONS = ("data", "validation_every", "generated", "prompt_tokens", "new_tokens", "model_type", "system",
                  "eval_windows", "window_length", "seed")
# Those of them that change the validation windows (the seed does not: VALIDATION_SEED): runs that differ in
# one are scored on different text, so their validation numbers do not compare.
VALIDATION_OPTIONS = ("data", "validation_every", "prompt_tokens", "new_tokens", "model_type", "system",
                      "eval_windows", "window_length")
VALIDATION_SEED = 1  # the prompts of the generated validation continuations, whatever --seed (seed 0 + 1 before)
# The options only the GTO objective reads; the control (objective "token") ignores them.
GTO_OPTIONS = ("objective", "reference", "reward", "eta", "debias", "group_size", "eps", "omega", "delta",
               "groups_per_window", "total_token", "depth", "top_k")


def load_streams(cfg: GTOConfig, models: Models) -> tuple[TokenStream, TokenStream]:
    """(training stream, validation stream), disjoint, each at least one window long."""
    streams = _make_streams(cfg, models)
    for name, stream in zip(("training", "validation"), streams):
        if len(stream) < cfg.window_length:
            raise ValueError(f"the {name} data has {len(stream)} tokens, fewer than one window of "
                             f"{cfg.window_length} (--window-length)")
    if not streams[1].loss_mask.any():
        raise ValueError("the validation data holds no trained tokens (prompts only?): validation drafts only what "
                         "the model writes (answers)")
    val_mask = streams[1].spread(cfg.eval_windows, cfg.window_length)[1]
    if len(val_mask) < cfg.eval_windows:  # e.g. generated continuations that ended early at </s>
        warnings.warn(f"the validation data holds {len(val_mask)} windows of {cfg.window_length} tokens, fewer than "
                      f"--eval-windows {cfg.eval_windows}: validation uses those {len(val_mask)}")
    validation_roots(val_mask)  # (e.g. short answers that no validation root precedes)
    return streams


def _make_streams(cfg: GTOConfig, models: Models) -> tuple[TokenStream, TokenStream]:
    if cfg.data in ("generated", "stdlib"):
        train_files, val_files = stdlib_split(cfg.validation_every)
        if cfg.data == "stdlib":
            return text_stream(train_files, models.tokenizer), text_stream(val_files, models.tokenizer)
        make = lambda files, count, seed: generated_stream(  # noqa: E731
            models.base, models.tokenizer, files, count, cfg.prompt_tokens, cfg.new_tokens, seed)
        return make(train_files, cfg.generated, cfg.seed), make(val_files, cfg.eval_windows, VALIDATION_SEED)
    stream = jsonl_stream(cfg.data, models.tokenizer, cfg.model_type, system=cfg.system)
    cut = len(stream) - max(len(stream) // cfg.validation_every, cfg.window_length)
    if cut < cfg.window_length:
        raise ValueError(f"{cfg.data}: too few tokens ({len(stream)}) for training and validation windows")
    return (TokenStream(stream.ids[:cut], stream.loss_mask[:cut]),
            TokenStream(stream.ids[cut:], stream.loss_mask[cut:]))


RUN_OUTPUTS = ("config.json", "metrics.jsonl", "summary.json", "head")  # what train() writes into cfg.out
FINISHED_OUTPUTS = ("summary.json", "head")  # those of a run that ended (or diverged)
STARTED_OUTPUTS = (*RUN_OUTPUTS, "checkpoints")  # what a run stopped before its first complete checkpoint left


def check_out(cfg: GTOConfig, checkpointing: Checkpointing, world: int) -> Path | None:
    """The checkpoint the run continues from, None for a fresh run, after the checks of --out: without
    --resume it must hold no earlier run (its output or its checkpoints); with --resume the newest checkpoint
    must be of a run with the same options (see checkpoints.FREE_OPTIONS) and at most --steps in. A --resume
    that finds no checkpoint starts afresh, over a run stopped before its first one (not over a finished run)."""
    out = Path(cfg.out)
    previous = checkpoints_to_resume(out, checkpointing.resume)
    if not previous:
        check_new_out(out, FINISHED_OUTPUTS)
        check_not_stopped(out, STARTED_OUTPUTS, checkpointing.resume)
        return None
    progress = read_progress(previous[-1], cfg.steps)
    check_same_run_options(previous[-1], progress["options"], run_options(cfg, world))
    return previous[-1]


@dataclass
class GTOResult:
    loss: torch.Tensor  # L_GTO, differentiable through s only
    rewards: torch.Tensor  # [B] R(T_i) of M's trees
    ref_rewards: torch.Tensor  # [B] R(T̄_i) of M0's trees
    advantages: torch.Tensor  # [B]
    s: torch.Tensor  # [B] ratios (differentiable)
    lengths: torch.Tensor  # [B] greedy accepted length of M's trees
    ref_lengths: torch.Tensor  # [B] the same for M0's trees

    STATS = ("reward", "reward_ref", "abs_advantage", "clip_frac", "tau", "tau_ref", "l_gto")  # stats(): row means

    def stats(self, eps: float) -> dict:
        return {
            "reward": self.rewards.mean().item(),
            "reward_ref": self.ref_rewards.mean().item(),
            "abs_advantage": self.advantages.abs().mean().item(),
            "clip_frac": ((self.s.detach() - 1).abs() > eps).float().mean().item(),
            "tau": self.lengths.float().mean().item() + 1,
            "tau_ref": self.ref_lengths.float().mean().item() + 1,
            "l_gto": self.loss.item(),
        }


def gto_objective(cfg: GTOConfig, models: Models, target: TargetPass, roots: Roots) -> GTOResult:
    """L_GTO for the groups `roots` (steps 3-5 of the module docstring)."""
    head, reference = models.head, models.reference
    state = head_pass(head, target)  # with gradients: s_i is differentiated through it
    with torch.no_grad():
        ref_state = head_pass(reference, target)
    tree = (cfg.total_token, cfg.depth, cfg.top_k)
    mine = draft_trees(head, state.detach(), target, roots, *tree)
    theirs = draft_trees(reference, ref_state, target, roots, *tree)
    both = TreeBatch.stack(mine.trees + theirs.trees)
    verdict = verify_trees(models.base, target, Roots(roots.seq.repeat(2), roots.pos.repeat(2)), both, cfg.tree_chunk)
    device = verdict.node_logp.device
    rewards = tree_reward(verdict.node_logp, both.mask.to(device), both.leaves.to(device), cfg.reward, cfg.eta)
    B = len(roots)
    advantages = group_advantages(debiased_rewards(rewards[:B], rewards[B:], cfg.debias), cfg.group_size, cfg.delta)
    tokens, lengths = accepted_paths(mine, verdict.choices[:B])
    _, ref_lengths = accepted_paths(theirs, verdict.choices[B:])
    logp = path_logprob(head, state, roots, tokens, lengths)
    with torch.no_grad():
        ref_logp = path_logprob(reference, ref_state, roots, tokens, lengths)
    s = ratio(logp, ref_logp, lengths.to(logp.device))
    advantages = advantages.to(s.device)
    return GTOResult(clipped_surrogate(s, advantages, cfg.eps), rewards[:B], rewards[B:], advantages, s,
                     lengths, ref_lengths)


def training_loss(cfg: GTOConfig, models: Models, tokens: torch.Tensor, loss_mask: torch.Tensor,
                  generator: torch.Generator, share: Share = Share()) -> tuple[torch.Tensor, dict]:
    """L = L_token + omega * L_GTO on one batch of windows (L_token alone for the control). Under several
    processes the windows are the global batch and this process computes its `share` of them, every mean
    taken over the global batch: the processes' losses (and gradients) add up to those of the whole batch,
    and the stats are the whole batch's."""
    from ..train.ttt import ttt_loss

    mine = share.windows(len(tokens))
    if cfg.objective == "gto":  # drawn over the global batch, as one process draws them
        roots = group_roots(root_eligible(loss_mask), cfg.group_size, cfg.groups_per_window, generator)
    tokens, loss_mask = tokens[mine], loss_mask[mine]
    target = target_pass(models.base, tokens, models.feature_layers)
    device = models.head.fc.weight.device
    token = ttt_loss(models.head, target.features.to(device, torch.float32), tokens.to(device),
                     target.logits.to(device), loss_mask.to(device), steps=cfg.ttt_steps, step_weight=cfg.step_weight)
    # Step s's loss is a mean over its positions here: weighted by their share of those of the global batch.
    shares = [n / max(total, 1) for n, total in zip(token.loss_counts, share.sum(token.loss_counts))]
    loss = sum(cfg.step_weight**s * step * part for s, (step, part) in enumerate(zip(token.step_losses, shares)))
    stats = {"l_token": share.sum([loss.item()])[0],
             **share.mean({"acc0": token.step_accuracy[0]}, token.step_counts[0])}
    if cfg.objective == "token" or not len(roots):  # no group: no m adjacent trainable positions (short answers?)
        return loss, stats
    roots, rows = share.roots(roots, mine), len(roots)
    if not len(roots):  # the groups are in the other processes' windows
        stats.update(share.mean(dict.fromkeys(GTOResult.STATS, 0.0), 0))
        return loss, stats
    gto = gto_objective(cfg, models, target, roots)
    stats.update(share.mean(gto.stats(cfg.eps), len(roots)))
    return loss + cfg.omega * gto.loss * (len(roots) / rows), stats


def validation_roots(loss_mask: torch.Tensor) -> Roots:
    """Every EVAL_STRIDE-th position of the validation windows where the next
    token is trained (an answer's, not a prompt's: the engine drafts only what
    the model writes); refused when there is none."""
    S, L = loss_mask.shape
    stride = torch.zeros(S, L, dtype=torch.bool)
    stride[:, EVAL_STRIDE::EVAL_STRIDE] = True
    eligible = stride & root_eligible(loss_mask.cpu())
    if not eligible.any():
        held = "no trained tokens" if not loss_mask.any() else \
            f"no trained token right after a validation root (every {EVAL_STRIDE}th position)"
        raise ValueError(f"the {S} validation windows of {L} tokens hold {held}: use a longer --window-length, more "
                         "--eval-windows or more data")
    return Roots(*eligible.nonzero(as_tuple=True))


class Validator:
    """The head's trees at the decoding defaults (60/7/10), rooted every 8th
    position of fixed validation windows where the next token is trained
    (validation_roots): greedy accepted length + 1 (an estimate of tau) and
    the mean tree reward, on text GTO never trains on."""

    def __init__(self, models: Models, tokens: torch.Tensor, chunk: int, loss_mask: torch.Tensor | None = None):
        self.models, self.chunk = models, chunk
        self.roots = validation_roots(torch.ones_like(tokens, device="cpu") if loss_mask is None else loss_mask)
        self.target = target_pass(models.base, tokens, models.feature_layers)

    @torch.no_grad()
    def __call__(self, head: DraftHead) -> dict:
        state = head_pass(head, self.target)
        trees = draft_trees(head, state, self.target, self.roots, EVAL_TREE.total_token, EVAL_TREE.depth,
                            EVAL_TREE.top_k)
        verdict = verify_trees(self.models.base, self.target, self.roots, trees, self.chunk)
        _, lengths = accepted_paths(trees, verdict.choices)
        device = verdict.node_logp.device
        reward = tree_reward(verdict.node_logp, trees.mask.to(device), trees.leaves.to(device))
        return {"val_tau": lengths.float().mean().item() + 1, "val_reward": reward.mean().item()}


def plot_metrics(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("tree reward", ("reward", "reward_ref")), ("tau (training trees)", ("tau", "tau_ref")),
              ("validation trees (60/7/10)", ("val_tau", "val_reward")), ("losses", ("l_token", "l_gto")),
              ("|A| and clip fraction", ("abs_advantage", "clip_frac"))]
    panels = [(title, [k for k in keys if any(k in r for r in records)]) for title, keys in panels]
    panels = [(title, keys) for title, keys in panels if keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            ax.plot(*zip(*points), label=key, marker="o" if key.startswith("val_") else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def export_head(head: DraftHead, folder: Path, dtype: str) -> Path:
    from ..checkpoint import save_head

    exported = type(head)(head.config)  # a copy, so casting leaves the trained head as it is
    if head.embed_tokens is not None:
        exported.embed_tokens = copy.deepcopy(head.embed_tokens)
    exported.load_state_dict(head.state_dict())
    return save_head(exported.to(getattr(torch, dtype)), folder)


def train(cfg: GTOConfig, models: Models | None = None, streams: tuple[TokenStream, TokenStream] | None = None,
          progress: bool = True, checkpointing: Checkpointing | None = None) -> dict:
    """Run GTO (or the control) and export the head to `cfg.out`/head.
    `models` and (training, validation) `streams` default to what `cfg`
    names. With `checkpointing` (the CLI's), checkpoints are written to
    `cfg.out`/checkpoints and a run resumes from them (see check_out).
    Returns a summary: validation tau at the start and the end."""
    from tqdm import tqdm

    share = Share.launched()  # (several processes: each trains on its share of every step's windows)
    resumed = check_out(cfg, checkpointing, share.world) if checkpointing else None
    torch.manual_seed(cfg.seed)
    if streams is None:
        check_data(cfg)
    models = models or load_models(cfg)
    train_stream, val_stream = streams or load_streams(cfg, models)
    data = data_fingerprint(train_stream, val_stream)
    differs = check_same_data(resumed, data, cfg.data == "generated") if resumed else None
    if differs and share.main:
        warnings.warn(differs)
    data_gen = torch.Generator().manual_seed(cfg.seed)  # windows: the same for GTO and the control
    group_gen = torch.Generator().manual_seed(cfg.seed + 1)
    val_tokens, val_mask = val_stream.spread(cfg.eval_windows, cfg.window_length)
    validator = Validator(models, val_tokens, cfg.tree_chunk, val_mask) if share.main else None
    out = Path(cfg.out)  # written only now: a run the checks above stop can be run again
    share.wait()  # (and only once every process has checked that --out holds no earlier run)
    if share.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.recorded_options(), indent=2) + "\n")
    params = [p for p in models.head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    generators = {"data": data_gen, "groups": group_gen}

    def validate() -> dict:  # computed once, by rank 0, and logged alike by every process
        return share.from_main(validator(models.head) if share.main else None)

    if resumed:  # the records logged up to the checkpoint (those logged after it are logged again)
        kept = load_checkpoint(resumed, models.head, optimizer, generators)
        records, without_groups, seconds = kept["records"], kept["without_groups"], kept["seconds"]
        if share.main:
            print(f"resumed from {resumed} (step {records[-1]['step']})")
    else:
        if checkpointing and checkpointing.resume and share.main:  # (a --resume that starts over says so)
            print(f"{out} holds no complete checkpoint: starting from step 0")
        records, without_groups, seconds = [{"step": 0, **validate()}], 0, 0.0
    # without_groups: GTO steps that found no group of adjacent trainable roots; seconds: of training, resumes too
    done = records[-1]["step"]
    started = time.perf_counter() - seconds
    with open(out / "metrics.jsonl" if share.main else os.devnull, "w") as log:
        log.write("".join(json.dumps(record) + "\n" for record in records))
        bar = tqdm(range(done + 1, cfg.steps + 1), initial=done, total=cfg.steps, desc=f"{cfg.objective}",
                   disable=not (progress and share.main), dynamic_ncols=True)
        for step in bar:
            tokens, loss_mask = train_stream.windows(cfg.windows * share.world, cfg.window_length, data_gen)
            loss, stats = training_loss(cfg, models, tokens, loss_mask, group_gen, share)
            without_groups += cfg.objective == "gto" and "l_gto" not in stats
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            share.sum_gradients(params)
            try:
                check_gradient_norm(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip), step)
            except TrainingDiverged as err:  # no head is exported; the summary says why (a sweep goes on)
                summary = {"diverged": str(err), "val_tau_start": records[0]["val_tau"],
                           "val_reward_start": records[0]["val_reward"], "steps": step - 1}
                if share.main:
                    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
                raise
            optimizer.step()
            record = {"step": step, **stats, "seconds": round(time.perf_counter() - started, 2)}
            if step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0):
                record.update(validate())
            records.append(record)
            log.write(json.dumps(record) + "\n")
            log.flush()
            if checkpointing and checkpointing.due(step, cfg.steps) and share.main:
                save_checkpoint(out, step, checkpointing.keep, run_options(cfg, share.world), data, models.head,
                                optimizer, generators, {"records": records, "without_groups": without_groups,
                                                        "seconds": time.perf_counter() - started})
            bar.set_postfix({k: f"{v:.3f}" for k, v in stats.items() if k in ("l_token", "l_gto", "tau", "tau_ref")})
    summary = {"val_tau_start": records[0]["val_tau"], "val_tau_end": records[-1]["val_tau"],
               "val_reward_start": records[0]["val_reward"], "val_reward_end": records[-1]["val_reward"],
               "seconds": round(time.perf_counter() - started, 1), "steps": cfg.steps}
    if cfg.objective == "gto":
        summary["steps_without_groups"] = without_groups
    if share.main:
        write_outputs(cfg, models.head, records, summary, without_groups)
    share.wait()  # every process returns once the files are there
    return summary


def write_outputs(cfg: GTOConfig, head: DraftHead, records: list[dict], summary: dict, without_groups: int) -> None:
    """The end of a run, written (and said) by one process: the head, metrics.png and summary.json."""
    out = Path(cfg.out)
    export_head(head, out / "head", cfg.export_dtype)
    try:  # (matplotlib is an extra: without it the run still ends with its summary.json)
        plot_metrics(records, out / "metrics.png")
    except ImportError:
        print("matplotlib is not installed (pip install eagle-gto[train]): no metrics.png")
    if without_groups:
        warnings.warn(f"{without_groups} of {cfg.steps} steps had no group of {cfg.group_size} adjacent "
                      "trainable roots in their windows and trained L_token only")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
