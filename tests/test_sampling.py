"""Speculative sampling preserves the base model's distribution.

With a 12-token vocabulary the exact joint distribution of the first three
generated tokens is enumerated from the base model (144 + 12 + 1 forwards);
thousands of speculative samples are compared with it by a chi-square test
(cells with small expected counts pooled). The head drafts well, so many of
the sampled tokens come from accepted drafts rather than from the bonus. The
same samples are also compared with a slightly different distribution (the
test must reject it), showing the test has the power to catch a bias.
"""

import itertools
from fractions import Fraction

import pytest
import torch
from scipy.stats import chisquare
from tiny_pairs import fit_head, make_base, trained_pair
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from eagle_gto import EaModel, generation
from eagle_gto.acceptance import SamplingParams, accept, choose_tokens, target_probs
from eagle_gto.tree import DraftTree, ancestor_mask

VOCAB, NEW, SAMPLES = 12, 3, 2000


@pytest.fixture(scope="module")
def model():
    base = make_base("llama", seed=4, vocab_size=VOCAB, residual_scale=0.5, num_layers=3)
    with torch.no_grad():
        base.lm_head.weight.mul_(60)  # peaky, but not deterministic, next-token distributions
    head = fit_head(base, "eagle3", steps=150, draft_vocab=10)
    return EaModel(base, head, None, total_token=8, depth=2, top_k=3)


def exact_joint(base, prompt, params):
    """P(x1, x2, x3 | prompt) under the processed distribution, [V, V, V]."""
    with torch.no_grad():
        p1 = target_probs(base(prompt[None]).logits[0, -1:], params)[0]
        seq2 = torch.cat((prompt.expand(VOCAB, -1), torch.arange(VOCAB)[:, None]), 1)
        p2 = target_probs(base(seq2).logits[:, -1], params)  # [x1, x2]
        pairs = torch.tensor(list(itertools.product(range(VOCAB), repeat=2)))
        seq3 = torch.cat((prompt.expand(VOCAB * VOCAB, -1), pairs), 1)
        p3 = target_probs(base(seq3).logits[:, -1], params).view(VOCAB, VOCAB, VOCAB)
    return p1[:, None, None] * p2[:, :, None] * p3


def chi_square_pvalue(counts, probs, min_expected=5.0):
    expected = probs.flatten().double() * counts.sum()
    observed = counts.flatten().double()
    if observed[expected == 0].sum() > 0:  # a sequence the base model can never produce
        return 0.0
    observed, expected = observed[expected > 0], expected[expected > 0]
    small = expected < min_expected
    exp, obs = expected[~small], observed[~small]
    if small.any():
        exp = torch.cat((exp, expected[small].sum()[None]))
        obs = torch.cat((obs, observed[small].sum()[None]))
    return chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_p=0.8),
    SamplingParams(temperature=1.3, top_k=4),
], ids=["temperature", "top_p", "top_k"])
def test_speculative_sampling_matches_base_distribution(model, params):
    prompt = torch.tensor([3, 1, 4, 1, 5])
    counts = torch.zeros(VOCAB, VOCAB, VOCAB)
    accepted = 0
    torch.manual_seed(123)
    for _ in range(SAMPLES):
        out = model.eagenerate(prompt[None], temperature=params.temperature, top_p=params.top_p,
                               top_k=params.top_k, max_new_tokens=NEW)
        x1, x2, x3 = out[0, -NEW:].tolist()
        counts[x1, x2, x3] += 1
        accepted += sum(step.num_accepted for step in model.last_stats.steps)
    probs = exact_joint(model.base_model, prompt, params)
    print(f"{params}: accepted drafts per sample {accepted / SAMPLES:.2f}")
    assert accepted / SAMPLES > 0.5, "drafts must be accepted often for this test to mean something"
    assert chi_square_pvalue(counts, probs) > 1e-3
    shifted = SamplingParams(params.temperature * 1.25, params.top_p, params.top_k)
    assert chi_square_pvalue(counts, exact_joint(model.base_model, prompt, shifted)) < 1e-3


