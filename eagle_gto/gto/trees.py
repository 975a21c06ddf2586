"""Draft trees for many training prefixes at once, and the target's verdict.

GTO scores, for every training position, the tree the engine would draft
there. Decoding drafts one tree at a time from a cache it grows step by step;
training holds whole sequences, so here:

- `target_pass` runs the target once over a batch of windows: the head's
  features and the keys/values every tree's prefix needs;
- `head_pass` runs the head once over the same windows (causal), which gives
  every position's last draft output and the draft prefix keys/values;
- `draft_trees` expands the trees of B prefixes together. It is the loop of
  `Drafter.draft_tree` with a leading batch dimension (the same operations in
  the same order, each row seeing only its own prefix), and it keeps the best
  candidates with `tree.select_tree` itself, so each tree is node for node
  the one decoding drafts (tests/test_gto.py checks this against the engine);
- `verify_trees` runs the target over the B trees with the tree-attention mask
  over each tree's own prefix, in one forward per chunk, as verification does.

Entry layout of the head (as in drafter.py): entry j pairs the target feature
at position j with the token at j + 1 and predicts the token at j + 2. A tree
rooted at position r (root = token r) sees entries 0..r-1 and drafts from
the output of entry r - 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..drafter import prefix_mask, vocab_chunk, vocab_top_k
from ..heads import DraftHead
from ..kv_cache import KVBuffer, TargetKVCache
from ..target import cache_keyword, decoder_layers, model_logits
from ..tree import DraftTree, select_tree


@dataclass
class Roots:
    """Where B trees are rooted: window `seq[b]`, position `pos[b]` (>= 1)."""

    seq: torch.Tensor  # [B] long
    pos: torch.Tensor  # [B] long

    def __len__(self) -> int:
        return self.seq.shape[0]


@dataclass
class TargetPass:
    tokens: torch.Tensor  # [S, L]
    features: torch.Tensor  # [S, L, F] what the head reads at each position
    logits: torch.Tensor  # [S, L, V] float32, the target's next-token logits
    cache: TargetKVCache  # keys/values of the S windows, batch S


@dataclass
class HeadPass:
    out: torch.Tensor  # [S, L-1, h] output of entry j (predicts token j + 2)
    keys: list[torch.Tensor]  # per head layer [S, kv_heads, L-1, head_dim]
    values: list[torch.Tensor]

    def detach(self) -> "HeadPass":
        return HeadPass(self.out.detach(), [k.detach() for k in self.keys], [v.detach() for v in self.values])


@dataclass
class TreeBatch:
    """B trees of one size, stacked (fields as in DraftTree)."""

    trees: list[DraftTree]
    tokens: torch.Tensor  # [B, T]
    parents: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T, T] bool
    depths: torch.Tensor  # [B, T]
    scores: torch.Tensor  # [B, T] cumulative draft log-prob
    leaves: torch.Tensor  # [B, T] bool

    @classmethod
    def stack(cls, trees: list[DraftTree]) -> "TreeBatch":
        def field(name):
            return torch.stack([getattr(t, name) for t in trees])

        leaves = torch.stack([t.leaves() for t in trees])
        return cls(trees, field("tokens"), field("parents"), field("mask"), field("depths"), field("scores"), leaves)

    def __len__(self) -> int:
        return len(self.trees)


def feature_layers_for(head: DraftHead, base) -> list[int] | None:
    return head.feature_layers(len(decoder_layers(base)))


@torch.no_grad()
def target_pass(base, tokens: torch.Tensor, feature_layers: list[int] | None) -> TargetPass:
    """One causal forward of the target over windows `tokens` [S, L]:
    features (EAGLE-3: hidden states entering the three layers; EAGLE-1: the
    final hidden state), logits, and the cache every tree's prefix is cut
    from."""
    S, L = tokens.shape
    decoder = base.get_decoder()
    device = base.get_input_embeddings().weight.device
    dtype = next(base.parameters()).dtype
    cache = TargetKVCache(len(decoder_layers(base)), L)
    causal = prefix_mask(L, 0, device)
    additive = torch.zeros(causal.shape, dtype=dtype, device=device).masked_fill(~causal, torch.finfo(dtype).min)
    out = decoder(
        input_ids=tokens.to(device),
        attention_mask=additive,
        position_ids=torch.arange(L, device=device)[None].expand(S, L),
        use_cache=True,
        **{cache_keyword(decoder): cache},
        output_hidden_states=feature_layers is not None,
    )
    if feature_layers is None:
        features = out.last_hidden_state
    else:
        # hidden_states[i] is the input of decoder layer i (index 0: the embeddings).
        features = torch.cat([out.hidden_states[i] for i in feature_layers], dim=-1)
    logits = model_logits(base.get_output_embeddings()(out.last_hidden_state), base.config).float()
    return TargetPass(tokens.to(device), features, logits, cache)


def head_pass(head: DraftHead, target: TargetPass) -> HeadPass:
    """The head over every entry of the windows (causal), with gradients when
    enabled by the caller."""
    tokens, features = target.tokens, target.features
    S, L = tokens.shape
    n = L - 1
    device = head.fc.weight.device
    hidden = head.project_features(features[:, :n].to(device, head.fc.weight.dtype))
    caches = [KVBuffer(n) for _ in range(head.num_layers)]
    positions = torch.arange(n, device=device)[None].expand(S, n)
    out = head(hidden, tokens[:, 1:].to(device), positions, prefix_mask(n, 0, device), caches)
    return HeadPass(out, [c.keys for c in caches], [c.values for c in caches])


def prefix_caches(state: HeadPass, roots: Roots, extra: int) -> list[KVBuffer]:
    """Per-tree draft caches holding the tree's window entries (rows past the
    root are masked, not removed) with room for `extra` more entries."""
    caches = []
    for keys, values in zip(state.keys, state.values):
        cache = KVBuffer(keys.shape[2] + extra)
        cache.append(keys[roots.seq], values[roots.seq])
        caches.append(cache)
    return caches


def visible_prefix(roots: Roots, n: int, rows: int) -> torch.Tensor:
    """Bool [B, rows, n]: entry j is visible to a tree rooted at r iff j < r."""
    visible = torch.arange(n, device=roots.pos.device)[None] < roots.pos[:, None]
    return visible[:, None, :].expand(-1, rows, -1)


@torch.no_grad()
def draft_trees(head: DraftHead, state: HeadPass, target: TargetPass, roots: Roots,
                total_token: int, depth: int, top_k: int) -> TreeBatch:
    """The engine's draft tree at each root, all B expanded together (see
    `Drafter.draft_tree`, which this mirrors line by line)."""
    k = top_k
    n = state.out.shape[1]
    device = state.out.device
    seq, pos = roots.seq.to(device), roots.pos.to(device)
    roots = Roots(seq, pos)
    B = len(roots)
    # The engine's own top-k (not torch.topk): tied log-probs must come out in the same order, or the trees differ.
    chunk = vocab_chunk(head.config.draft_vocab_size)
    caches = prefix_caches(state, roots, k * depth)
    last_out = state.out[seq, pos - 1]  # [B, h]
    logp = torch.log_softmax(head.draft_logits(last_out).float(), dim=-1)
    scores, ids = vocab_top_k(logp, k, chunk)  # [B, k]
    tokens = head.to_target_ids(ids)
    cand_tokens, cand_scores = [tokens], [scores]
    cand_parents = [torch.zeros(B, k, dtype=torch.long, device=device)]
    eye = torch.eye(k, dtype=torch.bool, device=device).expand(B, k, k)
    f_hidden = last_out[:, None].expand(B, k, last_out.shape[-1])
    f_tokens, f_scores = tokens, scores
    f_numbers = torch.arange(k, device=device).expand(B, k)
    history = eye
    seen = visible_prefix(roots, n, k)
    offset = k
    for level in range(depth):
        positions = (pos + level)[:, None].expand(B, k)
        mask = torch.cat((seen, history), dim=2)[:, None]  # [B, 1, k, n + k*(level+1)]
        out = head(f_hidden, f_tokens, positions, mask, caches)  # [B, k, h]
        logp = torch.log_softmax(head.draft_logits(out).float(), dim=-1)
        child_p, child_ids = vocab_top_k(logp, k, chunk)  # [B, k, k]
        cum = (child_p + f_scores[:, :, None]).flatten(1)  # [B, k*k]
        child_tokens = head.to_target_ids(child_ids).flatten(1)
        cand_tokens.append(child_tokens)
        cand_scores.append(cum)
        cand_parents.append((f_numbers + 1).repeat_interleave(k, dim=1))
        f_scores, best = cum.topk(k, dim=-1)
        parent_slot = best // k
        f_hidden = out.gather(1, parent_slot[:, :, None].expand(-1, -1, out.shape[-1]))
        f_tokens = child_tokens.gather(1, best)
        f_numbers = offset + best
        history = torch.cat((history.gather(1, parent_slot[:, :, None].expand(-1, -1, history.shape[-1])), eye), dim=2)
        offset += k * k
    cand_tokens, cand_scores, cand_parents = (torch.cat(c, dim=1) for c in (cand_tokens, cand_scores, cand_parents))
    root_tokens = target.tokens.to(device)[seq, pos]
    trees = [
        select_tree(root_tokens[b], cand_tokens[b], cand_scores[b], cand_parents[b], total_token, depth + 1)
        for b in range(B)
    ]
    return TreeBatch.stack(trees)


@dataclass
class Verdict:
    """The target's view of each tree node."""

    node_logp: torch.Tensor  # [B, T] log p_target(node token | prefix, ancestors); 0 at the root
    choices: torch.Tensor  # [B, T] the target's greedy token after each node


