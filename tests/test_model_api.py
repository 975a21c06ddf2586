"""The EAGLE-compatible surface: loading, return values, streaming, stops,
and a clear error for every kind of bad input."""

import copy
import gc
import json
import threading
import warnings
import weakref

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_pairs import DRAFT_VOCAB, VOCAB, trained_pair
from transformers import AutoModelForCausalLM, BatchEncoding

import eagle_gto.ea_model as ea_model
from eagle_gto import CheckpointError, EaModel, arguments, context_length, memory, placement
from eagle_gto.checkpoint import save_head
from eagle_gto.generation import Decoder
from eagle_gto.kv_cache import KVBuffer
from eagle_gto.target import decoder_layers
from eagle_gto.tiny import base_config, head_config, random_head


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    """A saved tiny base and one head of each kind."""
    root = tmp_path_factory.mktemp("pair")
    torch.manual_seed(0)
    cfg = base_config("llama", vocab_size=VOCAB)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "base")
    save_head(random_head(head_config(cfg, "eagle3", draft_vocab_size=40)), root / "eagle3")
    save_head(random_head(head_config(cfg, "eagle1")), root / "eagle1", pytorch_bin=True)
    (root / "eagle1" / "model.safetensors").unlink()  # only the .bin remains
    return root


def load(dirs, head="eagle3", **kw):
    return EaModel.from_pretrained(str(dirs / "base"), str(dirs / head), dtype=torch.float32,
                                   total_token=12, depth=3, top_k=3, **kw)


def test_loads_both_kinds_and_formats(pair_dirs):
    m3 = load(pair_dirs, "eagle3")
    assert m3.use_eagle3 and m3.ea_layer.kind == "eagle3"
    m1 = load(pair_dirs, "eagle1")
    assert not m1.use_eagle3
    ids = torch.randint(0, VOCAB, (1, 5))
    for m in (m1, m3):
        assert m.eagenerate(ids, max_new_tokens=16).tolist() == m.naivegenerate(ids, max_new_tokens=16).tolist()


def test_the_reference_attributes(pair_dirs):
    """config, hidden_size, vocab_size and base_model_name_or_path, as the reference's scripts read them
    (e.g. `model.config.pad_token_id = model.config.eos_token_id`)."""
    m = load(pair_dirs)
    assert m.config is m.base_model.config
    assert (m.hidden_size, m.vocab_size) == (m.config.hidden_size, VOCAB)
    assert m.base_model_name_or_path == str(pair_dirs / "base")