def test_the_bonus_after_a_rejected_draft_leaves_the_draft_out(model):
    """Where the walk stops at a node that has a drafted child, the bonus token
    is the target's draw that missed the child: p with the child left out,
    never a fresh draw from p (which gives the child twice its chance). A
    chain tree (top_k=1) at a high temperature stops so about half the time;
    the two-token joint distribution is checked as above. (The three-token
    test above, with its peaky distributions and wide tree, cannot see this.)"""
    chain = EaModel(model.base_model, model.ea_layer, None, total_token=3, depth=2, top_k=1)
    params = SamplingParams(temperature=3.0)
    prompt = torch.tensor([3, 1, 4, 1, 5])
    counts = torch.zeros(VOCAB, VOCAB)
    accepted = []
    torch.manual_seed(123)
    for _ in range(600):
        out = chain.eagenerate(prompt[None], temperature=params.temperature, max_new_tokens=2)
        x1, x2 = out[0, -2:].tolist()
        counts[x1, x2] += 1
        accepted.append(chain.last_stats.steps[1].num_accepted)
    assert 0.2 < sum(a > 0 for a in accepted) / len(accepted) < 0.8  # drafts both taken and missed, often

    def exact(params):
        with torch.no_grad():
            p1 = target_probs(model.base_model(prompt[None]).logits[0, -1:], params)[0]
            seq2 = torch.cat((prompt.expand(VOCAB, -1), torch.arange(VOCAB)[:, None]), 1)
            return p1[:, None] * target_probs(model.base_model(seq2).logits[:, -1], params)

    assert chi_square_pvalue(counts, exact(params)) > 1e-3
    assert chi_square_pvalue(counts, exact(SamplingParams(params.temperature * 1.25))) < 1e-3


@pytest.mark.parametrize("temperature,top_p,top_k",
                         [(1.0, 0.0, 0), (0.5, 0.9, 0), (2.0, 0.0, 5), (0.8, 0.6, 3), (1.0, 0.0, 1000)])
def test_target_probs_match_transformers_warpers(temperature, top_p, top_k):
    """The processing order and semantics of the EAGLE reference (which uses
    these transformers warpers): temperature, then top-p, then top-k (a top_k
    past the vocabulary keeps every token)."""
    logits = torch.randn(4, 50) * 3
    expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if 0 < top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    if top_k > 0:
        expected = TopKLogitsWarper(top_k)(None, expected)
    got = target_probs(logits, SamplingParams(temperature, top_p, top_k))
    torch.testing.assert_close(got, expected.softmax(-1))


@pytest.mark.parametrize("settings,message", [
    (dict(temperature=-0.5), "temperature must be >= 0, got -0.5"),
    (dict(top_p=-0.1), "top_p must be >= 0 .*got -0.1"),
    (dict(top_k=-1), "top_k must be >= 0 .*got -1"),
])
def test_sampling_settings_below_their_range_are_refused(settings, message):
    """0 is each one's lowest value (greedy; top-p and top-k off): below it the settings are refused."""
    SamplingParams(**{name: 0 for name in settings}).validate()
    with pytest.raises(ValueError, match=message):
        SamplingParams(**settings).validate()


