"""The draft tree against brute force.

The brute-force builder below follows formats.md literally with Python loops:
it runs the head along each branch one token at a time (no tree attention),
keeps the global top_k of every level, then picks the best total_token - 1
candidates and walks parent pointers for the mask, depths and leaf paths.
"""

import pytest
import torch

from eagle_gto.drafter import Drafter, vocab_chunk, vocab_top_k
from eagle_gto.kv_cache import KVBuffer
from eagle_gto.tiny import base_config, head_config, random_head
from eagle_gto.tree import check_tree_params, select_tree


def run_branch(head, features, tokens, branch):
    """Head output after the prefix and then `branch` (tokens), fed one at a
    time with the head's own output as the next hidden state."""
    caches = [KVBuffer(256) for _ in range(head.num_layers)]
    drafter = Drafter(head, 256)
    drafter.caches = caches
    out = drafter.extend(features, tokens)
    for i, token in enumerate(branch):
        pos = torch.tensor([[caches[0].length]])
        mask = torch.ones(1, 1, 1, caches[0].length + 1, dtype=torch.bool)
        out = head(out[None, None], torch.tensor([[token]]), pos, mask, caches)[0, -1]
    return out


def brute_force_candidates(head, features, tokens, depth, top_k):
    """Returns a list of (token, score, parent_candidate_number_or_-1)."""
    def children(branch):
        out = run_branch(head, features, tokens, branch)
        logp = torch.log_softmax(head.draft_logits(out[None]).float(), -1)[0]
        p, ids = logp.topk(top_k)
        return [(int(head.to_target_ids(i)), float(v)) for i, v in zip(ids, p)]

    cands = []  # (token, score, parent, branch)
    for tok, lp in children([]):
        cands.append((tok, lp, -1, [tok]))
    frontier = list(range(top_k))
    for _ in range(depth):
        level = []
        for number in frontier:
            tok0, score0, _, branch = cands[number]
            for tok, lp in children(branch):
                level.append((tok, score0 + lp, number, branch + [tok]))
        start = len(cands)
        cands.extend(level)
        scores = torch.tensor([c[1] for c in level])
        frontier = [start + int(i) for i in scores.topk(top_k).indices]
    return cands


def brute_force_select(cands, root, total_token):
    order = sorted(range(len(cands)), key=lambda i: (-cands[i][1], i))[: total_token - 1]
    kept = sorted(order)
    node_of = {c: n + 1 for n, c in enumerate(kept)}
    parents = [0] + [node_of.get(cands[c][2], 0) if cands[c][2] >= 0 else 0 for c in kept]
    T = len(parents)
    mask = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        j = i
        mask[i, j] = True
        while j != 0:
            j = parents[j]
            mask[i, j] = True
    tokens = [root] + [cands[c][0] for c in kept]
    depths = mask.sum(1) - 1
    leaves = [i for i in range(T) if i not in parents[1:]]
    paths = []
    for leaf in leaves:
        path, j = [leaf], leaf
        while j != 0:
            j = parents[j]
            path.append(j)
        paths.append(path[::-1])
    width = int(depths.max()) + 1
    retrieve = torch.tensor([p + [-1] * (width - len(p)) for p in paths])
    return tokens, parents, mask, depths, retrieve