def test_export_has_official_names(pair_dirs):
    config = json.loads((pair_dirs / "eagle3" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] == 40
    keys = set(load_file(str(pair_dirs / "eagle3" / "model.safetensors")))
    assert {"fc.weight", "midlayer.hidden_norm.weight", "midlayer.self_attn.q_proj.weight",
            "norm.weight", "lm_head.weight", "d2t", "t2d"} <= keys


def test_speculators_naming_and_own_embedding(pair_dirs, tmp_path):
    """vLLM speculators keys (`layers.0.`), a nested config, and a head that
    carries its own embedding all load and draft the same tokens."""
    state = load_file(str(pair_dirs / "eagle3" / "model.safetensors"))
    renamed = {k.replace("midlayer.", "layers.0."): v for k, v in state.items()}
    base = AutoModelForCausalLM.from_pretrained(str(pair_dirs / "base"))
    renamed["embed_tokens.weight"] = base.get_input_embeddings().weight.detach().clone()
    folder = tmp_path / "spec"
    folder.mkdir()
    save_file(renamed, str(folder / "model.safetensors"))
    cfg = json.loads((pair_dirs / "eagle3" / "config.json").read_text())
    nested = {"speculators_model_type": "eagle3", "draft_vocab_size": cfg.pop("draft_vocab_size"),
              "transformer_layer_config": cfg}
    (folder / "config.json").write_text(json.dumps(nested))
    m = EaModel.from_pretrained(str(pair_dirs / "base"), str(folder), total_token=12, depth=3, top_k=3)
    ref = load(pair_dirs)
    ids = torch.randint(0, VOCAB, (1, 6))
    a, na, ia = m.eagenerate(ids, max_new_tokens=20, log=True)
    b, nb, ib = ref.eagenerate(ids, max_new_tokens=20, log=True)
    assert a.tolist() == b.tolist() and (na, ia) == (nb, ib)
    assert m.ea_layer.embed_tokens is not None


def test_log_counts_and_streaming_prefixes():
    model = trained_pair("llama", "eagle3")
    ids = torch.randint(0, VOCAB, (1, 7))
    out, new_token, idx = model.eagenerate(ids, max_new_tokens=30, log=True)
    stats = model.last_stats
    assert new_token == out.shape[1] - 7 == 30 == stats.new_tokens
    assert idx == stats.iterations - 1 and idx < new_token - 1  # drafts were accepted
    assert stats.mean_accepted_length == pytest.approx(new_token / (idx + 1))
    streamed = list(model.ea_generate(ids, max_new_tokens=30))
    assert len(streamed) == idx + 1
    for before, after in zip(streamed, streamed[1:]):
        assert after.shape[1] > before.shape[1] and after[0, : before.shape[1]].tolist() == before[0].tolist()
    assert streamed[-1].tolist() == out.tolist()
    plain = list(model.naive_generate(ids, max_new_tokens=30))
    assert len(plain) == 30 and plain[-1].tolist() == out.tolist()
    _, n_plain, idx_plain = model.naivegenerate(ids, max_new_tokens=30, log=True)
    assert (n_plain, idx_plain) == (30, 29) and model.last_stats.mean_accepted_length == 1.0


def test_stop_tokens_end_generation_at_the_first_stop():
    model = trained_pair("llama", "eagle3")
    ids = torch.randint(0, VOCAB, (1, 7))
    full = model.naivegenerate(ids, max_new_tokens=40)[0, 7:].tolist()
    stop = full[12]
    cut = full[: full.index(stop) + 1]
    for fn in (model.eagenerate, model.naivegenerate):
        out = fn(ids, max_new_tokens=40, stop_token_ids=[stop])
        assert out[0, 7:].tolist() == cut
        assert model.last_stats.finish_reason == "stop"
    unseen = next(t for t in range(VOCAB) if t not in cut)
    for one in (stop, np.int64(stop), torch.tensor(stop), {stop, unseen}):  # a bare id, or a set
        out = model.eagenerate(ids, max_new_tokens=40, stop_token_ids=one)
        assert out[0, 7:].tolist() == cut


def test_a_stop_token_just_past_the_budget_is_not_reached():
    """A speculative step may accept a stop token one past max_new_tokens:
    the output is still cut at the budget, exactly as plain decoding's."""
    model = trained_pair("llama", "eagle3")
    ids = torch.randint(0, VOCAB, (1, 7))
    full = model.naivegenerate(ids, max_new_tokens=30)[0, 7:].tolist()
    for budget in range(1, 29):
        stop = full[budget]
        if stop in full[:budget]:
            continue
        runs = []
        for fn in (model.eagenerate, model.naivegenerate):
            out = fn(ids, max_new_tokens=budget, stop_token_ids=[stop])
            runs.append((out[0, 7:].tolist(), model.last_stats.finish_reason))
        assert runs[0] == runs[1] == (full[:budget], "length"), budget


def test_a_stop_token_among_a_steps_accepted_tokens_ends_the_output_there():
    """A speculative step emits several tokens at once: a stop token anywhere
    among them, not only the step's last, ends the output right after it."""
    model = trained_pair("llama", "eagle3")
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    full = model.naivegenerate(ids, max_new_tokens=30)[0, 7:].tolist()
    model.eagenerate(ids, max_new_tokens=30)
    step_ends = np.cumsum([len(step.tokens) for step in model.last_stats.steps]) - 1  # (stops change no step before)
    inside = 0
    for i, stop in enumerate(full):
        if stop in full[:i]:
            continue
        out = model.eagenerate(ids, max_new_tokens=30, stop_token_ids=[stop])
        assert (out[0, 7:].tolist(), model.last_stats.finish_reason) == (full[: i + 1], "stop"), i
        inside += i not in step_ends
    assert inside >= 3  # stops with more of their step's tokens after them


def test_llama3_stop_is_skipped_when_the_tokenizer_lacks_eot_id():
    """convert_tokens_to_ids returns the unk id for an unknown token: that
    must not become a stop token."""
    model = trained_pair("llama", "eagle3")
    ids = torch.randint(0, VOCAB, (1, 7))
    full = model.eagenerate(ids, max_new_tokens=20)

    class NoEotTokenizer:
        eos_token_id = None
        unk_token_id = int(full[0, 10])  # a token the answer holds

        def convert_tokens_to_ids(self, token):
            return self.unk_token_id

    model.tokenizer = NoEotTokenizer()
    try:
        assert model.eagenerate(ids, max_new_tokens=20, is_llama3=True).tolist() == full.tolist()
    finally:
        model.tokenizer = None


def test_eos_from_the_model_config_stops():
    model = trained_pair("qwen3", "eagle1")
    ids = torch.randint(0, VOCAB, (1, 5))
    full = model.naivegenerate(ids, max_new_tokens=30)[0, 5:].tolist()
    model.base_model.generation_config.eos_token_id = full[5]
    try:
        out = model.eagenerate(ids, max_new_tokens=30)[0, 5:].tolist()
        assert out == full[: full.index(full[5]) + 1]
    finally:
        model.base_model.generation_config.eos_token_id = None


def test_log_reports_its_own_generation_even_when_another_finished_first():
    model = trained_pair("llama", "eagle3")
    ids = torch.randint(0, VOCAB, (1, 7))
    steps = model.generate_steps

    def then_another_request(*args, **kwargs):  # another request runs as soon as this one lets go of the model
        yield from steps(*args, **kwargs)
        for _ in steps(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=3):
            pass

    model.generate_steps = then_another_request
    try:
        out, new_token, idx = model.eagenerate(ids, max_new_tokens=20, log=True)
    finally:
        del model.generate_steps
    assert new_token == out.shape[1] - 7 == 20 and 0 < idx < 20


def test_streaming_leaves_gradients_on_in_the_callers_loop():
    model = trained_pair("llama", "eagle3")
    ids = torch.zeros(1, 3, dtype=torch.long)
    for stream in (model.ea_generate, model.naive_generate):
        modes = [torch.is_grad_enabled() for _ in stream(ids, max_new_tokens=6)]
        assert modes and all(modes)


def test_max_length_is_an_integer_and_a_bad_one_caches_nothing():
    model = trained_pair("llama", "eagle3")
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="max_length must be an integer, got 64.0"):
        model.eagenerate(ids, max_new_tokens=4, max_length=64.0)
    # 64.0 == 64: a cache built for the float would have been reused here.
    assert model.eagenerate(ids, max_new_tokens=4, max_length=64).shape[1] == 7
    assert model.naivegenerate(ids, max_new_tokens=4, max_length=np.int64(64)).shape[1] == 7
    assert model.eagenerate(ids, max_new_tokens=4, max_length=None).shape[1] == 7  # None: the default


def test_a_max_length_whose_cache_cannot_fit_the_device_is_refused_before_anything_is_cached(monkeypatch):
    """It failed at the prefill, in the allocator's words ("you tried to allocate 1536000000000000 bytes")."""
    model = trained_pair("llama", "eagle3")
    ids = torch.zeros(1, 3, dtype=torch.long)
    kept = model.eagenerate(ids, max_new_tokens=4, max_length=64)
    cache = model._cache
    allocated = sum(stack.storage.numel() * stack.storage.element_size() for stack in cache.stacks)
    assert model._target.cache_bytes(64) == {torch.device("cpu"): allocated}
    with pytest.raises(ValueError, match=r"max_length=1000000000000 needs 1430511.5 GiB of key/value cache on cpu, "
                                         r"which has [0-9.]+ GiB in all: lower max_length"):
        model.eagenerate(ids, max_new_tokens=4, max_length=10**12)
    monkeypatch.setattr(context_length, "device_memory", lambda device: 2 * allocated)
    model.check_max_length(128)  # exactly all of it
    with pytest.raises(ValueError, match="max_length=129 needs"):
        model.naivegenerate(ids, max_new_tokens=4, max_length=129)
    assert model._cache is cache and torch.equal(model.eagenerate(ids, max_new_tokens=4, max_length=64), kept)


ALLOCATOR_WORDS = ("CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has a total capacity of 79.19 GiB\n"
                   "If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF")


class EagerSteps:
    """Step graphs that run each step eagerly (this machine has no GPU to record them)."""

    def __init__(self, *args):
        pass

    def run(self, key, step):
        return step()