@pytest.mark.parametrize("top_p", [1e-300, 1e-46])
def test_a_tiny_top_p_keeps_the_most_probable_token(top_p):
    """Below float32's smallest number top_p compares as 0: the top token must still stay."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    probs = target_probs(logits, SamplingParams(1.0, top_p))
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), 50).float())


@pytest.mark.parametrize("params", [SamplingParams(0.0, 0.9, 5), SamplingParams(1e-6, 0.5), SamplingParams(0.8, 1.0, 7),
                                    SamplingParams(0.8, 2.5), SamplingParams(0.8, 0.9, 3)])
def test_canonical_sampling_settings_draw_the_same_tokens(params):
    """Settings that change nothing are left out of the key CUDA graphs are
    kept under (a server's greedy requests come with top_p=1): the canonical
    settings must draw exactly what the given ones draw."""
    canonical = params.canonical()
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(3)) * 3
    draws = [choose_tokens(logits, p, torch.Generator().manual_seed(9)) for p in (params, canonical)]
    assert torch.equal(draws[0], draws[1])
    assert canonical.top_p < 1 and (canonical == SamplingParams()) == params.greedy


@pytest.mark.parametrize("top_p,kept", [(0.25, 2), (0.5, 4), (0.75, 6)])
def test_top_p_at_an_exact_boundary_keeps_what_transformers_keeps(top_p, kept):
    """Eight equal tokens (1/8 each, exact in float32): a token whose preceding
    mass equals top_p is dropped, as TopPLogitsWarper drops it. Random logits
    never land on the boundary, so the comparison above cannot see it."""
    logits = torch.zeros(1, 8)
    probs = target_probs(logits, SamplingParams(1.0, top_p))
    expected = TopPLogitsWarper(top_p)(None, logits.clone()).softmax(-1)
    assert int((probs > 0).sum()) == int((expected > 0).sum()) == kept
    assert torch.equal(probs[probs > 0], torch.full((kept,), 1 / kept))
    assert torch.equal(probs, expected)  # the same tokens, not only as many


@pytest.mark.parametrize("top_p", [1e-300, 0.2, 0.4, 0.6, 0.8, 0.95])
def test_top_p_keeps_the_tokens_transformers_keeps_among_ties(top_p):
    """Of tokens tied at the top-p boundary (exact ties are common in bfloat16
    logits), TopPLogitsWarper drops the first in its ascending sort: the same
    ones must stay here, the top token included when it ties."""
    logits = torch.tensor([[1.0, 2.0, 1.0, 0.0, 1.0, 2.0, 1.0, 0.0], [0.5, 0.5, 0.5, 0.5, 3.0, 0.5, 0.5, 0.5]])
    expected = TopPLogitsWarper(top_p)(None, logits.clone()).softmax(-1)
    assert torch.equal(target_probs(logits, SamplingParams(1.0, top_p)), expected)


@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(0.7, 0.8, 5)],
                         ids=["temperature", "top_p_top_k"])
def test_choose_tokens_draws_from_target_probs(params):
    """The exponential race, checked on its own: many rows of one logit
    vector, each drawn once, follow the processed distribution."""
    logits = torch.randn(1, 12, generator=torch.Generator().manual_seed(2)) * 2
    probs = target_probs(logits, params)[0]
    draws = choose_tokens(logits.expand(20000, -1), params, torch.Generator().manual_seed(8))
    counts = torch.bincount(draws, minlength=12).float()
    assert chi_square_pvalue(counts, probs) > 1e-3
    shifted = SamplingParams(params.temperature * 1.25, params.top_p, params.top_k)
    assert chi_square_pvalue(counts, target_probs(logits, shifted)[0]) < 1e-3


@pytest.mark.parametrize("params", [SamplingParams(0.8), SamplingParams(0.7, 0.8, 5)],
                         ids=["temperature", "top_p_top_k"])
def test_plain_sampling_draws_each_token_from_the_base_models_own_distribution(params):
    """Plain decoding (naivegenerate, and the one-token steps that finish a
    speculative generation where a tree no longer fits in max_length) draws
    every token with choose_tokens from the base model's logits after the
    tokens before it: the same draws from torch's generator, replayed here on
    full forwards. (The statistical test above runs speculative steps only.)"""
    model = trained_pair("llama", "eagle3")  # trees of 24 tokens
    g = torch.Generator().manual_seed(1)
    options = dict(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
    for seed in range(3):
        for run, length, max_length in ((model.naivegenerate, 6, 24), (model.eagenerate, 16, 28)):
            prompt = torch.randint(0, model.base_model.config.vocab_size, (1, length), generator=g)
            torch.manual_seed(seed)
            out = run(prompt, max_new_tokens=100, max_length=max_length, **options)
            assert out.shape[1] == max_length and all(step.num_accepted == 0 for step in model.last_stats.steps)
            torch.manual_seed(seed)
            expected = prompt
            with torch.no_grad():
                while expected.shape[1] < max_length:
                    token = choose_tokens(model.base_model(expected).logits[:, -1], params)
                    expected = torch.cat((expected, token[None]), dim=1)
            assert out.tolist() == expected.tolist()


def test_temperature_1e_5_is_greedy_as_in_the_reference():
    """The reference samples only above temperature 1e-5 (`temperature > 1e-5`):
    at 1e-5 itself it takes the argmax, also where the top logits tie."""
    assert SamplingParams(1e-5).greedy and not SamplingParams(1.5e-5).greedy
    assert SamplingParams(1e-5, 0.9, 4).canonical() == SamplingParams()
    logits = torch.tensor([[3.0, 3.0, 1.0]]).expand(100, -1)
    assert choose_tokens(logits, SamplingParams(1e-5), torch.Generator().manual_seed(0)).eq(0).all()


def children_of(node, parents):
    return [c for c in range(1, len(parents)) if parents[c] == node]


def engine_step_law(tokens, parents, p):
    """Exact law (Fractions) of the tokens one verification step emits (the
    accepted drafts, then the bonus): `accept` on every combination of the
    target's draws at the nodes, each weighted by its probability."""
    parent_ids = torch.tensor(parents)
    mask = ancestor_mask(parent_ids, len(tokens))
    tree = DraftTree(torch.tensor(tokens), parent_ids, mask, mask.sum(1) - 1, torch.zeros(len(tokens)))
    law = {}
    for choices in itertools.product(*[[x for x, px in enumerate(row) if px] for row in p]):
        result = accept(tree, torch.tensor(choices))
        path = result.path[: int(result.num_accepted) + 1].tolist()
        emitted = tuple(tokens[node] for node in path[1:]) + (int(result.bonus),)
        weight = Fraction(1)
        for node, x in enumerate(choices):
            weight *= p[node][x]
        law[emitted] = law.get(emitted, 0) + weight
    return law


def plain_step_law(tokens, parents, p):
    """Plain sampling from the root's context, token by token, up to the
    first token that is not a drafted child (where a step ends)."""
    law = {}

    def walk(node, emitted, weight):
        child_of = {tokens[c]: c for c in children_of(node, parents)}
        for x, px in enumerate(p[node]):
            if px and x in child_of:
                walk(child_of[x], emitted + (x,), weight * px)
            elif px:
                law[emitted + (x,)] = weight * px

    walk(0, (), Fraction(1))
    return law


def eagle_step_law(tokens, parents, p):
    """The reference's rule (formats.md) with its deterministic drafts, q = one-hot: children in draft order,
    child x accepted with probability min(1, p(x) / q(x)) = p(x), else p <- norm(max(p - q, 0)) (x zeroed);
    once all are rejected the bonus is drawn from what is left."""
    law = {}

    def walk(node, emitted, weight):
        left = list(p[node])
        for child in children_of(node, parents):
            x = tokens[child]
            accepted = left[x] / sum(left)
            if accepted:
                walk(child, emitted + (x,), weight * accepted)
            weight, left[x] = weight * (1 - accepted), 0
            if not weight:
                return
        for y, py in enumerate(left):
            if py:
                law[emitted + (y,)] = law.get(emitted + (y,), 0) + weight * py / sum(left)

    walk(0, (), Fraction(1))
    return law


def random_step(seed, size=7, vocab=3):
    """A random tree (distinct tokens among siblings, as top-k drafts are) and node distributions with zeros."""
    g = torch.Generator().manual_seed(seed)
    tokens, parents = [int(torch.randint(vocab, (), generator=g))], [0]
    while len(tokens) < size:
        parent = int(torch.randint(len(tokens), (), generator=g))
        free = sorted(set(range(vocab)) - {tokens[c] for c in children_of(parent, parents)})
        if free:
            tokens.append(free[int(torch.randint(len(free), (), generator=g))])
            parents.append(parent)
    weights = torch.randint(0, 4, (size, vocab), generator=g)
    weights[:, 0] += weights.sum(1) == 0
    return tokens, parents, [[Fraction(int(w), int(row.sum())) for w in row] for row in weights]


# Root (token 2) with children 0, 1, 3; token 1 and token 0 drafted again deeper (other contexts); node 5's token
# has target probability 0, node 7's probability 1 (p[2]); node 3 is a leaf; the root's own token has p 0.
HAND_TREE = ([2, 0, 1, 3, 1, 2, 0, 3], [0, 0, 0, 0, 1, 1, 4, 2],
             [[Fraction(n, d) for n, d in row] for row in [
                 [(1, 2), (1, 4), (0, 1), (1, 4)], [(1, 6), (1, 2), (0, 1), (1, 3)], [(0, 1), (0, 1), (0, 1), (1, 1)],
                 [(1, 4)] * 4, [(1, 2), (1, 8), (1, 8), (1, 4)], [(1, 3), (0, 1), (1, 3), (1, 3)],
                 [(2, 5), (3, 5), (0, 1), (0, 1)], [(1, 10), (2, 10), (3, 10), (4, 10)]]])


@pytest.mark.parametrize("step", [HAND_TREE, random_step(0), random_step(1), random_step(2)],
                         ids=["hand", "random0", "random1", "random2"])
def test_one_verification_step_has_exactly_the_law_of_plain_sampling(step):
    """Exact, not statistical: the law of the tokens a step emits, from
    `accept` over every combination of the target's draws at the nodes,
    equals (as fractions) the law of plain sampling up to the first token
    that is not drafted, and that of the reference's try-children-in-order
    rule with residual distributions. So its first token follows p at the
    root and each next one p at its parent's node, whatever the drafts."""
    tokens, parents, p = step
    law = engine_step_law(tokens, parents, p)
    assert sum(law.values()) == 1
    assert law == plain_step_law(tokens, parents, p) == eagle_step_law(tokens, parents, p)
    first = [sum(w for emitted, w in law.items() if emitted[0] == x) for x in range(len(p[0]))]
    assert first == p[0]
    assert max(len(emitted) for emitted in law) >= 3  # drafts accepted two deep


class PositionNoise:
    """Stands in for choose_tokens and accept: the target's draw for the i-th
    new token of a generation is argmax(p / E_i), the exponential race with
    noise E_i fixed by (seed, i). Plain decoding with it samples exactly (one
    independent E_i per token); a speculative step draws at a node of depth
    d with E_{produced + d}, the noise plain decoding uses for that token."""

    def __init__(self, seed: int, params: SamplingParams):
        self.seed, self.params = seed, params
        self.produced = self.accepted = self.accepted_off_argmax = 0
        self.logits = None

    def draw(self, logits, indices):
        noise = torch.stack([torch.empty(logits.shape[-1]).exponential_(
            generator=torch.Generator().manual_seed(self.seed * 100003 + int(i))) for i in indices])
        return (target_probs(logits, self.params) / noise).argmax(-1)

    def choose_tokens(self, logits, params, generator=None):
        assert params == self.params
        if logits.shape[0] == 1:  # the prefill or a plain step
            self.produced += 1
            return self.draw(logits, [self.produced - 1])
        self.logits = logits  # a tree: drawn in accept, which knows the depths
        return torch.zeros(logits.shape[0], dtype=torch.long)

    def accept(self, tree, _choices):
        choices = self.draw(self.logits, self.produced + tree.depths)
        result = accept(tree, choices)
        n = int(result.num_accepted)
        drafted = result.path[1 : n + 1]  # the accepted drafts, each the draw at its parent
        self.accepted += n
        self.accepted_off_argmax += int((tree.tokens[drafted] != self.logits[tree.parents[drafted]].argmax(-1)).sum())
        self.produced += n + 1
        return result


@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(0.7, 0.8), SamplingParams(2.0, 0.0, 4)],
                         ids=["temperature", "top_p", "top_k"])