@torch.no_grad()
def verify_trees(base, target: TargetPass, roots: Roots, trees: TreeBatch, chunk: int = 64) -> Verdict:
    """Target forward over the trees, `chunk` trees per forward: every tree
    sees its own prefix (window tokens before the root) and its own
    ancestors, at positions root + depth."""
    decoder, lm_head = base.get_decoder(), base.get_output_embeddings()
    device = base.get_input_embeddings().weight.device
    dtype = next(base.parameters()).dtype
    T = trees.tokens.shape[1]
    node_logp, choices = [], []
    for start in range(0, len(trees), chunk):
        rows = slice(start, start + chunk)
        seq, pos = roots.seq[rows].to(device), roots.pos[rows].to(device)
        width = int(pos.max())  # the longest prefix in the chunk
        cache = TargetKVCache(len(target.cache.layers), width + T)
        for mine, source in zip(cache.layers, target.cache.layers):
            mine.buffer.append(source.buffer.keys[seq, :, :width], source.buffer.values[seq, :, :width])
        tree_mask = trees.mask[rows].to(device)
        visible = torch.cat((visible_prefix(Roots(seq, pos), width, T), tree_mask), dim=2)
        additive = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, torch.finfo(dtype).min)
        hidden = decoder(
            input_ids=trees.tokens[rows].to(device),
            attention_mask=additive[:, None],
            position_ids=pos[:, None] + trees.depths[rows].to(device),
            use_cache=True,
            **{cache_keyword(decoder): cache},
        ).last_hidden_state
        logits = model_logits(lm_head(hidden), base.config)  # [b, T, V]
        logp = torch.log_softmax(logits.float(), dim=-1)
        parents, tokens = trees.parents[rows].to(device), trees.tokens[rows].to(device)
        b = torch.arange(parents.shape[0], device=device)[:, None]
        own = logp[b, parents, tokens]
        own[:, 0] = 0.0  # the root is the target's own token
        node_logp.append(own)
        # The argmax of the logits, as the engine's greedy choice: log_softmax may round two top logits that
        # differ by one ulp to the same value, and argmax would then take the first.
        choices.append(logits.argmax(dim=-1))
    return Verdict(torch.cat(node_logp), torch.cat(choices))
