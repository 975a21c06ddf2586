"""GTO fine-tuning: the tree reward, the batched trees it is computed on, the
group policy objective and a short end-to-end run (eagle_gto/gto)."""

import copy
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from tiny_pairs import VOCAB, trained_pair

from eagle_gto import EaModel
from eagle_gto.demo import demo_paths, measure
from eagle_gto.drafter import Drafter
from eagle_gto.gto import __main__ as gto_cli
from eagle_gto.gto import checkpoints as gto_checkpoints
from eagle_gto.gto import experiment, sweep
from eagle_gto.gto import trainer as gto_trainer
from eagle_gto.gto.__main__ import config_from, config_parser
from eagle_gto.gto.checkpoints import Checkpointing, load_checkpoint, run_options
from eagle_gto.gto.data import TokenStream, from_samples, generated_stream
from eagle_gto.gto.policy import (accepted_paths, clipped_surrogate, group_advantages, group_roots, path_logprob, ratio,
                                  root_eligible)
from eagle_gto.gto.reward import branch_values, tree_reward
from eagle_gto.gto.trainer import GTOConfig, Models, export_head, gto_objective, load_models, train, training_loss
from eagle_gto.gto.trees import Roots, draft_trees, head_pass, target_pass, verify_trees
from eagle_gto.loading import load_base
from eagle_gto.placement import attach_head
from eagle_gto.target import TargetRunner
from eagle_gto.train.checkpoints import CheckpointMismatch, checkpoint_dirs
from eagle_gto.train.data import Sample
from eagle_gto.train.features import target_outputs
from eagle_gto.tree import ancestor_mask
from eagle_gto.vocab import build_vocab_mapping

TREE = dict(total_token=24, depth=5, top_k=4)  # the tiny pair's decoding tree


# ----------------------------------------------------------------- reward
def random_tree(T: int, seed: int):
    """A random tree (parent index < child index) with random node probabilities."""
    g = torch.Generator().manual_seed(seed)
    parents = torch.zeros(T, dtype=torch.long)
    for i in range(1, T):
        parents[i] = int(torch.randint(0, i, (1,), generator=g))
    probs = torch.rand(T, generator=g, dtype=torch.float64) * 0.98 + 0.01
    return parents, probs


def enumerate_branches(parents, probs) -> list[float]:
    """L_{t,i} for every root-to-leaf branch, by walking each branch."""
    T = len(parents)
    leaves = [i for i in range(T) if i not in set(parents[1:].tolist())]
    values = []
    for leaf in leaves:
        branch, node = [], leaf
        while node != 0:
            branch.append(node)
            node = int(parents[node])
        branch.reverse()
        value, reach = 0.0, 1.0
        for node in branch:
            reach *= float(probs[node])
            value += reach
        values.append(value)
    return values


def tree_tensors(parents, probs):
    T = len(parents)
    mask = ancestor_mask(parents, T)[None]
    node_logp = probs.log().clone()
    node_logp[0] = 0.0
    is_parent = torch.zeros(T, dtype=torch.bool)
    is_parent[parents[1:]] = True
    return node_logp[None], mask, (~is_parent)[None]


@pytest.mark.parametrize("seed", range(5))
def test_reward_equals_branch_enumeration(seed):
    """Branch values and the three aggregations equal a direct walk of every
    root-to-leaf branch: L = sum_j prod_{k<=j} p_k."""
    parents, probs = random_tree(12 + seed, seed)
    node_logp, mask, leaves = tree_tensors(parents, probs)
    expected = enumerate_branches(parents, probs)
    got = branch_values(node_logp, mask)[leaves]
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64))
    for eta in (0.5, 1.0, 3.0):
        smooth = math.log(sum(math.exp(eta * v) for v in expected)) / eta
        assert tree_reward(node_logp, mask, leaves, "smoothmax", eta).item() == pytest.approx(smooth, rel=1e-9)
    assert tree_reward(node_logp, mask, leaves, "mean").item() == pytest.approx(sum(expected) / len(expected))
    assert tree_reward(node_logp, mask, leaves, "max").item() == pytest.approx(max(expected))


def test_smooth_max_limits():
    """(1/eta) log sum_i exp(eta L_i) tends to max_i L_i as eta grows (within
    log N / eta) and to mean_i L_i + log N / eta as eta shrinks (error O(eta))."""
    parents, probs = random_tree(20, seed=7)
    node_logp, mask, leaves = tree_tensors(parents, probs)
    values = enumerate_branches(parents, probs)
    n, top, mean = len(values), max(values), sum(values) / len(values)
    assert n > 3 and max(values) - min(values) > 0.1
    for eta in (1e2, 1e3, 1e4):
        r = tree_reward(node_logp, mask, leaves, "smoothmax", eta).item()
        assert top - 1e-12 <= r <= top + math.log(n) / eta + 1e-12
    spread = max(abs(v - mean) for v in values)
    for eta in (1e-2, 1e-3, 1e-4):
        r = tree_reward(node_logp, mask, leaves, "smoothmax", eta).item()
        assert abs(r - (mean + math.log(n) / eta)) <= eta * spread**2 + 1e-9
    r1 = tree_reward(node_logp, mask, leaves, "smoothmax", 1.0).item()
    assert top < r1  # eta = 1 is a soft maximum, above the hard one
    with pytest.raises(ValueError, match="eta must be > 0, got 0.0"):  # (1/eta) log sum exp(eta L) has no eta = 0
        tree_reward(node_logp, mask, leaves, "smoothmax", 0.0)


# --------------------------------------------------- trees of the engine
@pytest.fixture(scope="module")
def pair():
    return trained_pair("llama", "eagle3")


def greedy_windows(pair, count: int, length: int, seed: int) -> torch.Tensor:
    """Text the base model writes itself (greedy from random 4-token starts):
    the head drafts it well, so trees get deep accepted branches."""
    starts = torch.randint(0, VOCAB, (count, 4), generator=torch.Generator().manual_seed(seed))
    return pair.base_model.generate(starts, max_new_tokens=length - 4, min_new_tokens=length - 4, do_sample=False,
                                    attention_mask=torch.ones_like(starts), pad_token_id=0)


def decode_and_record(model, prompt, monkeypatch):
    """Greedy speculative decoding, recording (root position, tree) of every
    tree the engine drafts."""
    recorded = []
    original = Drafter.draft_tree

    def recording(self, last_out, root_token, total_token, depth, top_k, **options):
        tree = original(self, last_out, root_token, total_token, depth, top_k, **options)
        start = options.get("start")  # the prefix length when the engine passes it (default: self.length)
        recorded.append((self.length if start is None else int(start), tree))  # the root follows the prefix
        return tree

    monkeypatch.setattr(Drafter, "draft_tree", recording)
    out = model.eagenerate(prompt, max_new_tokens=40)
    monkeypatch.undo()
    return out[0], recorded


def test_training_trees_are_the_decoding_trees(pair, monkeypatch):
    """Batched drafting over a whole sequence reproduces, node for node, every
    tree the engine drafted while generating that sequence; the batched
    verification gives the engine's verification logits at every node."""
    g = torch.Generator().manual_seed(3)
    runner = TargetRunner(pair.base_model, pair._target.feature_layers)
    checked = 0
    for _ in range(3):
        prompt = torch.randint(0, VOCAB, (1, 6), generator=g)
        seq, recorded = decode_and_record(pair, prompt, monkeypatch)
        target = target_pass(pair.base_model, seq[None], pair._target.feature_layers)
        roots = Roots(torch.zeros(len(recorded), dtype=torch.long), torch.tensor([r for r, _ in recorded]))
        batch = draft_trees(pair.ea_layer, head_pass(pair.ea_layer, target), target, roots, **TREE)
        verdict = verify_trees(pair.base_model, target, roots, batch, chunk=5)
        for b, (r, tree) in enumerate(recorded):
            assert torch.equal(batch.tokens[b], tree.tokens) and torch.equal(batch.parents[b], tree.parents)
            assert torch.equal(batch.mask[b], tree.mask)
            assert torch.allclose(batch.scores[b], tree.scores, atol=1e-4)
            # the engine's verification forward of this tree after its prefix
            cache = runner.new_cache(r + tree.size)
            runner.forward(seq[:r], torch.arange(r), torch.ones(r, r).tril().bool(), cache)
            visible = torch.cat((torch.ones(tree.size, r, dtype=torch.bool), tree.mask), dim=1)
            logits, _ = runner.forward(tree.tokens, r + tree.depths, visible, cache)
            logp = torch.log_softmax(logits, dim=-1)
            expected = logp[tree.parents, tree.tokens]
            assert torch.allclose(verdict.node_logp[b, 1:], expected[1:], atol=1e-4)
            assert torch.equal(verdict.choices[b], logits.argmax(-1))
            checked += 1
    assert checked > 10


def test_training_trees_break_ties_as_the_engine_does(pair):
    """A head whose draft tokens come in groups of 8 with equal logits: every
    level of the expansion meets exact ties, and the engine's top-k
    (`vocab_top_k`, two rounds over vocabulary chunks) orders tied tokens
    differently from torch.topk. The training trees must still be the
    engine's, node for node (else GTO scores trees decoding never drafts)."""
    head = copy.deepcopy(pair.ea_layer)
    attach_head(pair.base_model, head)
    with torch.no_grad():
        weight = head.lm_head.weight
        weight.copy_(weight[:8].repeat(weight.shape[0] // 8, 1))
    seq = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(0))
    target = target_pass(pair.base_model, seq, pair._target.feature_layers)
    roots = Roots(torch.zeros(4, dtype=torch.long), torch.tensor([1, 7, 15, 28]))
    batch = draft_trees(head, head_pass(head, target), target, roots, **TREE)
    for b, r in enumerate(roots.pos.tolist()):
        drafter = Drafter(head, 64)
        last = drafter.extend(target.features[0, :r], seq[0, 1 : r + 1])
        tree = drafter.draft_tree(last, seq[0, r], **TREE)
        assert torch.equal(batch.tokens[b], tree.tokens) and torch.equal(batch.parents[b], tree.parents)


def test_verdict_choices_are_the_argmax_of_the_logits(pair, monkeypatch):
    """The greedy choice at each node is the engine's: the argmax of the
    target's logits. Logits whose top two differ by one float32 ulp (1.0 and
    the next float) come out of log_softmax equal here, so an argmax of the
    log-probs took token 0 where the engine takes token 1."""
    from eagle_gto.gto import trees as gto_trees

    top = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    assert torch.log_softmax(torch.cat((torch.tensor([1.0, top]), torch.zeros(VOCAB - 2))), 0).argmax() == 0

    def near_tie(lm_head_output, config):
        logits = torch.zeros_like(lm_head_output)
        logits[..., 0], logits[..., 1] = 1.0, top
        return logits

    seq = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
    target = target_pass(pair.base_model, seq, pair._target.feature_layers)
    roots = Roots(torch.zeros(2, dtype=torch.long), torch.tensor([5, 12]))
    trees = draft_trees(pair.ea_layer, head_pass(pair.ea_layer, target), target, roots, **TREE)
    monkeypatch.setattr(gto_trees, "model_logits", near_tie)
    verdict = verify_trees(pair.base_model, target, roots, trees)
    assert (verdict.choices == 1).all()


def test_target_features_match_the_trainer(pair):
    """GTO's target pass gives the EAGLE-3 trainer's features and logits."""
    seqs = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(0))
    mine = target_pass(pair.base_model, seqs, pair._target.feature_layers)
    theirs = target_outputs(pair.base_model, seqs)
    assert torch.allclose(mine.features, theirs.features, atol=1e-5)
    assert torch.allclose(mine.logits, theirs.logits, atol=1e-4)


def test_teacher_forced_branch_logprob_equals_the_tree_score(pair):
    """log M(Ŝ) recomputed along the accepted branch equals the cumulative
    draft score the tree expansion gave its last node."""
    seqs = greedy_windows(pair, 2, 40, seed=1)
    head, base = pair.ea_layer, pair.base_model
    target = target_pass(base, seqs, pair._target.feature_layers)
    roots = group_roots(torch.ones(2, 40, dtype=torch.bool), 4, 3, torch.Generator().manual_seed(0))
    state = head_pass(head, target)
    trees = draft_trees(head, state, target, roots, **TREE)
    verdict = verify_trees(base, target, roots, trees)
    tokens, lengths = accepted_paths(trees, verdict.choices)
    assert lengths.max() >= 2  # some branches are accepted deep
    logp = path_logprob(head, state, roots, tokens, lengths)
    for b, tree in enumerate(trees.trees):
        node = 0
        for token in tokens[b, : lengths[b]]:
            children = ((tree.parents == node) & (tree.tokens == token)).nonzero().flatten()
            node = int(children[children > 0][0])
        assert logp[b].item() == pytest.approx(tree.scores[node].item(), abs=1e-4)


