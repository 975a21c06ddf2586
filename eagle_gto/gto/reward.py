"""The draft tree reward (gto-method.md, "Draft Tree Reward").

For the branch ending at node i, with p_a the target probability of node a's
token given the prefix and a's ancestors (the root's is 1):

    reach(a)  = prod of p over a's ancestors and a itself (root excluded)
              = the probability that the target accepts every token down to a
    value(i)  = sum of reach(a) over the nodes a on the branch (root excluded)
              = L_{t,i}, the expected accepted length along that branch

The tree's candidate sequences are its root-to-leaf branches, and the reward
aggregates their values: the smooth maximum (1/eta) log sum_i exp(eta L_i) of
the method, or the plain mean or hard maximum for the ablation. Everything is
tensor work over the tree's ancestor mask; nothing here is differentiated.
"""

from __future__ import annotations

import torch

AGGREGATIONS = ("smoothmax", "mean", "max")


def branch_values(node_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """node_logp [B, T] (0 at the root), mask [B, T, T] ancestor mask ->
    [B, T]: L for the branch from the root down to each node."""
    # where() rather than a product: log p may be -inf and 0 * -inf is nan.
    reach = torch.where(mask, node_logp[:, None, :], 0.0).sum(dim=-1).exp()
    return torch.where(mask, reach[:, None, :], 0.0).sum(dim=-1) - 1.0  # the root's reach is 1


def aggregate(values: torch.Tensor, leaves: torch.Tensor, how: str = "smoothmax", eta: float = 1.0) -> torch.Tensor:
    """values [B, T] branch values, leaves [B, T] bool -> [B] tree rewards."""
    if how == "smoothmax":
        return torch.logsumexp(torch.where(leaves, eta * values, float("-inf")), dim=-1) / eta
    if how == "mean":
        return torch.where(leaves, values, 0.0).sum(dim=-1) / leaves.sum(dim=-1)
    if how == "max":
        return torch.where(leaves, values, float("-inf")).amax(dim=-1)
    raise ValueError(f"unknown reward aggregation {how!r}; choose from {AGGREGATIONS}")


def tree_reward(node_logp: torch.Tensor, mask: torch.Tensor, leaves: torch.Tensor,
                how: str = "smoothmax", eta: float = 1.0) -> torch.Tensor:
    """R(T; eta) for each of B trees: [B]."""
    if eta <= 0:
        raise ValueError(f"eta must be > 0, got {eta}")
    return aggregate(branch_values(node_logp, mask), leaves, how, eta)
