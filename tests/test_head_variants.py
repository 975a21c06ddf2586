"""EAGLE-3 head variants other trainers export (SpecForge's `fc_norm`, vLLM
speculators' `norm_before_residual`, gpt-oss heads' `norm_before_fc`,
EAGLE-3.1's `norm_output`): the layer
math checked against a hand-written forward, the switches read from config
and weights, kept on export, and drafting with them lossless and accepting."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tiny_pairs import VOCAB, fit_head, make_base

from eagle_gto import CheckpointError, EaModel
from eagle_gto.checkpoint import build_head, load_checkpoint, save_head
from eagle_gto.tiny import base_config, head_config, random_head

SWITCHES = ("norm_before_residual", "fc_norm", "norm_before_fc", "norm_output")
# fc_norm and norm_before_fc are two ways of one step: a head has one or the other
ALL_ON = tuple({name: True for name in SWITCHES if name != left_out} for left_out in ("norm_before_fc", "fc_norm"))


def variant_head(seed=0, **switches):
    """A random EAGLE-3 head (hidden 64) whose norms are random too, so that none is the identity."""
    cfg = {**head_config(base_config("llama", vocab_size=VOCAB), "eagle3", draft_vocab_size=40), **switches}
    head = random_head(cfg, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    for name, param in head.named_parameters():
        if name.endswith("norm.weight") or ".fc_norm." in f".{name}":  # (input_norm.weight ends so too)
            param.copy_(1 + 0.5 * torch.rand(param.shape, generator=generator))
    return head


def rms(x, weight, eps=1e-6):
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def by_hand(head, features, token):
    """One entry, no cache: attention over a single key is its value, so the
    layer is written out here without the engine's attention code."""
    cfg, layer = head.config, head.midlayer
    if cfg.fc_norm:
        features = torch.cat([rms(part, norm.weight) for norm, part in zip(head.fc_norm, features.chunk(3, -1))], -1)
    if cfg.norm_before_fc:
        features = rms(features, head.input_norm.weight)
    hidden = features @ head.fc.weight.T
    normed_hidden = rms(hidden, layer.hidden_norm.weight)
    residual = normed_hidden if cfg.norm_before_residual else hidden
    x = torch.cat((rms(head.embed(token), layer.input_layernorm.weight), normed_hidden), -1)
    value = x @ layer.self_attn.v_proj.weight.T  # [kv_heads * head_dim]
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    value = value.view(cfg.num_key_value_heads, 1, -1).expand(-1, group, -1).reshape(-1)
    hidden = residual + value @ layer.self_attn.o_proj.weight.T
    mlp_in = rms(hidden, layer.post_attention_layernorm.weight)
    out = hidden + (F.silu(mlp_in @ layer.mlp.gate_proj.weight.T) * (mlp_in @ layer.mlp.up_proj.weight.T)) \
        @ layer.mlp.down_proj.weight.T
    normed_out = rms(out, head.norm.weight)
    fed_back = normed_out if cfg.norm_output else out
    return fed_back, normed_out @ head.lm_head.weight.T


