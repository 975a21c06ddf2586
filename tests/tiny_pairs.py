"""Tiny base models and draft heads that draft well, for engine tests.

A random transformer's greedy continuation depends on subtle context, so a
random head almost never gets a draft accepted and most of the engine would go
untested. Here the base model's attention and MLP outputs are scaled down, so
its next token is mostly a function of the current token (with some context
dependence left, so drafts are sometimes rejected too), and the head is
trained for a few hundred steps on the base model's own greedy outputs.
"""

from __future__ import annotations

import functools

import torch
from transformers import AutoModelForCausalLM

from eagle_gto import EaModel
from eagle_gto.placement import attach_head
from eagle_gto.target import TargetRunner, eagle3_feature_layers
from eagle_gto.tiny import base_config, head_config, random_head
from eagle_gto.vocab import target_to_draft

VOCAB = 96
DRAFT_VOCAB = 64  # EAGLE-3 heads draft over fewer tokens than the target has


def make_base(arch: str, seed: int = 0, residual_scale: float = 0.15, **sizes):
    torch.manual_seed(seed)
    cfg = base_config(arch, vocab_size=sizes.pop("vocab_size", VOCAB), **sizes)
    base = AutoModelForCausalLM.from_config(cfg).float().eval().requires_grad_(False)
    with torch.no_grad():
        for name, param in base.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "w2.weight")):
                param.mul_(residual_scale)
    return base


@torch.no_grad()
def greedy_corpus(base, num: int = 24, prompt_len: int = 6, new: int = 40, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, base.config.vocab_size, (num, prompt_len), generator=g)
    return base.generate(prompts, max_new_tokens=new, do_sample=False, min_new_tokens=new,
                         attention_mask=torch.ones_like(prompts), pad_token_id=0)


def fit_head(base, kind: str, steps: int = 250, seed: int = 0, draft_vocab: int = DRAFT_VOCAB, **config):
    """Teacher-forced fit of a head to the base's greedy corpus: entry t reads
    the target feature at t and token t+1, and predicts token t+2. EAGLE-1
    also regresses its output onto the next feature, which it feeds back.
    `config`: extra head config.json values (EAGLE-3 variant switches)."""
    seqs = greedy_corpus(base)
    layers = eagle3_feature_layers(base.config.num_hidden_layers) if kind == "eagle3" else None
    runner = TargetRunner(base, layers)
    feats = []
    for seq in seqs:
        n = seq.shape[0]
        cache = runner.new_cache(n)
        _, f = runner.forward(seq, torch.arange(n), torch.ones(n, n).tril().bool(), cache, features=True)
        feats.append(f)
    feats = torch.stack(feats)  # [B, n, F]
    cfg = {**head_config(base.config, kind, draft_vocab_size=draft_vocab if kind == "eagle3" else None), **config}
    counts = torch.bincount(seqs.flatten(), minlength=base.config.vocab_size).float()
    head = random_head(cfg, seed=seed, token_counts=counts).train().requires_grad_(True)
    attach_head(base, head)
    head.float()
    labels = seqs[:, 2:]
    if kind == "eagle3":
        labels = target_to_draft(head.d2t, base.config.vocab_size)[labels]
    n = seqs.shape[1] - 2
    positions = torch.arange(n)[None]
    mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    optimizer = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(steps):
        out = head(head.project_features(feats[:, :n]), seqs[:, 1 : n + 1], positions, mask)
        logits = head.draft_logits(out)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-1)
        if kind == "eagle1":
            loss = loss + torch.nn.functional.smooth_l1_loss(out, feats[:, 1 : n + 1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head.eval().requires_grad_(False)


@functools.lru_cache(maxsize=None)
def trained_pair(arch: str, kind: str, total_token: int = 24, depth: int = 5, top_k: int = 4) -> EaModel:
    base = make_base(arch)
    head = fit_head(base, kind)
    return EaModel(base, head, None, total_token=total_token, depth=depth, top_k=top_k)