@pytest.mark.parametrize("mode", ["eagenerate", "naivegenerate", "ea_generate", "warm_up"])
def test_a_cache_that_does_not_fit_free_memory_is_a_clear_error_and_the_model_goes_on(monkeypatch, mode):
    """A cache that fits the device's total memory but not its free memory failed at the prefill in the
    allocator's words; the model must still generate at a smaller max_length."""
    model = trained_pair("llama", "eagle3")
    ids = torch.zeros(1, 3, dtype=torch.long)
    expected = model.eagenerate(ids, max_new_tokens=8, max_length=64)
    allocate = KVBuffer._allocate

    def short_of_memory(buffer, key, value):
        if buffer.capacity > 1000:
            raise torch.OutOfMemoryError(ALLOCATOR_WORDS)
        allocate(buffer, key, value)

    monkeypatch.setattr(KVBuffer, "_allocate", short_of_memory)
    monkeypatch.setattr(model, "cuda_graphs", True)  # warm_up runs steps only with graphs or compiled steps
    monkeypatch.setattr(ea_model, "StepGraphs", EagerSteps)
    run = {"eagenerate": lambda: model.eagenerate(ids, max_new_tokens=8, max_length=2000),
           "naivegenerate": lambda: model.naivegenerate(ids, max_new_tokens=8, max_length=2000),
           "ea_generate": lambda: list(model.ea_generate(ids, max_new_tokens=8, max_length=2000)),
           "warm_up": lambda: model.warm_up(max_length=2000)}[mode]
    needed = model._target.cache_bytes(2000)[torch.device("cpu")] / 2**30
    with pytest.raises(torch.OutOfMemoryError) as failure:
        run()
    message = str(failure.value)
    assert message == (f"out of memory generating with max_length=2000 (its key/value cache needs {needed:.2f} GiB "
                       "on cpu): lower max_length, or free memory (other processes, other tensors) and try again; "
                       "the model is still usable. CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has a total "
                       "capacity of 79.19 GiB")
    monkeypatch.undo()
    assert torch.equal(model.eagenerate(ids, max_new_tokens=8, max_length=64), expected)


def test_a_generation_out_of_memory_lets_go_of_its_caches_even_while_its_error_is_kept(monkeypatch):
    """A REPL keeps the last error (sys.last_exc): the caches of the failed max_length, made before the
    step that ran out of memory, must not stay alive through it, taking the memory a smaller one needs."""
    model = trained_pair("llama", "eagle3")
    ids = torch.zeros(1, 3, dtype=torch.long)
    expected = model.eagenerate(ids, max_new_tokens=8, max_length=64)
    caches = []

    def short_of_memory(drafter, *args, **kwargs):
        caches.append(weakref.ref(model._cache.stacks[0].storage))
        raise torch.OutOfMemoryError(ALLOCATOR_WORDS)

    monkeypatch.setattr(ea_model.Drafter, "extend", short_of_memory)
    with pytest.raises(torch.OutOfMemoryError, match="max_length=500 ") as failure:
        model.eagenerate(ids, max_new_tokens=8, max_length=500)
    assert failure.value is not None  # `failure` holds the error, as a REPL holds it
    gc.collect()
    assert len(caches) == 1 and caches[0]() is None
    monkeypatch.undo()
    assert torch.equal(model.eagenerate(ids, max_new_tokens=8, max_length=64), expected)


def test_a_cpus_memory_is_counted_in_bytes():
    """The cache check compares bytes with it: the machine's memory, at least what /proc/meminfo counts (in KiB;
    a container's may show its limit, less than the machine's)."""
    from pathlib import Path

    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        pytest.skip("no /proc/meminfo to compare with")
    total_kib = int(meminfo.read_text().split("MemTotal:")[1].split()[0])
    assert memory.device_memory(torch.device("cpu")) >= total_kib * 1024


def test_what_an_out_of_memory_error_says_is_free_counts_the_allocators_unused_blocks(monkeypatch):
    """mem_get_info counts the blocks torch's caching allocator holds unused as used; a new cache may take them."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 5 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 4.5 * 2**30)
    message = memory.no_room_message(4096, {torch.device("cuda", 0): 2 * 2**30}, ALLOCATOR_WORDS)
    assert message.startswith("out of memory generating with max_length=4096 (its key/value cache needs 2.00 GiB "
                              "on cuda:0 (1.50 GiB free now)): lower max_length")


@pytest.mark.parametrize("layer_types,window", [(None, 64), (["full_attention", "sliding_attention"], 64),
                                                (["full_attention", "full_attention"], None)])
def test_a_sliding_window_counts_where_a_layer_slides(layer_types, window):
    """Configs may keep a sliding_window that no layer uses (their layer_types say so): it limits nothing."""
    from types import SimpleNamespace

    config = SimpleNamespace(sliding_window=64, layer_types=layer_types, max_position_embeddings=4096)
    assert context_length.sliding_window(config) == window
    assert context_length.default_max_length(config) == (window or 2048)


def test_a_longrope_base_decodes_speculatively_only_within_its_original_context():
    """LongRoPE turns to its long factors past original_max_position_embeddings, not max_position_embeddings:
    from there a draft tree's forward would rotate the tokens it verifies otherwise than plain decoding."""
    from transformers import Phi3Config

    from eagle_gto.target import TargetRunner

    config = Phi3Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=128, pad_token_id=None, bos_token_id=None,
                        eos_token_id=None, max_position_embeddings=64, original_max_position_embeddings=16,
                        rope_parameters={"rope_type": "longrope", "rope_theta": 100.0, "short_factor": [1.0] * 8,
                                         "long_factor": [2.0] * 8, "original_max_position_embeddings": 16})
    target = TargetRunner(AutoModelForCausalLM.from_config(config).eval(), None)
    context_length.check_max_length(target, 16)
    with pytest.raises(ValueError, match=r"'longrope' rope scaling .* max_length must be <= 16, got 17 \(plain"):
        context_length.check_max_length(target, 17)
    context_length.check_max_length(target, 64, speculative=False)