@pytest.mark.parametrize("switches", [{}, *({name: True} for name in SWITCHES), *ALL_ON])
def test_layer_math_matches_a_hand_written_forward(switches):
    head = variant_head(**switches)
    head.attach_embedding(torch.randn(VOCAB, 64, generator=torch.Generator().manual_seed(3)))
    features = torch.randn(1, 1, 3 * 64, generator=torch.Generator().manual_seed(4))
    token = torch.tensor([[5]])
    out = head(head.project_features(features), token, torch.zeros(1, 1, dtype=torch.long),
               torch.ones(1, 1, 1, 1, dtype=torch.bool))
    expected_out, expected_logits = by_hand(head, features[0, 0], token[0, 0])
    torch.testing.assert_close(out[0, 0], expected_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(head.draft_logits(out)[0, 0], expected_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", SWITCHES)
def test_each_switch_changes_the_draft(name):
    """Two draft steps, the second fed the first's output (norm_output only
    changes what is fed back): a switch read but not applied would draft the same."""
    off, on = variant_head(), variant_head(**{name: True})
    if name == "fc_norm":
        off.fc_norm = on.fc_norm  # unused when off
    if name == "norm_before_fc":
        off.input_norm = on.input_norm
    features = torch.randn(1, 1, 3 * 64, generator=torch.Generator().manual_seed(4))
    mask = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    logits = []
    for head in (off, on):
        head.attach_embedding(torch.randn(VOCAB, 64, generator=torch.Generator().manual_seed(3)))
        first = head(head.project_features(features), torch.tensor([[1]]), torch.zeros(1, 1, dtype=torch.long), mask)
        second = head(first, torch.tensor([[2]]), torch.ones(1, 1, dtype=torch.long), mask)
        logits.append(head.draft_logits(second))
    assert not torch.allclose(logits[0], logits[1], atol=1e-3)


@pytest.mark.parametrize("switches", ALL_ON)
def test_switches_are_read_from_config_and_weights_and_kept_on_export(tmp_path, switches):
    head = variant_head(**switches)
    save_head(head, tmp_path / "all")
    saved = json.loads((tmp_path / "all" / "config.json").read_text())
    assert {name: saved.get(name, False) for name in SWITCHES} == {name: name in switches for name in SWITCHES}
    again = build_head(load_checkpoint(str(tmp_path / "all")))
    assert all(getattr(again.config, name) is (name in switches) for name in SWITCHES)
    for key, value in head.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key

    # SpecForge (fc_norm.{i}) and gpt-oss (input_norm) heads: the tensors without the flag in config.json
    cfg = json.loads((tmp_path / "all" / "config.json").read_text())
    implied = "fc_norm" if "fc_norm" in switches else "norm_before_fc"
    del cfg[implied]
    (tmp_path / "all" / "config.json").write_text(json.dumps(cfg))
    assert getattr(load_checkpoint(str(tmp_path / "all")).config, implied) is True


@pytest.mark.parametrize("top,nested,expected", [(None, True, True), (True, False, False), (True, None, True)])
def test_norm_before_fc_under_eagle_config(tmp_path, top, nested, expected):
    """NVIDIA's gpt-oss heads write norm_before_fc under `eagle_config`; as in
    vLLM, that value wins over a top-level one."""
    head = variant_head(norm_before_fc=True)
    save_head(head, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["norm_before_fc"]
    if top is not None:
        cfg["norm_before_fc"] = top
    if nested is not None:
        cfg["eagle_config"] = {"norm_before_fc": nested}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    if expected:
        assert build_head(load_checkpoint(str(tmp_path))).config.norm_before_fc is True
    else:  # the config says no norm, the weights hold one: refused, not silently dropped
        with pytest.raises(CheckpointError, match="unexpected tensors input_norm.weight"):
            build_head(load_checkpoint(str(tmp_path)))


@pytest.mark.parametrize("written,in_layer,expected", [(None, None, True), (False, None, False), (True, None, True),
                                                       (True, False, True)])
def test_speculators_configs_default_to_norm_before_residual(tmp_path, written, in_layer, expected):
    """vLLM reads a speculators config without the key as norm_before_residual=True. The speculator's own
    settings (top level) win over its transformer_layer_config's, as vLLM takes them from the top (speculators
    writes each key on one side only; a mutant letting the layer config win survived)."""
    save_head(variant_head(), tmp_path / "flat")
    cfg = json.loads((tmp_path / "flat" / "config.json").read_text())
    if in_layer is not None:
        cfg["norm_before_residual"] = in_layer
    nested = {"speculators_model_type": "eagle3", "draft_vocab_size": cfg.pop("draft_vocab_size"),
              "transformer_layer_config": cfg}
    if written is not None:
        nested["norm_before_residual"] = written
    folder = tmp_path / "spec"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(nested))
    state = load_file(str(tmp_path / "flat" / "model.safetensors"))
    save_file({k.replace("midlayer.", "layers.0."): v for k, v in state.items()}, str(folder / "model.safetensors"))
    head = build_head(load_checkpoint(str(folder)))
    assert head.config.norm_before_residual is expected
    save_head(head, tmp_path / "exported")  # exported flat: the switch spelled out, no speculators keys
    exported = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert exported.get("norm_before_residual", False) is expected and "speculators_model_type" not in exported
    assert build_head(load_checkpoint(str(tmp_path / "exported"))).config.norm_before_residual is expected


@pytest.mark.parametrize("change,message", [
    (dict(norm_before_fc=True, fc_norm=True), "fc_norm and norm_before_fc are both true"),
    (dict(norm_output="yes"), "norm_output must be true or false, found 'yes'"),
])
def test_unsupported_or_bad_switches_are_refused(tmp_path, change, message):
    save_head(variant_head(), tmp_path)
    cfg = {**json.loads((tmp_path / "config.json").read_text()), **change}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"config.json: {message}"):
        load_checkpoint(str(tmp_path))


@pytest.mark.parametrize("switches", ALL_ON)
def test_a_head_of_every_switch_drafts_losslessly_and_is_accepted(switches):
    """Fitted with all switches on (training and drafting share the head's
    forward), its drafts are accepted, and greedy output is plain decoding's."""
    base = make_base("llama")
    head = fit_head(base, "eagle3", **switches)
    assert all(getattr(head.config, name) is (name in switches) for name in SWITCHES)
    model = EaModel(base, head, None, total_token=24, depth=5, top_k=4)
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(7))
    spec, new_tokens, idx = model.eagenerate(ids, max_new_tokens=48, log=True)
    assert spec.tolist() == model.naivegenerate(ids, max_new_tokens=48).tolist()
    assert new_tokens / (idx + 1) > 1.5