def test_branch_logprob_follows_d2t_when_draft_ids_are_not_in_target_order(pair):
    """The pair's head with its draft ids permuted (lm_head rows and d2t
    together: a checkpoint the loader accepts) drafts the same trees and must
    give the same log M(Ŝ): the tokens are mapped to draft ids through d2t,
    not through t2d's ascending order."""
    head, base = pair.ea_layer, pair.base_model
    other = copy.deepcopy(head)
    attach_head(base, other)
    draft = torch.arange(head.config.draft_vocab_size)
    perm = torch.randperm(len(draft), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        other.lm_head.weight.copy_(head.lm_head.weight[perm])
        other.d2t.copy_((draft + head.d2t)[perm] - draft)
    seqs = greedy_windows(pair, 2, 40, seed=1)
    target = target_pass(base, seqs, pair._target.feature_layers)
    roots = group_roots(torch.ones(2, 40, dtype=torch.bool), 4, 3, torch.Generator().manual_seed(0))
    state = head_pass(head, target)
    trees = draft_trees(head, state, target, roots, **TREE)
    assert torch.equal(draft_trees(other, head_pass(other, target), target, roots, **TREE).tokens, trees.tokens)
    tokens, lengths = accepted_paths(trees, verify_trees(base, target, roots, trees).choices)
    assert lengths.max() >= 2
    want = path_logprob(head, state, roots, tokens, lengths)
    got = path_logprob(other, head_pass(other, target), roots, tokens, lengths)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------- policy
def test_group_roots_are_adjacent_and_eligible():
    eligible = torch.ones(3, 50, dtype=torch.bool)
    eligible[1, 20:] = False  # e.g. a prompt: no loss there
    roots = group_roots(eligible, 4, 5, torch.Generator().manual_seed(0))
    groups = roots.pos.reshape(-1, 4)
    assert torch.equal(groups - groups[:, :1], torch.arange(4).expand_as(groups))  # m adjacent positions
    assert torch.equal(roots.seq.reshape(-1, 4), roots.seq.reshape(-1, 4)[:, :1].expand(-1, 4))  # one window
    assert len(set(map(tuple, torch.stack((roots.seq, roots.pos), 1).tolist()))) == len(roots)  # no overlap
    assert eligible[roots.seq, roots.pos].all() and roots.pos.min() >= 1
    assert (roots.seq == 1).sum() == 16  # only 4 whole groups fit in window 1's 19 eligible roots
    assert (roots.seq == 0).sum() == (roots.seq == 2).sum() == 20  # 5 of the 12 groups that fit, as asked


def test_roots_draft_trained_tokens_and_windows_without_a_group_train_tokens_only(pair):
    # A tree at position r drafts tokens r+1, r+2, ...: r is a root when token r+1 is trained.
    mask = torch.tensor([[0, 0, 1, 1, 1, 0]])
    assert root_eligible(mask).tolist() == [[False, True, True, True, False, False]]
    mask = torch.zeros(2, 40, dtype=torch.long)
    mask[:, ::3] = 1  # short answers: trained tokens, but never 4 adjacent roots
    assert len(group_roots(root_eligible(mask), 4, 3)) == 0
    tokens = greedy_windows(pair, 2, 40, seed=3)
    loss, stats = training_loss(GTOConfig(**TREE), tiny_models(pair), tokens, mask, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and "l_token" in stats and "l_gto" not in stats


def test_advantages_are_standardised_per_group():
    rewards = torch.randn(6, 4, dtype=torch.float64) * torch.tensor([[0.1], [1], [5], [0.01], [2], [3]]) + 7
    rewards[3] = 1.5  # a group whose trees all score the same: no preference
    adv = group_advantages(rewards.flatten(), 4, delta=1e-6).reshape(6, 4)
    assert torch.allclose(adv.mean(dim=1), torch.zeros(6, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(adv[[0, 1, 2, 4, 5]].std(dim=1, correction=0), torch.ones(5, dtype=torch.float64), atol=1e-4)
    assert torch.equal(adv[3], torch.zeros(4, dtype=torch.float64))
    for g in (0, 1, 2, 4, 5):
        assert torch.equal(adv[g].argsort(), rewards[g].argsort())


def test_clipping_for_positive_and_negative_advantages():
    """min(s A, clip(s) A): a positive advantage stops pushing s up past
    1+eps, a negative one stops pushing it down past 1-eps; on the other side
    the unclipped term is kept (the pessimistic bound)."""
    eps = 0.2
    s = torch.tensor([0.5, 0.9, 1.1, 1.5, 0.5, 0.9, 1.1, 1.5], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0])
    loss = clipped_surrogate(s, adv, eps)
    kept = torch.tensor([0.5, 0.9, 1.1, 1.2, -0.8, -0.9, -1.1, -1.5])
    assert loss.item() == pytest.approx(-kept.mean().item())
    loss.backward()
    live = torch.tensor([1.0, 1, 1, 0, 0, 1, 1, 1])  # clipped entries get no gradient
    assert torch.allclose(s.grad, -adv * live / len(s))
    # A group whose trees all score the same (A = 0) still counts in the mean: L_GTO averages over every row.
    tied = clipped_surrogate(torch.cat((s.detach(), torch.ones(8))), torch.cat((adv, torch.zeros(8))), eps)
    assert tied.item() == pytest.approx(-kept.mean().item() / 2)


def test_ratio_is_per_token():
    logp_new = torch.tensor([-1.0, -2.0, 0.0])
    logp_ref = torch.tensor([-2.0, -2.5, 0.0])
    lengths = torch.tensor([4, 1, 0])
    assert torch.allclose(ratio(logp_new, logp_ref, lengths), torch.exp(torch.tensor([0.25, 0.5, 0.0])))


def tiny_models(pair, perturb: float = 0.0):
    """A trainable copy M of the pair's head and a frozen copy M0 (M optionally nudged away from M0)."""
    head = copy.deepcopy(pair.ea_layer).float().train().requires_grad_(True)
    reference = copy.deepcopy(pair.ea_layer).float().eval()
    attach_head(pair.base_model, head)
    attach_head(pair.base_model, reference)
    if perturb:
        torch.manual_seed(5)
        with torch.no_grad():
            for p in head.parameters():
                p.add_(perturb * p.abs().mean() * torch.randn_like(p))
    return Models(pair.base_model, head, reference, None, pair._target.feature_layers)


def test_validation_trees_are_rooted_where_the_model_writes(pair):
    """The engine drafts only what the model writes: on chat data, validation
    roots are the stride positions whose next token carries loss (an answer),
    never inside a prompt; plain text (all loss) keeps every stride position
    whose next token is in the window."""
    models = tiny_models(pair)
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 40, dtype=torch.long)
    mask[0, 20:] = 1  # window 0: a prompt, then an answer; window 1: all prompt
    chat = gto_trainer.Validator(models, tokens, 64, mask)
    assert chat.roots.seq.tolist() == [0, 0] and chat.roots.pos.tolist() == [24, 32]
    plain = gto_trainer.Validator(models, tokens, 64)
    assert plain.roots.seq.tolist() == [0] * 4 + [1] * 4 and plain.roots.pos.tolist() == [8, 16, 24, 32] * 2
    assert 0 < chat(models.head)["val_tau"] <= 8
    with pytest.raises(ValueError, match="no trained tokens"):
        gto_trainer.Validator(models, tokens, 64, torch.zeros_like(mask))


def test_gradients_reach_m_only_through_the_ratio(pair):
    """The gradient of L_GTO w.r.t. M is exactly the clipped-PPO policy
    gradient -(1/B) sum_i A_i s_i 1[unclipped] d/dθ log M(Ŝ_i) / max(l_i, 1):
    nothing flows through the rewards, the advantages, the trees or M0."""
    models = tiny_models(pair, perturb=0.05)
    cfg = GTOConfig(group_size=4, eps=0.2, **TREE)
    seqs = greedy_windows(pair, 2, 40, seed=5)
    target = target_pass(models.base, seqs, models.feature_layers)
    roots = group_roots(torch.ones(2, 40, dtype=torch.bool), 4, 2, torch.Generator().manual_seed(2))
    result = gto_objective(cfg, models, target, roots)
    assert not (result.rewards.requires_grad or result.advantages.requires_grad)
    assert result.advantages.abs().sum() > 0 and result.lengths.max() >= 3  # branches several steps deep
    assert not any(p.requires_grad for p in models.reference.parameters())
    params = [p for p in models.head.parameters() if p.requires_grad]
    got = torch.autograd.grad(result.loss, params, allow_unused=True)
    # the expected gradient, from log M(Ŝ_i) alone
    tokens, lengths = accepted_paths(draft_trees(models.head, head_pass(models.head, target).detach(), target,
                                                 roots, **TREE), target_verdict(models, target, roots))
    assert torch.equal(lengths, result.lengths)
    logp = path_logprob(models.head, head_pass(models.head, target), roots, tokens, lengths)
    s = result.s.detach()
    live = ((result.advantages > 0) & (s < 1 + cfg.eps)) | ((result.advantages < 0) & (s > 1 - cfg.eps))
    weights = -result.advantages * s * live / lengths.clamp_min(1) / len(roots)
    expected = torch.autograd.grad((weights * logp).sum(), params, allow_unused=True)
    nonzero = 0
    for g, e in zip(got, expected):
        g = torch.zeros_like(e) if g is None else g
        assert torch.allclose(g, e, atol=1e-6, rtol=1e-4)
        nonzero += int(g.abs().sum() > 0)
    assert nonzero > 3


def target_verdict(models, target, roots):
    trees = draft_trees(models.head, head_pass(models.head, target).detach(), target, roots, **TREE)
    return verify_trees(models.base, target, roots, trees).choices


def test_identical_heads_give_zero_debiased_advantage(pair):
    """With M = M0 the trees coincide: R_i = 0, A_i = 0, s_i = 1. Without
    debiasing the raw rewards are standardised instead."""
    models = tiny_models(pair)
    seqs = greedy_windows(pair, 1, 40, seed=6)
    target = target_pass(models.base, seqs, models.feature_layers)
    roots = group_roots(torch.ones(1, 40, dtype=torch.bool), 4, 3, torch.Generator().manual_seed(0))
    result = gto_objective(GTOConfig(**TREE), models, target, roots)
    assert torch.equal(result.rewards, result.ref_rewards)
    assert torch.equal(result.advantages, torch.zeros_like(result.advantages))
    assert torch.allclose(result.s, torch.ones_like(result.s))
    plain = gto_objective(GTOConfig(debias=False, **TREE), models, target, roots)
    assert plain.advantages.abs().sum() > 0


def test_objective_scores_each_heads_own_trees_and_debiases_by_the_reference(pair):
    """gto_objective against the method's definitions, computed apart: R(T_i)
    and R(T̄_i) by walking every root-to-leaf branch of M's and M0's own trees
    (node probabilities from separate verifications of each), A_i the group-
    standardised R(T_i) - R(T̄_i), l_i the greedy accepted length of each tree,
    s_i = exp((log M(Ŝ_i) - log M0(Ŝ_i)) / max(l_i, 1)) along M's branch.
    (M is nudged far enough from M0 for their trees to differ in shape.)"""
    models = tiny_models(pair, perturb=0.2)
    cfg = GTOConfig(group_size=4, delta=1e-2, **TREE)
    seqs = greedy_windows(pair, 2, 40, seed=5)
    target = target_pass(models.base, seqs, models.feature_layers)
    roots = group_roots(torch.ones(2, 40, dtype=torch.bool), 4, 2, torch.Generator().manual_seed(2))
    result = gto_objective(cfg, models, target, roots)
    rewards, lengths, logps = {}, {}, {}
    with torch.no_grad():
        for name, head in (("M", models.head), ("M0", models.reference)):
            state = head_pass(head, target)
            trees = draft_trees(head, state, target, roots, **TREE)
            verdict = verify_trees(models.base, target, roots, trees)
            rewards[name] = torch.tensor([
                math.log(sum(math.exp(v) for v in enumerate_branches(tree.parents, verdict.node_logp[b].exp())))
                for b, tree in enumerate(trees.trees)])
            tokens, lengths[name] = accepted_paths(trees, verdict.choices)
            if name == "M":
                path = tokens, lengths[name]  # Ŝ_i: M's accepted branch, scored by both heads
            logps[name] = path_logprob(head, state, roots, *path)
    assert (rewards["M"] - rewards["M0"]).abs().max() > 1e-3  # the heads' trees differ
    torch.testing.assert_close(result.rewards.double(), rewards["M"].double(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.ref_rewards.double(), rewards["M0"].double(), atol=1e-4, rtol=1e-4)
    assert torch.equal(result.lengths, lengths["M"]) and torch.equal(result.ref_lengths, lengths["M0"])
    groups = (rewards["M"] - rewards["M0"]).double().reshape(-1, 4)
    spread = ((groups - groups.mean(1, keepdim=True)) ** 2).mean(1, keepdim=True).sqrt()
    advantages = ((groups - groups.mean(1, keepdim=True)) / (spread + cfg.delta)).flatten()
    torch.testing.assert_close(result.advantages.double(), advantages, atol=1e-3, rtol=1e-3)
    s = torch.exp((logps["M"] - logps["M0"]) / lengths["M"].clamp_min(1))
    assert (s - 1).abs().max() > 1e-3  # M0 scores Ŝ otherwise than M
    torch.testing.assert_close(result.s.detach(), s, atol=1e-5, rtol=1e-5)


def test_training_loss_weights_l_gto_by_omega_and_roots_draft_trained_tokens(pair, monkeypatch):
    """L = L_token + omega * L_GTO, with L_token the TTT loss of the configured
    unroll; roots are the positions whose next token is trained, in every
    whole group of m adjacent ones (here: all of them)."""
    from eagle_gto.train.ttt import ttt_loss

    models = tiny_models(pair, perturb=0.05)
    cfg = GTOConfig(omega=3.0, ttt_steps=3, step_weight=0.5, groups_per_window=10, **TREE)
    tokens = greedy_windows(pair, 2, 40, seed=5)
    mask = torch.ones_like(tokens)
    mask[0, :18] = 0  # a prompt: window 0's roots start at 17, whose next token is the first trained one
    seen = []
    original = gto_trainer.gto_objective

    def recording(cfg, models, target, roots):
        seen.append(roots)
        return original(cfg, models, target, roots)

    monkeypatch.setattr(gto_trainer, "gto_objective", recording)
    loss, stats = training_loss(cfg, models, tokens, mask, torch.Generator().manual_seed(0))
    assert abs(stats["l_gto"]) > 1e-5  # (small: s is near 1 and the advantages sum to 0 in each group)
    assert loss.item() - stats["l_token"] == pytest.approx(cfg.omega * stats["l_gto"], abs=1e-6)
    target = target_pass(models.base, tokens, models.feature_layers)
    token = ttt_loss(models.head, target.features, tokens, target.logits, mask, steps=3, step_weight=0.5)
    assert stats["l_token"] == pytest.approx(token.loss.item(), rel=1e-5)
    (roots,) = seen
    expected = []  # brute force: groups 1+g*m .. g*m+m whose every root r has token r+1 trained
    for w in range(2):
        for g in range((40 - 1) // 4):
            group = [1 + g * 4 + j for j in range(4)]
            if all(r + 1 < 40 and mask[w, r + 1] for r in group):
                expected += [(w, r) for r in group]
    assert (0, 17) in expected
    assert sorted(zip(roots.seq.tolist(), roots.pos.tolist())) == sorted(expected)


def test_the_optimizer_steps_with_the_clipped_gradient(pair, tmp_path, monkeypatch):
    """Every AdamW step of `train` sees gradients of total norm at most --grad-clip."""
    norms = []
    step = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    seqs = greedy_windows(pair, 4, 48, seed=9)
    stream = TokenStream(seqs.flatten(), torch.ones(seqs.numel(), dtype=torch.long))
    cfg = GTOConfig(out=str(tmp_path / "run"), steps=2, windows=2, window_length=40, grad_clip=1e-3, eval_every=0,
                    eval_windows=1, **TREE)
    train(cfg, tiny_models(pair, perturb=0.05), (stream, stream), progress=False)
    assert len(norms) == 2 and all(n == pytest.approx(cfg.grad_clip, rel=1e-3) for n in norms)  # (larger unclipped)


# -------------------------------------------------------------- end to end
def test_cli_options_map_to_the_config():
    args = config_parser("x").parse_args(["--no-debias", "--reward", "mean", "--eta", "2", "--group-size", "6"])
    cfg = config_from(args)
    assert (cfg.debias, cfg.reward, cfg.eta, cfg.group_size) == (False, "mean", 2.0, 6)
    assert config_from(config_parser("x").parse_args([])) == GTOConfig()
    with pytest.raises(ValueError, match="reward"):
        GTOConfig(reward="median")


def test_short_run_exports_a_head_the_engine_loads(pair, tmp_path):
    """A few GTO steps on a tiny pair: metrics are logged, the exported head
    (float16, as the demo ships it) loads with EaModel.from_pretrained,
    carries the trained weights and decodes exactly like plain greedy
    decoding."""
    models = tiny_models(pair)
    seqs = greedy_windows(pair, 8, 48, seed=9)
    stream = TokenStream(seqs.flatten(), torch.ones(seqs.numel(), dtype=torch.long))
    cfg = GTOConfig(out=str(tmp_path / "run"), steps=3, windows=2, window_length=40, groups_per_window=2, lr=1e-3,
                    eval_every=0, eval_windows=1, export_dtype="float16", **TREE)
    summary = train(cfg, models, (stream, stream), progress=False)
    records = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and '"l_gto"' in records[-1] and '"val_tau"' in records[-1]
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 1000
    assert summary["val_tau_start"] > 1
    base_dir = tmp_path / "base"
    pair.base_model.save_pretrained(base_dir)
    model = EaModel.from_pretrained(str(base_dir), str(tmp_path / "run" / "head"), dtype=torch.float32, **TREE)
    trained = models.head.state_dict()
    assert trained["fc.weight"].dtype == torch.float32  # exporting in float16 left the trained head alone
    assert all(torch.equal(v, trained[k].half().to(v.dtype)) for k, v in model.ea_layer.state_dict().items())
    assert not torch.equal(trained["fc.weight"], pair.ea_layer.state_dict()["fc.weight"])
    for seed in range(4):
        prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(seed))
        fast = model.eagenerate(prompt, max_new_tokens=30)
        assert model.last_stats.mean_accepted_length > 1
        assert torch.equal(fast, model.naivegenerate(prompt, max_new_tokens=30))


def test_a_run_without_matplotlib_ends_with_its_summary(pair, tmp_path, monkeypatch, capsys):
    """matplotlib is an extra: without it there is no metrics.png, as the
    train CLI does, but the summary is written (a run dying there could not
    be run again: its --out holds config.json)."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    seqs = greedy_windows(pair, 4, 48, seed=9)
    stream = TokenStream(seqs.flatten(), torch.ones(seqs.numel(), dtype=torch.long))
    cfg = GTOConfig(out=str(tmp_path / "run"), steps=1, windows=1, window_length=40, eval_every=0, eval_windows=1,
                    **TREE)
    summary = train(cfg, tiny_models(pair), (stream, stream), progress=False)
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
    assert (tmp_path / "run" / "head" / "config.json").is_file() and not (tmp_path / "run" / "metrics.png").exists()
    assert "matplotlib is not installed (pip install eagle-gto[train]): no metrics.png" in capsys.readouterr().out


def test_windows_without_a_group_are_counted_and_groups_must_fit(pair, tmp_path):
    # Roots are positions 1 .. L-2 (a token before, a trained token after): m = L-2 fits once, m = L-1 never
    # (GTO would silently train L_token only).
    with pytest.raises(ValueError, match=r"group_size \(9\) must be at most window_length - 2 \(8\)"):
        GTOConfig(group_size=9, window_length=10)
    fits = GTOConfig(group_size=8, window_length=10)
    roots = group_roots(root_eligible(torch.ones(2, fits.window_length, dtype=torch.long)), fits.group_size, 1)
    assert roots.pos.tolist() == list(range(1, 9)) * 2
    seqs = greedy_windows(pair, 4, 48, seed=9)
    mask = torch.zeros(seqs.numel(), dtype=torch.long)
    mask[::3] = 1  # short answers: never 4 adjacent roots
    stream = TokenStream(seqs.flatten(), mask)
    cfg = GTOConfig(out=str(tmp_path / "run"), steps=2, windows=2, window_length=40, eval_every=0, eval_windows=1,
                    **TREE)
    with pytest.warns(UserWarning, match="2 of 2 steps had no group of 4 adjacent trainable roots"):
        summary = train(cfg, tiny_models(pair), (stream, stream), progress=False)
    assert summary["steps_without_groups"] == 2
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps_without_groups"] == 2


# -------------------------------------------------------------- loading
def test_heads_train_in_float32_from_the_checkpoint_weights(pair, tmp_path):
    """With a bfloat16 base, M and M0 still hold the checkpoint's exact
    float32 weights: placing them beside the base must not round them."""
    export_head(pair.ea_layer, tmp_path / "head", "float32")
    expected = pair.ea_layer.state_dict()
    assert not torch.equal(expected["fc.weight"], expected["fc.weight"].bfloat16().float())
    base = copy.deepcopy(pair.base_model).to(torch.bfloat16)
    cfg = GTOConfig(head=str(tmp_path / "head"), dtype="bfloat16", **TREE)
    models = load_models(cfg, Models(base, None, None, None, None))
    for head in (models.head, models.reference):
        state = head.state_dict()
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    tokens = greedy_windows(pair, 2, 40, seed=3)
    loss, stats = training_loss(cfg, models, tokens, torch.ones_like(tokens), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and "l_gto" in stats


def test_a_reference_with_another_draft_vocabulary_is_refused(pair, tmp_path):
    """M0 scores M's branches in its own draft ids: another draft vocabulary gives wrong log-probabilities."""
    export_head(pair.ea_layer, tmp_path / "head", "float32")
    other = copy.deepcopy(pair.ea_layer)
    d2t, t2d = build_vocab_mapping(torch.arange(VOCAB).flip(0), other.config.draft_vocab_size)  # the lowest ids
    assert not torch.equal(t2d, other.t2d)
    other.d2t.copy_(d2t)
    other.t2d.copy_(t2d)
    export_head(other, tmp_path / "other", "float32")
    reuse = Models(pair.base_model, None, None, None, None)
    with pytest.raises(ValueError, match="another draft vocabulary"):
        load_models(GTOConfig(head=str(tmp_path / "head"), reference=str(tmp_path / "other")), reuse)
    same = load_models(GTOConfig(head=str(tmp_path / "head"), reference=str(tmp_path / "head")), reuse)
    assert torch.equal(same.reference.t2d, same.head.t2d)


def test_a_reference_that_reads_other_target_layers_is_refused(pair, tmp_path):
    """One target pass, with M's feature layers, feeds M and M0: a reference
    trained on other layers would be scored on features it never saw."""
    export_head(pair.ea_layer, tmp_path / "head", "float32")
    reuse = Models(pair.base_model, None, None, None, None)
    layers = load_models(GTOConfig(head=str(tmp_path / "head"), **TREE), reuse).feature_layers
    for name, ids in [("other", [0, 1, 2]), ("same", layers)]:  # (M's layers given explicitly: the same head)
        shutil.copytree(tmp_path / "head", tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        (tmp_path / name / "config.json").write_text(json.dumps({**config, "eagle_aux_hidden_state_layer_ids": ids}))
    assert layers != [0, 1, 2]
    with pytest.raises(ValueError, match=re.escape(f"reads the inputs of target layers [0, 1, 2] "
                                                   f"(eagle_aux_hidden_state_layer_ids), the head {tmp_path / 'head'} "
                                                   f"those of {layers}: M0 must read M's feature layers")):
        load_models(GTOConfig(head=str(tmp_path / "head"), reference=str(tmp_path / "other"), **TREE), reuse)
    same = load_models(GTOConfig(head=str(tmp_path / "head"), reference=str(tmp_path / "same"), **TREE), reuse)
    assert same.feature_layers == layers


# --------------------------------------------------------- command line
@pytest.mark.parametrize("content, options, message", [
    (None, [], r"python -m eagle_gto.gto: .*No such file.*data.jsonl"),
    ("\n", [], r"python -m eagle_gto.gto: .*data.jsonl: no records"),
    ('{"prompt": "x"}\n', [], r"data.jsonl:1: expected an object"),
    ('{"text": "x"}\n', ["--model-type", "chatml"], r"argument --model-type: invalid choice: 'chatml'"),
])
def test_cli_rejects_bad_input_before_the_models_load(tmp_path, monkeypatch, capsys, content, options, message):
    import transformers

    def from_pretrained(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    data = tmp_path / "data.jsonl"
    if content is not None:
        data.write_text(content)
    with pytest.raises(SystemExit) as exit:
        gto_cli.main(["--data", str(data), "--out", str(tmp_path / "run"), *options])
    assert re.search(message, f"{exit.value}\n{capsys.readouterr().err}")


class CharTokenizer:
    """One token a character: enough for plain-text records."""

    def __call__(self, text):
        return SimpleNamespace(input_ids=[ord(c) % VOCAB for c in text])


def test_cli_reports_too_little_data_in_one_line(pair, tmp_path, monkeypatch):
    data = tmp_path / "short.jsonl"
    data.write_text('{"text": "def f(): pass"}\n')
    models = tiny_models(pair)
    models.tokenizer = CharTokenizer()
    monkeypatch.setattr(gto_cli, "load_models", lambda cfg: models)
    with pytest.raises(SystemExit, match=r"python -m eagle_gto.gto: .*short.jsonl: too few tokens \(13\)"):
        gto_cli.main(["--data", str(data), "--out", str(tmp_path / "run")])


@pytest.mark.parametrize("answers, message", [
    # one-token answers at position 3 of every 16 tokens: never the token after a validation root (8)
    ([3], "the 2 validation windows of 16 tokens hold no trained token right after a validation root (every 8th "
          "position): use a longer --window-length, more --eval-windows or more data"),
    ([], "the validation data holds no trained tokens (prompts only?)"),
])
def test_validation_windows_without_a_root_stop_the_run_in_one_line_before_it_writes(pair, tmp_path, monkeypatch,
                                                                                     answers, message):
    """It was a traceback after config.json was written: the same command
    could not be run again (--out held an earlier run's output)."""
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "x"}\n')  # (read by check_data; the stream below stands for its tokens)
    ids = greedy_windows(pair, 4, 16, seed=9).flatten()
    mask = torch.zeros(4, 16, dtype=torch.long)
    mask[:, answers] = 1
    stream = TokenStream(ids, mask.flatten())
    monkeypatch.setattr(gto_trainer, "jsonl_stream", lambda path, tokenizer, model_type, system: stream)
    models = tiny_models(pair)
    monkeypatch.setattr(gto_cli, "load_models", lambda cfg: models)
    options = ["--window-length", "16", "--eval-windows", "2", "--validation-every", "2", "--group-size", "4"]
    with pytest.raises(SystemExit, match=re.escape(f"python -m eagle_gto.gto: {message}")):
        gto_cli.main(["--data", str(data), "--out", str(tmp_path / "run"), *options])
    assert not (tmp_path / "run").exists()
    if answers:  # train() given the streams checks the windows before it writes too
        cfg = GTOConfig(out=str(tmp_path / "run"), window_length=16, eval_windows=2, group_size=4, **TREE)
        with pytest.raises(ValueError, match=re.escape(message.split(":")[0])):
            train(cfg, models, (stream, stream), progress=False)
        assert not (tmp_path / "run").exists()


def test_a_diverged_run_stops_before_the_update_and_exports_no_head(pair, tmp_path, monkeypatch):
    """A NaN loss (a too high lr) went on for every step and exported NaN weights."""
    models = tiny_models(pair)
    seqs = greedy_windows(pair, 8, 48, seed=9)
    stream = TokenStream(seqs.flatten(), torch.ones(seqs.numel(), dtype=torch.long))
    calls = []

    def nan_at_step_2(*args):
        loss, stats = real_loss(*args)
        calls.append(1)
        return (loss * math.nan if len(calls) == 2 else loss), stats

    real_loss = gto_trainer.training_loss
    monkeypatch.setattr(gto_trainer, "training_loss", nan_at_step_2)
    cfg = GTOConfig(out=str(tmp_path / "run"), steps=4, windows=1, window_length=40, eval_every=0, eval_windows=1,
                    **TREE)
    before = [p.detach().clone() for p in models.head.parameters()]
    with pytest.raises(gto_trainer.TrainingDiverged, match="step 2: the gradient norm is nan: training diverged"):
        train(cfg, models, (stream, stream), progress=False)
    after = list(models.head.parameters())
    assert all(torch.isfinite(p).all() for p in after) and any(not torch.equal(a, b) for a, b in zip(before, after))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["diverged"].startswith("step 2") and summary["val_tau_start"] > 1
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1] and not (tmp_path / "run" / "head").exists()


def fake_experiment(monkeypatch, evaluated: list, trained: list, summary=None):
    """experiment.py's and sweep.py's models, data, training and tau measurement replaced by stubs that record
    their calls; the training stub writes what train() writes (config.json first, the head and summary.json at the
    end); `summary(cfg)` gives its summary. No HumanEval file by default."""
    head = SimpleNamespace(config=SimpleNamespace(draft_vocab_size=64))
    models = SimpleNamespace(base=SimpleNamespace(name_or_path="base"), tokenizer=None, head=head)
    for module in (experiment, sweep):
        monkeypatch.setattr(module, "load_models", lambda cfg, reuse=None: models)
        monkeypatch.setattr(module, "load_streams", lambda cfg, models: None)
    monkeypatch.setattr(experiment, "prompt_sets", lambda tokenizer, humaneval, limit: {"heldout": [[1, 2]] * limit})
    monkeypatch.setattr(measure, "DEFAULT_HUMANEVAL", Path("/nonexistent/humaneval/question.jsonl"))

    def evaluate(base, head, sets, tree, max_new_tokens):
        evaluated.append(head)
        return {"heldout": 2.0}

    def train(cfg, models, streams):
        trained.append(cfg)
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.recorded_options()))
        result = summary(cfg) if summary else {"val_tau_start": 1.0, "val_tau_end": 1.5, "val_reward_end": 0.5}
        (out / "head").mkdir(exist_ok=True)
        (out / "summary.json").write_text(json.dumps(result))
        return result

    monkeypatch.setattr(experiment, "evaluate", evaluate)
    for module in (experiment, sweep):
        monkeypatch.setattr(module, "train", train)


def test_sweep_parses_boolean_grid_values(tmp_path, monkeypatch):
    trained = []
    fake_experiment(monkeypatch, [], trained)
    sweep.main(["--out", str(tmp_path / "a"), "--grid", "debias=False,TRUE", "omega=1"])
    assert [(cfg.debias, cfg.omega) for cfg in trained] == [(False, 1.0), (True, 1.0)]  # bool("False") is True
    trained.clear()
    sweep.main(["--out", str(tmp_path / "b"), "--grid", "debias=0,1"])
    assert [cfg.debias for cfg in trained] == [False, True]
    with pytest.raises(SystemExit, match="--grid 'debias=yes': expected true, false, 1 or 0, got 'yes'"):
        sweep.main(["--out", str(tmp_path / "c"), "--grid", "debias=yes"])


def test_experiment_reuses_only_results_made_with_the_same_settings(tmp_path, monkeypatch):
    evaluated, trained = [], []
    fake_experiment(monkeypatch, evaluated, trained)
    command = ["--out", str(tmp_path), "--head", "start-head", "--runs", "gto", "--steps", "3"]
    experiment.main(command)
    assert evaluated == ["start-head", str(tmp_path / "gto" / "head")] and len(trained) == 1
    experiment.main(command)  # the same command: both results are kept
    assert len(evaluated) == 2 and len(trained) == 1
    with pytest.raises(SystemExit, match=r"gto/result.json was made with other settings: training.steps \(3 then, 5 "
                                         r"now\)\. .*choose another --out"):
        experiment.main(command[:-1] + ["5"])
    with pytest.raises(SystemExit, match=r"start.json was made with other settings: measured.max_new_tokens"):
        experiment.main(command + ["--max-new-tokens", "64"])
    (tmp_path / "gto" / "result.settings.json").unlink()  # e.g. a result of an older version
    with pytest.raises(SystemExit, match="result.json has no record of the settings that produced it"):
        experiment.main(command)
    assert len(evaluated) == 2 and len(trained) == 1  # nothing was reused under other settings
    experiment.main(["--out", str(tmp_path / "other"), *command[2:-1], "5"])  # another --out runs
    assert len(trained) == 2 and trained[-1].steps == 5


# ------------------------------------------- options that fail only after loading
@pytest.mark.parametrize("options, message", [
    (dict(validation_every=0), "validation_every must be >= 2, got 0"),
    (dict(validation_every=1), "validation_every must be >= 2, got 1"),  # all of a jsonl kept out
    (dict(windows=0), "windows must be >= 1, got 0"),
    (dict(eval_windows=0), "eval_windows must be >= 1, got 0"),
    (dict(steps=-1), "steps must be >= 1, got -1"),
    (dict(generated=0), "generated must be >= 1, got 0"),
    (dict(tree_chunk=0), "tree_chunk must be >= 1, got 0"),
    (dict(ttt_steps=0), "ttt_steps must be >= 1, got 0"),
    (dict(grad_clip=0.0), "grad_clip must be > 0, got 0.0"),
    (dict(eval_every=-1), "eval_every must be >= 0, got -1"),
    (dict(omega=-1.0), "omega must be >= 0, got -1.0"),
    (dict(step_weight=-0.5), "step_weight must be >= 0, got -0.5"),
    (dict(total_token=1), "total_token must be >= 2"),
    (dict(total_token=60, depth=2, top_k=3), "total_token=60 needs 59 draft nodes"),
    (dict(device="tpu:x"), "device 'tpu:x'"),
    (dict(device="meta"), "device 'meta': not a device GTO can train on"),  # tensors without data
    (dict(export_dtype="float8"), "export_dtype must be one of float32, float16, bfloat16, got 'float8'"),
    (dict(dtype="int8"), "dtype must be one of auto, float32, float16, bfloat16, got 'int8'"),
    (dict(system="Be brief."), "system: only with a jsonl --data (conversations), not with data 'generated'"),
])
def test_config_refuses_values_that_would_fail_after_the_models_load(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        GTOConfig(**options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_config_refuses_cuda_without_cuda():
    with pytest.raises(ValueError, match="device 'cuda': cuda is not available"):
        GTOConfig(device="cuda")


def test_config_refuses_a_gpu_the_machine_lacks_naming_those_there_are(two_gpus):
    """As every command refuses it (it said "there are 2 cuda devices", not which)."""
    with pytest.raises(ValueError, match=re.escape(f"device 'cuda:2': there is no GPU 2 here; {two_gpus}")):
        GTOConfig(device="cuda:2")


def test_config_refuses_an_xpu_or_mps_device_the_machine_lacks_naming_those_there_are(two_xpus, an_mps):
    """As every command refuses them (it said "there are 2 xpu devices", or "there are 1 mps devices", not which)."""
    with pytest.raises(ValueError, match=re.escape(f"device 'xpu:2': there is no XPU 2 here; {two_xpus}")):
        GTOConfig(device="xpu:2")
    with pytest.raises(ValueError, match=re.escape(f"device 'mps:1': there is no MPS device 1 here; {an_mps}")):
        GTOConfig(device="mps:1")


def test_top_k_beyond_the_heads_vocabulary_and_a_head_as_the_base_are_refused(pair, tmp_path):
    export_head(pair.ea_layer, tmp_path / "head", "float32")
    draft_vocab = pair.ea_layer.config.draft_vocab_size
    reuse = Models(pair.base_model, None, None, None, None)
    with pytest.raises(ValueError, match=f"top_k={draft_vocab + 1} is larger than the draft head's vocabulary"):
        load_models(GTOConfig(head=str(tmp_path / "head"), total_token=draft_vocab, depth=2, top_k=draft_vocab + 1),
                    reuse)
    with pytest.raises(ValueError, match="draft head"):
        load_models(GTOConfig(base=str(tmp_path / "head"), head=str(tmp_path / "head"), **TREE))


def test_a_validation_split_shorter_than_a_window_is_refused(pair, monkeypatch):
    def generated_stream(base, tokenizer, files, count, prompt_tokens, new_tokens, seed):
        length = count * (prompt_tokens + new_tokens)
        return TokenStream(torch.zeros(length, dtype=torch.long), torch.ones(length, dtype=torch.long))

    monkeypatch.setattr(gto_trainer, "generated_stream", generated_stream)
    cfg = GTOConfig(data="generated", generated=8, eval_windows=1, prompt_tokens=4, new_tokens=8, window_length=40,
                    **TREE)
    with pytest.raises(ValueError, match=r"the validation data has 12 tokens, fewer than one window of 40"):
        gto_trainer.load_streams(cfg, tiny_models(pair))  # it would fail as an empty reshape in train()
    train_stream, val_stream = gto_trainer.load_streams(dataclasses.replace(cfg, eval_windows=4), tiny_models(pair))
    assert (len(train_stream), len(val_stream)) == (96, 48)


def test_windows_are_drawn_up_to_the_end_of_the_stream():
    """The last window of a stream (or the one at its last sample start) must be drawn too: a stream of exactly
    one window has no other."""
    drawn = torch.Generator().manual_seed(0)
    anywhere = TokenStream(torch.arange(6), torch.ones(6, dtype=torch.long))
    assert set(anywhere.windows(32, 4, drawn)[0][:, 0].tolist()) == {0, 1, 2}
    assert anywhere.windows(2, 6, drawn)[0].tolist() == [list(range(6))] * 2
    at_samples = from_samples([Sample([0, 1], [1, 1]), Sample([2, 3, 4, 5], [1] * 4)], aligned=True)
    assert set(at_samples.windows(32, 4, drawn)[0][:, 0].tolist()) == {0, 2}


def test_fewer_validation_windows_than_asked_are_announced(pair, monkeypatch):
    """Generated validation continuations that end early at </s> are shorter:
    windows start at continuations, so the last ones may not fit a window."""
    stopped_early = [True]

    def generated_stream(base, tokenizer, files, count, prompt_tokens, new_tokens, seed):
        lengths = [prompt_tokens + new_tokens] * count
        if stopped_early[0]:
            lengths[-1] = prompt_tokens + 2
        return from_samples([Sample([1] * n, [1] * n) for n in lengths], aligned=True)

    monkeypatch.setattr(gto_trainer, "generated_stream", generated_stream)
    cfg = GTOConfig(data="generated", generated=8, eval_windows=4, prompt_tokens=4, new_tokens=8, window_length=12,
                    **TREE)
    with pytest.warns(UserWarning, match="holds 3 windows of 12 tokens, fewer than --eval-windows 4"):
        gto_trainer.load_streams(cfg, tiny_models(pair))
    stopped_early[0] = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gto_trainer.load_streams(cfg, tiny_models(pair))


def test_cli_refuses_an_out_that_holds_an_earlier_run(tmp_path, monkeypatch):
    def load_models(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(gto_cli, "load_models", load_models)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"python -m eagle_gto.gto: .*run already holds the output of an earlier "
                                         r"run \(summary.json\)"):
        gto_cli.main(["--out", str(tmp_path / "run")])
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        gto_cli.main(["--out", str(tmp_path / "file" / "run")])


@pytest.mark.parametrize("command", [["experiment"], ["sweep", "--grid", "omega=1,2"]])
def test_experiment_and_sweep_refuse_several_processes_once_before_anything_loads(tmp_path, monkeypatch, capsys,
                                                                                  command):
    """Under torchrun every process ran every training and evaluation (fine-tuning alone is data-parallel)
    and wrote the same files at once."""
    def load_models(*args, **kwargs):
        raise AssertionError("a model was loaded")

    for module in (gto_cli, experiment, sweep):
        monkeypatch.setattr(module, "load_models", load_models)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit, match=rf"python -m eagle_gto.gto {command[0]}: 2 processes \(WORLD_SIZE\): "
                                         rf"`{command[0]}` runs in one process"):
        gto_cli.main([*command, "--out", str(tmp_path / "run")])
    monkeypatch.setenv("RANK", "1")  # the other process leaves without repeating it (the launch fails by rank 0)
    with pytest.raises(SystemExit) as stopped:
        gto_cli.main([*command, "--out", str(tmp_path / "run")])
    assert stopped.value.code == 0 and not capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def two_processes(monkeypatch, rank: int, others: str | None = None) -> None:
    """This process as `rank` of 2, in-process: the other one's outcome of the checks before training is `others`
    (a failure, or None)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setattr("eagle_gto.train.errors.process_state",
                        lambda: SimpleNamespace(num_processes=2, is_main_process=rank == 0))
    monkeypatch.setattr("accelerate.utils.gather_object",
                        lambda mine: [*mine, others] if rank == 0 else [others, *mine])


def test_fine_tuning_under_several_processes_says_a_bad_option_once(tmp_path, monkeypatch, capsys):
    """Every process meets the same bad --out: rank 0 says it, the others leave quietly with status 0."""
    (tmp_path / "file").write_text("")
    two_processes(monkeypatch, 0, "the same failure")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        gto_cli.main(["--out", str(tmp_path / "file" / "run")])
    two_processes(monkeypatch, 1, "the same failure")
    for argv in (["--out", str(tmp_path / "file" / "run")], ["--steps", "many"]):
        with pytest.raises(SystemExit) as stopped:
            gto_cli.main(argv)
        assert stopped.value.code == 0
    assert not capsys.readouterr().err


def test_a_check_that_fails_in_another_process_alone_stops_this_one_which_says_it(tmp_path, monkeypatch):
    """A check failed in rank 1 alone (its node lacks --data): that process left quietly with status 0 and
    rank 0 went on to train and waited for it there, forever."""
    def train(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(gto_cli, "load_models", lambda cfg: None)
    monkeypatch.setattr(gto_cli, "load_streams", lambda cfg, models: None)
    monkeypatch.setattr(gto_cli, "train", train)
    two_processes(monkeypatch, 0, "python -m eagle_gto.gto: data.jsonl: no such file")
    with pytest.raises(SystemExit, match="^python -m eagle_gto.gto: data.jsonl: no such file$"):
        gto_cli.main(["--out", str(tmp_path / "run")])


def test_each_process_trains_on_its_own_device_whatever_device_is_given(monkeypatch):
    """--device cuda (or cuda:0) under several processes put every process on the first GPU."""
    monkeypatch.setattr(gto_trainer, "process_device", lambda: torch.device("cuda", 1))
    for given, device in ((None, "cuda:1"), ("cuda", "cuda:1"), ("cuda:1", "cuda:1"), ("cpu", "cpu")):
        assert gto_trainer.resolve_device(SimpleNamespace(device=given)) == device
    with pytest.raises(ValueError, match=r"--device cuda:0: under several processes each trains on its own device "
                                         r"\(this one: cuda:1\); leave --device out"):
        gto_trainer.resolve_device(SimpleNamespace(device="cuda:0"))
    monkeypatch.setattr(gto_trainer, "process_device", lambda: None)  # one process: as given
    assert gto_trainer.resolve_device(SimpleNamespace(device="cuda:0")) == "cuda:0"


def test_two_processes_train_as_one_on_their_global_batch_and_write_once(pair, tmp_path):
    """torchrun, 2 processes at --windows 2 = 1 process at --windows 4: each process computes its share of the
    same global batch (the same windows and groups), losses normalised over the global batch and gradients summed,
    so the heads and the logged metrics are the same; rank 0 alone validates and writes. Half the windows have
    no group (a process may have none): the GTO means are still the global batch's."""
    seqs = greedy_windows(pair, 8, 48, seed=9)
    mask = torch.ones_like(seqs)
    mask[1::2, ::3] = 0  # every other sample: never 4 adjacent roots
    stream = TokenStream(seqs.flatten(), mask.flatten(), torch.arange(8) * 48)  # windows start at samples
    drawn = torch.Generator().manual_seed(0)  # (the windows of the 3 steps, as the runs draw them)
    eligible = [root_eligible(stream.windows(4, 40, drawn)[1]) for _ in range(3)]
    groups = [[len(group_roots(step[half], 4, 2)) for half in (slice(0, 2), slice(2, 4))] for step in eligible]
    assert groups[1] == [0, 0] and groups[2][0] == 0 < groups[2][1]  # no group; groups in rank 1's windows only
    pair.base_model.save_pretrained(tmp_path / "base")
    export_head(pair.ea_layer, tmp_path / "head", "float32")
    torch.save((stream, stream), tmp_path / "streams.pt")
    options = dict(base=str(tmp_path / "base"), head=str(tmp_path / "head"), steps=3, window_length=40,
                   groups_per_window=2, lr=1e-3, eval_every=2, eval_windows=2, **TREE)
    script = tmp_path / "run.py"  # train() on the saved pair, saying each file it writes
    script.write_text("import pathlib, sys, torch\nfrom eagle_gto.loading import load_base\n"
                      "from eagle_gto.gto import trainer\n"
                      "write, export = pathlib.Path.write_text, trainer.export_head\n"
                      "def noted(path, *args):\n    print('wrote', path.name, flush=True)\n"
                      "    return write(path, *args)\n"
                      "def exported(*args):\n    print('exported', flush=True)\n    return export(*args)\n"
                      "pathlib.Path.write_text, trainer.export_head = noted, exported\n"
                      f"cfg = trainer.GTOConfig(out=sys.argv[1], windows=2, **{options!r})\n"
                      "models = trainer.load_models(cfg, trainer.Models(load_base(cfg.base), None, None, None, None))\n"
                      "streams = torch.load(sys.argv[2], weights_only=False)\n"
                      "print('summary', trainer.train(cfg, models, streams, progress=False), flush=True)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(Path(__file__).parents[i]) for i in (1, 0)),
               OMP_NUM_THREADS="1")
    ran = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path / "two"), str(tmp_path / "streams.pt")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert ran.returncode == 0, ran.stderr[-3000:]
    written = sorted(line for line in ran.stdout.splitlines() if line.startswith(("wrote", "exported")))
    assert written == ["exported", "wrote config.json", "wrote config.json", "wrote summary.json"]  # (head/config)
    assert ran.stdout.count("'steps_without_groups': 1}") == 2  # every process returns the summary
    cfg = GTOConfig(out=str(tmp_path / "one"), windows=4, **options)
    models = load_models(cfg, Models(load_base(cfg.base), None, None, None, None))
    with pytest.warns(UserWarning, match="1 of 3 steps had no group"):
        train(cfg, models, (stream, stream), progress=False)
    records = {}
    for run in ("one", "two"):
        records[run] = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for record in records[run]:
            record.pop("seconds", None)
    assert len(records["two"]) == 4 and "l_gto" in records["two"][1] and "val_tau" in records["two"][2]
    assert len(records["one"]) == 4
    for two, one in zip(records["two"], records["one"]):
        assert two == pytest.approx(one, rel=1e-5, abs=1e-7)  # (l_gto ~ 0: a float32 sum of terms ~ 1 that cancel)
    one, two = (load_file(str(tmp_path / run / "head" / "model.safetensors")) for run in ("one", "two"))
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert not torch.equal(one["fc.weight"], pair.ea_layer.state_dict()["fc.weight"])  # it trained
    # (atol: Adam divides each gradient by its own size: one in 12288 weights, with a gradient of about float32's
    # rounding, moves by about 1e-4 of a step (lr 1e-3) more in one run than in the other)


def test_an_error_of_one_process_alone_during_fine_tuning_is_said_once_and_stops_both(pair, tmp_path):
    """An error rank 1 alone meets mid-run (a write failing on its node): its message went to a silenced stderr,
    it left with status 0, and rank 0 printed the traceback of its lost connection (with NCCL it waited)."""
    pair.base_model.save_pretrained(tmp_path / "base")
    export_head(pair.ea_layer, tmp_path / "head", "float32")
    seqs = greedy_windows(pair, 8, 48, seed=9)
    stream = TokenStream(seqs.flatten(), torch.ones(seqs.numel(), dtype=torch.long))
    torch.save((stream, stream), tmp_path / "streams.pt")
    script = tmp_path / "run.py"  # the CLI on the saved pair; rank 1's second step fails
    script.write_text("import os, sys, torch\nfrom eagle_gto.loading import load_base\n"
                      "from eagle_gto.gto import __main__ as cli, trainer\n"
                      "cli.load_models = lambda cfg: trainer.load_models(cfg, trainer.Models(load_base(cfg.base), "
                      "None, None, None, None))\n"
                      f"cli.load_streams = lambda cfg, models: torch.load({str(tmp_path / 'streams.pt')!r}, "
                      "weights_only=False)\n"
                      "loss, steps = trainer.training_loss, []\n"
                      "def failing(*args):\n    steps.append(1)\n"
                      "    if len(steps) == 2 and os.environ['RANK'] == '1':\n"
                      "        raise OSError(28, 'No space left on device')\n"
                      "    return loss(*args)\n"
                      "trainer.training_loss = failing\ncli.main(sys.argv[1:])\n")
    options = dict(base=tmp_path / "base", head=tmp_path / "head", out=tmp_path / "run", steps=3, windows=1,
                   window_length=40, eval_every=0, eval_windows=1, **TREE)
    arguments = [arg for key, value in options.items() for arg in (f"--{key.replace('_', '-')}", str(value))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(Path(__file__).parents[i]) for i in (1, 0)),
               OMP_NUM_THREADS="1")
    ran = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "--log-dir", str(tmp_path / "logs"), "--tee", "3", str(script), *arguments],
                         capture_output=True, text=True, env=env, timeout=300)  # (a run left waiting fails)
    output = ran.stdout + ran.stderr.replace("\r", "\n")
    assert ran.returncode != 0
    assert output.count("No space left on device") == 1, output[-3000:]
    assert "[default1]:python -m eagle_gto.gto: [Errno 28] No space left on device" in output
    assert not re.search(r"^\[default\d\]:.*Traceback", output, re.M), output[-3000:]
    assert not (tmp_path / "run" / "head").exists()