def test_max_length_past_the_trained_context_warns_and_is_not_the_default(monkeypatch):
    model = trained_pair("llama", "eagle3")
    monkeypatch.setattr(model.base_model.config, "max_position_embeddings", 40)
    assert model.default_max_length() == 40
    ids = torch.zeros(1, 3, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model.eagenerate(ids, max_new_tokens=500).shape[1] == 40  # the default: no warning
        model.check_max_length(40)
    with pytest.warns(UserWarning, match="max_length=41 is beyond the base model's max_position_embeddings \\(40\\)"):
        assert model.naivegenerate(ids, max_new_tokens=500, max_length=41).shape[1] == 41


def test_tree_settings_are_checked_against_the_head():
    model = trained_pair("llama", "eagle3")
    with pytest.raises(ValueError, match=f"top_k={DRAFT_VOCAB + 1} is larger than the draft head's vocabulary "
                                         f"\\({DRAFT_VOCAB} tokens\\)"):
        EaModel(model.base_model, model.ea_layer, total_token=8, depth=2, top_k=DRAFT_VOCAB + 1)


def test_total_token_auto_fits_what_depth_and_top_k_produce():
    model = trained_pair("llama", "eagle3")
    small = EaModel(model.base_model, model.ea_layer, total_token=-1, depth=1, top_k=2)
    assert small.tree.total_token == 7  # the root and all 2 + 1 * 2 * 2 candidates
    ids = torch.zeros(1, 3, dtype=torch.long)
    assert small.eagenerate(ids, max_new_tokens=8).tolist() == small.naivegenerate(ids, max_new_tokens=8).tolist()


@pytest.mark.parametrize("prompt_length", [10, 45, 59])
def test_max_length_is_used_to_the_end_in_both_modes(prompt_length):
    """Where a draft tree (24 tokens) no longer fits, speculative decoding
    goes on one token at a time: both modes fill max_length exactly, with the
    same tokens (a prompt of 45 starts that way; 59 leaves room for one token)."""
    model = trained_pair("llama", "eagle3")  # total_token 24
    ids = torch.randint(0, VOCAB, (1, prompt_length), generator=torch.Generator().manual_seed(prompt_length))
    out = model.eagenerate(ids, max_new_tokens=500, max_length=60)
    stats = model.last_stats
    assert stats.finish_reason == "length" and out.shape[1] == 60
    if prompt_length == 10:
        assert any(step.num_accepted > 0 for step in stats.steps)  # speculative steps first
        assert all(len(step.tokens) == 1 for step in stats.steps[-3:])  # one-token steps at the end
    plain = model.naivegenerate(ids, max_new_tokens=500, max_length=60)
    assert plain.tolist() == out.tolist()


@pytest.mark.parametrize("kwargs,message", [
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "empty"),
    (dict(input_ids=[]), "input_ids is empty"),
    (dict(input_ids=[[]]), "input_ids is empty"),
    (dict(input_ids=[["a"]]), "input_ids must hold integer token ids"),
    (dict(input_ids=torch.zeros(2, 5, dtype=torch.long)), "batch size 2"),
    (dict(input_ids=5), r"input_ids must have shape \[1, n\], got \[\]"),  # (one id, not a prompt of one)
    (dict(input_ids=torch.zeros(1, 1, 5, dtype=torch.long)), r"input_ids must have shape \[1, n\], got \[1, 1, 5\]"),
    (dict(input_ids=torch.zeros(1, 5)), "integer"),
    (dict(input_ids=torch.ones(1, 5, dtype=torch.bool)), "input_ids must hold integer token ids, got dtype torch.bool"),
    (dict(input_ids=torch.full((1, 5), VOCAB)), "outside the vocabulary"),
    (dict(input_ids=[[3, -1]]), rf"input_ids holds ids outside the vocabulary \[0, {VOCAB}\)"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=None), "temperature must be a number, got None"),
    (dict(temperature=True), "temperature must be a number, got True"),  # (not 1.0)
    (dict(temperature="0.7"), "temperature must be a number, got '0.7'"),
    (dict(temperature=float("inf")), "temperature must be finite"),
    (dict(top_p=None), "top_p must be a number, got None"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(max_new_tokens=5.7), "max_new_tokens must be an integer"),
    (dict(input_ids=torch.zeros(1, 110, dtype=torch.long), max_length=110),
     "the prompt has 110 tokens; with the next token it does not fit in max_length=110: pass a larger max_length, "
     "or a shorter prompt"),
    (dict(input_ids="Hello"), "input_ids must be token ids, got a string: tokenize it first"),
    (dict(input_ids=BatchEncoding({"input_ids": [[1, 2]], "attention_mask": [[1, 1]]})),
     r"input_ids must be token ids, got a mapping with keys \['input_ids', 'attention_mask'\]: pass its "
     r"'input_ids'"),
    (dict(is_llama3=True), r"is_llama3=True needs the base model's tokenizer to find <\|eot_id\|>, and this base "
                           "has none: pass its id as stop_token_ids instead"),
    (dict(max_length=True), "max_length must be an integer"),
    (dict(max_length=0), "max_length must be >= 1"),
    (dict(stop_token_ids=[1.5]), "stop_token_ids must hold integer token ids"),
    (dict(stop_token_ids=[3, VOCAB, -1]),  # (never met: another tokenizer's ids? -1 for none?)
     rf"stop_token_ids holds ids outside the vocabulary \[0, {VOCAB}\): -1, {VOCAB}$"),
])
def test_bad_generation_input(kwargs, message):
    model = trained_pair("llama", "eagle3")
    kwargs.setdefault("input_ids", torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=message):
        model.eagenerate(**kwargs)
    # The model still works afterwards.
    assert model.eagenerate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=4).shape[1] == 7


class CudaGenerator(torch.Generator):
    """A generator that says it is on cuda:0 (this CPU machine cannot make one)."""
    device = torch.device("cuda", 0)


@pytest.mark.parametrize("generator,message", [
    (1234, "generator must be a torch.Generator, got int"),
    (CudaGenerator(), r"the generator is on cuda:0, but tokens are drawn on cpu \(the base's lm_head\): "
                      r"make it with torch.Generator\(device='cpu'\)"),
])
def test_a_generator_torch_cannot_draw_with_is_refused_before_the_first_step(generator, message):
    """It failed at the first draw, mid-generation, in torch's words (an int; a generator on another device)."""
    model = trained_pair("llama", "eagle3")
    with pytest.raises(ValueError, match=message):
        next(model.generate_steps(torch.zeros(1, 5, dtype=torch.long), temperature=0.8, generator=generator))
    steps = list(model.generate_steps(torch.zeros(1, 5, dtype=torch.long), temperature=0.8, max_new_tokens=4,
                                      generator=torch.Generator().manual_seed(0)))
    assert steps[-1].finished and model.last_stats.new_tokens == 4


class SecondCudaGenerator(torch.Generator):
    device = torch.device("cuda", 1)


