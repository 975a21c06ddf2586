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

import pytest
import torch
from scipy.stats import chisquare
from tiny_pairs import fit_head, make_base
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from eagle_gto import EaModel
from eagle_gto.acceptance import SamplingParams, choose_tokens, target_probs

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


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 0.0, 0), (0.5, 0.9, 0), (2.0, 0.0, 5), (0.8, 0.6, 3)])
def test_target_probs_match_transformers_warpers(temperature, top_p, top_k):
    """The processing order and semantics of the EAGLE reference (which uses
    these transformers warpers): temperature, then top-p, then top-k."""
    logits = torch.randn(4, 50) * 3
    expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if 0 < top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    if top_k > 0:
        expected = TopKLogitsWarper(top_k)(None, expected)
    got = target_probs(logits, SamplingParams(temperature, top_p, top_k))
    torch.testing.assert_close(got, expected.softmax(-1))


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