def test_sweep_points_get_their_own_data_and_cannot_vary_the_base(tmp_path, monkeypatch):
    trained, loaded = [], []
    fake_experiment(monkeypatch, [], trained)
    monkeypatch.setattr(sweep, "load_streams", lambda cfg, models: loaded.append(cfg.generated) or cfg)
    sweep.main(["--out", str(tmp_path / "a"), "--grid", "generated=8,16", "omega=1,3"])
    assert loaded == [8, 16]  # one stream per data setting, shared by the omega values
    assert [(cfg.generated, cfg.omega) for cfg in trained] == [(8, 1.0), (8, 3.0), (16, 1.0), (16, 3.0)]
    with pytest.raises(SystemExit, match="--grid 'dtype=float32,bfloat16': the base model is loaded once"):
        sweep.main(["--out", str(tmp_path / "b"), "--grid", "dtype=float32,bfloat16"])
    with pytest.raises(SystemExit, match="generated must be >= 1, got 0"):  # every point is checked first
        sweep.main(["--out", str(tmp_path / "c"), "--grid", "generated=2,0"])
    assert len(trained) == 4


@pytest.mark.parametrize("options, message", [
    (["--runs", "control", "--ship"], "--ship needs the gto run in --runs"),
    (["--eval-tree", "20,4"], "--eval-tree '20,4': expected three whole numbers"),
    (["--eval-tree", "60,2,3"], "--eval-tree '60,2,3': total_token=60 needs 59 draft nodes"),
    (["--limit", "0"], "--limit must be at least 1, got 0"),
    (["--eval-tree", "60,7,65"], "--eval-tree '60,7,65': top_k=65 is larger than the draft head's vocabulary (64"),
    (["--humaneval", "/nonexistent/typo.jsonl"], "--humaneval /nonexistent/typo.jsonl: no such file"),
])
def test_experiment_refuses_bad_options_before_training(tmp_path, monkeypatch, options, message):
    trained, evaluated = [], []
    fake_experiment(monkeypatch, evaluated, trained)
    with pytest.raises(SystemExit, match=re.escape(message)):
        experiment.main(["--out", str(tmp_path), *options])
    assert not trained and not evaluated