def test_a_generator_on_another_gpu_than_the_lm_head_is_refused():
    """Same device type, other index: torch refuses that only at the first draw."""
    with pytest.raises(ValueError, match=r"the generator is on cuda:1, but tokens are drawn on cuda:0 .*"
                                         r"torch.Generator\(device='cuda:0'\)"):
        arguments.check_generator_device(SecondCudaGenerator(), torch.device("cuda", 0))
    arguments.check_generator_device(CudaGenerator(), torch.device("cuda", 0))
    arguments.check_generator_device(SecondCudaGenerator(), torch.device("meta"))  # refused by name later


def test_concurrent_generations_do_not_interleave():
    model = trained_pair("qwen2", "eagle3")
    prompts = [torch.randint(0, VOCAB, (1, 4 + i)) for i in range(6)]
    alone = [model.eagenerate(p, max_new_tokens=24).tolist() for p in prompts]
    results = {}

    def worker(i):
        results[i] = model.eagenerate(prompts[i], max_new_tokens=24).tolist()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [results[i] for i in range(6)] == alone


def test_a_second_generation_in_the_same_thread_is_refused():
    model = trained_pair("llama", "eagle3")
    first = model.ea_generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=20)
    next(first)
    with pytest.raises(RuntimeError, match="still running"):
        model.eagenerate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=4)
    first.close()
    assert model.eagenerate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=4).shape[1] == 7


def test_the_model_is_free_once_the_finished_step_is_delivered():
    """A reader that stops at the step marked finished (or once it has all
    the tokens it asked for) has nothing left to close."""
    model = trained_pair("llama", "eagle3")
    prompt = torch.tensor([[3, 1, 4]])
    expected = model.eagenerate(prompt, max_new_tokens=10).tolist()
    steps = model.generate_steps(prompt, max_new_tokens=10)
    assert next(step for step in steps if step.finished).finish_reason == "length"
    assert model.eagenerate(prompt, max_new_tokens=10).tolist() == expected  # this thread: not refused
    stream = model.ea_generate(prompt, max_new_tokens=10)
    assert next(ids for ids in stream if ids.shape[1] == 13).tolist() == expected
    other = threading.Thread(target=lambda: model.eagenerate(prompt, max_new_tokens=10))
    other.start()
    other.join(60)
    assert not other.is_alive()  # another thread: not left waiting
    del steps, stream


def greedy_or_refusal(model, ids):
    """A greedy generation's ids, or the RuntimeError refusing it."""
    try:
        return model.eagenerate(ids, max_new_tokens=6).tolist()
    except RuntimeError as err:
        return err


def test_a_stream_driven_by_another_thread_makes_its_starter_wait_not_fail():
    """Thread-pool servers start a stream in one thread and step it in others:
    the starting thread may then wait for the model like any other."""
    model = trained_pair("llama", "eagle3")
    prompt, other = torch.tensor([[3, 1, 4]]), torch.tensor([[2, 7]])
    expected = model.naivegenerate(other, max_new_tokens=6).tolist()
    handed_over, stepped, outcome = threading.Event(), threading.Event(), {}

    def starter():
        outcome["stream"] = model.ea_generate(prompt, max_new_tokens=30)
        next(outcome["stream"])
        handed_over.set()
        stepped.wait(60)
        outcome["ids"] = greedy_or_refusal(model, other)  # waits until the main thread finishes the stream

    thread = threading.Thread(target=starter)
    thread.start()
    assert handed_over.wait(60)
    next(outcome["stream"])  # this thread drives the stream now
    stepped.set()
    thread.join(0.3)
    assert thread.is_alive()  # waiting for the model, not refused
    for _ in outcome["stream"]:
        pass
    thread.join(60)
    assert outcome["ids"] == expected


def test_a_new_thread_with_a_finished_threads_id_waits_for_its_stream_not_fails(monkeypatch):
    """Thread ids are reused once a thread ends: a new thread that gets the id of the finished thread that
    last stepped a stream has not stepped it, so it waits for the model like any other. Here every thread
    gets the same id, so the reuse happens for certain (the OS reuses ids often, but not always)."""
    model = trained_pair("llama", "eagle3")
    prompt, other = torch.tensor([[3, 1, 4]]), torch.tensor([[2, 7]])
    expected = model.naivegenerate(other, max_new_tokens=6).tolist()

    class OneIdent:  # the threading module, with one id for all threads
        def __getattr__(self, name):
            return getattr(threading, name)

        @staticmethod
        def get_ident():
            return 1

    monkeypatch.setattr(ea_model, "threading", OneIdent())
    box = {}

    def starter():
        box["stream"] = model.ea_generate(prompt, max_new_tokens=30)
        next(box["stream"])

    thread = threading.Thread(target=starter)
    thread.start()
    thread.join(60)

    def later():
        box["ids"] = greedy_or_refusal(model, other)  # waits until the main thread finishes the stream

    thread = threading.Thread(target=later)
    thread.start()
    thread.join(1)  # (a refusal comes at once; waiting for the model does not end while the stream is suspended)
    for _ in box["stream"]:
        pass
    thread.join(60)
    assert box["ids"] == expected


