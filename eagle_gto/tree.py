"""The EAGLE-2 dynamic draft tree, built with tensor operations.

Terms (used throughout the engine and the GTO trainer):
- root: the token the target produced last; node 0 of every tree.
- candidates: every token the expansion scored. Level 0 holds the head's
  top_k after the root; each of `depth` further levels expands the current
  frontier (the top_k candidates of the level by cumulative score) with top_k
  children each, so it holds top_k**2 candidates. Candidates are numbered in
  creation order; a candidate's score is the sum of the draft log-probs on its
  path (its parent's score + its own log-prob).
- tree: the root plus the best `total_token - 1` candidates, kept in creation
  order, so that a parent always precedes its children.

`DraftTree` carries what verification needs, all of static shape for a given
`total_token`: tokens, parents, the ancestor mask (tree attention) and depths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DraftTree:
    tokens: torch.Tensor  # [T] target token ids, tokens[0] = root
    parents: torch.Tensor  # [T] node index of each node's parent (root: 0)
    mask: torch.Tensor  # [T, T] bool, mask[i, j] = j is i itself or an ancestor of i
    depths: torch.Tensor  # [T] 0 for the root; a node's offset from the root's position
    scores: torch.Tensor  # [T] cumulative draft log-prob (root: 0)

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    def leaves(self) -> torch.Tensor:
        """Bool [T]: nodes that are nobody's parent."""
        is_parent = torch.zeros_like(self.mask[0])
        is_parent[self.parents[1:]] = True
        return ~is_parent

    def paths(self) -> torch.Tensor:
        """[T, max_depth + 1] node indices from the root to each node, padded
        with -1 (row i is the branch that ends at node i). Static shape."""
        T = self.size
        order = torch.arange(T, device=self.mask.device).expand(T, T)
        # Ancestors have smaller indices than their descendants: sorting the
        # masked indices lists each branch root first.
        ranked = torch.where(self.mask, order, T).sort(dim=1).values
        width = int(self.depths.max()) + 1
        ranked = ranked[:, :width]
        return torch.where(ranked == T, -1, ranked)

    def retrieve_indices(self) -> torch.Tensor:
        """Root-to-leaf paths [num_leaves, max_depth + 1], padded with -1, as
        the reference engine names them."""
        return self.paths()[self.leaves()]


def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] for a 0-dim index tensor. Plain indexing would read the index
    on the host (`.item()`): a synchronisation, and an error while a CUDA
    graph records."""
    return x.index_select(0, index.reshape(1).to(x.device)).squeeze(0)


def ancestor_mask(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """Ancestor closure by pointer jumping: node i sees itself, its parent,
    its grandparent, ... (max_depth steps reach the root from any node)."""
    # Comparisons rather than indexed assignment of True, which would copy a
    # host value to the device (not allowed while a CUDA graph records).
    nodes = torch.arange(parents.shape[0], device=parents.device)
    mask = nodes[:, None] == nodes[None, :]
    current = nodes
    for _ in range(max_depth):
        current = parents[current]
        mask |= current[:, None] == nodes[None, :]
    return mask


def select_tree(
    root_token: torch.Tensor,
    cand_tokens: torch.Tensor,
    cand_scores: torch.Tensor,
    cand_parents: torch.Tensor,
    total_token: int,
    max_depth: int,
) -> DraftTree:
    """Keep the best `total_token - 1` candidates and derive the tree.

    cand_tokens/cand_scores [C]; cand_parents [C] the parent's candidate
    number + 1 (0 = the root). A stable descending sort ranks ties by creation
    order, so a parent (score >= its child's) is always kept before its child:
    the kept set is closed under ancestors even when log-probs are exactly 0.
    A NaN score (a head whose logits overflowed; its descendants are NaN too)
    ranks as -inf, after its parent: sorted first, as torch sorts NaN, it
    would be kept without its parent.
    """
    n = total_token - 1
    ranked = torch.nan_to_num(cand_scores, nan=float("-inf"))
    order = torch.sort(ranked, descending=True, stable=True).indices[:n]
    kept = torch.sort(order).values  # creation order
    parent_cand = cand_parents[kept]  # 1-based candidate number, 0 = root
    # Position of each kept node's parent among the kept nodes, +1 for the root.
    parent_node = torch.searchsorted(kept, parent_cand - 1) + 1
    parent_node = torch.where(parent_cand == 0, 0, parent_node)
    root = root_token.reshape(1).to(cand_tokens)
    parents = torch.cat((parent_node.new_zeros(1), parent_node))
    mask = ancestor_mask(parents, max_depth)
    return DraftTree(
        tokens=torch.cat((root, cand_tokens[kept])),
        parents=parents,
        mask=mask,
        depths=mask.sum(dim=1) - 1,
        scores=torch.cat((cand_scores.new_zeros(1), cand_scores[kept])),
    )


def num_candidates(depth: int, top_k: int) -> int:
    return top_k + depth * top_k * top_k


def check_tree_params(total_token: int, depth: int, top_k: int, draft_vocab_size: int | None = None) -> None:
    """Refuse a tree the expansion cannot build; `draft_vocab_size`: the
    head's, when known (each level keeps top_k draft tokens of it)."""
    if depth < 1 or top_k < 1:
        raise ValueError(f"depth and top_k must be >= 1, got depth={depth}, top_k={top_k}")
    if draft_vocab_size is not None and top_k > draft_vocab_size:
        raise ValueError(f"top_k={top_k} is larger than the draft head's vocabulary ({draft_vocab_size} tokens)")
    if total_token < 2:
        raise ValueError(f"total_token must be >= 2 (the root and at least one draft token), got {total_token}")
    if total_token - 1 > num_candidates(depth, top_k):
        raise ValueError(
            f"total_token={total_token} needs {total_token - 1} draft nodes, but depth={depth} and "
            f"top_k={top_k} produce only {num_candidates(depth, top_k)} candidates"
        )