def test_help_names_the_experiment_and_sweep_commands(capsys):
    with pytest.raises(SystemExit):
        gto_cli.main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m eagle_gto.gto [experiment | sweep]") and "`sweep` trains" in out


# ------------------------------------------------ experiment and sweep: what results stand for
def test_experiment_runs_are_what_their_names_say_whatever_the_command_line(tmp_path, monkeypatch, capsys):
    """Each run sets objective, reward and debias itself (the ablations differ from gto in one of them), so the
    command refuses those options: with them, `--objective token --ship` would ship a token-only head as GTO."""
    assert experiment.RUNS["gto"] == dict(objective="gto", reward="smoothmax", debias=True)
    assert experiment.RUNS["control"]["objective"] == "token"
    for name, run in experiment.RUNS.items():
        assert run.keys() == experiment.RUNS["gto"].keys()
        changed = {k for k in run if run[k] != experiment.RUNS["gto"][k]}
        assert len(changed) == (name != "gto"), name
    trained = []
    fake_experiment(monkeypatch, [], trained)
    for option in (["--objective", "token"], ["--reward", "mean"], ["--no-debias"], ["--debias"]):
        with pytest.raises(SystemExit):
            experiment.main(["--out", str(tmp_path / "refused"), *option])
        assert f"{option[0]}: experiment sets {option[0][2:].replace('no-', '')} per run" in capsys.readouterr().err
    assert not trained
    experiment.main(["--out", str(tmp_path / "exp")])
    assert {Path(cfg.out).name: dict(objective=cfg.objective, reward=cfg.reward, debias=cfg.debias)
            for cfg in trained} == experiment.RUNS
    record = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert record["runs"] == experiment.RUNS and "reward" not in record["training"]