@pytest.mark.parametrize("kind,total_token,depth,top_k", [
    ("eagle3", 20, 4, 4), ("eagle1", 12, 3, 3), ("eagle3", 60, 5, 5), ("eagle3", 5, 2, 2),
    # extremes: one draft token; top_k 1; every candidate kept; top_k the whole draft vocabulary
    ("eagle3", 2, 1, 1), ("eagle3", 6, 5, 1), ("eagle1", 7, 1, 2), ("eagle3", 41, 1, 40),
])
def test_draft_tree_matches_brute_force(kind, total_token, depth, top_k):
    torch.manual_seed(3)
    base = base_config("llama", vocab_size=50, hidden_size=32, num_heads=4, num_kv_heads=2)
    cfg = head_config(base, kind, draft_vocab_size=40 if kind == "eagle3" else None)
    head = random_head(cfg, seed=1, token_counts=torch.rand(50))
    # Large weights make the head's distributions peaky and branch-dependent.
    for p in head.parameters():
        p.data.mul_(20)
    head.attach_embedding(torch.randn(50, 32))
    if kind == "eagle1":
        head.attach_lm_head(torch.nn.Linear(32, 50, bias=False).requires_grad_(False))
    feat_dim = 3 * 32 if kind == "eagle3" else 32
    features = torch.randn(7, feat_dim)
    tokens = torch.randint(0, 50, (7,))
    root = int(tokens[-1])

    drafter = Drafter(head, 512)
    last = drafter.extend(features, tokens)
    tree = drafter.draft_tree(last, torch.tensor(root), total_token, depth, top_k)
    assert drafter.length == 7  # scratch entries dropped

    cands = brute_force_candidates(head, features, tokens, depth, top_k)
    exp_tokens, exp_parents, exp_mask, exp_depths, exp_retrieve = brute_force_select(cands, root, total_token)
    assert tree.tokens.tolist() == exp_tokens
    assert tree.parents.tolist() == exp_parents
    assert torch.equal(tree.mask, exp_mask)
    assert tree.depths.tolist() == exp_depths.tolist()
    assert torch.equal(tree.retrieve_indices(), exp_retrieve)
    assert tree.size == total_token
    # The scores too: a frontier entry attending to another branch's entries can leave the tokens' ranking
    # (all the rest checks) as it was, and only its log-probs show it.
    kept = sorted(sorted(range(len(cands)), key=lambda i: (-cands[i][1], i))[: total_token - 1])
    torch.testing.assert_close(tree.scores, torch.tensor([0.0] + [cands[c][1] for c in kept]), atol=1e-4, rtol=1e-4)


