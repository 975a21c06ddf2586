"""Build the demo BASE model: a byte-level BPE tokenizer and a small Llama trained on stdlib sources.

    python -m eagle_gto.demo.build_base --out eagle_gto/demo/assets/base [--steps N] [--seed S]

The result is a plain code LM (no chat template) that `AutoModelForCausalLM` /
`AutoTokenizer.from_pretrained(out)` load. It is meant to be small enough to ship in
the repository (weights saved as float16, < 12 MB) and to train in ~15 minutes on
2 CPU cores, while still writing text that looks like Python, so speculative
decoding has something meaningful to accelerate.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from eagle_gto.cli_help import show_defaults
from eagle_gto.demo.corpus import read_texts, stdlib_files

SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>"]  # ids 0..3, in this order
VOCAB_SIZE = 2048
SEQ_LEN = 256
BATCH_SIZE = 16
LR = 2e-3  # high for a transformer, but the model is tiny and the budget is a few hundred steps
WARMUP_FRAC = 0.05
MIN_LR_FRAC = 0.1


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE: every byte is in the base alphabet, so any source text round-trips exactly
    (spaces, tabs, newlines, non-ASCII) and `<unk>` is never produced."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # Like Llama tokenizers, prepend <s>: the model is trained on documents that start with it,
    # so prompts encoded by `tokenizer(text)` look like the start of a training document.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=2048,
        clean_up_tokenization_spaces=False,  # would otherwise eat spaces before punctuation
    )


def token_stream(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """All documents as one long id stream, each wrapped as <s> ... </s>."""
    ids: list[int] = []
    for enc in tokenizer(texts, verbose=False)["input_ids"]:  # <s> comes from the post-processor
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def make_config(vocab_size: int) -> LlamaConfig:
    # 7 layers so that the EAGLE-3 feature layers (2, N//2=3, N-3=4) are distinct;
    # width chosen so the float16 weights stay under 12 MB (about 5.5M parameters).
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=576,
        num_hidden_layers=7,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=True,  # the embedding matrix is a large share of such a small model
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=3,
    )


def lr_at(step: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to MIN_LR_FRAC * LR."""
    warmup = max(1, int(WARMUP_FRAC * steps))
    if step < warmup:
        return LR * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return LR * (MIN_LR_FRAC + (1 - MIN_LR_FRAC) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def heldout_loss(model: LlamaForCausalLM, stream: torch.Tensor, device: torch.device) -> float:
    """Mean next-token loss over consecutive non-overlapping SEQ_LEN windows of the held-out stream."""
    model.eval()
    windows = stream[: len(stream) // SEQ_LEN * SEQ_LEN].view(-1, SEQ_LEN)
    # Every window has the same length, so weighting batch means by batch size gives the exact mean.
    total = sum(model(input_ids=b.to(device), labels=b.to(device)).loss.item() * len(b)
                for b in windows.split(BATCH_SIZE))
    model.train()
    return total / len(windows)


def train(model: LlamaForCausalLM, train_ids: torch.Tensor, steps: int, seed: int, device: torch.device) -> float:
    """`steps` AdamW steps on random SEQ_LEN windows of the token stream; returns
    the mean loss of the last 20 steps (less noisy than one batch's)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    # Window starts come from their own generator so the data order depends only on the seed.
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(SEQ_LEN)
    recent: list[float] = []
    model.train()
    for step in (bar := tqdm(range(steps), desc="train", dynamic_ncols=True)):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps)
        starts = torch.randint(0, len(train_ids) - SEQ_LEN + 1, (BATCH_SIZE, 1), generator=gen)
        batch = train_ids[starts + offsets].to(device)
        loss = model(input_ids=batch, labels=batch).loss  # the model shifts labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recent = (recent + [loss.item()])[-20:]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}", lr=f"{lr_at(step, steps):.1e}")
    return sum(recent) / len(recent)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m eagle_gto.demo.build_base",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--steps", type=int, default=600,
                        help="optimizer steps (600: about 13 min on 2 idle CPU cores)")
    parser.add_argument("--seed", type=int, default=0)
    args = show_defaults(parser).parse_args()

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)

    train_files, heldout_files = stdlib_files("train"), stdlib_files("heldout")
    train_texts = read_texts(train_files)
    tokenizer = train_tokenizer(train_texts)
    tokenizer.save_pretrained(args.out)
    train_ids = token_stream(tokenizer, train_texts)
    heldout_ids = token_stream(tokenizer, read_texts(heldout_files))
    print(f"corpus: {len(train_files)} train files / {len(train_ids):,} tokens, "
          f"{len(heldout_files)} held-out files / {len(heldout_ids):,} tokens")

    config = make_config(len(tokenizer))
    model = LlamaForCausalLM(config).to(device)  # random init under the fixed seed above
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters")

    start = time.time()
    train_loss = train(model, train_ids, args.steps, args.seed, device)
    seconds = time.time() - start

    eval_loss = heldout_loss(model, heldout_ids, device)
    print(f"train loss {train_loss:.4f} | held-out loss {eval_loss:.4f} (perplexity {math.exp(eval_loss):.2f})")

    prompt = "def fibonacci(n):\n"
    model.eval()
    with torch.no_grad():
        out = model.generate(**tokenizer(prompt, return_tensors="pt").to(device), max_new_tokens=64, do_sample=False)
    sample = tokenizer.decode(out[0], skip_special_tokens=True)
    print("sample (greedy):\n" + sample)

    # float16 halves the file size; loaders cast back to float32 on CPU.
    model.half().save_pretrained(args.out, safe_serialization=True)
    command = "python -m eagle_gto.demo.build_base " + " ".join(sys.argv[1:])
    log = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": BATCH_SIZE,
        "seq_len": SEQ_LEN,
        "lr": LR,
        "seconds": round(seconds, 1),
        "device": str(device),
        "parameters": n_params,
        "train_files": len(train_files),
        "train_tokens": len(train_ids),
        "heldout_files": len(heldout_files),
        "heldout_tokens": len(heldout_ids),
        "final_train_loss": round(train_loss, 4),
        "heldout_loss": round(eval_loss, 4),
        "heldout_perplexity": round(math.exp(eval_loss), 2),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sample_prompt": prompt,
        "sample_greedy": sample,
        "config": config.to_dict(),
    }
    (args.out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    (args.out / "README.md").write_text(README.format(
        command=command, n_params=n_params, steps=args.steps, minutes=seconds / 60,
        train_loss=train_loss, eval_loss=eval_loss, ppl=math.exp(eval_loss),
        n_train=len(train_files), train_tokens=len(train_ids), n_heldout=len(heldout_files),
        python=sys.version.split()[0],
    ))


README = """# Demo base model

A tiny Llama ({n_params:,} parameters, 7 layers, hidden 256, tied embeddings) trained from
scratch as a plain code LM on the Python {python} standard library sources, for the
speculative-decoding demos. It is not an instruction/chat model: prompts are raw Python,
and the tokenizer prepends `<s>` like during training.

Built with:

    {command}

- Corpus: {n_train} stdlib `.py` files ({train_tokens:,} tokens); {n_heldout} files held out by
  `zlib.crc32(relpath) % 20 == 0` (see `eagle_gto/demo/corpus.py`).
- Tokenizer: byte-level BPE, vocab 2048, special tokens `<s>`, `</s>`, `<unk>`, `<pad>`;
  decoding round-trips source text exactly.
- Training: {steps} AdamW steps of 16 random 256-token windows, cosine schedule with warm-up,
  grad clipping 1.0, fp32, {minutes:.1f} minutes.
- Final train loss {train_loss:.3f}; held-out loss {eval_loss:.3f} (perplexity {ppl:.2f}).
- Weights stored as float16 (`model.safetensors`); load with
  `AutoModelForCausalLM.from_pretrained(dir, dtype=torch.float32)` on CPU.

`training_log.json` has the full config, timings and a greedy sample.
"""


if __name__ == "__main__":
    main()
