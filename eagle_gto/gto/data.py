"""Training windows for GTO: fixed-length slices of one token stream.

GTO compares trees at adjacent positions of the same text, so it trains on
windows of `window_length` tokens. Sources:
- "generated" (the demo default): random prompts cut from the demo corpus,
  each followed by the base model's own greedy continuation, all of it
  trained (the prompt too); windows start at a sample's first token, so most
  trees are rooted in text the base wrote itself, as at decoding time.
- "stdlib": the demo corpus itself, each file as <s> ... </s>, windows
  anywhere.
- a jsonl file in any format `eagle_gto.train.data` reads; its loss mask
  marks the tokens a head is trained to predict (roots are only taken where
  it is 1).
The demo corpus is the training split of the stdlib files, with every
`validation_every`-th file set aside for validation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch


@dataclass
class TokenStream:
    ids: torch.Tensor  # [N] long
    loss_mask: torch.Tensor  # [N] long, 1 where a prediction is trained
    starts: torch.Tensor | None = None  # [K] sample starts where windows begin; None: anywhere
    prompts: str | None = None  # generated: a digest of the prompts continued (see prompts_digest)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def windows(self, count: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`count` random windows [count, length] and their loss masks."""
        if len(self) < length:
            raise ValueError(f"the token stream has {len(self)} tokens, fewer than one window of {length}")
        if self.starts is None:
            starts = torch.randint(0, len(self) - length + 1, (count,), generator=generator)
        else:
            usable = self.starts[self.starts <= len(self) - length]
            starts = usable[torch.randint(0, len(usable), (count,), generator=generator)]
        return self._cut(starts, length)

    def spread(self, count: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`count` fixed windows (validation): at the first `count` sample
        starts, or evenly spaced through the stream."""
        if self.starts is None:
            starts = torch.linspace(0, len(self) - length, count).long()
        else:
            starts = self.starts[self.starts <= len(self) - length][:count]
        return self._cut(starts, length)

    def _cut(self, starts: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = starts[:, None] + torch.arange(length)
        return self.ids[index], self.loss_mask[index]


def from_samples(samples, aligned: bool = False) -> TokenStream:
    """One stream of `eagle_gto.train.data.Sample`s; aligned: windows start at samples."""
    ids = torch.tensor([t for s in samples for t in s.input_ids], dtype=torch.long)
    mask = torch.tensor([t for s in samples for t in s.loss_mask], dtype=torch.long)
    starts = torch.tensor([0] + [len(s.input_ids) for s in samples[:-1]]).cumsum(0) if aligned else None
    return TokenStream(ids, mask, starts)


def stdlib_split(validation_every: int) -> tuple[list, list]:
    """(training files, validation files) of the demo corpus's training split."""
    from ..demo.corpus import stdlib_files

    files = stdlib_files("train")
    return ([f for i, f in enumerate(files) if i % validation_every],
            [f for i, f in enumerate(files) if i % validation_every == 0])


def text_stream(files, tokenizer) -> TokenStream:
    """Files as one stream, each as <s> (from the tokenizer) ... </s>."""
    from ..demo.corpus import read_texts
    from ..train.data import Sample

    encoded = tokenizer(read_texts(files), verbose=False)["input_ids"]
    return from_samples([Sample(ids + [tokenizer.eos_token_id], [1] * (len(ids) + 1)) for ids in encoded])


def generated_stream(base, tokenizer, files, count: int, prompt_tokens: int, new_tokens: int,
                     seed: int) -> TokenStream:
    """The base's greedy continuations (`new_tokens`, cut after </s>) of
    `count` random `prompt_tokens`-token windows of `files`, prompt included."""
    from ..train.data import Sample, greedy_continue

    text = text_stream(files, tokenizer)
    prompts, _ = text.windows(count, prompt_tokens, torch.Generator().manual_seed(seed))
    prompts = prompts.tolist()
    continued = greedy_continue(base, prompts, new_tokens, {tokenizer.eos_token_id}, batch_size=64)
    samples = [Sample(p + c, [1] * (len(p) + len(c))) for p, c in zip(prompts, continued)]
    stream = from_samples(samples, aligned=True)
    stream.prompts = prompts_digest(prompts)
    return stream


def prompts_digest(prompts: list[list[int]]) -> str:
    """What generated continuations are made from, as a digest (the corpus's files, cut by --seed, and the
    tokenizer): a resume compares it, as the continuations themselves may differ by a token on another device."""
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()


def jsonl_stream(path: str, tokenizer, model_type: str = "auto", max_length: int = 2048,
                 system: str | None = None) -> TokenStream:
    from ..train.data import read_records, to_samples

    return from_samples(to_samples(read_records(path), tokenizer, model_type, max_length, system))