def test_speculative_sampling_emits_what_plain_sampling_draws_for_every_noise(model, params, monkeypatch):
    """The multi-step joint law, exactly, by coupling: with the target's draws
    fixed per new-token index (PositionNoise), speculative decoding must emit
    token for token what plain decoding emits, for every seed, also where
    max_length cuts the trees short or a stop token ends the answer inside an
    accepted branch. As plain decoding then samples exactly, and choose_tokens
    draws each node independently (tested above), the speculative law is the
    plain one over whole answers, not only over the first tokens the
    chi-square test sees. Drafts that are not the target's argmax are
    accepted too (sampling walks branches greedy decoding never takes)."""
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    deep = EaModel(model.base_model, model.ea_layer, None, total_token=16, depth=4, top_k=3)
    totals = {"accepted": 0, "off_argmax": 0, "stopped": 0, "stopped_inside_a_branch": 0}
    answer: list[int] = []  # the last answer (seed % 3 == 2 reads it: two answers on, so it is set)
    for seed in range(9):
        options = dict(max_new_tokens=24)
        if seed % 3 == 1:  # trees cut short where the context ends, then one-token steps
            options = dict(max_new_tokens=40, max_length=26)
        elif seed % 3 == 2:  # a token the last answer held, so that answers do stop
            options = dict(max_new_tokens=24, stop_token_ids=[answer[12]])
        outputs = []
        for engine, run in ((model, model.eagenerate), (deep, deep.eagenerate), (model, model.naivegenerate)):
            noise = PositionNoise(seed, params)
            monkeypatch.setattr(generation, "choose_tokens", noise.choose_tokens)
            monkeypatch.setattr(generation, "accept", noise.accept)
            outputs.append(run(prompt, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                               **options)[0].tolist())
            totals["accepted"] += noise.accepted
            totals["off_argmax"] += noise.accepted_off_argmax
            last = engine.last_stats.steps[-1]
            totals["stopped"] += last.finish_reason == "stop"
            totals["stopped_inside_a_branch"] += last.finish_reason == "stop" and len(last.tokens) <= last.num_accepted
        assert outputs[0] == outputs[1] == outputs[2], seed
        answer = outputs[2]  # (26 tokens long)
    assert totals["accepted"] > 60 and totals["off_argmax"] > 5, totals
    assert totals["stopped"] >= 3 and totals["stopped_inside_a_branch"] >= 1, totals