def test_experiment_records_the_training_device_and_the_evaluation(tmp_path, monkeypatch):
    """tau is measured on the CPU in float32 whatever --device: the record and the shipped README say so, and
    name the device the heads trained on (here a stand-in GPU), not the CPU."""
    fake_experiment(monkeypatch, [], [])
    monkeypatch.setattr(experiment, "resolve_device", lambda cfg: "cuda:0")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Stand-in GPU")
    import eagle_gto.demo

    monkeypatch.setattr(eagle_gto.demo, "ASSETS", tmp_path / "assets")
    experiment.main(["--out", str(tmp_path / "exp"), "--head", "start-head", "--runs", "gto", "--ship"])
    record = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert record["device"] == "trained on Stand-in GPU (cuda:0), base in float32"
    assert record["evaluation"].startswith("tau measured on the CPU in float32")
    assert (record["measured"]["device"], record["measured"]["dtype"]) == ("cpu", "float32")
    readme = (tmp_path / "assets" / "gto" / "README.md").read_text()
    assert "trained on Stand-in GPU" in readme and "tau measured on the CPU in float32" in readme
    assert "reward smoothmax (eta 1.0), debiased: True" in readme


def test_experiment_humaneval_file_is_checked_and_recorded(tmp_path, monkeypatch, capsys):
    """A missing --humaneval stops the command (test_experiment_refuses_bad_options_before_training); a missing
    default is skipped with a note; the file measured on is recorded (path, size, sha256), so a changed file
    counts as other settings when a run is resumed."""
    evaluated, sets = [], []
    fake_experiment(monkeypatch, evaluated, [])
    monkeypatch.setattr(experiment, "prompt_sets", lambda tokenizer, humaneval, limit: sets.append(humaneval) or {
        "heldout": [[1]]})
    experiment.main(["--out", str(tmp_path / "a"), "--runs", "gto"])
    assert "/nonexistent/humaneval/question.jsonl not found: HumanEval skipped" in capsys.readouterr().out
    assert sets == [None] and json.loads((tmp_path / "a" / "start.settings.json").read_text())["measured"][
        "humaneval"] is None
    questions = tmp_path / "question.jsonl"
    questions.write_text('{"turns": ["def f():"]}\n')
    command = ["--out", str(tmp_path / "b"), "--runs", "gto", "--humaneval", str(questions)]
    experiment.main(command)
    recorded = json.loads((tmp_path / "b" / "start.settings.json").read_text())["measured"]["humaneval"]
    assert sets[-1] == questions and recorded["path"] == str(questions) and recorded["bytes"] == 24
    questions.write_text('{"turns": ["def g():"]}\n')
    with pytest.raises(SystemExit, match=r"start.json was made with other settings: measured.humaneval.sha256"):
        experiment.main(command)


