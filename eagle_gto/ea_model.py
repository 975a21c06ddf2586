"""`EaModel`: the EAGLE-compatible front of the engine.

Same names, arguments, defaults and return values as the EAGLE reference
(`from_pretrained`, `eagenerate`, `ea_generate`, `naivegenerate`,
`naive_generate`, `tokenizer`, `get_tokenizer`), all thin wrappers over
`generation.generate_steps`. `generate_steps` is public too: it yields one
`Step` per iteration with the accepted length and timing, and `last_stats`
holds the record of the latest generation.

On a GPU, decoding steps run as CUDA graphs (`cuda_graphs`, default: on when
the base model and the head sit on one CUDA device, and the base is not
quantized); `cuda_graphs=False` runs the same steps eagerly.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Iterator

import torch
from torch import nn

from . import attention, context_length
from .acceptance import SamplingParams
from .arguments import check_generator_device, positive_int, prompt_ids, real_number, token_ids, whole_number
from .chat import eos_ids
from .checkpoint import build_head, check_against_base, load_checkpoint
from .drafter import Drafter
from .fusion import fuse_sibling_linears
from .generation import (Decoder, DecodeState, GenerationStats, Step, TreeParams, generate_steps, views_per_setting,
                         warm_up_steps)
from .graphs import StepGraphs, check_compile_mode, compile_decoder_layers, compile_drafter_steps
from .heads import DraftHead
from .loading import (check_device_map, check_dtype, check_not_offloaded, load_base, load_tokenizer,
                      quantization_options, read_base_config, trusted)
from .memory import no_room_message
from .model_files import expand_path, hub_options
from .placement import attach_head, head_device, share_base_weights
from .target import TargetRunner, decoder_layers, length_dependent_rope
from .tree import check_tree_params, num_candidates

AUTO_TREE_CANDIDATES = (32, 40, 48, 56, 60)
CPU_AUTO_TOTAL_TOKEN = 30


class EaModel(nn.Module):
    def __init__(self, base_model: nn.Module, ea_layer: DraftHead, tokenizer=None, total_token: int = 60,
                 depth: int = 7, top_k: int = 10, threshold: float = 1.0, cuda_graphs: bool | None = None,
                 torch_compile: bool | str = False):
        """cuda_graphs: replay decoding steps as CUDA graphs; None (default)
        turns them on when the base model and the head sit on a single CUDA device.
        torch_compile: also torch.compile the base model's decoder layers and
        the draft head's step work (`enable_torch_compile`); True, or a
        torch.compile mode ("default", "max-autotune-no-cudagraphs")."""
        super().__init__()
        self.base_model = base_model
        self.ea_layer = ea_layer
        self.tokenizer = tokenizer
        # The reference's attributes, which its scripts read.
        self.config = base_model.config
        self.vocab_size, self.hidden_size = base_model.get_output_embeddings().weight.shape
        self.base_model_name_or_path = getattr(base_model, "name_or_path", None)
        self.threshold = threshold  # accepted for compatibility; the reference does not use it either
        self.use_eagle3 = ea_layer.kind == "eagle3"
        attention.use_for(base_model)  # sdpa without copying grouped keys/values (attention.py)
        layers = decoder_layers(base_model)
        check_against_base(ea_layer, base_model.config, "ea_layer")  # (a head built apart from this base)
        check_not_offloaded(base_model, "base_model")  # (as from_pretrained does; before the head moves)
        attach_head(base_model, ea_layer)  # as the reference does: beside the last layer, in the base's dtype
        self._feature_layers = ea_layer.feature_layers(len(layers))
        self._target = TargetRunner(base_model, self._feature_layers)
        self._layout = self._weights_layout()
        self._lock = threading.Lock()
        # The thread itself, not its ident: a finished thread's ident is often reused by a new one.
        self._lock_owner: threading.Thread | None = None
        self._cache = None
        self._drafter: Drafter | None = None
        self._state: DecodeState | None = None
        self._graphs: StepGraphs | None = None
        self._cuda_graphs_asked = cuda_graphs
        self.cuda_graphs = self._check_graphs(cuda_graphs)
        self.torch_compile: str | None = None  # the compile mode once enabled
        if torch_compile:
            self.enable_torch_compile("default" if torch_compile is True else torch_compile)
        self.last_stats: GenerationStats | None = None
        if total_token == -1:
            total_token = self._pick_total_token(depth, top_k)
        self.tree = TreeParams(total_token, depth, top_k)

    @property
    def tree(self) -> TreeParams:
        """The draft tree's settings; assigning a new `TreeParams` checks it first."""
        return self._tree

    @tree.setter
    def tree(self, tree: TreeParams) -> None:
        if not isinstance(tree, TreeParams):
            raise TypeError(f"model.tree must be a TreeParams(total_token, depth, top_k), got {tree!r}")
        for name, value in dataclasses.asdict(tree).items():
            positive_int(name, value)
        check_tree_params(tree.total_token, tree.depth, tree.top_k, self.ea_layer.config.draft_vocab_size)
        self._tree = tree

    def _apply(self, fn, recurse=True):
        # A cast (model.to(torch.bfloat16)) keeps the base's rotary frequencies in float32, as transformers loads
        # them into a half-precision model and as the head keeps its own: rounded to bf16, the angles a thousand
        # positions in are off by radians.
        kept = [(module, name, buffer) for module in self.base_model.modules()
                for name, buffer in module.named_buffers(recurse=False)
                if name.endswith("inv_freq") and buffer.dtype == torch.float32]
        super()._apply(fn, recurse)
        for module, name, before in kept:
            after = getattr(module, name)
            if after.dtype != before.dtype:
                setattr(module, name, before.to(after.device))
        return self

    def forward(self, *args, **kwargs):
        raise NotImplementedError("EaModel has no forward: generate with eagenerate / ea_generate / naivegenerate "
                                  "/ naive_generate, or call model.base_model(...) for the base model's logits")

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, base_model_path=None, ea_model_path=None, total_token: int = 60, depth: int = 7,
                        top_k: int = 10, threshold: float = 1.0, use_eagle3: bool | None = None,
                        cuda_graphs: bool | None = None, torch_compile: bool | str = False, **kwargs) -> "EaModel":
        """Load a base model (local folder or hub id) with transformers'
        `AutoModelForCausalLM` and a draft head; kwargs go to the base
        model's `from_pretrained` (torch_dtype/dtype, device_map, ...), and the
        reference's load_in_8bit/load_in_4bit become a bitsandbytes
        quantization_config. With no paths at all, the embedded demo pair is used."""
        if base_model_path is None and ea_model_path is None:
            from .demo import demo_paths

            base_model_path, ea_model_path = demo_paths()
        if base_model_path is None or ea_model_path is None:
            raise ValueError("give both base_model_path and ea_model_path (or neither, for the demo pair)")
        if isinstance(base_model_path, bool):  # the reference's signature starts with use_eagle3
            raise TypeError(f"from_pretrained's first argument is base_model_path, got {base_model_path!r}: pass "
                            "base_model_path=, ea_model_path= and use_eagle3= by name")
        check_device_map(kwargs.get("device_map"))
        if "torch_dtype" in kwargs and "dtype" not in kwargs:
            kwargs["dtype"] = kwargs.pop("torch_dtype")
        check_dtype(kwargs.get("dtype"))
        quantization_options(kwargs)
        base_model_path, ea_model_path = expand_path(base_model_path), expand_path(ea_model_path)
        hub = hub_options(kwargs)
        head_hub = {k: v for k, v in hub.items() if k not in ("revision", "subfolder")}  # those name the base's
        # The head is small: read and check it, also against the base's config.json, before loading the base.
        head = build_head(load_checkpoint(ea_model_path, use_eagle3, head_hub))
        for name, value in (("total_token", total_token), ("depth", depth), ("top_k", top_k)):
            if not (name == "total_token" and value == -1):  # (-1 is picked by timing, once the model is built)
                positive_int(name, value)
        if total_token != -1:
            check_tree_params(total_token, depth, top_k, head.config.draft_vocab_size)
        base_config = read_base_config(base_model_path, hub)
        if isinstance(base_config.get("hidden_size"), int) and isinstance(base_config.get("vocab_size"), int):
            check_against_base(head, SimpleNamespace(**base_config), str(ea_model_path))
        if "dtype" not in kwargs and "device_map" not in kwargs:
            # No device map: the model stays on the CPU, where half precision is slow. float32
            # there, the default of transformers 4 (so of the reference); else the checkpoint's dtype.
            kwargs["dtype"] = torch.float32
        base = load_base(base_model_path, **kwargs)
        base.eval()
        check_against_base(head, base.config, str(ea_model_path))  # (__init__ checks again, naming no path)
        # A base whose tokenizer is custom code needs the user's trust_remote_code for the tokenizer too.
        tokenizer = load_tokenizer(base_model_path, {**hub, **trusted(kwargs)})
        return cls(base, head, tokenizer, total_token, depth, top_k, threshold, cuda_graphs, torch_compile)

    def enable_torch_compile(self, mode: str = "default", fuse_projections: bool = True) -> None:
        """torch.compile the base model's decoder layers (one set of graphs
        for all of them) and the draft head's step work (tree expansion,
        extension) as whole functions, so that the step graphs record fused
        kernels: on an H100 (8B shape) about 20% less time per step, after
        about a minute of compilation on first use (the prefill stays eager).
        `mode`: "default" or "max-autotune-no-cudagraphs" (slower to compile,
        tuned matrix kernels). For GPUs; on a CPU it works but gains little.
        fuse_projections: first stack the query/key/value and the gate/up
        projections of the base and the head into one matrix product each
        (`fusion.fuse_sibling_linears`; their state_dicts keep the stock keys)."""
        check_compile_mode(mode)
        if self.torch_compile is None:
            if fuse_projections:
                fuse_sibling_linears(self.base_model)
                fuse_sibling_linears(self.ea_layer)
            compile_decoder_layers(self.base_model, mode)
            self.torch_compile = mode
            self._cache = None  # the next generation makes a drafter with compiled step functions
        elif mode != self.torch_compile:
            raise ValueError(f"already compiled with mode {self.torch_compile!r}")

    def get_tokenizer(self):
        return self.tokenizer

    # --------------------------------------------------------------- generation
    # Not under inference mode even when called in it: the caches made here are
    # kept for later generations, and inference tensors could not be updated outside it.
    @torch.inference_mode(False)
    @torch.no_grad()
    def generate_steps(self, input_ids, temperature: float = 0.0, top_p: float = 0.0, top_k: float = 0.0,
                       max_new_tokens: int = 512, max_length: int | None = None, is_llama3: bool = False,
                       stop_token_ids=None, speculative: bool = True,
                       generator: torch.Generator | None = None) -> Iterator[Step]:
        """Yield one `Step` per target forward (the prefill first). Requests
        on one model run one at a time; `last_stats` records the run. A
        `generator` (sampling; on the device of the base's lm_head, where
        tokens are drawn) runs the steps eagerly, outside CUDA graphs.
        max_length=None: 2048, or the base's max_position_embeddings or sliding window if smaller."""
        prompt = prompt_ids(input_ids, self.base_model.config.vocab_size)
        # Checked before anything is cached: the caches are kept per max_length.
        max_length = self._max_length(max_length, speculative)
        sampling = self._sampling(temperature, top_p, top_k)
        max_new_tokens = positive_int("max_new_tokens", max_new_tokens)
        if prompt.shape[0] + 1 > max_length:  # (where a draft tree no longer fits, steps go one token at a time)
            raise ValueError(f"the prompt has {prompt.shape[0]} tokens; with the next token it does not fit in "
                             f"max_length={max_length}: pass a larger max_length, or a shorter prompt")
        stops = self._stop_ids(is_llama3, stop_token_ids)
        self._check_generator(generator)
        stats = GenerationStats(prompt_length=prompt.shape[0])
        last = None
        with self._exclusive():
            self.last_stats = stats  # set only once this generation owns the model
            no_room = None
            try:
                decoder = self._decoder(max_length, sampling, speculative, generator)
                prompt = prompt.to(self._target.input_device)
                for step in generate_steps(decoder, prompt, max_new_tokens, stops, stats):
                    if step.finished:  # handed over below, with the model free: a reader may stop there
                        last = step
                        break
                    yield step
                    # A stream may be driven by another thread than the one that started it; only the
                    # thread driving it now would deadlock by waiting for the model (_exclusive).
                    self._lock_owner = threading.current_thread()
            except torch.OutOfMemoryError as err:
                no_room = str(err)
            if no_room is not None:
                decoder = None  # (this frame stays in the new error's traceback)
                raise self._out_of_memory(max_length, no_room)
        if last is not None:
            yield last

    @torch.inference_mode(False)
    @torch.no_grad()
    def warm_up(self, max_length: int | None = None, temperature: float = 0.0, top_p: float = 0.0,
                top_k: float = 0.0, speculative: bool = True) -> int:
        """Prepare every step shape that generations with these settings can
        use, so that none of them pays for it later: with CUDA graphs, a step
        at each attention view up to max_length records its graph (about
        max_length / 256 + 2 of them: ten at 2048); compiled steps compile.
        A move or cast (`model.to(...)`) makes new caches: warm up again.
        gen_answer and `python -m eagle_gto` call it before timing, the
        servers at startup. Nothing is generated; sampling settings draw from
        torch's global random generator. Returns the number of steps run (0
        where steps run eagerly and uncompiled)."""
        max_length = self._max_length(max_length, speculative)
        sampling = self._sampling(temperature, top_p, top_k)
        with self._exclusive():
            try:
                decoder = self._decoder(max_length, sampling, speculative, None)  # (graphs on or off after a move)
                if decoder.graphs is None and self.torch_compile is None:
                    return 0
                return warm_up_steps(decoder, torch.zeros(1, dtype=torch.long, device=self._target.input_device))
            except torch.OutOfMemoryError as err:
                no_room = str(err)
            decoder = None  # (this frame stays in the new error's traceback)
            raise self._out_of_memory(max_length, no_room)

    def _out_of_memory(self, max_length: int, allocator_words: str) -> torch.OutOfMemoryError:
        """The error for a generation at `max_length` that ran out of memory (the
        allocator's words: "CUDA out of memory. Tried to allocate ..."), once its caches
        and graphs are dropped, so that their memory is free for a smaller max_length.
        Raised outside the `except` block: the allocator's error, as its context, would keep
        the failed step's frames, and their tensors, alive."""
        self._cache = self._graphs = self._drafter = self._state = None
        return torch.OutOfMemoryError(no_room_message(max_length, self._target.cache_bytes(max_length),
                                                      allocator_words))

    def _max_length(self, max_length: int | None, speculative: bool = True) -> int:
        max_length = self.default_max_length() if max_length is None else positive_int("max_length", max_length)
        self.check_max_length(max_length, speculative)
        return max_length

    @staticmethod
    def _sampling(temperature, top_p, top_k) -> SamplingParams:
        sampling = SamplingParams(real_number("temperature", temperature), real_number("top_p", top_p),
                                  whole_number("top_k", top_k))
        sampling.validate()
        return sampling.canonical()

    def _decoder(self, max_length: int, sampling: SamplingParams, speculative: bool,
                 generator: torch.Generator | None) -> Decoder:
        """A decoder on the kept caches (call it holding the model: `_exclusive`)."""
        cache, drafter, state = self._caches(max_length)
        graphs = None
        if self.cuda_graphs and generator is None:
            if self._graphs is None:  # room for the graphs of several settings, each up to max_length
                self._graphs = StepGraphs(self._target.input_device, max(64, 8 * views_per_setting(max_length)))
            graphs = self._graphs
        return Decoder(self._target, drafter if speculative else None, cache, state, sampling, self.tree,
                       generator, graphs)

    def _generate(self, input_ids, speculative: bool, log: bool, stream: bool, **options):
        prompt = token_ids("input_ids", input_ids)
        device = prompt.device
        tokens = prompt.reshape(-1).tolist()
        steps = self.generate_steps(input_ids, speculative=speculative, **options)
        if stream:
            return _growing_ids(tokens, steps, device)
        # This generation's own record: last_stats may already be another request's.
        stats = GenerationStats(prompt_length=len(tokens), steps=list(steps))
        for step in stats.steps:
            tokens += step.tokens
        output = torch.tensor([tokens], device=device)
        if log:
            return output, stats.new_tokens, stats.iterations - 1
        return output

    @torch.no_grad()
    def eagenerate(self, input_ids, temperature=0.0, top_p=0.0, top_k=0.0, max_new_tokens=512, max_length=None,
                   log=False, is_llama3=False, stop_token_ids=None):
        """Speculative generation. Returns input_ids [1, prompt + new] or, with
        log=True, (input_ids, new_token, idx): idx is the 0-based index of the
        last iteration (target forwards, prefill included)."""
        return self._generate(input_ids, True, log, False, temperature=temperature, top_p=top_p, top_k=top_k,
                              max_new_tokens=max_new_tokens, max_length=max_length, is_llama3=is_llama3,
                              stop_token_ids=stop_token_ids)

    @torch.no_grad()
    def naivegenerate(self, input_ids, temperature=0.0, top_p=0.0, top_k=0.0, max_new_tokens=512, max_length=None,
                      log=False, is_llama3=False, stop_token_ids=None):
        """Plain decoding through the same loop; same returns as `eagenerate`."""
        return self._generate(input_ids, False, log, False, temperature=temperature, top_p=top_p, top_k=top_k,
                              max_new_tokens=max_new_tokens, max_length=max_length, is_llama3=is_llama3,
                              stop_token_ids=stop_token_ids)

    # On a generator function, torch.no_grad() holds only while the generator
    # runs, not in the caller's loop body between iterations (as a `with` would).
    @torch.no_grad()
    def ea_generate(self, input_ids, temperature=0.0, top_p=0.0, top_k=0.0, max_new_tokens=512, max_length=None,
                    log=False, is_llama3=False, stop_token_ids=None):
        """Yield the growing input_ids once per iteration (speculative)."""
        yield from self._generate(input_ids, True, False, True, temperature=temperature, top_p=top_p, top_k=top_k,
                                  max_new_tokens=max_new_tokens, max_length=max_length, is_llama3=is_llama3,
                                  stop_token_ids=stop_token_ids)

    @torch.no_grad()
    def naive_generate(self, input_ids, temperature=0.0, top_p=0.0, top_k=0.0, max_new_tokens=512,
                       max_length=None, log=False, is_llama3=False, stop_token_ids=None):
        """Yield the growing input_ids once per token (plain decoding)."""
        yield from self._generate(input_ids, False, False, True, temperature=temperature, top_p=top_p, top_k=top_k,
                                  max_new_tokens=max_new_tokens, max_length=max_length, is_llama3=is_llama3,
                                  stop_token_ids=stop_token_ids)

    # ------------------------------------------------------------------ helpers
    def default_max_length(self) -> int:
        """max_length when none is given: 2048, or the base's context
        (max_position_embeddings) or sliding window where smaller."""
        return context_length.default_max_length(self.base_model.config)

    def check_max_length(self, max_length: int, speculative: bool = True) -> None:
        """A ValueError when this model cannot decode with this context
        (`speculative`: with draft trees), a warning when it was not trained
        for it (servers check their --max-length once, at startup)."""
        context_length.check_max_length(self._target, max_length, speculative)

    def _check_generator(self, generator) -> None:
        """A generator torch cannot draw with failed only at the first draw, mid-generation, in torch's words."""
        if generator is None:
            return
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        check_generator_device(generator, self._target.lm_head.weight.device)

    def _stop_ids(self, is_llama3: bool, extra) -> set[int]:
        ids = eos_ids(getattr(self.base_model, "generation_config", None), self.base_model.config, self.tokenizer)
        if is_llama3:
            if self.tokenizer is None:
                raise ValueError("is_llama3=True needs the base model's tokenizer to find <|eot_id|>, and this "
                                 "base has none: pass its id as stop_token_ids instead (128009 in Llama 3's "
                                 "vocabulary), or give the model a tokenizer (EaModel(..., tokenizer=...))")
            eot = self.tokenizer.convert_tokens_to_ids("<|eot_id|>")
            if eot is not None and eot != self.tokenizer.unk_token_id:  # unk: not in this vocabulary
                ids.add(eot)
        if extra is not None:  # one id (int, numpy integer, 0-d tensor) or several (a set too)
            extra = sorted(extra) if isinstance(extra, (set, frozenset)) else extra
            extra = token_ids("stop_token_ids", extra).reshape(-1).tolist()
            outside = sorted({i for i in extra if not 0 <= i < self.vocab_size})
            if outside:  # such a stop could never be met: a mistake (another tokenizer's ids? -1 for none?)
                raise ValueError(f"stop_token_ids holds ids outside the vocabulary [0, {self.vocab_size}): "
                                 f"{', '.join(map(str, outside))}")
            ids.update(extra)
        return ids

    def _weights_layout(self) -> tuple:
        """Where the weights are and in what dtype: caches, masks and step graphs are made for one layout."""
        return tuple((p.device, p.dtype) for p in (next(self.base_model.parameters()), self._target.lm_head.weight,
                                                     next(self.ea_layer.parameters())))

    def _caches(self, max_length: int):
        """The caches and decode state, kept across generations (CUDA graphs
        read them at fixed addresses); new ones, and new graphs, when
        max_length changes, the tree outgrows the draft cache's scratch, or
        the model was moved or cast (`model.to(...)`) since they were made."""
        if self._weights_layout() != self._layout:
            moved = [old[0] != new[0] for old, new in zip(self._layout, self._weights_layout())]
            if any(moved) and len(set(getattr(self.base_model, "hf_device_map", {}).values())) > 1:
                # accelerate's hooks still send each layer's inputs where device_map put it
                raise ValueError("this base model was dispatched over several devices (device_map) and then moved "
                                 "with .to(): load it again with the device_map wanted instead")
            check_not_offloaded(self.base_model, "base_model")  # (accelerate's cpu_offload or disk_offload since)
            self._target = TargetRunner(self.base_model, self._feature_layers)
            share_base_weights(self.base_model, self.ea_layer)
            self.cuda_graphs = self._check_graphs(self._cuda_graphs_asked)
            self._layout, self._cache = self._weights_layout(), None
        draft_capacity = max_length + Drafter.view_needed(*dataclasses.astuple(self.tree))
        if (self._cache is None or self._cache.capacity != max_length
                or self._drafter.caches[0].capacity < draft_capacity):
            # Graphs recorded the old buffers' addresses. The old cache goes first (its memory is the new one's),
            # and the new one is set last: a failure in between (out of memory) leaves nothing half made to reuse.
            self._cache = self._graphs = None
            cache = self._target.new_cache(max_length)
            self._drafter = Drafter(self.ea_layer, draft_capacity)
            if self.torch_compile is not None:
                compile_drafter_steps(self._drafter, self.torch_compile)
            self._state = DecodeState(self._target.input_device, head_device(self.base_model),
                                      self.ea_layer.config.hidden_size, next(self.ea_layer.parameters()).dtype)
            self._cache = cache
        return self._cache, self._drafter, self._state

    def _not_capturable(self) -> str | None:
        """Why the base model's steps cannot be CUDA graphs, if they cannot."""
        if getattr(self.base_model.config, "quantization_config", None) is not None:
            # Quantized kernels (bitsandbytes, GPTQ, ...) are not checked under graph capture here.
            return "a quantized base model"
        # Dynamic NTK and LongRoPE read the longest position on the host in every forward, to pick frequencies.
        kind = length_dependent_rope(self.base_model)
        return f"{kind!r} rope scaling" if kind else None

    def _check_graphs(self, wanted: bool | None) -> bool:
        reason = self._not_capturable()
        if reason is not None:
            if wanted:
                raise ValueError(f"cuda_graphs=True is not supported for {reason}; leave it out "
                                 "(steps then run eagerly)")
            return False
        devices = {p.device for p in self.base_model.parameters()} | {p.device for p in self.ea_layer.parameters()}
        possible = len(devices) == 1 and next(iter(devices)).type == "cuda"
        if wanted and not possible:
            raise ValueError("cuda_graphs=True needs the base model and the head on one CUDA device, "
                             f"found {sorted(str(d) for d in devices)}")
        return possible if wanted is None else bool(wanted)

    @contextmanager
    def _exclusive(self):
        """One generation at a time per model: the caches are shared."""
        me = threading.current_thread()
        if self._lock_owner is me:
            raise RuntimeError("a generation on this model is still running in this thread: "
                               "finish or close its generator before starting another")
        with self._lock:
            self._lock_owner = me
            try:
                yield
            finally:
                self._lock_owner = None

    def _pick_total_token(self, depth: int, top_k: int) -> int:
        """total_token=-1: time a tree-sized target forward per candidate size
        and keep the best time per expected token. The expected gain of a
        larger tree is modest, so each size's time is divided by a factor
        that grows slowly with size. On the CPU, verification cost grows
        linearly with the tree, so a fixed mid-size tree is used. Sizes are
        capped at what depth and top_k can fill."""
        limit = max(2, num_candidates(depth, top_k) + 1)  # the root and every candidate: the largest tree
        device = self._target.input_device
        if device.type != "cuda":
            return min(CPU_AUTO_TOTAL_TOKEN, limit)
        sizes = sorted({min(size, limit) for size in AUTO_TREE_CANDIDATES})
        best, best_cost = sizes[0], float("inf")
        vocab = self.base_model.config.vocab_size
        for size in sizes:
            ids = torch.arange(size, device=device)[None] % vocab  # not random: loading draws no random numbers
            with torch.no_grad():
                self.base_model(ids)  # warm-up
                torch.cuda.synchronize(device)
                start = time.perf_counter()
                for _ in range(10):
                    self.base_model(ids)
                torch.cuda.synchronize(device)
            gain = 1 + 0.13 * (size - AUTO_TREE_CANDIDATES[0]) / (AUTO_TREE_CANDIDATES[-1] - AUTO_TREE_CANDIDATES[0])
            cost = (time.perf_counter() - start) / gain
            if cost < best_cost:
                best, best_cost = size, cost
        return best


def _growing_ids(tokens: list[int], steps: Iterator[Step], device) -> Iterator[torch.Tensor]:
    for step in steps:
        tokens = tokens + step.tokens
        yield torch.tensor([tokens], device=device)
