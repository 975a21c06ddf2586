"""Greedy speculative decoding returns exactly the tokens of plain greedy
decoding, compared with transformers' own `generate`, for every architecture
and head kind, with heads that draft well enough to get tokens accepted."""

import pytest
import torch
from tiny_pairs import DRAFT_VOCAB, VOCAB, trained_pair
from transformers import AutoModelForCausalLM

from eagle_gto import EaModel
from eagle_gto.tiny import base_config, head_config, random_head

ARCHS = ["llama", "qwen2", "qwen3", "mixtral"]
KINDS = ["eagle1", "eagle3"]
NUM_PROMPTS = 20
NEW_TOKENS = 32


def prompts(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (1, int(torch.randint(1, 30, (1,), generator=g))), generator=g)
            for _ in range(NUM_PROMPTS)]


def assert_same_or_near_tie(model, out, expected):
    """float32 sums in a different order (a tree forward vs a one-token
    forward) may flip the argmax where two logits tie to ~1e-5; any other
    divergence is a bug."""
    if out.tolist() == expected.tolist():
        return
    first = next(i for i in range(min(out.shape[1], expected.shape[1])) if out[0, i] != expected[0, i])
    with torch.no_grad():
        logits = model.base_model(expected[:, :first]).logits[0, -1]
    margin = logits[expected[0, first]] - logits[out[0, first]]
    assert abs(float(margin)) < 1e-4, f"divergence at {first} is not a near-tie (margin {float(margin)})"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_transformers_generate(arch, kind):
    model = trained_pair(arch, kind)
    taus = []
    for ids in prompts(seed=ARCHS.index(arch) * 10 + KINDS.index(kind)):
        out = model.eagenerate(ids, max_new_tokens=NEW_TOKENS)
        taus.append(model.last_stats.mean_accepted_length)
        expected = model.base_model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                                             attention_mask=torch.ones_like(ids), pad_token_id=0)
        assert_same_or_near_tie(model, out, expected)
        assert model.naivegenerate(ids, max_new_tokens=NEW_TOKENS).tolist() == expected.tolist()
    tau = sum(taus) / len(taus)
    print(f"{arch}/{kind}: mean accepted length {tau:.2f}")
    assert tau > 1.5, "the head should draft well enough that the acceptance path is exercised"
    assert min(taus) < max(taus)  # both accepted and rejected drafts occurred


def test_greedy_with_larger_tree_and_eagle_defaults():
    """The default tree shape (60/7/10 needs top_k**2 candidates per level)."""
    model = trained_pair("llama", "eagle3", total_token=60, depth=7, top_k=10)
    taus = []
    for ids in prompts(seed=7)[:5]:
        out = model.eagenerate(ids, max_new_tokens=NEW_TOKENS)
        taus.append(model.last_stats.mean_accepted_length)
        expected = model.naivegenerate(ids, max_new_tokens=NEW_TOKENS)
        assert out.tolist() == expected.tolist()
    assert sum(taus) / len(taus) > 1.5


@pytest.mark.parametrize("tree", [(2, 1, 1), (2, 6, 1), (7, 1, 2), (15, 3, 2), (DRAFT_VOCAB + 1, 1, DRAFT_VOCAB)])
def test_greedy_at_tree_extremes_and_context_ends(tree):
    """Trees at their limits (one draft token, top_k 1, every candidate kept, top_k the whole draft vocabulary,
    depth past the token budget), each with budgets of one token or a few, and with prompts that leave the
    context room for less than a tree: speculative output, its stream and its log equal plain decoding's."""
    pair = trained_pair("llama", "eagle3")
    model = EaModel(pair.base_model, pair.ea_layer, None, *tree)
    g = torch.Generator().manual_seed(sum(tree))
    for prompt_length, max_new_tokens, max_length in ((1, 1, None), (5, 3, None), (20, 200, 40), (37, 200, 40)):
        ids = torch.randint(0, VOCAB, (1, prompt_length), generator=g)
        options = dict(max_new_tokens=max_new_tokens, max_length=max_length)
        out, new_token, idx = model.eagenerate(ids, log=True, **options)
        assert out.tolist() == model.naivegenerate(ids, **options).tolist()
        streamed = list(model.ea_generate(ids, **options))
        assert streamed[-1].tolist() == out.tolist()
        assert (new_token, idx) == (out.shape[1] - prompt_length, len(streamed) - 1)


def test_dynamic_rope_bases_decode_speculatively_only_within_their_context():
    """Dynamic NTK scaling picks the rotary frequencies of a whole forward from its longest position: past
    max_position_embeddings a draft tree's forward rotated the tokens it verifies otherwise than plain decoding's
    one-token forwards, and greedy outputs could differ (with sharper attention than here, at tokens whose top two
    logits were 0.2 apart: no tie). Speculation is refused there; plain decoding is not; within the context the two
    agree."""
    torch.manual_seed(0)
    config = base_config("llama", vocab_size=VOCAB, num_layers=3)
    config.max_position_embeddings = 24
    config.rope_parameters = {"rope_type": "dynamic", "factor": 16.0, "rope_theta": 100.0}
    base = AutoModelForCausalLM.from_config(config).eval()
    model = EaModel(base, random_head(head_config(config, "eagle1")), None, total_token=24, depth=6, top_k=4)
    ids = torch.tensor([[5, 17, 3, 60]])
    with pytest.raises(ValueError, match=r"'dynamic' rope scaling .* max_length must be <= 24, got 100 \(plain"):
        model.eagenerate(ids, max_new_tokens=30, max_length=100)
    with pytest.warns(UserWarning, match="beyond the base model's max_position_embeddings"):
        assert model.naivegenerate(ids, max_new_tokens=30, max_length=100).shape == (1, 34)
    assert model.eagenerate(ids, max_new_tokens=20).tolist() == model.naivegenerate(ids, max_new_tokens=20).tolist()


def test_the_base_sees_every_token_at_its_place_in_the_sequence():
    """A rotary base attends by distances only, so positions all one off decoded alike on the bases above (a
    mutant adding 1 to every position the base is given survived); a base whose rope depends on the longest
    position (dynamic NTK) or that adds absolute position embeddings would not. The prefill is fed from position
    0, and every later forward's first token (a tree's root, or plain decoding's one token) at its index in the
    output, the tree's other tokens after it, each at most the tree's depth further."""
    model = trained_pair("llama", "eagle3")
    fed = []  # (token ids, position ids) of every forward the engine runs on the base's decoder

    def record(_module, _args, kwargs):
        if kwargs.get("position_ids") is not None:
            fed.append((kwargs["input_ids"][0].tolist(), kwargs["position_ids"][0].tolist()))

    ids = torch.tensor([[5, 17, 3, 60, 9, 41, 2]])
    hook = model.base_model.get_decoder().register_forward_pre_hook(record, with_kwargs=True)
    try:
        for generate in (model.eagenerate, model.naivegenerate):
            fed.clear()
            out = generate(ids, max_new_tokens=20)[0].tolist()
            assert fed[0] == (ids[0].tolist(), list(range(ids.shape[1])))
            for tokens, positions in fed[1:]:
                root = positions[0]
                assert out[root] == tokens[0], f"token {tokens[0]} fed at {root}, where the output has {out[root]}"
                assert all(root < position <= root + model.tree.depth + 1 for position in positions[1:])
        assert len(fed) == 20  # (plain decoding: a prefill and 19 one-token forwards)
    finally:
        hook.remove()