def test_sweep_control_trains_like_the_points_it_is_compared_with(tmp_path, monkeypatch):
    """--control: one token-only run per combination of the gridded options the control reads (here lr and
    ttt_steps, not the GTO-only omega), each compared with the points that share it."""
    trained = []
    fake_experiment(monkeypatch, [], trained, summary=lambda cfg: {
        "val_tau_start": 1.0, "val_tau_end": 1 + cfg.lr * 1000 + cfg.ttt_steps / 100 + cfg.omega / 1e4,
        "val_reward_end": 0.5})
    sweep.main(["--out", str(tmp_path / "s"), "--grid", "lr=1e-4,3e-4", "omega=1,4", "ttt_steps=3",
                           "steps=5", "--control"])
    controls = [cfg for cfg in trained if cfg.objective == "token"]
    assert [(cfg.lr, cfg.ttt_steps, cfg.steps) for cfg in controls] == [(1e-4, 3, 5), (3e-4, 3, 5)]
    assert len(trained) == 6
    rows = json.loads((tmp_path / "s" / "sweep.json").read_text())["rows"]
    for row in rows:  # the control trains with the default omega (2), which it ignores
        assert row["control_val_tau_end"] == pytest.approx(1 + row["lr"] * 1000 + 0.03 + 2 / 1e4)
    assert "control val tau end" in (tmp_path / "s" / "sweep.md").read_text()
    with pytest.raises(SystemExit, match="--control adds the token-only runs itself"):
        sweep.main(["--out", str(tmp_path / "t"), "--grid", "objective=gto,token", "--control"])


def test_validation_windows_do_not_depend_on_the_seed(monkeypatch):
    """Seeds change the training data only, so runs (a sweep's seed grid) that differ in the seed are scored on
    one validation slice."""
    seeds = []

    def generated_stream(base, tokenizer, files, count, prompt_tokens, new_tokens, seed):
        seeds.append(seed)
        return TokenStream(torch.zeros(400, dtype=torch.long), torch.ones(400, dtype=torch.long))

    monkeypatch.setattr(gto_trainer, "generated_stream", generated_stream)
    models = SimpleNamespace(base=None, tokenizer=None)
    for seed in (0, 7):
        gto_trainer.load_streams(GTOConfig(seed=seed, window_length=40), models)
    assert seeds == [0, gto_trainer.VALIDATION_SEED, 7, gto_trainer.VALIDATION_SEED]


def test_sweep_refuses_grids_over_the_validation_windows(monkeypatch, tmp_path):
    """Points are ranked by validation tau, which compares only on the same text."""
    fake_experiment(monkeypatch, [], [])
    for option in ("window_length=96", "eval_windows=4,8", "data=stdlib", "validation_every=5", "new_tokens=64"):
        with pytest.raises(SystemExit, match="change the validation windows, so points would be ranked on different"):
            sweep.main(["--out", str(tmp_path / "s"), "--grid", option])


def test_sweep_checks_every_point_before_the_first_trains(pair, tmp_path, monkeypatch):
    """Options (export_dtype), top_k against each point's head and the data of every point are checked before
    anything trains."""
    trained = []
    fake_experiment(monkeypatch, [], trained)
    export_head(pair.ea_layer, tmp_path / "head", "float32")
    reuse = Models(pair.base_model, None, None, None, None)
    monkeypatch.setattr(sweep, "load_models", lambda cfg, reuse_=None: load_models(cfg, reuse))
    head = ["--head", str(tmp_path / "head"), "--total-token", "24", "--depth", "5", "--top-k", "4"]
    with pytest.raises(SystemExit, match="top_k=65 is larger than the draft head's vocabulary"):
        sweep.main(["--out", str(tmp_path / "a"), *head, "--grid", "top_k=4,65"])
    with pytest.raises(SystemExit, match="export_dtype must be one of float32, float16, bfloat16, got 'float8'"):
        sweep.main(["--out", str(tmp_path / "b"), *head, "--grid", "export_dtype=float16,float8"])

    def load_streams(cfg, models):
        if cfg.generated < 16:
            raise ValueError(f"the training data has {cfg.generated} tokens")

    monkeypatch.setattr(sweep, "load_streams", load_streams)
    with pytest.raises(SystemExit, match="the training data has 8 tokens"):
        sweep.main(["--out", str(tmp_path / "c"), *head, "--grid", "generated=32,8"])
    assert not trained


def test_sweep_resumes_after_a_failure_and_never_overwrites_results(tmp_path, monkeypatch):
    trained = []

    def summary(cfg):
        if cfg.omega == 4 and len(trained) == 2:  # the first attempt fails at the second point
            raise RuntimeError("out of memory")
        return {"val_tau_start": 1.0, "val_tau_end": 1.5, "val_reward_end": 0.5}

    fake_experiment(monkeypatch, [], trained, summary)
    command = ["--out", str(tmp_path / "s"), "--grid", "omega=1,4", "--steps", "3"]
    with pytest.raises(RuntimeError):
        sweep.main(command)
    with pytest.raises(SystemExit, match=r"omega1.0 holds a run with other options \(steps \(3 then, 5 now\)\): rerun "
                                         "the sweep with them, or choose another --out"):
        sweep.main(command[:-1] + ["5"])  # other settings: refused, naming them, not overwritten
    made = tmp_path / "s" / "omega1.0" / "config.json"  # as a run made before the option --system existed
    made.write_text(json.dumps({k: v for k, v in json.loads(made.read_text()).items() if k != "system"}))
    sweep.main(command)  # resumes: the finished point is kept, the failed one trains again
    assert [(Path(cfg.out).name) for cfg in trained] == ["omega1.0", "omega4.0", "omega4.0"]
    assert len(json.loads((tmp_path / "s" / "sweep.json").read_text())["rows"]) == 2


def test_a_sweep_made_before_dtype_auto_names_the_dtype_it_needs_on_a_gpu(tmp_path, monkeypatch):
    """A sweep made with float32 (the default before auto) and rerun on a GPU, where auto loads half precision, was
    refused as holding "the output of an earlier run", not saying that --dtype float32 resumes it."""
    trained = []
    fake_experiment(monkeypatch, [], trained)
    command = ["--out", str(tmp_path / "s"), "--grid", "omega=1", "--steps", "3"]
    sweep.main([*command, "--dtype", "float32"])
    (tmp_path / "s" / "sweep.json").unlink()  # (as if stopped before its table)
    (tmp_path / "s" / "sweep.md").unlink()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit, match=r"omega1.0 holds a run with other options \(dtype \('float32' then, "
                                         r"'float16' now\)\)"):
        sweep.main(command)
    sweep.main([*command, "--dtype", "float32"])
    assert len(trained) == 1


def test_a_sweep_point_that_diverges_is_a_row_of_its_own_and_the_others_train(tmp_path, monkeypatch):
    trained = []

    def summary(cfg):
        if (cfg.lr, cfg.objective) in ((1.0, "gto"), (3e-4, "token")):  # as train(): summary.json says why, raises
            result = {"diverged": "step 3: the gradient norm is nan", "val_tau_start": 1.0, "val_reward_start": 0.1,
                      "steps": 2}
            (Path(cfg.out) / "summary.json").write_text(json.dumps(result))
            raise gto_trainer.TrainingDiverged(result["diverged"])
        return {"val_tau_start": 1.0, "val_tau_end": 1.5, "val_reward_end": 0.5}

    fake_experiment(monkeypatch, [], trained, summary)
    command = ["--out", str(tmp_path / "s"), "--grid", "lr=1e-4,1,3e-4", "--control"]
    sweep.main(command)
    assert [cfg.lr for cfg in trained] == [1e-4, 1.0, 3e-4, 1e-4, 1.0, 3e-4]  # (each lr's control too)
    table = (tmp_path / "s" / "sweep.md").read_text().splitlines()
    assert table[2] == "| 0.0001 | gto | 1.000 | 1.500 | 0.500 | 1.500 |"
    assert table[3] == "| 1.0 | gto | 1.000 | diverged after step 2 | diverged after step 2 | 1.500 |"
    assert table[4] == "| 0.0003 | gto | 1.000 | 1.500 | 0.500 | diverged after step 2 |"  # its control did
    rows = json.loads((tmp_path / "s" / "sweep.json").read_text())["rows"]
    assert rows[1]["diverged"] == "step 3: the gradient norm is nan" and len(rows) == 6


def test_sweep_refuses_points_that_share_a_folder_and_an_out_with_a_finished_sweep(tmp_path, monkeypatch):
    trained = []
    fake_experiment(monkeypatch, [], trained)
    with pytest.raises(SystemExit, match=r"--grid gives several points the same settings \(lr0.0001\)"):
        sweep.main(["--out", str(tmp_path / "t"), "--grid", "lr=1e-4,0.0001"])
    assert not trained
    sweep.main(["--out", str(tmp_path / "s"), "--grid", "omega=1"])
    with pytest.raises(SystemExit, match=r"s already holds the output of an earlier run \(sweep.json, sweep.md\)"):
        sweep.main(["--out", str(tmp_path / "s"), "--grid", "omega=2"])  # would replace its table
    assert len(trained) == 1


@pytest.mark.parametrize("device", ["mps", "xpu"])
def test_config_refuses_a_device_torch_does_not_have(device):
    if getattr(torch, device).is_available():
        pytest.skip(f"{device} is available here")
    with pytest.raises(ValueError, match=f"device '{device}': {device} is not available"):
        GTOConfig(device=device)


