"""Group-based draft policy training (gto-method.md, steps 1-5).

- groups: m adjacent root positions of one window; trees of the current head
  M and of the frozen reference M0 at each;
- debiased rewards R_i = R(T_i) - R(T̄_i) and group-standardised advantages;
- the longest accepted sequence Ŝ_i of T_i (greedy target acceptance) and its
  teacher-forced log-probability under a head, with gradients for M;
- the per-token ratio s_i and the PPO clipped surrogate.

Only `path_logprob` touches the head's parameters; rewards and advantages are
plain tensors computed without gradients, so L_GTO reaches M through s_i alone.
"""

from __future__ import annotations

import torch

from ..acceptance import accept
from ..heads import DraftHead
from ..train.ttt import StepKeys
from ..vocab import target_to_draft
from .trees import HeadPass, Roots, TreeBatch, visible_prefix


def group_roots(eligible: torch.Tensor, group_size: int, groups_per_window: int,
                generator: torch.Generator | None = None) -> Roots:
    """Up to `groups_per_window` non-overlapping groups of `group_size`
    adjacent root positions in each window. eligible [S, L] bool marks the
    positions that may be roots (see `root_eligible`); group g covers
    positions 1 + g*m .. g*m + m (a root needs one entry before it) and is
    used only when all of them are eligible. Rows come out group by group:
    row b belongs to group b // m. No rows when no group is eligible."""
    S, L = eligible.shape
    starts = 1 + torch.arange((L - 1) // group_size) * group_size
    positions = starts[:, None] + torch.arange(group_size)  # [groups, m]
    seq, pos = [], []
    for s in range(S):
        usable = eligible[s].cpu()[positions].all(dim=1).nonzero().flatten()
        picked = usable[torch.randperm(len(usable), generator=generator)[:groups_per_window]].sort().values
        pos.append(positions[picked].flatten())
        seq.append(torch.full((len(picked) * group_size,), s))
    return Roots(torch.cat(seq), torch.cat(pos))


def root_eligible(loss_mask: torch.Tensor) -> torch.Tensor:
    """[S, L] bool: positions whose tree drafts trained tokens. A tree at
    position r drafts the tokens from r + 1 on, so r may be a root when the
    token after it carries loss (the last position drafts nothing known)."""
    eligible = torch.zeros_like(loss_mask, dtype=torch.bool)
    eligible[:, :-1] = loss_mask[:, 1:].bool()
    return eligible


def debiased_rewards(reward: torch.Tensor, reference_reward: torch.Tensor, debias: bool = True) -> torch.Tensor:
    """R_i = R(T_i) - R(T̄_i); without debiasing (ablation) R_i = R(T_i)."""
    return reward - reference_reward if debias else reward


def group_advantages(rewards: torch.Tensor, group_size: int, delta: float) -> torch.Tensor:
    """[G*m] rewards, group by group -> A_i = (R_i - mean_G) / (std_G + delta),
    with the population standard deviation of the group."""
    groups = rewards.reshape(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True, correction=0)
    return ((groups - mean) / (std + delta)).flatten()


def accepted_paths(trees: TreeBatch, choices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ŝ for each tree under greedy target acceptance (`acceptance.accept`
    with the target's argmax at every node): draft tokens [B, D] (padded with
    the root token) and lengths l [B], D = the longest l."""
    results = [accept(tree, choices[b]) for b, tree in enumerate(trees.trees)]
    lengths = torch.stack([r.num_accepted for r in results])
    width = max(int(lengths.max()), 1)
    nodes = torch.stack([r.path[1 : width + 1] for r in results])  # padded with T beyond the branch
    nodes = torch.where(nodes < trees.tokens.shape[1], nodes, 0)  # padding -> the root
    tokens = trees.tokens.gather(1, nodes)
    return tokens, lengths


def path_logprob(head: DraftHead, state: HeadPass, roots: Roots, tokens: torch.Tensor,
                 lengths: torch.Tensor) -> torch.Tensor:
    """log M(Ŝ | x): the head's log-probabilities of tokens[b, :lengths[b]]
    drafted after root b, summed, fed along the branch exactly as the tree
    expansion feeds it (each step reads the previous step's output and sees
    the prefix and the branch so far). Differentiable when `state` is. [B]"""
    device = state.out.device
    seq, pos = roots.seq.to(device), roots.pos.to(device)
    tokens, lengths = tokens.to(device), lengths.to(device)
    B, D = tokens.shape
    if head.kind == "eagle3":
        draft_ids = target_to_draft(head.d2t, head.config.vocab_size).to(device)[tokens].clamp_min(0)
    else:
        draft_ids = tokens
    caches = []
    for keys, values in zip(state.keys, state.values):
        # Concatenating keys (not writing into a buffer) keeps the views autograd saved valid.
        cache = StepKeys()
        cache.append(keys[seq], values[seq])
        caches.append(cache)
    visible = visible_prefix(Roots(seq, pos), state.out.shape[1], 1)  # [B, 1, n]
    hidden = state.out[seq, pos - 1]  # [B, h] predicts Ŝ_1
    total = torch.zeros(B, device=device)
    for j in range(D):
        logp = torch.log_softmax(head.draft_logits(hidden).float(), dim=-1)
        step = logp.gather(1, draft_ids[:, j : j + 1]).squeeze(1)
        total = total + torch.where(j < lengths, step, 0.0)
        if j + 1 < D:
            mask = torch.cat((visible, torch.ones(B, 1, j + 1, dtype=torch.bool, device=device)), dim=2)
            hidden = head(hidden[:, None], tokens[:, j : j + 1], (pos + j)[:, None], mask[:, None], caches)[:, 0]
    return total


def ratio(logp_new: torch.Tensor, logp_ref: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """s_i = exp((log M(Ŝ) - log M0(Ŝ)) / max(l_i, 1))."""
    return torch.exp((logp_new - logp_ref) / lengths.clamp_min(1).to(logp_new))


def clipped_surrogate(s: torch.Tensor, advantages: torch.Tensor, eps: float) -> torch.Tensor:
    """L_GTO = -mean_i min(s_i A_i, clip(s_i, 1-eps, 1+eps) A_i): the mean over
    all rows is the mean over groups of the (1/m) sum inside each."""
    return -torch.minimum(s * advantages, s.clamp(1 - eps, 1 + eps) * advantages).mean()