def test_two_models_on_one_base_keep_their_features_apart():
    """EaModels sharing a base share its layer hooks (added once, not per
    model or per capture) and each thread captures only its own forwards' features."""
    model = trained_pair("llama", "eagle3")
    layer = model._target.layers[model._feature_layers[0]]
    model.eagenerate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)  # features captured: the hooks are on
    hooks = len(layer._forward_pre_hooks)
    twin = EaModel(model.base_model, model.ea_layer, None, 60, 7, 10)  # another tree: other shapes
    assert len(layer._forward_pre_hooks) == hooks
    prompts = [torch.randint(0, VOCAB, (1, 4 + i), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    expected = [model.naivegenerate(p, max_new_tokens=30).tolist() for p in prompts]
    results = {}

    def worker(name, m):
        try:
            results[name] = [m.eagenerate(p, max_new_tokens=30).tolist() for p in prompts]
        except Exception as err:  # noqa: BLE001 (reported by the assertion below)
            results[name] = err

    threads = [threading.Thread(target=worker, args=item) for item in (("model", model), ("twin", twin))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert results == {"model": expected, "twin": expected}
    assert len(layer._forward_pre_hooks) == hooks


def test_a_forward_in_another_thread_does_not_reach_a_capture():
    from eagle_gto.target import layer_input_tap

    model = trained_pair("llama", "eagle3")
    tap = layer_input_tap(model.base_model)
    with tap.capturing([2]) as captured:
        thread = threading.Thread(target=lambda: model.base_model(torch.tensor([[1, 2, 3]])))
        thread.start()
        thread.join(60)
        assert captured == {}
        model.base_model(torch.tensor([[1, 2]]))
        assert captured[2].shape[1] == 2


def test_a_capture_inside_another_leaves_the_outer_one_capturing():
    """A nested capture gets the forwards run inside it; once it ends, the
    outer one captures again."""
    from eagle_gto.target import layer_input_tap

    model = trained_pair("llama", "eagle3")
    tap = layer_input_tap(model.base_model)
    with tap.capturing([2]) as outer:
        with tap.capturing([3]) as inner:
            model.base_model(torch.tensor([[1, 2, 3]]))
        assert inner[3].shape[1] == 3 and outer == {}
        model.base_model(torch.tensor([[1, 2]]))
        assert outer[2].shape[1] == 2


@pytest.mark.parametrize("kind", ["eagle3", "eagle1"])
def test_a_dropped_model_frees_its_base_models_layers(kind):
    """The module-wide registry of feature hooks (one per base) must not keep a base's layers, most of its
    weights, alive once no model uses them."""
    import gc
    import weakref

    torch.manual_seed(0)
    cfg = base_config("llama", vocab_size=VOCAB)
    base = AutoModelForCausalLM.from_config(cfg).eval()
    head = random_head(head_config(cfg, kind, draft_vocab_size=DRAFT_VOCAB if kind == "eagle3" else None))
    model = EaModel(base, head, None, total_token=12, depth=3, top_k=3)
    model.eagenerate(torch.tensor([[1, 2, 3]]), max_new_tokens=5)
    layers = weakref.ref(base.model.layers)
    del base, head, model
    gc.collect()
    assert layers() is None


@pytest.mark.parametrize("kind", ["eagle3", "eagle1"])
def test_nothing_a_generation_leaves_behind_changes_the_next_one(kind):
    """Caches and decode state are kept across generations: after a longer prompt, a stream closed mid-way,
    an exception inside a step, a sampled generation and another max_length, a greedy generation gives what
    a fresh model gives, in as many iterations (stale draft entries would change only those), and draws
    nothing from torch's global random generator."""
    shared = trained_pair("llama", kind)
    fresh = EaModel(copy.deepcopy(shared.base_model), copy.deepcopy(shared.ea_layer), None, 24, 5, 4)
    model = EaModel(copy.deepcopy(shared.base_model), copy.deepcopy(shared.ea_layer), None, 24, 5, 4)
    prompts = [torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(n)) for n in (40, 5)]
    expected = [[fresh.eagenerate(p, max_new_tokens=40, max_length=m, log=True) for m in (None, 64)] for p in prompts]

    def check():
        rng = torch.get_rng_state()
        for p, outputs in zip(prompts[::-1], expected[::-1]):  # the shorter prompt after the longer one
            for m, (output, new_token, idx) in zip((None, 64), outputs):
                ids, n, i = model.eagenerate(p, max_new_tokens=40, max_length=m, log=True)
                assert (ids.tolist(), n, i) == (output.tolist(), new_token, idx)
                assert model.naivegenerate(p, max_new_tokens=40, max_length=m).tolist() == output.tolist()
        assert torch.equal(torch.get_rng_state(), rng)

    check()
    stream = model.ea_generate(prompts[0], max_new_tokens=40, max_length=64)
    next(stream), next(stream)
    stream.close()
    check()
    step = Decoder._speculative_step

    def failing(self, *args):
        step(self, *args)
        raise KeyboardInterrupt  # after the step's cache and state updates

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Decoder, "_speculative_step", failing)
        with pytest.raises(KeyboardInterrupt):
            model.eagenerate(prompts[0], max_new_tokens=40)
    check()
    model.eagenerate(prompts[0], temperature=1.0, max_new_tokens=40, max_length=100)
    check()


def test_a_model_cast_after_generating_gets_new_caches():
    shared = trained_pair("llama", "eagle1")  # cached for other tests: cast copies
    model = EaModel(copy.deepcopy(shared.base_model), copy.deepcopy(shared.ea_layer), None, 24, 5, 4)
    ids = torch.tensor([[5, 17, 33, 2]])
    before = model.eagenerate(ids, max_new_tokens=20).tolist()
    float32_bytes = model._target.cache_bytes(64)
    model.to(torch.float64)
    # what the next generation checks max_length against, before it makes new caches: float64's size
    assert model._target.cache_bytes(64) == {device: 2 * size for device, size in float32_bytes.items()}
    assert model.eagenerate(ids, max_new_tokens=20).tolist() == model.naivegenerate(ids, max_new_tokens=20).tolist()
    assert model._cache.stacks[0].storage.dtype == torch.float64
    model.to(torch.float32)
    assert model.eagenerate(ids, max_new_tokens=20).tolist() == before


def test_a_cast_keeps_the_bases_rotary_frequencies_in_float32(tmp_path):
    """transformers loads a base in bfloat16 with float32 rotary frequencies; model.to(torch.bfloat16) rounded
    them (torch casts every float buffer), so the cast model's logits drifted from the loaded one's with the
    position. Cast, it is the model loaded in bfloat16."""
    from eagle_gto.attention import use_for

    shared = trained_pair("llama", "eagle3")
    shared.base_model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    use_for(loaded)  # the attention EaModel switches its base to
    model = EaModel(copy.deepcopy(shared.base_model), copy.deepcopy(shared.ea_layer), None, 24, 5, 4)
    model.to(torch.bfloat16)
    buffers = dict(model.base_model.named_buffers())
    assert buffers and all(buffer.dtype == torch.float32 for name, buffer in buffers.items() if "inv_freq" in name)
    ids = torch.randint(0, VOCAB, (1, 1200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.base_model(ids).logits[0, -50:], loaded(ids).logits[0, -50:])
    model.to(torch.float32)  # and back: the frequencies are the float32 model's own
    assert all(torch.equal(buffer, dict(shared.base_model.named_buffers())[name]) for name, buffer in buffers.items())


@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
def test_a_float32_head_beside_a_half_precision_base_drafts(kind):
    """A head kept in float32 (or the base alone cast afterwards) beside a bfloat16 base: features are cast
    to the head's dtype, and an EAGLE-1 head's output to the base's lm_head's (it failed with a dtype error)."""
    shared = trained_pair("llama", kind)
    model = EaModel(copy.deepcopy(shared.base_model), copy.deepcopy(shared.ea_layer), None, 24, 5, 4)
    model.base_model.to(torch.bfloat16)
    assert next(model.ea_layer.parameters()).dtype == torch.float32
    ids = torch.tensor([[5, 17, 33, 2]])
    out = model.eagenerate(ids, max_new_tokens=30)
    assert model.last_stats.mean_accepted_length > 1.5  # the float32 head's drafts are accepted
    assert out.tolist() == model.naivegenerate(ids, max_new_tokens=30).tolist()


def test_a_head_given_to_the_constructor_is_moved_beside_the_bases_last_layer(monkeypatch):
    """As the reference's constructor does (from_pretrained places the head itself). The CPU has no second
    device: the base's last layer is said to be on "meta", where a move needs no copy of the weights."""

    cfg = base_config("llama", vocab_size=VOCAB)
    base = AutoModelForCausalLM.from_config(cfg)
    head = random_head(head_config(cfg, "eagle3", draft_vocab_size=DRAFT_VOCAB))
    monkeypatch.setattr(placement, "head_device", lambda model: torch.device("meta"))
    EaModel(base, head, None, 12, 3, 3)
    assert head.fc.weight.device == torch.device("meta")


def test_the_head_goes_to_the_device_of_the_bases_last_layer():
    """Where the base's final features are made (a base split over devices has its first layer elsewhere).
    The CPU has no second device: the last layer is put on "meta"."""
    base = AutoModelForCausalLM.from_config(base_config("llama", vocab_size=VOCAB))
    decoder_layers(base)[-1].to("meta")
    assert placement.head_device(base) == torch.device("meta")


@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
def test_the_constructor_checks_a_head_against_the_base_and_casts_it_to_the_bases_dtype(kind):
    """As from_pretrained does: a head made for another base is refused when the model is built (not with a
    shape error at the first step), and a head in another dtype is cast to the base's, as the reference does."""
    cfg = base_config("llama", vocab_size=VOCAB)
    draft_vocab = DRAFT_VOCAB if kind == "eagle3" else None
    for other in (base_config("llama", vocab_size=VOCAB, hidden_size=32), base_config("llama", vocab_size=VOCAB + 8)):
        head = random_head(head_config(other, kind, draft_vocab_size=draft_vocab))
        with pytest.raises(CheckpointError, match="^ea_layer: .*(hidden_size|target features|vocab_size)"):
            EaModel(AutoModelForCausalLM.from_config(cfg), head, None, 12, 3, 3)
    base = AutoModelForCausalLM.from_config(cfg).to(torch.float64)
    head = random_head(head_config(cfg, kind, draft_vocab_size=draft_vocab))  # float32
    model = EaModel(base, head, None, 12, 3, 3)
    assert {p.dtype for p in head.parameters()} == {torch.float64}
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(0))
    assert model.eagenerate(ids, max_new_tokens=12).tolist() == model.naivegenerate(ids, max_new_tokens=12).tolist()


def test_a_dispatched_base_may_be_cast_but_not_moved():
    """accelerate's hooks keep sending each layer's inputs where the
    device_map put it: a base dispatched over devices and then moved with
    .to() would fail deep in a forward, so the next generation refuses it."""
    shared = trained_pair("llama", "eagle3")
    model = EaModel(copy.deepcopy(shared.base_model), copy.deepcopy(shared.ea_layer), None, 24, 5, 4)
    model.base_model.hf_device_map = {"model.embed_tokens": 0, "model.layers": 1, "lm_head": 1}  # as dispatched
    ids = torch.tensor([[5, 17, 33, 2]])
    model.eagenerate(ids, max_new_tokens=4)
    model.to(torch.float64)  # a cast keeps every weight where it was
    model.eagenerate(ids, max_new_tokens=4)
    model.to("meta")  # (a move; the CPU has no second device)
    with pytest.raises(ValueError, match="dispatched over several devices"):
        model.eagenerate(ids, max_new_tokens=4)


def test_the_tree_is_checked_when_assigned():
    from eagle_gto.generation import TreeParams

    model = EaModel(trained_pair("llama", "eagle3").base_model, trained_pair("llama", "eagle3").ea_layer,
                    None, 8, 3, 3)
    for bad, error in ((TreeParams(8, 3, DRAFT_VOCAB + 1), ValueError), (TreeParams(8, 0, 3), ValueError),
                       (TreeParams(100, 2, 3), ValueError), (TreeParams(1, 3, 3), ValueError),
                       (TreeParams(8.0, 3, 3), ValueError), ((8, 3, 3), TypeError)):
        with pytest.raises(error):
            model.tree = bad
        assert model.tree == TreeParams(8, 3, 3)
    model.tree = TreeParams(12, 4, 2)
    ids = torch.tensor([[1, 2, 3]])
    assert model.eagenerate(ids, max_new_tokens=12).tolist() == model.naivegenerate(ids, max_new_tokens=12).tolist()


def test_a_tree_that_reaches_further_gets_a_larger_draft_cache():
    """A tree assigned after generating may reach further past the cache
    length (depth * top_k draft slots) than the draft cache made for the old
    tree holds: the next generation makes new caches, and decodes to the end
    of the context."""
    from eagle_gto.generation import TreeParams

    pair = trained_pair("llama", "eagle3")
    model = EaModel(pair.base_model, pair.ea_layer, None, 4, 2, 2)
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    expected = model.naivegenerate(ids, max_new_tokens=200, max_length=96).tolist()
    assert len(expected[0]) == 96
    assert model.eagenerate(ids, max_new_tokens=200, max_length=96).tolist() == expected
    model.tree = TreeParams(8, 8, 8)  # 64 draft slots, where the old tree wrote 4
    assert model.eagenerate(ids, max_new_tokens=200, max_length=96).tolist() == expected


def test_reference_argument_order_and_forward_get_clear_errors(pair_dirs):
    with pytest.raises(TypeError, match="pass base_model_path=, ea_model_path= and use_eagle3= by name"):
        EaModel.from_pretrained(True, str(pair_dirs / "base"), str(pair_dirs / "eagle3"))
    with pytest.raises(NotImplementedError, match="EaModel has no forward"):
        trained_pair("llama", "eagle3")(torch.tensor([[1, 2]]))


# ----------------------------------------------------------------- bad checkpoints
def copy_head(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_folder_and_offline_hub_id(pair_dirs, monkeypatch, tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        load(pair_dirs, "does-not-exist/../nowhere")
    with pytest.raises(CheckpointError, match="no config.json"):
        EaModel.from_pretrained(str(pair_dirs / "base"), str(tmp_path))
    with pytest.raises(CheckpointError, match="a file, not a folder"):
        EaModel.from_pretrained(str(pair_dirs / "base"), str(pair_dirs / "eagle3" / "config.json"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import, not from the env
    with pytest.raises(CheckpointError, match=r"the hub could not be reached .*\(offline\?\)") as refused:
        EaModel.from_pretrained(str(pair_dirs / "base"), "someone/some-eagle-head")
    assert "HF_HUB_OFFLINE" not in str(refused.value)


def test_an_unreachable_hub_says_how_to_fail_at_once(pair_dirs, monkeypatch):
    """Without HF_HUB_OFFLINE the hub client retries for about 25 s before
    giving up; the error names the setting that skips that wait."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(*args, **kwargs):
        raise LocalEntryNotFoundError("no connection")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(CheckpointError, match="offline\\?, HF_HUB_OFFLINE=1 fails at once"):
        EaModel.from_pretrained(str(pair_dirs / "base"), "someone/some-eagle-head")


def test_contradicting_use_eagle3(pair_dirs):
    with pytest.raises(CheckpointError, match="use_eagle3=False"):
        load(pair_dirs, "eagle3", use_eagle3=False)
    with pytest.raises(CheckpointError, match="use_eagle3=True"):
        load(pair_dirs, "eagle1", use_eagle3=True)


def test_config_missing_keys(pair_dirs, tmp_path):
    head = copy_head(pair_dirs / "eagle3", tmp_path / "h")
    cfg = json.loads((head / "config.json").read_text())
    del cfg["intermediate_size"]
    (head / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing intermediate_size"):
        EaModel.from_pretrained(str(pair_dirs / "base"), str(head))


def test_wrong_tensor_shape_names_file_tensor_and_shapes(pair_dirs, tmp_path):
    head = copy_head(pair_dirs / "eagle3", tmp_path / "h")
    state = load_file(str(head / "model.safetensors"))
    state["midlayer.mlp.up_proj.weight"] = torch.zeros(7, 64)
    save_file(state, str(head / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.safetensors.*midlayer.mlp.up_proj.weight: "
                                              r"expected shape \[128, 64\], found \[7, 64\]"):
        EaModel.from_pretrained(str(pair_dirs / "base"), str(head))


def test_head_not_matching_the_base(pair_dirs, tmp_path):
    other = base_config("llama", vocab_size=VOCAB + 10)
    save_head(random_head(head_config(other, "eagle3", draft_vocab_size=40)), tmp_path / "vocab")
    with pytest.raises(CheckpointError, match="vocab_size 106 != base model vocab_size 96"):
        EaModel.from_pretrained(str(pair_dirs / "base"), str(tmp_path / "vocab"))
    wide = base_config("llama", vocab_size=VOCAB, hidden_size=128)
    save_head(random_head(head_config(wide, "eagle3")), tmp_path / "wide")
    with pytest.raises(CheckpointError, match="width 128"):
        EaModel.from_pretrained(str(pair_dirs / "base"), str(tmp_path / "wide"))


def test_corrupt_and_truncated_weights(pair_dirs, tmp_path):
    head = copy_head(pair_dirs / "eagle3", tmp_path / "h")
    data = (head / "model.safetensors").read_bytes()
    (head / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        EaModel.from_pretrained(str(pair_dirs / "base"), str(head))
    bin_head = copy_head(pair_dirs / "eagle1", tmp_path / "b")
    for junk in (b"not a checkpoint at all", b"<html>404 Not Found</html>", bytes(range(7, 200))):
        (bin_head / "pytorch_model.bin").write_bytes(junk)
        with pytest.raises(CheckpointError, match="not a PyTorch checkpoint|corrupt or truncated|a web page") as info:
            EaModel.from_pretrained(str(pair_dirs / "base"), str(bin_head))
        assert "weights_only" not in str(info.value)  # never the advice to unpickle arbitrary objects
        assert junk != b"not a checkpoint at all" or "not a PyTorch checkpoint" in str(info.value)


class NotATensor:
    pass


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_bin_with_more_than_tensors_is_refused(pair_dirs, tmp_path, legacy):
    head = copy_head(pair_dirs / "eagle1", tmp_path / "h")
    state = torch.load(head / "pytorch_model.bin", weights_only=True)
    state["payload"] = NotATensor()
    torch.save(state, head / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)  # (old torch's format)
    with pytest.raises(CheckpointError, match="more than tensors"):
        EaModel.from_pretrained(str(pair_dirs / "base"), str(head))


def test_missing_or_broken_base_model(pair_dirs, tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        EaModel.from_pretrained(str(tmp_path), str(pair_dirs / "eagle3"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="cannot load the base model"):
        EaModel.from_pretrained(str(tmp_path), str(pair_dirs / "eagle3"))
    with pytest.raises(CheckpointError, match="no such folder"):
        EaModel.from_pretrained(str(tmp_path / "missing"), str(pair_dirs / "eagle3"))


def test_a_generation_under_inference_mode_leaves_the_model_usable():
    """The caches are made by the first generation of a max_length (77 here:
    new ones) and kept: made under inference mode they must still be usable outside it."""
    model = trained_pair("llama", "eagle3")
    with torch.inference_mode():
        ids = torch.tensor([[5, 17, 33]])
        inside = model.eagenerate(ids, max_new_tokens=10, max_length=77)
    outside = [model.eagenerate(ids, max_new_tokens=10, max_length=77),
               model.naivegenerate(ids, max_new_tokens=10, max_length=77)]
    assert all(out.tolist() == inside.tolist() for out in outside)


@pytest.mark.parametrize("top_k,message", [(2.7, "2.7"), (-1, "-1"), (None, "None"), (True, "True")])
def test_sampling_top_k_must_be_a_whole_number(top_k, message):
    model = trained_pair("llama", "eagle3")
    with pytest.raises(ValueError, match=f"top_k must be a whole number >= 0 .*got {message}"):
        model.eagenerate(torch.zeros(1, 3, dtype=torch.long), temperature=1.0, top_k=top_k)
    assert model.eagenerate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2, top_k=5.0).shape[1] == 5