@pytest.mark.parametrize("threads", ["0", "-1", "two"])
def test_cli_refuses_a_thread_count_below_one(threads, tmp_path, monkeypatch, capsys):
    def load_models(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(gto_cli, "load_models", load_models)
    with pytest.raises(SystemExit):
        gto_cli.main(["--out", str(tmp_path / "run"), "--data", "stdlib", "--threads", threads])
    assert "argument --threads: " in capsys.readouterr().err


# ------------------------------------------------------------ checkpoints
def half_without_groups(pair) -> TokenStream:
    """Windows at sample starts, every other sample without 4 adjacent trainable roots: some steps have no group."""
    seqs = greedy_windows(pair, 8, 48, seed=9)
    mask = torch.ones_like(seqs)
    mask[1::2, ::3] = 0
    return TokenStream(seqs.flatten(), mask.flatten(), torch.arange(8) * 48)


def logged(run: Path) -> list[dict]:
    """metrics.jsonl without the times (which no two runs share)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in record.items() if k != "seconds"} for record in records]


@pytest.mark.filterwarnings("ignore:.* steps had no group")
def test_a_run_interrupted_and_resumed_trains_and_logs_what_an_uninterrupted_one_does(pair, tmp_path, monkeypatch):
    """Checkpoints every 4 steps (the newest kept); the run stops in step 6 (step 5 already logged): resumed from
    step 4 it ends with the head, the records and the summary of the run that never stopped (the windows and the
    groups drawn on from the generators' saved states, AdamW's moments, the steps without groups counted before)."""
    stream = half_without_groups(pair)
    cfg = GTOConfig(out=str(tmp_path / "straight"), steps=6, windows=2, window_length=40, lr=1e-3, eval_every=2,
                    eval_windows=1, **TREE)
    every_4 = Checkpointing(save_every=4, keep=1)
    straight = train(cfg, tiny_models(pair, perturb=0.05), (stream, stream), progress=False, checkpointing=every_4)
    assert [p.name for p in checkpoint_dirs(tmp_path / "straight")] == ["step-00000006"]

    def stop_in_step_6(*args):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real_loss(*args)

    calls, real_loss = [], gto_trainer.training_loss
    monkeypatch.setattr(gto_trainer, "training_loss", stop_in_step_6)
    stopped = dataclasses.replace(cfg, out=str(tmp_path / "stopped"))
    with pytest.raises(KeyboardInterrupt):
        train(stopped, tiny_models(pair, perturb=0.05), (stream, stream), progress=False, checkpointing=every_4)
    monkeypatch.setattr(gto_trainer, "training_loss", real_loss)
    assert [p.name for p in checkpoint_dirs(tmp_path / "stopped")] == ["step-00000004"]
    assert [r["step"] for r in logged(tmp_path / "stopped")] == [0, 1, 2, 3, 4, 5]
    with pytest.raises(CheckpointMismatch, match="already holds checkpoints of an earlier run"):
        train(stopped, tiny_models(pair, perturb=0.05), (stream, stream), progress=False, checkpointing=every_4)
    resume = dataclasses.replace(every_4, resume=True)
    resumed = train(stopped, tiny_models(pair, perturb=0.05), (stream, stream), progress=False, checkpointing=resume)
    assert logged(tmp_path / "stopped") == logged(tmp_path / "straight")
    assert {k: v for k, v in resumed.items() if k != "seconds"} == {k: v for k, v in straight.items() if k != "seconds"}
    # (steps 3, 4 and 5 had no group: the count of the first two came back from the checkpoint)
    assert [r["step"] for r in logged(tmp_path / "straight") if "l_gto" in r] == [1, 2, 6]
    assert straight["steps_without_groups"] == 3
    one, two = (load_file(str(tmp_path / run / "head" / "model.safetensors")) for run in ("straight", "stopped"))
    assert one.keys() == two.keys() and all(torch.equal(one[name], two[name]) for name in one)
    assert [p.name for p in checkpoint_dirs(tmp_path / "stopped")] == ["step-00000006"]
    # A checkpoint of a head of another shape (another --head at the same path) is refused, naming the weights.
    state_file = tmp_path / "stopped" / "checkpoints" / "step-00000006" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    state["head"]["fc.weight"] = state["head"]["fc.weight"][:, :8]
    torch.save(state, state_file)
    head = tiny_models(pair).head
    with pytest.raises(CheckpointMismatch, match=r"holds a head of another shape than the one fine-tuned now "
                                                 r"\(fc.weight \[\d+, 8\] then, \[\d+, \d+\] now\)"):
        load_checkpoint(state_file.parent, head, torch.optim.AdamW(head.parameters()), {})


@pytest.mark.filterwarnings("ignore:.* steps had no group")
def test_a_run_killed_while_it_writes_a_checkpoint_resumes_from_the_one_before(pair, tmp_path, monkeypatch):
    """Killed while torch.save wrote step 4's state.pt: resumed (with another --save-every, which is free) from
    step 2 it trains what an uninterrupted run does, and the half-written step-4, which it never writes again,
    is removed with the next complete checkpoint (it stayed, as large as a complete one)."""
    stream = half_without_groups(pair)
    cfg = GTOConfig(out=str(tmp_path / "straight"), steps=5, windows=2, window_length=40, lr=1e-3, eval_every=0,
                    eval_windows=1, **TREE)
    train(cfg, tiny_models(pair, perturb=0.05), (stream, stream), progress=False,
          checkpointing=Checkpointing(save_every=3))
    real_save = torch.save

    def killed_in_step_4(state, path):
        if "step-00000004" in str(path):
            Path(path).write_bytes(b"cut short")
            raise KeyboardInterrupt
        real_save(state, path)

    monkeypatch.setattr(torch, "save", killed_in_step_4)
    stopped = dataclasses.replace(cfg, out=str(tmp_path / "stopped"))
    with pytest.raises(KeyboardInterrupt):
        train(stopped, tiny_models(pair, perturb=0.05), (stream, stream), progress=False,
              checkpointing=Checkpointing(save_every=2, keep=1))
    monkeypatch.undo()
    folders = tmp_path / "stopped" / "checkpoints"
    assert sorted(p.name for p in folders.iterdir()) == ["step-00000002", "step-00000004"]
    train(stopped, tiny_models(pair, perturb=0.05), (stream, stream), progress=False,
          checkpointing=Checkpointing(save_every=3, keep=1, resume=True))
    assert logged(tmp_path / "stopped") == logged(tmp_path / "straight")
    assert sorted(p.name for p in folders.iterdir()) == ["step-00000005"]


def test_resume_refuses_another_runs_checkpoints_before_the_models_load(tmp_path, monkeypatch):
    """As `python -m eagle_gto.train`: an --out with checkpoints needs --resume; --resume refuses a checkpoint
    past --steps or written with options that change the result (naming them), and accepts another number of
    processes at the same global batch; a --resume that finds no checkpoint starts over a run stopped before
    its first one, never over a finished run."""
    def load_models(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(gto_cli, "load_models", load_models)
    out = tmp_path / "run"
    started = GTOConfig(out=str(out), lr=1e-3, windows=4)
    checkpoint = out / "checkpoints" / "step-00000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "progress.json").write_text(json.dumps({"step": 2, "options": run_options(started, 1)}))
    with pytest.raises(SystemExit, match=r"python -m eagle_gto.gto: .*run already holds checkpoints of an earlier run "
                                         r"\(up to step-00000002\): pass --resume to continue it"):
        gto_cli.main(["--out", str(out), "--lr", "1e-3", "--windows", "4"])
    with pytest.raises(SystemExit, match=r"step-00000002 was written by a run with other options \(--lr 0.001 then, "
                                         r"3e-05 now; --windows x processes 4 then, 2 now\): resume with the options "
                                         r"that started the run, or choose another --out$"):
        gto_cli.main(["--out", str(out), "--resume"])
    with pytest.raises(SystemExit, match=r"step-00000002 is at step 2, past this run's 1 steps"):
        gto_cli.main(["--out", str(out), "--lr", "1e-3", "--windows", "4", "--steps", "1", "--resume"])
    # Free to change: --steps (the rate is constant), --eval-every, --device, ...; --windows 2 under 2 processes.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr("eagle_gto.train.errors.process_state",
                        lambda: SimpleNamespace(num_processes=1, is_main_process=True))
    with pytest.raises(AssertionError, match="a model was loaded"):
        gto_cli.main(["--out", str(out), "--lr", "1e-3", "--steps", "500", "--eval-every", "5", "--resume"])
    monkeypatch.delenv("WORLD_SIZE")
    shutil.rmtree(out / "checkpoints")
    (out / "metrics.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(AssertionError, match="a model was loaded"):
        gto_cli.main(["--out", str(out), "--resume"])
    (out / "summary.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"run already holds the output of an earlier run \(summary.json\)"):
        gto_cli.main(["--out", str(out), "--resume"])
    with pytest.raises(SystemExit, match=r"--save-every must be at least 1, got 0 \(a --save-every past the run's "
                                         r"steps checkpoints only the last step\)$"):
        gto_cli.main(["--out", str(tmp_path / "new"), "--save-every", "0"])
    with pytest.raises(SystemExit, match=r"--keep-checkpoints must be at least 1, got 0 \(the newest is the one "
                                         r"--resume continues from\)$"):
        gto_cli.main(["--out", str(tmp_path / "new"), "--keep-checkpoints", "0"])


def test_resume_compares_local_paths_as_the_folders_they_name(tmp_path, monkeypatch):
    """--base and --head as typed (./head, head, its absolute path, or relative to another working folder) name
    the same folders: the resume goes on (here: to loading the models); another folder is refused, naming both;
    a hub id is compared as given. A checkpoint written before paths were resolved is read from here."""
    def load_models(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(gto_cli, "load_models", load_models)
    monkeypatch.chdir(tmp_path)
    for folder in ("base", "head", "other", "work"):
        (tmp_path / folder).mkdir()
    started = GTOConfig(out="run", base="base", head="head", data="stdlib")
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000002"
    checkpoint.mkdir(parents=True)
    resumes = [("run", "./base", str(tmp_path / "head")), ("../run", "../base", "../head/")]  # (the second: in work/)
    typed = {**run_options(started, 1), "base": "base", "head": "head"}  # (as before: read from the same folder)
    for options, ways in ((run_options(started, 1), resumes), (typed, resumes[:1])):
        (checkpoint / "progress.json").write_text(json.dumps({"step": 2, "options": options}))
        for out, base, head in ways:
            monkeypatch.chdir(tmp_path / ("work" if out.startswith("..") else ""))
            with pytest.raises(AssertionError, match="a model was loaded"):
                gto_cli.main(["--out", out, "--base", base, "--head", head, "--data", "stdlib", "--resume"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=f"other options \\(--head {re.escape(str(tmp_path / 'head'))} then, "
                                         f"{re.escape(str(tmp_path / 'other'))} now\\)"):
        gto_cli.main(["--out", "run", "--base", "base", "--head", "other", "--data", "stdlib", "--resume"])
    assert run_options(dataclasses.replace(started, base="org/model"), 1)["base"] == "org/model"


def test_resume_compares_a_default_base_head_or_reference_as_the_folder_it_stands_for(tmp_path, monkeypatch):
    """A run started with the default --base and --head (the demo pair) and resumed with those folders given, or
    the reverse, is the same run; so is a --reference left out (the head) and one given as the head. A hub id is
    still compared as typed."""
    def load_models(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(gto_cli, "load_models", load_models)
    base, head = demo_paths(head="eagle3")
    given = ["--base", base, "--head", head, "--reference", head]
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000002"
    checkpoint.mkdir(parents=True)
    for started, resumed in (({}, given), (dict(base=base, head=head, reference=head), [])):
        options = run_options(GTOConfig(out=str(tmp_path / "run"), data="stdlib", **started), 1)
        (checkpoint / "progress.json").write_text(json.dumps({"step": 2, "options": options}))
        with pytest.raises(AssertionError, match="a model was loaded"):
            gto_cli.main(["--out", str(tmp_path / "run"), "--data", "stdlib", "--resume", *resumed])
    options = run_options(GTOConfig(out=str(tmp_path / "run"), data="stdlib", base="org/model"), 1)
    (checkpoint / "progress.json").write_text(json.dumps({"step": 2, "options": options}))
    demo_base = re.escape(str(Path(base).resolve()))
    with pytest.raises(SystemExit, match=f"other options \\(--base org/model then, {demo_base} now\\)"):
        gto_cli.main(["--out", str(tmp_path / "run"), "--data", "stdlib", "--resume"])


def test_dtype_auto_is_the_default_and_a_resume_compares_the_dtype_it_loads(tmp_path, monkeypatch):
    """--dtype auto, the default as in every command, is resolved as the config is made: float32 on a CPU, so a
    run started with --dtype float32 (the default before auto) resumes with auto; on a GPU the demo base's own
    float16, which a run started in float32 is not."""
    def load_models(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(gto_cli, "load_models", load_models)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    started = GTOConfig(out=str(tmp_path / "run"), dtype="float32", data="stdlib")
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "progress.json").write_text(json.dumps({"step": 2, "options": run_options(started, 1)}))
    for dtype in ([], ["--dtype", "auto"]):
        with pytest.raises(AssertionError, match="a model was loaded"):
            gto_cli.main(["--out", str(tmp_path / "run"), "--data", "stdlib", "--resume", *dtype])
    assert config_from(config_parser("").parse_args([])).base_dtype == "float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on_gpu = GTOConfig(out=str(tmp_path / "run"), data="stdlib")
    assert on_gpu.base_dtype == "float16" and GTOConfig(device="cpu").base_dtype == "float32"
    with pytest.raises(CheckpointMismatch, match=r"other options \(--dtype float32 then, float16 now\)"):
        gto_checkpoints.check_same_run_options(checkpoint, run_options(started, 1), run_options(on_gpu, 1))


def test_dtype_auto_is_resolved_for_the_device_of_a_replaced_config(tmp_path, monkeypatch):
    """auto was resolved as the config was made, so dataclasses.replace(cfg, device=...) kept the dtype of the old
    device (float16 for a CPU run, float32 for a GPU one). The config keeps what was asked; what it records (and a
    resume compares) is the dtype the base loads in."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    on_gpu = GTOConfig(out=str(tmp_path / "run"))
    on_cpu = dataclasses.replace(on_gpu, device="cpu")
    assert (on_gpu.dtype, on_gpu.base_dtype) == ("auto", "float16")
    assert (on_cpu.dtype, on_cpu.base_dtype) == ("auto", "float32")
    assert dataclasses.replace(on_cpu, device="cuda").base_dtype == "float16"
    assert dataclasses.replace(on_cpu, dtype="bfloat16").base_dtype == "bfloat16"
    assert on_cpu.recorded_options()["dtype"] == run_options(on_cpu, 1)["dtype"] == "float32"
    assert sweep.control_of(on_gpu) != sweep.control_of(on_cpu)


def test_a_fresh_run_over_a_run_stopped_before_its_first_checkpoint_says_to_pass_resume(tmp_path, monkeypatch):
    """A run killed while it wrote its first checkpoint left config.json, metrics.jsonl and a checkpoint without
    progress.json: nothing to continue from, so --resume starts it again; a fresh run is refused, saying so."""
    def load_models(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(gto_cli, "load_models", load_models)
    out = tmp_path / "run"
    (out / "checkpoints" / "step-00000002").mkdir(parents=True)
    (out / "checkpoints" / "step-00000002" / "state.pt").write_bytes(b"cut short")
    (out / "config.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"step": 0}\n')
    for held in ("config.json, metrics.jsonl, checkpoints", "checkpoints"):
        with pytest.raises(SystemExit, match=f"run holds a run stopped before its first complete checkpoint \\({held}"
                                             r"\): pass --resume to start it again there from step 0, or choose"):
            gto_cli.main(["--out", str(out), "--data", "stdlib"])
        with pytest.raises(AssertionError, match="a model was loaded"):
            gto_cli.main(["--out", str(out), "--data", "stdlib", "--resume"])
        for name in ("config.json", "metrics.jsonl"):
            (out / name).unlink(missing_ok=True)


def test_ctrl_c_stops_a_run_in_one_line_that_says_how_to_go_on(tmp_path, monkeypatch, capsys):
    """A KeyboardInterrupt (Ctrl-C, a scheduler's SIGINT) ended the run with a traceback: now one line naming the
    checkpoint --resume continues from (or that it starts over), and exit status 130."""
    monkeypatch.setattr(gto_cli, "load_models", lambda cfg: None)
    monkeypatch.setattr(gto_cli, "load_streams", lambda cfg, models: None)

    def train(cfg, models, streams, checkpointing):
        Path(cfg.out, "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(gto_cli, "train", train)
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises((SystemExit, KeyboardInterrupt)) as stopped:  # (a KeyboardInterrupt would stop pytest)
        gto_cli.main(["--out", str(out), "--data", "stdlib"])
    assert stopped.type is SystemExit and stopped.value.code == 130
    assert capsys.readouterr().err == (f"python -m eagle_gto.gto: interrupted; {out} holds no complete checkpoint "
                                       "yet: run the same command with --resume to start again there from step 0\n")
    for step in (1, 2):  # it names the newest (--keep-checkpoints 2 keeps an older one)
        checkpoint = out / "checkpoints" / f"step-{step:08d}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "progress.json").write_text(json.dumps({"step": step, "options": run_options(
            GTOConfig(out=str(out), data="stdlib"), 1)}))
    with pytest.raises((SystemExit, KeyboardInterrupt)) as stopped:
        gto_cli.main(["--out", str(out), "--data", "stdlib", "--resume"])
    assert stopped.type is SystemExit
    assert capsys.readouterr().err == ("python -m eagle_gto.gto: interrupted; run the same command with --resume to "
                                       f"continue from {checkpoint}\n")