@pytest.mark.parametrize("where,ids,expected", [
    ("top", [1, 3, 5], [1, 3, 5]),  # vLLM: the input of layer j
    ("eagle_config", [1, 3, 4], [2, 4, 5]),  # SGLang: the output of layer j
    (None, None, [2, 3, 3]),  # the EAGLE-3 default for 6 layers: 2, N//2, N-3
])
def test_feature_layers_from_the_config(tmp_path, where, ids, expected):
    """Heads trained on other target layers say so; the engine's pre-hooks
    then capture those layers' inputs, checked against output_hidden_states."""
    save_head(variant_head(), tmp_path / "head")
    cfg = json.loads((tmp_path / "head" / "config.json").read_text())
    if where == "top":
        cfg["eagle_aux_hidden_state_layer_ids"] = ids
    elif where == "eagle_config":
        cfg["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": ids}
    (tmp_path / "head" / "config.json").write_text(json.dumps(cfg))
    base = make_base("llama")  # 6 layers
    model = EaModel(base, build_head(load_checkpoint(str(tmp_path / "head"))), None, total_token=8, depth=2, top_k=2)
    ids_in = torch.tensor([3, 1, 4, 1, 5])
    runner = model._target
    _, features = runner.forward(ids_in, torch.arange(5), torch.ones(5, 5, dtype=torch.bool).tril(),
                                 runner.new_cache(5), features=True)
    with torch.no_grad():
        hidden = base(input_ids=ids_in[None], output_hidden_states=True).hidden_states
    torch.testing.assert_close(features, torch.cat([hidden[j][0] for j in expected], dim=-1))
    save_head(model.ea_layer, tmp_path / "again")  # the ids stay as they were written
    assert build_head(load_checkpoint(str(tmp_path / "again"))).feature_layers(6) == expected