def random_candidates(depth, top_k, seed, quantize=False, nan_branch=False):
    """Candidate arrays with the expansion's structure: level 0 has top_k
    children of the root, each later level top_k children of each of the
    previous level's top_k frontier nodes. `nan_branch`: the first frontier
    node's draft log-probs are NaN (overflowed logits), so are all its
    descendants', and topk takes NaN first into the next frontiers."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(top_k, generator=g) * 3
    if quantize:  # exact ties, including log-prob 0 (a child scoring as high as its parent)
        logp = (logp * 2).round() / 2
    tokens = [torch.randint(0, 100, (top_k,), generator=g)]
    scores, parents = [logp], [torch.zeros(top_k, dtype=torch.long)]
    frontier, f_scores, offset = torch.arange(top_k), logp, top_k
    for _ in range(depth):
        lp = -torch.rand(top_k, top_k, generator=g) * 3
        if quantize:
            lp = (lp * 2).round() / 2
        if nan_branch and offset == top_k:
            lp[0] = float("nan")
        cum = (f_scores[:, None] + lp).flatten()
        tokens.append(torch.randint(0, 100, (top_k * top_k,), generator=g))
        scores.append(cum)
        parents.append((frontier + 1).repeat_interleave(top_k))
        f_scores, best = cum.topk(top_k)
        frontier = offset + best
        offset += top_k * top_k
    return torch.cat(tokens), torch.cat(scores), torch.cat(parents)


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_select_tree_matches_brute_force(seed, quantize):
    depth, top_k, total_token = 4, 3, 16
    tokens, scores, parents = random_candidates(depth, top_k, seed, quantize)
    tree = select_tree(torch.tensor(7), tokens, scores, parents, total_token, depth + 1)
    cands = [(int(t), float(s), int(p) - 1) for t, s, p in zip(tokens, scores, parents)]
    exp_tokens, exp_parents, exp_mask, exp_depths, exp_retrieve = brute_force_select(cands, 7, total_token)
    assert tree.tokens.tolist() == exp_tokens
    assert tree.parents.tolist() == exp_parents
    assert torch.equal(tree.mask, exp_mask)
    assert torch.equal(tree.depths, exp_depths)
    assert torch.equal(tree.retrieve_indices(), exp_retrieve)
    # Every kept node's parent is kept (closure), even with exact ties.
    assert all(p < i for i, p in enumerate(tree.parents.tolist()) if i > 0)


@pytest.mark.parametrize("seed", range(3))
def test_nan_scores_rank_as_minus_infinity_and_the_tree_stays_closed(seed):
    """Sorted first, as torch sorts NaN, NaN candidates were kept without
    their parent: a node became its own parent, its mask row lacked the root."""
    depth, top_k = 3, 3
    tokens, scores, parents = random_candidates(depth, top_k, seed, nan_branch=True)
    assert scores.isnan().sum() > top_k  # the branch and its descendants
    cands = [(int(t), float("-inf") if s != s else float(s), int(p) - 1) for t, s, p in zip(tokens, scores, parents)]
    for total_token in (4, 20, len(cands) + 1):
        tree = select_tree(torch.tensor(7), tokens, scores, parents, total_token, depth + 1)
        exp_tokens, exp_parents, exp_mask, _, _ = brute_force_select(cands, 7, total_token)
        assert tree.tokens.tolist() == exp_tokens and tree.parents.tolist() == exp_parents
        assert torch.equal(tree.mask, exp_mask)
        assert all(p < i for i, p in enumerate(tree.parents.tolist()) if i > 0)
        assert bool(tree.mask[:, 0].all())


def test_tree_params_are_checked():
    with pytest.raises(ValueError, match="candidates"):
        check_tree_params(100, 2, 3)
    with pytest.raises(ValueError, match=">= 1"):
        check_tree_params(10, 0, 3)
    with pytest.raises(ValueError, match=">= 2"):
        check_tree_params(1, 3, 3)
    with pytest.raises(ValueError, match=r"top_k=5 is larger than the draft head's vocabulary \(4 tokens\)"):
        check_tree_params(10, 2, 5, draft_vocab_size=4)
    check_tree_params(10, 2, 4, draft_vocab_size=4)
    # At the boundary: 3 + 2 * 9 = 21 candidates fill a tree of 22 nodes exactly; one node more does not fit.
    check_tree_params(22, 2, 3)
    with pytest.raises(ValueError, match="needs 22 draft nodes"):
        check_tree_params(23, 2, 3)


@pytest.mark.parametrize("vocab", [32000, 128256, 1000, 97, 12])
@pytest.mark.parametrize("rows", [(), (1,), (10,)])
def test_vocab_top_k_matches_torch_topk(vocab, rows):
    # distinct values: the same values and indices, in the same order
    gen = torch.Generator().manual_seed(vocab)
    x = torch.randperm(vocab * torch.Size(rows).numel(), generator=gen).float().reshape(*rows, vocab)
    values, ids = vocab_top_k(x, 10, vocab_chunk(vocab))
    expected = x.topk(10)
    assert torch.equal(values, expected.values) and torch.equal(ids, expected.indices)


def test_vocab_top_k_with_ties_keeps_the_top_values():
    x = torch.randint(0, 4, (10, 4000), generator=torch.Generator().manual_seed(0)).float()
    values, ids = vocab_top_k(x, 10, vocab_chunk(4000))
    assert torch.equal(values, x.topk(10).values)
    assert torch.equal(x.gather(1, ids), values)
    assert all(len(set(row)) == 10 for row in ids.tolist())  # ten different entries


def test_vocab_chunk_is_the_largest_fitting_divisor():
    for vocab in range(2, 6000):
        fitting = [c for c in range(2, 2561) if vocab % c == 0 and vocab // c >= 2]
        assert vocab_chunk(vocab) == max(fitting, default=1)
    assert [vocab_chunk(v) for v in (32000, 128256, 151936, 152064)] == [2000, 2004, 2374, 2376]


def brute_force_accept(tokens, parents, choices):
    """Walk from the root to the child whose token is the target's choice at
    the current node, while there is one; the last choice is the bonus."""
    node, path = 0, [0]
    while True:
        child = next((c for c in range(1, len(tokens)) if parents[c] == node and tokens[c] == choices[node]), None)
        if child is None:
            return path, choices[node]
        node = child
        path.append(node)


@pytest.mark.parametrize("seed", range(4))
def test_accept_matches_brute_force(seed):
    """The accepted branch, its length and the bonus token, against a walk
    down the tree. Choices are drawn mostly from each node's children, so long
    branches are accepted, and the root's own token is unrelated to the choice
    at the root (the root is the target's token: it needs no match)."""
    from eagle_gto.acceptance import accept

    depth, top_k, total_token = 4, 3, 16
    tokens, scores, parents = random_candidates(depth, top_k, seed)
    tree = select_tree(torch.tensor(200), tokens, scores, parents, total_token, depth + 1)
    T, toks, pars = tree.size, tree.tokens.tolist(), tree.parents.tolist()
    g = torch.Generator().manual_seed(seed)
    lengths = set()
    for _ in range(200):
        choices = torch.randint(0, 100, (T,), generator=g)
        for node in range(T):
            children = [c for c in range(1, T) if pars[c] == node]
            if children and float(torch.rand((), generator=g)) < 0.8:
                choices[node] = toks[children[int(torch.randint(0, len(children), (1,), generator=g))]]
        path, bonus = brute_force_accept(toks, pars, choices.tolist())
        result = accept(tree, choices)
        assert result.path.tolist() == path + [T] * (T - len(path))
        assert int(result.num_accepted) == len(path) - 1 and int(result.bonus) == bonus
        lengths.add(len(path) - 1)
    assert 0 in lengths and max(lengths) >= 3  # rejections and long branches both occurred


@pytest.mark.parametrize("kind", ["eagle3", "eagle1"])
def test_head_state_after_speculative_steps_equals_one_causal_pass(kind):
    """After prefill and speculative steps (trees drafted, branches accepted
    and fed back), the draft head's cache and its last output are those of one
    plain causal head pass over the whole sequence: entry j reads the target's
    feature at j and the token at j + 1. Drafting mistakes here are lossless,
    so the greedy tests only see them as fewer accepted tokens."""
    from tiny_pairs import VOCAB, trained_pair

    from eagle_gto.acceptance import SamplingParams

    model = trained_pair("llama", kind)
    prompt = torch.randint(0, VOCAB, (9,), generator=torch.Generator().manual_seed(5))
    with model._exclusive():
        decoder = model._decoder(128, SamplingParams(), True, None)
        seq = prompt.tolist() + [decoder.prefill(prompt)]
        accepted = []
        for _ in range(10):
            tokens, num_accepted = decoder.step()
            seq += tokens
            accepted.append(num_accepted)
    n = len(seq) - 1  # cached positions; the last token follows them
    assert int(decoder.state.past) == n and max(accepted) >= 2 and min(accepted) < max(accepted)
    ids, causal = torch.tensor(seq), torch.ones(n, n, dtype=torch.bool).tril()
    runner, head = model._target, model.ea_layer
    _, features = runner.forward(ids[:-1], torch.arange(n), causal, runner.new_cache(n), features=True)
    caches = [KVBuffer(n) for _ in range(head.num_layers)]
    with torch.no_grad():
        out = head(head.project_features(features)[None], ids[1:][None], torch.arange(n)[None], causal[None, None],
                   caches)[0]
    torch.testing.assert_close(decoder.state.head_out, out[-1], atol=1e-4, rtol=1e-4)
    for mine, expected in zip(decoder.drafter.caches, caches):
        torch.testing.assert_close(mine.keys[:, :, :n], expected.keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(mine.values[:, :, :n], expected.values, atol=1e-4, rtol=1e-4)