@pytest.mark.filterwarnings("ignore:.* steps had no group")
def test_a_resume_that_finds_no_checkpoint_says_it_starts_from_step_0(pair, tmp_path, capsys):
    stream = half_without_groups(pair)
    cfg = GTOConfig(out=str(tmp_path / "run"), steps=1, windows=2, window_length=40, eval_windows=1, **TREE)
    train(cfg, tiny_models(pair), (stream, stream), progress=False, checkpointing=Checkpointing(resume=True))
    assert f"{tmp_path / 'run'} holds no complete checkpoint: starting from step 0\n" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["experiment", "sweep"])
@pytest.mark.parametrize("option", [["--resume"], ["--save-every", "5"], ["--keep-checkpoints", "1"]])
def test_experiment_and_sweep_refuse_the_checkpoint_options(command, option, capsys):
    """They keep finished runs' results, not checkpoints: the options would be silently ignored."""
    with pytest.raises(SystemExit):
        gto_cli.main([command, *option])
    assert f"error: {option[0]}: {command} keeps no checkpoints: it keeps each finished" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:.* steps had no group")
def test_two_processes_resume_and_a_run_may_resume_with_another_number_of_processes(pair, tmp_path):
    """torchrun, 2 processes at --windows 2, stopped in step 3 of 4: resumed by 2 processes, or by one at
    --windows 4 (the same global batch), each ends with the head and the records of one uninterrupted process
    at --windows 4 (to the tolerance two processes train it to, see the test above)."""
    stream = half_without_groups(pair)
    pair.base_model.save_pretrained(tmp_path / "base")
    export_head(pair.ea_layer, tmp_path / "head", "float32")
    torch.save((stream, stream), tmp_path / "streams.pt")
    options = dict(base=str(tmp_path / "base"), head=str(tmp_path / "head"), steps=4, window_length=40, lr=1e-3,
                   eval_every=2, eval_windows=2, **TREE)
    script = tmp_path / "run.py"  # train() on the saved pair; "stop": a KeyboardInterrupt in step 3
    script.write_text("import sys, torch\nfrom eagle_gto.loading import load_base\n"
                      "from eagle_gto.gto import trainer\nfrom eagle_gto.gto.checkpoints import Checkpointing\n"
                      "calls, loss = [], trainer.training_loss\n"
                      "def stopping(*args):\n    calls.append(1)\n"
                      "    if len(calls) == 3 and sys.argv[2] == 'stop':\n        raise KeyboardInterrupt\n"
                      "    return loss(*args)\n"
                      "trainer.training_loss = stopping\n"
                      f"cfg = trainer.GTOConfig(out=sys.argv[1], windows=2, **{options!r})\n"
                      "models = trainer.load_models(cfg, trainer.Models(load_base(cfg.base), None, None, None, None))\n"
                      "streams = torch.load(sys.argv[3], weights_only=False)\n"
                      "every_2 = Checkpointing(save_every=2, resume=sys.argv[2] == 'resume')\n"
                      "trainer.train(cfg, models, streams, progress=False, checkpointing=every_2)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(Path(__file__).parents[i]) for i in (1, 0)),
               OMP_NUM_THREADS="1")
    for how in ("stop", "resume"):
        ran = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              str(script), str(tmp_path / "two"), how, str(tmp_path / "streams.pt")],
                             capture_output=True, text=True, env=env, timeout=120)
        assert (ran.returncode == 0) == (how == "resume"), ran.stderr[-3000:]
        if how == "stop":
            assert [p.name for p in checkpoint_dirs(tmp_path / "two")] == ["step-00000002"]
            shutil.copytree(tmp_path / "two", tmp_path / "one-after-two")
    assert ran.stdout.count("resumed from") == 1  # (said by rank 0)
    base = load_base(options["base"])
    for run, resume in (("one", False), ("one-after-two", True)):
        cfg = GTOConfig(out=str(tmp_path / run), windows=4, **options)
        train(cfg, load_models(cfg, Models(base, None, None, None, None)), (stream, stream), progress=False,
              checkpointing=Checkpointing(save_every=2, resume=resume))
    assert len(logged(tmp_path / "one")) == 5
    heads = {run: load_file(str(tmp_path / run / "head" / "model.safetensors"))
             for run in ("one", "two", "one-after-two")}
    assert not torch.equal(heads["one"]["fc.weight"], pair.ea_layer.state_dict()["fc.weight"])  # it trained
    for run in ("two", "one-after-two"):
        for mine, one in zip(logged(tmp_path / run), logged(tmp_path / "one"), strict=True):
            assert mine == pytest.approx(one, rel=1e-5, abs=1e-7)
        for name in heads["one"]:
            torch.testing.assert_close(heads[run][name], heads["one"][name], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{run} {name}: {m}")


def test_resume_refuses_other_data_at_the_same_path_before_writing(pair, tmp_path):
    """--data is compared as a path: a jsonl file edited (or another at the same relative path) since the
    checkpoint resumed a run on a mix of the two, and compared validation tau at the start and the end on
    two validation sets. The checkpoint holds a fingerprint of the tokens: other tokens are refused (--data
    generated: the test below)."""
    stream = half_without_groups(pair)
    cfg = GTOConfig(out=str(tmp_path / "run"), data="train.jsonl", steps=1, windows=2, window_length=40,
                    eval_windows=1, **TREE)  # (the streams given stand for the file's)
    train(cfg, tiny_models(pair), (stream, stream), progress=False, checkpointing=Checkpointing(save_every=1))
    edited = dataclasses.replace(stream, ids=stream.ids.clone())
    edited.ids[100] = (edited.ids[100] + 1) % VOCAB
    written = {name: (tmp_path / "run" / name).read_text() for name in ("config.json", "metrics.jsonl")}
    with pytest.raises(CheckpointMismatch, match=r"step-00000001 was written by a run on other data: the tokens of "
                                                 r"--data .* resume with the data that started the run"):
        train(dataclasses.replace(cfg, steps=2), tiny_models(pair), (edited, stream), progress=False,
              checkpointing=Checkpointing(save_every=1, resume=True))
    assert {name: (tmp_path / "run" / name).read_text() for name in written} == written


@pytest.mark.filterwarnings("ignore:.* steps had no group")
def test_resume_on_generated_data_refuses_other_prompts_and_warns_of_other_continuations(pair, tmp_path):
    """--data generated was not compared at all: a resume with another corpus (another Python's standard library)
    or tokenizer trained on a mix unnoticed. Its prompts are compared (refused when they differ); the base's
    continuations of the same prompts may differ by a token on another --device, so those only warn."""
    stream = dataclasses.replace(half_without_groups(pair), prompts="prompts")
    cfg = GTOConfig(out=str(tmp_path / "run"), steps=1, windows=2, window_length=40, eval_windows=1, **TREE)
    train(cfg, tiny_models(pair), (stream, stream), progress=False, checkpointing=Checkpointing(save_every=1))
    continued = dataclasses.replace(stream, ids=stream.ids.clone())
    continued.ids[100] = (continued.ids[100] + 1) % VOCAB
    resume = Checkpointing(save_every=1, resume=True)
    with pytest.warns(UserWarning, match=r"the base's continuations \(--data generated\) differ from those of the run "
                                         r"that wrote .*step-00000001 \(another --device or GPU may change a token"):
        train(dataclasses.replace(cfg, steps=2), tiny_models(pair), (continued, stream), progress=False,
              checkpointing=resume)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "the base's continuations")  # step 2's checkpoint holds the new ones
        train(dataclasses.replace(cfg, steps=3), tiny_models(pair), (continued, stream), progress=False,
              checkpointing=resume)
    other = dataclasses.replace(continued, prompts="other prompts")
    with pytest.raises(CheckpointMismatch, match=r"step-00000003 was written by a run on other data: the prompts of "
                                                 r"--data generated differ from the run's \(the demo corpus"):
        train(dataclasses.replace(cfg, steps=4), tiny_models(pair), (other, stream), progress=False,
              checkpointing=resume)


def test_a_generated_stream_carries_a_digest_of_its_prompts_not_of_the_continuations(tmp_path, monkeypatch):
    class Characters:
        eos_token_id = 0

        def __call__(self, texts, verbose=True):
            return {"input_ids": [[1 + ord(c) % (VOCAB - 1) for c in text] for text in texts]}

    files = [tmp_path / "a.py", tmp_path / "b.py"]
    for i, file in enumerate(files):
        file.write_text(f"def f{i}(x):\n    return x + {i}\n" * 4)
    shift = [1]
    monkeypatch.setattr("eagle_gto.train.data.greedy_continue",
                        lambda base, prompts, new, stops, batch_size: [[shift[0]] * new for _ in prompts])

    def generated(seed=0):
        return generated_stream(None, Characters(), files, 4, 8, 5, seed)

    first = generated()
    # each sample is its prompt, then its continuation, all of it trained
    assert first.starts.tolist() == [0, 13, 26, 39] and bool(first.loss_mask.all())
    assert first.ids.view(4, 13)[:, 8:].eq(1).all()
    shift[0] = 2
    continued = generated()
    assert first.prompts == continued.prompts and not torch.equal(first.ids, continued.ids)
    assert generated(seed=1).prompts != first.prompts
    files[1].write_text("class Other:\n    pass\n" * 6)
    assert generated().prompts != first.prompts