@pytest.mark.parametrize("ids,message", [([1, 2], "three layer numbers"), ([1, 2, 6], "base model has 6 layers")])
def test_bad_feature_layers_are_refused(tmp_path, ids, message):
    save_head(variant_head(), tmp_path)
    cfg = {**json.loads((tmp_path / "config.json").read_text()), "eagle_aux_hidden_state_layer_ids": ids}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    base = tmp_path.parent / f"base-{len(ids)}"
    make_base("llama").save_pretrained(base)
    with pytest.raises(CheckpointError, match=message):
        EaModel.from_pretrained(str(base), str(tmp_path))


def test_eagle1_layer_math_matches_a_hand_written_forward():
    """EAGLE-1's fc reads [embedding of the token, feature] in that order (the reference's), its first layer has
    no input norm, and its logits come from the target's lm_head; one entry, so attention is its value."""
    head = random_head(head_config(base_config("llama", vocab_size=VOCAB), "eagle1"), seed=3)
    for param in head.parameters():
        param.add_(0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    embedding = torch.randn(VOCAB, 64, generator=torch.Generator().manual_seed(3))
    lm_head = torch.nn.Linear(64, VOCAB, bias=True)  # (with a bias, as some bases' lm_head has)
    head.attach_embedding(embedding)
    head.attach_lm_head(lm_head)
    feature, token = torch.randn(64, generator=torch.Generator().manual_seed(4)), 5
    with torch.no_grad():
        out = head(feature[None, None], torch.tensor([[token]]), torch.zeros(1, 1, dtype=torch.long),
                   torch.ones(1, 1, 1, 1, dtype=torch.bool))[0, 0]
        layer = head.layers[0]
        x = head.fc(torch.cat((embedding[token], feature)))
        value = layer.self_attn.v_proj(x).view(head.config.num_key_value_heads, 1, -1)
        group = head.config.num_attention_heads // head.config.num_key_value_heads
        hidden = x + layer.self_attn.o_proj(value.expand(-1, group, -1).reshape(-1))
        expected = hidden + layer.mlp(rms(hidden, layer.post_attention_layernorm.weight))
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(head.draft_logits(out), lm_head(expected), rtol=1e-4, atol=1e-5)


def test_stacked_eagle1_layers_have_an_input_norm_after_the_first():
    """EAGLE-1 heads of several layers (num_hidden_layers > 1): only the first layer reads fc's output unnormed."""
    cfg = {**head_config(base_config("llama", vocab_size=VOCAB), "eagle1"), "num_hidden_layers": 3}
    keys = set(random_head(cfg).state_dict())
    assert [f"layers.{i}.input_layernorm.weight" in keys for i in range(3)] == [False, True, True]


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


@pytest.mark.parametrize("rope", [{"rope_type": "default"}, {"rope_type": "linear", "factor": 4.0}, LLAMA3_ROPE],
                         ids=lambda rope: rope["rope_type"])
def test_head_attention_with_rotary_positions_equals_transformers_llama_attention(rope):
    """The layer math above sees one entry, where rotary embeddings cancel out; here several entries at spread
    positions, under a causal mask, against transformers' own Llama attention with the same weights (the
    official heads were trained with its rotation convention: a rotation the other way, or keys left unrotated,
    would draft as well in tests with heads trained here, and badly with every published head)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    theta = 500000.0 if rope["rope_type"] == "llama3" else 10000.0
    sizes = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
    scaling = None if rope["rope_type"] == "default" else rope
    head = random_head({**sizes, "architectures": ["LlamaForCausalLM"], "intermediate_size": 64, "vocab_size": VOCAB,
                        "rope_theta": theta, "rope_scaling": scaling, "bias": False}, seed=2)
    attention = head.layers[0].self_attn
    config = LlamaConfig(**sizes, vocab_size=VOCAB, rope_parameters={**rope, "rope_theta": theta})
    config._attn_implementation = "eager"
    reference = LlamaAttention(config, layer_idx=0).eval()
    reference.load_state_dict(attention.state_dict())
    positions = torch.tensor([[0, 3, 17, 40, 200, 1500]])
    x = 30 * torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(5))  # scores far from uniform
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]
    with torch.no_grad():
        cos, sin = head.rope(positions, x.dtype)
        out = attention(x, cos, sin, causal, None)
        expected_rope = LlamaRotaryEmbedding(config)(x, positions)
        expected, _ = reference(x, expected_rope, torch.zeros(causal.shape).masked_fill(~causal, float("-inf")))
    torch.testing.assert_close((cos, sin), expected_rope, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_rotary_frequencies_stay_float32_in_a_half_precision_head():
    """Cast with the head (`.to(torch.bfloat16)`, as attaching it to a bf16
    base does), the frequencies were rounded to bf16: at position 1500 the
    angles were off by radians (cos off by 0.1 here, 2 at head_dim 128)."""
    head = random_head(head_config(base_config("llama", vocab_size=VOCAB), "eagle3"))
    positions = torch.arange(1500, 1510)
    cos32, sin32 = head.rope(positions, torch.float32)
    for dtype in (torch.bfloat16, torch.float16):
        head.to(dtype)
        assert head.inv_freq.dtype == torch.float32
        cos, sin = head.rope(positions, dtype)
        assert (cos.float() - cos32).abs().max() < 1e-2 and (sin.float() - sin32).abs().max() < 1e-2
    head.to(torch.float32)
    assert torch.equal(head.rope(positions, torch.float32)[0], cos32)


@pytest.mark.parametrize("written", [
    {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192, "rope_theta": 500000.0}},
    {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_theta": 500000.0}},
], ids=["top-level", "in-rope_scaling", "rope_parameters"])
def test_rope_theta_is_read_where_each_writer_puts_it(written):
    from eagle_gto.head_config import HeadConfig

    cfg = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 96,
           "draft_vocab_size": 64, **written}
    head = HeadConfig.from_dict(cfg, "eagle3")
    assert (head.rope_theta, head.rope_scaling["rope_type"]) == (500000.0, "llama3")


def test_config_fields_read_where_configs_put_them_and_defaulted_as_llama():
    """transformers 5 writes rope_theta under rope_parameters; head_dim need not be hidden / heads (Gemma);
    an absent rms_norm_eps is Llama's 1e-6; llama3 RoPE scaling without its optional numbers is Llama-3.1's."""
    from eagle_gto.head_config import HeadConfig
    from eagle_gto.heads import Eagle3Head, rope_inverse_frequencies

    plain = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=VOCAB)
    cfg = HeadConfig.from_dict({**plain, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
                               "eagle3")
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.head_dim) == (500000.0, 1e-6, 16)
    wide = HeadConfig.from_dict({**plain, "head_dim": 32}, "eagle3")
    assert wide.head_dim == 32 and Eagle3Head(wide).midlayer.self_attn.q_proj.out_features == 4 * 32
    short = rope_inverse_frequencies(16, 500000.0, {"rope_type": "llama3", "factor": 8.0})
    llama31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    spelled = rope_inverse_frequencies(16, 500000.0, llama31)
    assert torch.equal(short, spelled)


def test_a_heads_own_embedding_wins_over_an_attached_one():
    """A checkpoint's own embed_tokens is the head's; the trainer attaches the target's whatever the head carries
    (`attach_target_embedding`), and that must not replace it. Without one, the attached embedding is used."""
    head = random_head(head_config(base_config("llama", vocab_size=VOCAB), "eagle3", draft_vocab_size=40))
    own = torch.randn(VOCAB, head.config.hidden_size)
    attached = torch.randn(VOCAB, head.config.hidden_size)
    head.attach_embedding(attached)
    ids = torch.tensor([[1, 5, 9]])
    assert torch.equal(head.embed(ids), attached[ids])
    head.embed_tokens = torch.nn.Embedding.from_pretrained(own, freeze=True)
    assert torch.equal(head.embed(ids), own[ids])
