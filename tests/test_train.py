"""Draft-head training (eagle_gto.train): data, features, the TTT unroll and
its loss, the training loop with resume, export and reload."""

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

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import eagle_gto.train.__main__ as cli
from eagle_gto import EaModel
from eagle_gto.chat import build_prompt, encode_prompt
from eagle_gto.checkpoint import save_head
from eagle_gto.drafter import Drafter
from eagle_gto.target import TargetRunner, eagle3_feature_layers
from eagle_gto.tiny import base_config, head_config, random_head
from eagle_gto.train import (Sample, TrainConfig, errors, new_head, target_outputs, to_samples, token_counts, train,
                             trainer, ttt_loss)
from eagle_gto.train.__main__ import main
from eagle_gto.train.checkpoints import (CheckpointMismatch, check_same_options, checkpoint_dirs, checkpoint_path,
                                         complete_checkpoint, read_progress)
from eagle_gto.train.data import collate, encode_conversation, read_records, to_messages
from eagle_gto.train.errors import TrainingDiverged
from eagle_gto.train.head_init import attach_target_embedding, head_config_for
from eagle_gto.train.plot import plot_metrics
from eagle_gto.train.resume import records_fingerprint, resumed_index, saved_window, window_file
from eagle_gto.train.schedule import MicroBatches, lr_at
from eagle_gto.train.ttt import unroll
from eagle_gto.vocab import build_vocab_mapping, target_to_draft

VOCAB = 320
TEXTS = ["def add(a, b):\n    return a + b\n", "USER: hello there ASSISTANT: x = 1</s>",
         "for i in range(10):\n    print(i)\n"]


def make_tokenizer():
    """A small byte-level BPE with <s>/</s> specials, trained on the spot."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def make_base(seed=0, sharpen=4.0):
    """A tiny random Llama whose next-token distributions are peaked (scaled
    lm_head), so a head has something to learn."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(base_config(vocab_size=VOCAB, hidden_size=64, num_layers=6)).eval()
    with torch.no_grad():
        base.lm_head.weight.mul_(sharpen)
    return base


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


# ----------------------------------------------------------------------------- data
def test_loss_mask_covers_only_assistant_tokens(tokenizer):
    messages = to_messages({"conversations": [
        {"from": "human", "value": "hello there"}, {"from": "gpt", "value": "def add(a, b):"},
        {"from": "human", "value": "more"}, {"from": "gpt", "value": "return a + b"}]})
    sample = encode_conversation(messages, tokenizer, "vicuna", system="SYS")
    trained = [t for t, m in zip(sample.input_ids, sample.loss_mask) if m]
    text = tokenizer.decode(trained)
    assert "def add(a, b):" in text and "return a + b" in text
    assert "hello" not in text and "USER" not in text and "more" not in text and "SYS" not in text
    assert trained.count(tokenizer.eos_token_id) == 2  # each answer's end-of-turn token is trained
    # The same conversation as OpenAI messages gives the same sample.
    same = encode_conversation(to_messages({"messages": messages}), tokenizer, "vicuna", system="SYS")
    assert same == sample
    # An answer that also occurs inside the question is marked where it is the answer.
    echo = encode_conversation([{"role": "user", "content": "x = 1 please"}, {"role": "assistant", "content": "x = 1"}],
                               tokenizer, "vicuna")
    first = echo.loss_mask.index(1)
    assert "ASSISTANT:" in tokenizer.decode(echo.input_ids[:first])
    assert tokenizer.decode([t for t, m in zip(echo.input_ids, echo.loss_mask) if m]).strip() == "x = 1</s>"
    plain = to_samples([{"text": TEXTS[0]}], tokenizer)[0]
    assert all(plain.loss_mask) and plain.input_ids[0] == tokenizer.bos_token_id


@pytest.mark.parametrize("model_type, answer, trained", [
    ("vicuna", "A", " A</s>"),  # "A" also starts "ASSISTANT:", and "hi" hides in the system prompt's "chat"
    ("qwen", "an", "an"),  # inside "assistant"
    ("llama3", "an", "an"),
    ("llama2-chat", "It is 4.", " It is 4. </s>"),  # the template writes a space before </s>: both trained
])
def test_short_answers_are_trained_where_they_are_answers(tokenizer, model_type, answer, trained):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": answer}]
    sample = encode_conversation(messages, tokenizer, model_type)
    first = sample.loss_mask.index(1)
    assert all(sample.loss_mask[first : first + sum(sample.loss_mask)])  # one run of tokens
    assert tokenizer.decode(sample.input_ids[:first]).endswith(build_prompt(messages[:1], model_type))
    assert tokenizer.decode([t for t, m in zip(sample.input_ids, sample.loss_mask) if m]) == trained


def test_bad_records_name_their_line_and_truncation_is_reported(tmp_path, tokenizer):
    good = {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "def add(a, b):"}]}
    assert to_messages(good)[1] == {"role": "assistant", "content": "def add(a, b):"}  # either key naming
    for bad, message in [({"messages": None}, "list of objects"), ({"messages": "x"}, "list of objects"),
                         ({"messages": [{"role": "tool", "content": "x"}]}, "role 'tool'"),
                         ({"text": 5}, "'text' must be a string")]:
        path = tmp_path / "data.jsonl"
        path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=f"data.jsonl:3: .*{message}"):
            read_records(path)
    path.write_text(json.dumps(good) + "\n", encoding="utf-8-sig")  # a byte-order mark opens the file
    assert read_records(path) == [good]
    path.write_bytes(json.dumps({"text": "caf\u00e9"}, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(ValueError, match="data.jsonl is not UTF-8 text"):
        read_records(path)
    long = {"messages": [{"role": "user", "content": "hello there " * 20}, {"role": "assistant", "content": "x = 1"}]}
    with pytest.warns(UserWarning, match="1 of 2 records have no loss tokens within the first 30"):
        assert len(to_samples([long, good], tokenizer, "plain", max_length=30)) == 1
    with pytest.raises(ValueError, match="0 have no loss tokens .*, 1 have none within --max-length 30"):
        to_samples([long], tokenizer, "plain", max_length=30)
    # A text of two tokens (<s> x) is all loss, but nothing predicts a token from two tokens before it.
    with pytest.raises(ValueError, match="1 have no loss tokens .*, 0 have none within --max-length 2048"):
        to_samples([{"text": "x"}], tokenizer)
    cut = to_samples([{"text": TEXTS[0]}], tokenizer, max_length=5)[0]
    assert len(cut.input_ids) == len(cut.loss_mask) == 5
    with pytest.raises(ValueError, match="log_every must be at least 1"):
        TrainConfig(log_every=0)



def test_curves_plot_from_a_log_still_being_written(tmp_path):
    log = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 3.0 - s, "acc": [0.1 * s, 0.05 * s]}) for s in range(1, 4)]
    log.write_text("\n".join(lines) + "\n" + lines[0][:9])  # the last line half written
    with pytest.warns(UserWarning, match="metrics.jsonl:4: skipping a line that is not valid JSON"):
        png = plot_metrics(log, tmp_path / "curves.png")
    assert png.stat().st_size > 1000

def trained_runs(sample, tokenizer) -> list[str]:
    """The text of each run of consecutive trained tokens."""
    runs, run = [], []
    for token, trained in zip(sample.input_ids + [None], sample.loss_mask + [0]):
        if trained:
            run.append(token)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    return runs


@pytest.mark.parametrize("model_type, opening, trained", [
    ("vicuna", "A", [" ok</s>"]),  # "A" opens the system prompt, "chat" is in it
    ("vicuna", "chat", [" ok</s>"]),
    ("qwen", "You", ["ok"]),  # (the qwen system prompt: "You are a helpful assistant.")
])
def test_assistant_turns_before_the_first_question_are_dropped(tokenizer, monkeypatch, model_type, opening, trained):
    """Nothing asks for an opening assistant turn: searched for from the
    start of the text, it was trained wherever the system prompt held it."""
    import eagle_gto.train.data as data

    record = {"conversations": [{"from": "system", "value": "S"}, {"from": "gpt", "value": opening},
                                {"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}]}
    assert [m["role"] for m in to_messages(record)] == ["system", "user", "assistant"]
    without_system = {"conversations": record["conversations"][1:]}
    assert trained_runs(to_samples([without_system], tokenizer, model_type)[0], tokenizer) == trained
    # Regeneration asks for the answer to the question only (it had asked for one to the bare system prompt).
    prompts, stop = [], [tokenizer.eos_token_id]
    monkeypatch.setattr(data, "greedy_continue", lambda model, batch, *args: (prompts.extend(batch), [stop])[1])
    regenerated = data.regenerate([without_system], nn.Linear(1, 1), tokenizer, model_type)
    question = build_prompt([{"role": "user", "content": "hi"}], model_type)
    assert prompts == [encode_prompt(question, tokenizer, model_type)]
    assert [m["role"] for m in regenerated[0]["messages"]] == ["user", "assistant"]


@pytest.mark.parametrize("model_type", ["vicuna", "qwen", "llama3"])
def test_a_system_turn_of_the_conversation_is_not_trained(tokenizer, model_type):
    """Only the assistant's answers carry loss, not a system turn the record holds (nor one given with --system)."""
    record = {"conversations": [{"from": "system", "value": "Answer in code"}, {"from": "human", "value": "hi"},
                                {"from": "gpt", "value": "x = 1"}]}
    assert [run.strip() for run in trained_runs(to_samples([record], tokenizer, model_type)[0], tokenizer)] \
        == ["x = 1</s>" if model_type == "vicuna" else "x = 1"]


def test_a_batch_is_right_padded_and_its_masks_mark_real_tokens():
    batch = collate([Sample([5, 6, 7], [0, 1, 1]), Sample([8], [1])])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_a_greedy_continuation_keeps_the_stop_token_it_ends_with():
    """GTO's generated stream trains the prediction of </s>: the continuation is cut after it, not before."""
    from eagle_gto.train.data import greedy_continue

    class Scripted(nn.Module):  # writes 5, 2, 7, 7 after any prompt
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 2)
            self.generation_config = None

        def get_input_embeddings(self):
            return self.embed

        def generate(self, input_ids, attention_mask, generation_config):
            return torch.cat((input_ids, torch.tensor([[5, 2, 7, 7]]).expand(len(input_ids), -1)), dim=1)

    assert greedy_continue(Scripted(), [[1, 3], [4, 4]], 4, {2}) == [[5, 2], [5, 2]]
    assert greedy_continue(Scripted(), [[1, 3]], 4, {9}) == [[5, 2, 7, 7]]
    # (batches of at most batch_size prompts: each is answered)
    assert greedy_continue(Scripted(), [[1, 3], [4, 4], [6, 6]], 4, {2}, batch_size=2) == [[5, 2]] * 3


def test_gto_jsonl_conversations_get_the_system_prompt_given(tokenizer, tmp_path):
    """GTO's --system, as this trainer's: conversations that have no system prompt get it."""
    from eagle_gto.gto.data import jsonl_stream

    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"conversations": [{"from": "human", "value": "hello there"},
                                                  {"from": "gpt", "value": "x = 1"}]}) + "\n")
    default, told = (jsonl_stream(str(data), tokenizer, "vicuna", system=system) for system in (None, "BE BRIEF"))
    assert "BE BRIEF" in tokenizer.decode(told.ids) and "BE BRIEF" not in tokenizer.decode(default.ids)
    trained = [tokenizer.decode(stream.ids[stream.loss_mask.bool()]) for stream in (default, told)]
    assert trained[0] == trained[1] and "x = 1" in trained[0]


def tokenizer_with(tokens: list[str], eos: str | None = None, special: bool = True):
    """make_tokenizer with added tokens (special or not), e.g. Llama-3's, saved and read back as a base ships it."""
    import tempfile

    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    tok = make_tokenizer()
    tok.add_tokens([AddedToken(t, special=special) for t in tokens], special_tokens=special)
    if eos:
        tok.eos_token = eos
    with tempfile.TemporaryDirectory() as folder:
        tok.save_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder)


def test_an_end_of_turn_token_that_is_only_an_added_special_token_is_trained():
    """transformers 5's all_special_ids lists only the named tokens (bos,
    eos, ...): Llama-3's <|eot_id|> where eos is <|end_of_text|>, or a
    template's own end token, was left untrained after every answer."""
    answer = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x = 1"}]
    llama3 = tokenizer_with(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                             "<|eot_id|>"], eos="<|end_of_text|>")
    assert llama3.convert_tokens_to_ids("<|eot_id|>") not in llama3.all_special_ids
    assert trained_runs(encode_conversation(answer, llama3, "llama3"), llama3) == ["x = 1<|eot_id|>"]
    # A chat template's end-of-turn token, in no format's stop list (Phi-3's <|end|>).
    phi = tokenizer_with(["<|user|>", "<|assistant|>", "<|end|>"])
    phi.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert trained_runs(to_samples([{"messages": answer}], phi)[0], phi) == ["x = 1<|end|>"]
    # Where the template's end token is no special token at all, the base's eos ids (generation_config) name it.
    plain = tokenizer_with(["<|end|>"], special=False)
    plain.chat_template = phi.chat_template
    end = plain.convert_tokens_to_ids("<|end|>")
    assert trained_runs(to_samples([{"messages": answer}], plain)[0], plain) == ["x = 1"]
    assert trained_runs(to_samples([{"messages": answer}], plain, stop_ids={end})[0], plain) == ["x = 1<|end|>"]


def test_draft_vocab_from_trained_tokens():
    samples = [Sample([5, 7, 7, 9, 9, 9, 2], [0, 0, 1, 1, 1, 1, 0])]  # 2 and 5 are not trained
    counts = token_counts(samples, 12)
    assert counts.tolist() == [0] * 7 + [1, 0, 3, 0, 0]
    base = make_base()
    head = new_head(base, token_counts([Sample([3, 9, 9, 7, 11, 11, 11], [1] * 7)], VOCAB), draft_vocab_size=3)
    # Counts 11:3, 9:2, 3:1, 7:1; the tie goes to the lower id. Draft ids follow target order.
    used = torch.arange(3) + head.d2t
    assert used.tolist() == [3, 9, 11] and head.d2t.tolist() == [3, 8, 9]
    assert head.t2d.nonzero().flatten().tolist() == [3, 9, 11]
    # and back: the draft id of each target id, -1 outside the draft vocabulary
    expected = [used.tolist().index(j) if j in used else -1 for j in range(VOCAB)]
    assert target_to_draft(head.d2t, VOCAB).tolist() == expected
    # The head's output layer starts as the target's rows of those tokens.
    assert torch.equal(head.lm_head.weight, base.lm_head.weight[used])


# ------------------------------------------------------------------------- features
def test_features_match_the_engine_and_ignore_padding():
    base = make_base()
    ids = torch.randint(0, VOCAB, (12,))
    runner = TargetRunner(base, eagle3_feature_layers(6))
    n = ids.shape[0]
    logits, feats = runner.forward(ids, torch.arange(n), torch.ones(n, n, dtype=torch.bool).tril(),
                                   runner.new_cache(n), features=True)
    padded = torch.cat((ids, torch.zeros(4, dtype=torch.long)))[None].repeat(2, 1)
    mask = torch.ones_like(padded)
    mask[0, n:] = 0
    out = target_outputs(base, padded, mask)
    assert out.features.shape == (2, n + 4, 3 * 64)
    torch.testing.assert_close(out.features[0, :n], feats, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits[0, :n], logits, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ TTT
def test_unroll_matches_decoding_time_attention():
    """Step s at position i must equal the depth-s node of a draft chain
    rooted after token i+1, run the way the engine's drafter runs it."""
    base = make_base()
    head = random_head(head_config(base.config, "eagle3", draft_vocab_size=VOCAB), seed=1)
    with torch.no_grad():
        for p in head.parameters():
            p.mul_(5)  # weights big enough for attention patterns to matter
    head.attach_embedding(base.get_input_embeddings().weight)
    n, steps = 10, 4
    feats = torch.randn(1, n, 3 * 64)
    ids = torch.randint(0, VOCAB, (1, n))
    with torch.no_grad():
        outs = list(unroll(head, head.project_features(feats), ids, steps))
        for i in (0, 3, 5):
            drafter = Drafter(head, 64)
            hidden = drafter.extend(feats[0, : i + 1], ids[0, 1 : i + 2])
            torch.testing.assert_close(outs[0][0, i], hidden, atol=1e-4, rtol=1e-4)
            for s in range(1, steps):
                if i + 1 + s >= n:
                    break
                length = drafter.length + 1
                hidden = head(hidden[None, None], ids[:, i + 1 + s : i + 2 + s], torch.tensor([[i + s]]),
                              torch.ones(1, 1, 1, length, dtype=torch.bool), drafter.caches)[0, 0]
                torch.testing.assert_close(outs[s][0, i], hidden, atol=1e-4, rtol=1e-4)


class SuccessorHead(nn.Module):
    """A stand-in head that ignores its hidden input and predicts
    (input token + offset) mod V with certainty."""

    def __init__(self, vocab, offset):
        super().__init__()
        self.vocab, self.offset = vocab, offset
        self.register_buffer("t2d", torch.ones(vocab, dtype=torch.bool))
        self.seen_positions = []

    def project_features(self, features):
        return features[..., :4]

    def forward(self, hidden, input_ids, position_ids, mask, caches):
        self.seen_positions.append(position_ids[0].tolist())
        assert mask.shape[-1] == len(self.seen_positions) * input_ids.shape[1]
        return nn.functional.one_hot((input_ids + self.offset) % self.vocab, self.vocab).float() * 50 + 0 * hidden.sum()

    def draft_logits(self, out):
        return out

    def to_target_ids(self, ids):
        return ids


def test_ttt_targets_and_masks_line_up():
    vocab, n, steps = 16, 12, 5
    ids = torch.arange(n)[None] % vocab  # token t is t: the next token is always the input + 1
    target = nn.functional.one_hot((ids + 1) % vocab, vocab).float() * 50
    loss_mask = torch.ones(1, n, dtype=torch.long)
    loss_mask[0, :5] = 0  # e.g. a prompt
    feats = torch.zeros(1, n, 8)
    good = ttt_loss(SuccessorHead(vocab, 1), feats, ids, target, loss_mask, steps=steps)
    assert good.step_accuracy == [1.0] * steps and all(float(x) < 1e-6 for x in good.step_losses)
    # Step s predicts token i+2+s: trained positions are the i with 5 <= i+2+s < n.
    assert good.step_counts == [n - max(5, 2 + s) for s in range(steps)]
    copying = SuccessorHead(vocab, 0)
    bad = ttt_loss(copying, feats, ids, target, loss_mask, steps=steps)
    assert bad.step_accuracy == [0.0] * steps and all(float(x) > 10 for x in bad.step_losses)
    assert copying.seen_positions[2] == list(range(2, n + 2))  # RoPE position of step s is i + s
    # Padding (attention_mask 0) counts like an untrained token.
    pad = torch.ones(1, n, dtype=torch.long)
    pad[0, -3:] = 0
    padded = ttt_loss(SuccessorHead(vocab, 1), feats, ids, target, loss_mask, pad, steps=steps)
    assert padded.step_counts == [max(0, n - 3 - max(5, 2 + s)) for s in range(steps)]


class TableHead(nn.Module):
    """A stand-in head over a draft vocabulary (the target ids `t2d` marks)
    whose draft logits depend only on its input token: row `table[token]`."""

    def __init__(self, table, t2d):
        super().__init__()
        self.table = table
        self.register_buffer("t2d", t2d)

    def project_features(self, features):
        return features

    def forward(self, hidden, input_ids, position_ids, mask, caches):
        return self.table[input_ids] + 0 * hidden.sum()

    def draft_logits(self, out):
        return out

    def to_target_ids(self, ids):
        return self.t2d.nonzero().flatten()[ids]


def test_ttt_loss_is_the_weighted_cross_entropy_on_the_draft_vocabulary():
    """Brute force of the module docstring: step s at position i is the
    cross-entropy of the head's draft distribution against the target's
    distribution at i+1+s renormalised over the draft vocabulary, averaged
    over the positions whose token i+2+s exists and is trained and whose
    target top-1 is a draft token; the loss is sum_s step_weight**s * loss_s."""
    vocab, n, steps, weight = 16, 14, 4, 0.5
    g = torch.Generator().manual_seed(0)
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[torch.randperm(vocab, generator=g)[:10]] = True  # 10 draft tokens, in target-id order
    ids = torch.randint(0, vocab, (1, n), generator=g)
    target = torch.randn(1, n, vocab, generator=g) * 3
    table = torch.randn(vocab, 10, generator=g) * 2
    loss_mask = torch.ones(1, n, dtype=torch.long)
    loss_mask[0, :4] = 0
    out = ttt_loss(TableHead(table, t2d), torch.zeros(1, n, 10), ids, target, loss_mask, steps=steps,
                   step_weight=weight)
    expected, skipped, averaged_over = [], 0, []
    for s in range(steps):
        terms = []
        for i in range(n - 2 - s):
            if not loss_mask[0, i + 2 + s]:
                continue
            row = target[0, i + 1 + s]
            if not t2d[row.argmax()]:
                skipped += 1
                continue
            p = torch.softmax(row[t2d], dim=-1)
            logq = torch.log_softmax(table[ids[0, i + 1 + s]], dim=-1)  # step s reads token i+1+s
            terms.append(-(p * logq).sum())
        expected.append(torch.stack(terms).mean())
        averaged_over.append(float(len(terms)))
    assert skipped > 0  # some targets' top-1 lie outside the draft vocabulary
    torch.testing.assert_close(torch.stack(out.step_losses), torch.stack(expected))
    torch.testing.assert_close(out.loss, sum(weight**s * loss for s, loss in enumerate(expected)))
    # GTO weights each process's step losses by these counts: the positions averaged, not all trained ones.
    assert out.loss_counts == averaged_over


def permuted_vocab(head, seed: int = 0):
    """The same head with its draft ids listed in another order: lm_head rows
    and d2t permuted together (a valid checkpoint; t2d is unchanged), so it
    drafts the same target tokens with the same probabilities."""
    other = copy.deepcopy(head)
    draft = torch.arange(head.config.draft_vocab_size)
    perm = torch.randperm(len(draft), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        other.lm_head.weight.copy_(head.lm_head.weight[perm])
        other.d2t.copy_((draft + head.d2t)[perm] - draft)
    return other


def test_ttt_loss_follows_d2t_when_draft_ids_are_not_in_target_order():
    """A checkpoint's d2t may list its target ids in any order (the loader
    accepts it; t2d cannot express an order). The loss must pair draft id i
    with target id i + d2t[i], so the same head with its draft ids permuted
    has the same losses; pairing by t2d's ascending order trained each draft
    id towards another token's probability."""
    base = make_base()
    head = random_head(head_config(base.config, "eagle3", draft_vocab_size=40), seed=1,
                       token_counts=torch.rand(VOCAB, generator=torch.Generator().manual_seed(2)))
    head.attach_embedding(base.get_input_embeddings().weight)
    other = permuted_vocab(head)
    assert not torch.equal(torch.arange(40) + other.d2t, other.t2d.nonzero().flatten())  # not ascending
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    out = target_outputs(base, ids)
    mask = torch.ones_like(ids)
    want, got = (ttt_loss(h, out.features, ids, out.logits, mask, steps=3) for h in (head, other))
    torch.testing.assert_close(torch.stack(got.step_losses), torch.stack(want.step_losses))
    assert got.step_accuracy == want.step_accuracy


def test_learning_rate_warms_up_then_follows_the_cosine():
    cfg = TrainConfig(lr=1e-3, warmup_ratio=0.1, min_lr_ratio=0.1)
    total, warmup = 100, 10
    for step in range(warmup):
        assert lr_at(step, total, cfg) == pytest.approx(cfg.lr * (step + 1) / warmup)
    for step in range(warmup, total + 1):
        progress = (step - warmup) / (total - warmup)
        cosine = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * (1 + math.cos(math.pi * progress)) / 2
        assert lr_at(step, total, cfg) == pytest.approx(cfg.lr * cosine)
    assert lr_at(total, total, cfg) == pytest.approx(cfg.lr * cfg.min_lr_ratio)


def test_micro_batches_cover_each_epoch_once_in_a_new_order_split_over_processes():
    """Each epoch visits every sample once, in its own order; with two
    processes each takes its own half of every global batch."""
    per_rank = [MicroBatches(12, 3, world=2, rank=rank, seed=0) for rank in (0, 1)]
    epochs = []
    for _ in range(3):
        batches = [[b.next() for b in per_rank] for _ in range(per_rank[0].per_epoch)]
        assert all(not set(a) & set(b) for a, b in batches)  # the processes never share a sample
        epochs.append([i for pair in batches for batch in pair for i in batch])
    for order in epochs:
        assert sorted(order) == list(range(12))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]  # reshuffled every epoch
    resumed = MicroBatches(12, 3, world=2, rank=1, seed=0, epoch=1, index=1)  # (epoch, index) suffice
    assert resumed.next() == epochs[1][9:12]  # epoch 1, global batch 2, rank 1's half


@pytest.mark.parametrize("count", [15, 3])  # (3: fewer samples than one global batch)
def test_every_split_of_a_global_batch_takes_the_same_samples_across_epochs(count):
    """Two processes at --batch-size 2, one at --batch-size 2 --grad-accum 2 and
    one at --batch-size 4 take the same samples step by step. An epoch was a
    whole number of micro-batches, not of global batches: of 15 samples the
    grad-accum split's epoch held 14, the others' 12, and from the second
    epoch on it trained on other samples (and a resume across the splits
    took other ones than the run it continued)."""
    def per_step(split: list, accum: int, steps: int = 8) -> list[list[int]]:
        return [sorted(i for _ in range(accum) for batches in split for i in batches.next()) for _ in range(steps)]

    two = per_step([MicroBatches(count, 2, world=2, rank=rank, seed=0) for rank in (0, 1)], 1)
    assert per_step([MicroBatches(count, 2, world=1, rank=0, seed=0, grad_accum=2)], 2) == two
    assert per_step([MicroBatches(count, 4, world=1, rank=0, seed=0)], 1) == two


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_base_trains_a_float32_head_without_autocast(tmp_path, tokenizer, dtype):
    """On the CPU nothing autocasts: a half-precision base's features met the float32 head's fc (a dtype
    error at the first step). Cast as GTO casts them, the loss is the float32 base's, within rounding."""
    samples = to_samples([{"text": t} for t in TEXTS], tokenizer)
    cfg = TrainConfig(max_steps=1, batch_size=2, ttt_steps=2, log_every=1)
    losses = []
    for name, base in (("float32", make_base()), ("half", make_base().to(dtype))):
        head = train(base, samples, tmp_path / name, cfg, draft_vocab_size=100, show_progress=False)
        assert head.fc.weight.dtype == torch.float32
        losses.append(json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])["loss"])
    assert math.isfinite(losses[1]) and losses[1] == pytest.approx(losses[0], rel=0.05)


def test_the_export_is_an_eagle3_checkpoint_in_the_requested_dtype(tmp_path, tokenizer):
    """The exported head holds the trained weights cast to --export-dtype, and
    the vocabulary mapping in the EAGLE-3 format: d2t[i] = target id - i, t2d
    marking those target ids."""
    from safetensors.torch import load_file

    from eagle_gto.checkpoint import build_head, load_checkpoint

    samples = to_samples([{"text": t} for t in TEXTS], tokenizer)
    cfg = TrainConfig(max_steps=1, batch_size=2, ttt_steps=1, export_dtype="float16")
    head = train(make_base(), samples, tmp_path, cfg, draft_vocab_size=100, show_progress=False)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert saved["fc.weight"].dtype == torch.float16 and saved["d2t"].dtype == torch.long
    used = torch.arange(100) + saved["d2t"]  # the target id of each draft id
    assert torch.equal(saved["t2d"].nonzero().flatten(), used)  # distinct, increasing, and what t2d marks
    counts = token_counts(samples, VOCAB)
    assert counts[used].min() >= counts[~saved["t2d"]].max()  # the most trained tokens
    state = head.state_dict()
    assert saved.keys() == state.keys()
    for name, value in state.items():
        assert torch.equal(saved[name], value.half() if value.is_floating_point() else value), name
    assert torch.equal(build_head(load_checkpoint(str(tmp_path))).d2t, head.d2t)  # the engine's loader takes it


# ------------------------------------------------------------------------- training
@pytest.mark.parametrize("model_type", ["vicuna", "mixtral", "llama2-chat"])
def test_a_regenerated_answer_is_trained_as_the_model_wrote_it(model_type, tokenizer, monkeypatch):
    """After `ASSISTANT:` or `[/INST]` a model writes " yes"; a byte-level
    tokenizer decodes the space too, and the template writes its own: the
    sample read `ASSISTANT:  yes`, two spaces, a sequence the model never wrote."""
    import eagle_gto.train.data as data

    answer = tokenizer(" yes", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    prompts = []
    monkeypatch.setattr(data, "greedy_continue", lambda model, batch, *args: (prompts.extend(batch), [answer])[1])
    model = nn.Linear(1, 1)  # (no generation_config: the tokenizer's eos stops)
    records = data.regenerate([{"messages": [{"role": "user", "content": "say yes"},
                                             {"role": "assistant", "content": "x"}]}], model, tokenizer, model_type)
    sample = encode_conversation(records[0]["messages"], tokenizer, model_type)
    written = prompts[0] + answer[:-1]  # (llama2-chat's template then writes " </s>")
    assert sample.input_ids[: len(written)] == written


def test_regenerated_answers_stop_at_every_eos_the_engine_stops_at(tokenizer):
    """The engine stops at the eos ids of generation_config, config.json and
    the tokenizer; regeneration read config.json's not, and wrote on past it."""
    from transformers import GenerationConfig

    from eagle_gto.train.data import regeneration_stop_ids

    base = make_base()
    base.config.eos_token_id = [11, 12]
    base.generation_config = GenerationConfig(eos_token_id=13)
    stops = regeneration_stop_ids(base, tokenizer, "plain")
    assert {11, 12, 13, tokenizer.eos_token_id} <= stops
    model = EaModel(base, random_head(head_config(base.config, "eagle3")), total_token=8, depth=2, top_k=2,
                    tokenizer=tokenizer)
    assert model._stop_ids(False, None) <= stops


def write_pair(tmp_path, tokenizer):
    base = make_base()
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    data = tmp_path / "data.jsonl"
    records = [{"conversations": [{"from": "human", "value": t[: 6 + k]}, {"from": "gpt", "value": "x"}]}
               for k, t in enumerate(TEXTS * 4)]
    records += [{"text": t} for t in TEXTS]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path / "base", data


def test_cli_trains_exports_and_the_engine_loads_the_head(tmp_path, tokenizer):
    base_dir, data = write_pair(tmp_path, tokenizer)
    out = tmp_path / "head"
    main(["--base-model-path", str(base_dir), "--data", str(data), "--out", str(out), "--model-type", "plain",
          "--regenerate", "--regen-max-new-tokens", "24", "--save-data", str(tmp_path / "regen.jsonl"),
          "--draft-vocab-size", "200", "--max-steps", "40", "--batch-size", "4", "--lr", "3e-3",
          "--log-every", "1", "--ttt-steps", "3", "--export-dtype", "float32", "--eval-data", str(data)])
    regen = [json.loads(line) for line in (tmp_path / "regen.jsonl").read_text().splitlines()]
    assert all(r["messages"][1]["content"] != "x" for r in regen[:12])  # answers are the base model's own
    # (a resume on answers that differ by a token is then a warning, not a refusal)
    answered = [json.loads(line) for line in data.read_text().splitlines()]
    progress = json.loads((checkpoint_dirs(out)[-1] / "progress.json").read_text())
    assert progress["regenerated_from"] == records_fingerprint(answered, "plain", None, 24)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_logs = [m for m in metrics if "loss" in m]
    assert len(train_logs) == 40
    # The loss is a cross-entropy against soft targets (bounded below by their entropy): it must fall.
    first, last = train_logs[:5], train_logs[-5:]
    assert sum(m["loss"] for m in last) / 5 < sum(m["loss"] for m in first) / 5 - 0.2
    assert sum(m["acc"][0] for m in last) > sum(m["acc"][0] for m in first)
    assert "eval_acc" in metrics[-1] and len(metrics[-1]["eval_acc"]) == 3
    assert (out / "training_curves.png").stat().st_size > 1000
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] == 200
    model = EaModel.from_pretrained(str(base_dir), str(out), dtype=torch.float32, total_token=20, depth=4, top_k=4)
    taus = []
    for text in TEXTS:
        prompt = tokenizer(text[:12], return_tensors="pt").input_ids
        spec = model.eagenerate(prompt, max_new_tokens=30)
        taus.append(model.last_stats.mean_accepted_length)
        assert torch.equal(spec, model.naivegenerate(prompt, max_new_tokens=30))
    assert max(taus) > 1.0  # the trained head gets drafts accepted


def test_two_processes_share_the_regeneration_write_its_data_and_say_done_once(tmp_path, tokenizer):
    """Under `accelerate launch` every process runs main(): each wrote --save-data
    (two writers truncating one file) and printed that the head was written;
    and each regenerated every record. Now each answers its share, and the
    data written is what one process regenerates."""
    base_dir, data = write_pair(tmp_path, tokenizer)
    script = tmp_path / "run.py"  # main(), saying each write of the regenerated data and each share regenerated
    # (each line in one os.write: the two processes share the pipe, and print's pieces interleaved there)
    script.write_text("import os, pathlib, sys\nfrom eagle_gto.train import __main__ as cli\n"
                      "write = pathlib.Path.write_text\n"
                      "def noted(path, *args):\n"
                      "    if path.name == 'regen.jsonl':\n        print('regen.jsonl written', flush=True)\n"
                      "    return write(path, *args)\n"
                      "pathlib.Path.write_text = noted\nregenerate = cli.regenerate\n"
                      "def counted(records, *args):\n    os.write(1, f'regenerated {len(records)}\\n'.encode())\n"
                      "    return regenerate(records, *args)\n"
                      "cli.regenerate = counted\ncli.main(sys.argv[1:])\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]), OMP_NUM_THREADS="1")
    ran = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), "--base-model-path", str(base_dir), "--data", str(data), "--out",
                          str(tmp_path / "head"), "--model-type", "plain", "--regenerate", "--regen-max-new-tokens",
                          "4", "--save-data", str(tmp_path / "regen.jsonl"), "--draft-vocab-size", "100",
                          "--max-steps", "1", "--batch-size", "2", "--ttt-steps", "1"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.count("regen.jsonl written") == 1 and ran.stdout.count("head written to") == 1
    assert sorted(re.findall(r"regenerated (\d+)", ran.stdout)) == ["7", "8"]  # 15 records, shared out
    one_process = cli.regenerate(read_records(str(data)), cli.load_base(str(base_dir)),
                                 cli.load_tokenizer(str(base_dir)), "plain", 4)
    assert [json.loads(line) for line in (tmp_path / "regen.jsonl").read_text().splitlines()] == one_process


def test_two_processes_say_a_bad_option_once_and_both_stop(tmp_path):
    """Every process checks the options, paths and data alike: each said the same error, once per process.
    Now rank 0 says it, the other says nothing, and the launch fails."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]), OMP_NUM_THREADS="1")
    ran = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "eagle_gto.train", "--base-model-path", str(tmp_path / "base"), "--data",
                          str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "head"), "--lr", "0"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert ran.returncode != 0
    assert ran.stderr.count("lr must be above 0") == 1, ran.stderr[-2000:]
    assert not (tmp_path / "head").exists()


def launch_two(script, *args, log_dir):
    """torchrun with 2 processes on the CPU, each output line marked with its process ([default0]: rank 0);
    the timeout fails a run left waiting instead of blocking the suite."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "--log-dir", str(log_dir), "--tee", "3", *script, *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_two_processes_say_a_diverged_run_once_by_rank_0(tmp_path, tokenizer):
    """Both processes stop at the same step (the norm is that of the reduced gradients) and each said so; which
    one the user saw depended on which the launcher stopped first. Rank 0 now says it, once. (Rank 0 waits here
    until rank 1 has left: before, rank 1 said it and the launcher stopped rank 0.)"""
    base_dir, data = write_pair(tmp_path, tokenizer)
    script = tmp_path / "run.py"
    script.write_text(
        "import atexit, math, os, pathlib, sys, time\nfrom eagle_gto.train import __main__ as cli, trainer\n"
        f"gone = pathlib.Path({str(tmp_path / 'rank-1-gone')!r})\n"
        "if os.environ['RANK'] == '1':\n    atexit.register(gone.touch)\n"
        "check = trainer.check_gradient_norm\n"
        "def after_rank_1(norm, step):\n"
        "    while os.environ['RANK'] == '0' and not math.isfinite(float(norm)) and not gone.exists():\n"
        "        time.sleep(0.05)\n"
        "    check(norm, step)\n"
        "trainer.check_gradient_norm = after_rank_1\ncli.main(sys.argv[1:])\n")
    ran = launch_two([script], "--base-model-path", base_dir, "--data", data, "--out", tmp_path / "head",
                     "--model-type", "plain", "--draft-vocab-size", "100", "--max-steps", "4", "--batch-size", "2",
                     "--ttt-steps", "1", "--lr", "1e30", log_dir=tmp_path / "logs")
    output = ran.stdout + ran.stderr.replace("\r", "\n")
    message = "python -m eagle_gto.train: step 2: the gradient norm is nan: training diverged"
    assert ran.returncode != 0
    assert output.count(message) == 1 and output.count(f"[default0]:{message}") == 1, output[-3000:]
    assert not re.search(r"^\[default\d\]:.*Traceback", output, re.M)
    assert not (tmp_path / "head" / "model.safetensors").exists()


def test_an_error_of_rank_0_alone_is_said_once_and_the_other_process_stops_without_a_traceback(tmp_path, tokenizer):
    """A file rank 0 alone writes, unwritable (found when the run ends): rank 0 said why and left, and rank 1,
    waiting for it, printed the traceback of its lost connection."""
    base_dir, data = write_pair(tmp_path, tokenizer)
    (tmp_path / "head" / "training_curves.png").mkdir(parents=True)
    ran = launch_two(["-m", "eagle_gto.train"], "--base-model-path", base_dir, "--data", data, "--out",
                     tmp_path / "head", "--model-type", "plain", "--draft-vocab-size", "100", "--max-steps", "2",
                     "--batch-size", "2", "--ttt-steps", "1", log_dir=tmp_path / "logs")
    output = ran.stdout + ran.stderr.replace("\r", "\n")
    assert ran.returncode != 0
    assert output.count("Is a directory") == 1 and "[default0]:python -m eagle_gto.train: [Errno 21] Is a " \
        "directory" in output, output[-3000:]
    assert not re.search(r"^\[default\d\]:.*Traceback", output, re.M), output[-3000:]


def test_an_error_met_after_rank_0_has_gone_is_still_said(monkeypatch):
    """The shared store lives in rank 0's process: once it has gone, noting the failure there raised inside the
    error handling, and the user saw that traceback instead of the error."""
    from eagle_gto.train import errors

    class GoneStore:
        def add(self, key, amount):
            raise RuntimeError("Connection reset by peer")

    monkeypatch.setattr(errors, "_store", lambda: GoneStore())
    with pytest.raises(SystemExit) as stopped:
        with errors.errors_said_once("prog"):
            raise OSError("out/metrics.jsonl: No space left on device")
    assert stopped.value.code == "prog: out/metrics.jsonl: No space left on device"


def test_resume_continues_exactly(tmp_path, tokenizer):
    base = make_base()
    samples = to_samples([{"text": t * 2} for t in TEXTS * 3], tokenizer)
    cfg = TrainConfig(max_steps=4, batch_size=2, lr=1e-3, save_every=2, keep_checkpoints=3, ttt_steps=2,
                      log_every=1)
    straight = train(base, samples, tmp_path / "a", cfg, draft_vocab_size=100, show_progress=False)
    assert [p.name for p in checkpoint_dirs(tmp_path / "a")] == ["step-00000002", "step-00000004"]
    # Interrupted after step 2: only the first checkpoint exists.
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-00000002", tmp_path / "b" / "checkpoints" / "step-00000002")
    # It had logged steps 3 and 4 before it stopped: the resumed run logs them again, once.
    (tmp_path / "b" / "metrics.jsonl").write_text((tmp_path / "a" / "metrics.jsonl").read_text())
    resumed = train(base, samples, tmp_path / "b", cfg, draft_vocab_size=100, resume=True, show_progress=False)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)
    progress = json.loads((tmp_path / "b" / "checkpoints" / "step-00000004" / "progress.json").read_text())
    assert progress["step"] == 4
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the step counter came back, the log continues


def test_a_run_resumed_with_another_split_of_its_global_batch_takes_the_next_samples(tmp_path, tokenizer,
                                                                                     monkeypatch):
    """Two processes with --batch-size 2 take, step by step, the samples one
    process takes with --batch-size 2 --grad-accum 2 or with --batch-size 4.
    A checkpoint counted its position in micro-batches of its own size: a
    two-process run resumed by one process (or the other way round) repeated
    and skipped samples. Here one process stands for two: the micro-batch
    over all processes is --batch-size x processes."""
    drawn = []
    real_next = MicroBatches.next

    def next_recorded(self):
        drawn.append(real_next(self))
        return drawn[-1]

    monkeypatch.setattr(MicroBatches, "next", next_recorded)
    base = make_base()
    samples = to_samples([{"text": t * 2} for t in TEXTS * 4], tokenizer)
    split = TrainConfig(max_steps=4, batch_size=2, grad_accum=2, save_every=2, ttt_steps=1)
    whole = dataclasses.replace(split, batch_size=4, grad_accum=1)
    for first, then in [(split, whole), (whole, split)]:
        shutil.rmtree(tmp_path, ignore_errors=True)
        drawn.clear()
        train(base, samples, tmp_path / "a", first, draft_vocab_size=100, show_progress=False)
        per_step = len(drawn) // 4
        straight = [sorted(sum(drawn[i : i + per_step], [])) for i in range(0, len(drawn), per_step)]
        shutil.copytree(tmp_path / "a" / "checkpoints" / "step-00000002",
                        tmp_path / "b" / "checkpoints" / "step-00000002")
        drawn.clear()
        train(base, samples, tmp_path / "b", then, draft_vocab_size=100, resume=True, show_progress=False)
        per_step = len(drawn) // 2
        assert [sorted(sum(drawn[i : i + per_step], [])) for i in range(0, len(drawn), per_step)] == straight[2:]
    # A position that is no whole number of the new micro-batches is refused; an older checkpoint's is kept.
    with pytest.raises(CheckpointMismatch, match="6 sequences into its epoch, not a whole number of this "):
        resumed_index({"index": 3, "micro_batch": 2}, 4)
    assert resumed_index({"index": 3}, 4) == 3


@pytest.mark.parametrize("max_grad_norm", [0.5, 0.0])  # (0: no clipping, still the check)
def test_a_diverged_run_stops_before_the_update_keeping_its_checkpoints(tmp_path, tokenizer, monkeypatch,
                                                                        max_grad_norm):
    """A NaN loss went on for every step and exported a head with NaN weights."""
    samples = to_samples([{"text": t * 2} for t in TEXTS * 3], tokenizer)
    cfg = TrainConfig(max_steps=4, batch_size=2, lr=1e-3, save_every=2, ttt_steps=1, max_grad_norm=max_grad_norm)
    batches = []

    def nan_at_step_3(*args):
        result = real_batch(*args)
        batches.append(1)
        return dataclasses.replace(result, loss=result.loss * math.nan) if len(batches) == 3 else result

    real_batch = trainer.run_batch
    monkeypatch.setattr(trainer, "run_batch", nan_at_step_3)
    with pytest.raises(TrainingDiverged, match="^step 3: the gradient norm is nan: training diverged"):
        train(make_base(), samples, tmp_path, cfg, draft_vocab_size=100, show_progress=False)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000002"]
    assert not (tmp_path / "model.safetensors").exists()  # no export


def test_a_checkpoint_that_cannot_be_written_stops_the_run_in_one_line(tmp_path, tokenizer):
    """A full disk while checkpointing was torch.save's traceback ("unexpected pos 64 vs 0"), naming no file."""
    base_dir, data = write_pair(tmp_path, tokenizer)
    checkpoint = tmp_path / "head" / "checkpoints" / "step-00000001"
    checkpoint.mkdir(parents=True)
    (checkpoint / "optimizer.bin").symlink_to("/dev/full")  # every write: "No space left on device"
    with pytest.raises(SystemExit, match=rf"^python -m eagle_gto.train: {re.escape(str(checkpoint))}: the "
                                         r"checkpoint could not be written \(is the disk full\?\): "):
        main(["--base-model-path", str(base_dir), "--data", str(data), "--out", str(tmp_path / "head"),
              "--model-type", "plain", "--draft-vocab-size", "100", "--max-steps", "1", "--batch-size", "2",
              "--ttt-steps", "1", "--resume"])  # (the folder holds a checkpoints folder: a fresh run is refused)


def test_a_resume_drops_a_half_written_last_log_line(tmp_path, tokenizer):
    """A run interrupted while it wrote a log line leaves half of it: the
    resumed run drops it with a warning (and logs that step again). A line
    before the last that does not parse is no interruption's: an error naming it."""
    samples = to_samples([{"text": t} for t in TEXTS], tokenizer)
    cfg = TrainConfig(max_steps=4, batch_size=2, ttt_steps=1, log_every=1, save_every=2)
    train(make_base(), samples, tmp_path, cfg, draft_vocab_size=100, show_progress=False)
    metrics = tmp_path / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    for broken, last in [(lines[:2] + [lines[2][:20]], True), ([lines[0], lines[1][:20], *lines[2:]], False)]:
        shutil.rmtree(tmp_path / "checkpoints" / "step-00000004")  # stopped after step 2's checkpoint
        metrics.write_text("\n".join(broken))
        if last:
            with pytest.warns(UserWarning, match="metrics.jsonl:3: dropping a last line that is not valid JSON"):
                train(make_base(), samples, tmp_path, cfg, draft_vocab_size=100, resume=True, show_progress=False)
            assert metrics.read_text().splitlines()[:2] == lines[:2]
            assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4]
        else:
            with pytest.raises(ValueError, match="metrics.jsonl:2: not valid JSON .*: fix or remove this one"):
                train(make_base(), samples, tmp_path, cfg, draft_vocab_size=100, resume=True, show_progress=False)


def assert_same_logs(straight_run, resumed_run, steps: list[int]) -> None:
    straight, resumed = ([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
                         for run in (straight_run, resumed_run))
    assert [m["step"] for m in resumed] == [m["step"] for m in straight] == steps
    for a, b in zip(straight, resumed):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["acc"] == pytest.approx(b["acc"], abs=1e-6)


def test_a_resumed_run_logs_the_same_averages(tmp_path, tokenizer):
    """The micro-batch results since the last log are checkpointed: a run
    resumed between two logs averages over the same steps."""
    base = make_base()
    samples = to_samples([{"text": t * 2} for t in TEXTS * 3], tokenizer)
    cfg = TrainConfig(max_steps=4, batch_size=2, lr=1e-3, save_every=2, ttt_steps=2, log_every=3)
    train(base, samples, tmp_path / "a", cfg, draft_vocab_size=100, show_progress=False)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-00000002", tmp_path / "b" / "checkpoints" / "step-00000002")
    train(base, samples, tmp_path / "b", cfg, draft_vocab_size=100, resume=True, show_progress=False)
    assert_same_logs(tmp_path / "a", tmp_path / "b", steps=[3, 4])


def test_a_run_resumed_with_another_number_of_processes_logs_the_same_averages(tmp_path, tokenizer):
    """Each process checkpoints its micro-batch results since the last log; a
    run resumed with fewer processes read only its own ranks' and logged the
    averages of part of them (with more, the processes' means were averaged
    as if they held equal shares)."""
    base = make_base()
    samples = to_samples([{"text": t * 2} for t in TEXTS * 4], tokenizer)
    # One process with --grad-accum 2 takes the micro-batches two processes with --grad-accum 1 take.
    cfg = TrainConfig(max_steps=4, batch_size=2, grad_accum=2, lr=1e-3, save_every=2, ttt_steps=2, log_every=3)
    train(base, samples, tmp_path / "a", cfg, draft_vocab_size=100, show_progress=False)
    checkpoint = tmp_path / "b" / "checkpoints" / "step-00000002"
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-00000002", checkpoint)
    window = json.loads(window_file(checkpoint, 0).read_text())
    for rank in (0, 1):  # as the two processes saved them: rank 0 the first micro-batch of each step
        window_file(checkpoint, rank).write_text(json.dumps(window[rank::2]))
    train(base, samples, tmp_path / "b", cfg, draft_vocab_size=100, resume=True, show_progress=False)
    assert_same_logs(tmp_path / "a", tmp_path / "b", steps=[3, 4])
    # Resumed by more processes than saved them, some start with none.
    window_file(checkpoint, 1).unlink()
    assert saved_window(checkpoint, 0, 2) == window[0::2] and saved_window(checkpoint, 1, 2) == []


def test_resuming_a_finished_run_logs_nothing_twice(tmp_path, tokenizer):
    samples = to_samples([{"text": t} for t in TEXTS], tokenizer)
    cfg = TrainConfig(max_steps=2, batch_size=2, ttt_steps=1, log_every=1)
    train(make_base(), samples, tmp_path, cfg, draft_vocab_size=100, eval_samples=samples, show_progress=False)
    before = (tmp_path / "metrics.jsonl").read_text()
    train(make_base(), samples, tmp_path, cfg, draft_vocab_size=100, eval_samples=samples, resume=True,
          show_progress=False)
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert [("eval_loss" in json.loads(line)) for line in before.splitlines()] == [False, True]


def test_evaluation_follows_eval_every_not_log_every(tmp_path, tokenizer):
    samples = to_samples([{"text": t} for t in TEXTS], tokenizer)
    cfg = TrainConfig(max_steps=4, batch_size=2, ttt_steps=1, log_every=2, eval_every=3)
    train(make_base(), samples, tmp_path, cfg, draft_vocab_size=100, eval_samples=samples, show_progress=False)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # The final evaluation shares the last step's record (it comes before the last checkpoint).
    assert [(m["step"], "loss" in m, "eval_loss" in m) for m in metrics] == \
        [(2, True, False), (3, False, True), (4, True, True)]
    # A record's learning rate is the one its step was taken with (step N is the update at index N - 1).
    assert [m["lr"] for m in metrics if "lr" in m] == [lr_at(1, 4, cfg), lr_at(3, 4, cfg)]


def test_checkpoints_of_another_run_are_refused(tmp_path, tokenizer):
    base = make_base()
    samples = to_samples([{"text": t} for t in TEXTS], tokenizer)
    cfg = TrainConfig(max_steps=4, batch_size=2, save_every=2, keep_checkpoints=1, ttt_steps=1)
    train(base, samples, tmp_path, cfg, draft_vocab_size=100, show_progress=False)
    # A fresh run would rotate that run's checkpoints away, or a later --resume would mix the two.
    with pytest.raises(ValueError, match="already holds checkpoints .*: pass --resume"):
        train(base, samples, tmp_path, cfg, draft_vocab_size=100, show_progress=False)
    # Resumed with fewer steps, the checkpoint is past the end: its weights would be exported untrained.
    with pytest.raises(ValueError, match="step-00000004 is at step 4, past this run's 2 steps"):
        train(base, samples, tmp_path, dataclasses.replace(cfg, max_steps=2), draft_vocab_size=100, resume=True,
              show_progress=False)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000004"]


def test_an_option_the_checkpoint_did_not_record_is_another_option():
    """An option the checkpoint's run did not record (an older version's, or one set only now) is compared too
    (a mutant comparing only the recorded ones survived)."""
    check_same_options(Path("step-00000002"), {"lr": 0.001}, {"lr": 0.001})
    with pytest.raises(CheckpointMismatch, match=r"--ttt-steps None then, 2 now\): resume with the options"):
        check_same_options(Path("step-00000002"), {"lr": 0.001}, {"lr": 0.001, "ttt_steps": 2})


def checkpoint_of(out, step: int, draft_vocab_size: int | None = None):
    """A checkpoint folder as far as the CLI's checks read it."""
    folder = out / "checkpoints" / f"step-{step:08d}"
    folder.mkdir(parents=True)
    progress = {"step": step, "epoch": 0, "index": step}
    if draft_vocab_size:
        progress["head_options"] = {"draft_vocab_size": draft_vocab_size, "intermediate_size": None}
    (folder / "progress.json").write_text(json.dumps(progress))


@pytest.mark.parametrize("options, existing, message", [
    (["--draft-vocab-size", "0"], None, "--draft-vocab-size must be at least 1, got 0"),
    (["--max-length", "-5"], None, "--max-length must be at least 1, got -5"),
    (["--intermediate-size", "0"], None, "--intermediate-size must be at least 1, got 0"),
    (["--regen-batch-size", "0"], None, "--regen-batch-size must be at least 1, got 0"),
    (["--regen-max-new-tokens", "0"], None, "--regen-max-new-tokens must be at least 1, got 0"),
    (["--weight-decay", "-0.1"], None, "weight_decay must be >= 0, got -0.1"),  # (AdamW's check comes later)
    (["--epochs", "inf"], None, "epochs must be a finite number above 0, got inf"),
    # the base's answers would be generated (hours) and then lost
    (["--regenerate", "--save-data", "/nonexistent-folder/regen.jsonl"], None,
     "--save-data /nonexistent-folder/regen.jsonl: there is no folder /nonexistent-folder"),
    # without --regenerate they were silently ignored (no file written)
    (["--save-data", "regen.jsonl"], None, "--save-data: only with --regenerate .*; add --regenerate, or leave it out"),
    (["--regen-batch-size", "16", "--regen-max-new-tokens", "64"], None,
     "--regen-max-new-tokens, --regen-batch-size: only with --regenerate .*, or leave them out"),
    ([], "checkpoint", "already holds checkpoints of an earlier run .*: pass --resume"),
    ([], "head", r"already holds the output of an earlier run \(config.json, model.safetensors\)"),
    ([], "file", "is a file, not a folder"),
    (["--resume", "--draft-vocab-size", "120"], "checkpoint",
     r"holds a head of another shape \(--draft-vocab-size 100 then, 120 now\)"),
])
def test_cli_refuses_bad_options_before_the_base_loads(tmp_path, monkeypatch, options, existing, message):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": TEXTS[0]}) + "\n")
    out = tmp_path / "out"
    if existing == "checkpoint":  # a fresh run into another run's folder, or a resume with another head shape
        checkpoint_of(out, 4, draft_vocab_size=100)
    elif existing == "head":  # an exported head, without checkpoints
        out.mkdir()
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_text("")
    elif existing == "file":
        out.write_text("")

    base = tmp_path / "base"  # (config.json only: --resume's check reads the vocabulary there)
    base_config(vocab_size=VOCAB).save_pretrained(base)

    def load_base(path):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr(cli, "load_base", load_base)
    with pytest.raises(SystemExit, match=message):
        main(["--base-model-path", str(base), "--data", str(data), "--out", str(out), *options])


def test_cli_wrong_base_paths_are_one_line(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": TEXTS[0]}) + "\n")
    head = tmp_path / "head"
    save_head(random_head(head_config(base_config(vocab_size=VOCAB), "eagle3", draft_vocab_size=100)), head)
    for path, message in [(tmp_path / "missing", "missing"), (head, "draft head")]:
        with pytest.raises(SystemExit, match=f"python -m eagle_gto.train: .*{message}"):
            main(["--base-model-path", str(path), "--data", str(data), "--out", str(tmp_path / "out")])


ALTERNATING = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
               "{% endif %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
               "{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}")
# Qwen3-style: the reasoning is dropped from the answers of earlier turns.
REWRITING = ("{% for m in messages %}{% if m['role'] == 'user' %}<u>{{ m['content'] }}</u>{% else %}"
             "<a>{{ m['content'].split('</think>')[-1] }}</s>{% endif %}{% endfor %}"
             "{% if add_generation_prompt %}<a>{% endif %}")


@pytest.mark.parametrize("template, bad_turns, options, message", [
    (ALTERNATING, [("human", "q"), ("human", "again"), ("gpt", "a b c")], [],
     "data.jsonl:3: the chat template refuses this conversation: Conversation roles must alternate"),
    (ALTERNATING, [("human", "q"), ("human", "again"), ("gpt", "a b c")], ["--regenerate"],
     "data.jsonl:3: the chat template refuses this conversation: Conversation roles must alternate"),
    (REWRITING, [("human", "q"), ("gpt", "<think>hmm</think>a b c")], [],
     "data.jsonl:3: the 'auto' prompt format does not contain assistant answer 1 .* verbatim"),
])
def test_records_the_chat_template_refuses_are_named_before_the_base_loads(tmp_path, monkeypatch, template,
                                                                          bad_turns, options, message):
    good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a b c"}]}
    bad = {"conversations": [{"from": role, "value": text} for role, text in bad_turns]}
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n" + json.dumps(good) + "\n")
    base = tmp_path / "base"
    base_config(vocab_size=VOCAB).save_pretrained(base)
    tok = make_tokenizer()
    tok.chat_template = template
    monkeypatch.setattr(cli, "load_tokenizer", lambda path: tok)

    def load_base(path):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr(cli, "load_base", load_base)
    with pytest.raises(SystemExit, match=f"python -m eagle_gto.train: .*{message}"):
        main(["--base-model-path", str(base), "--data", str(data), "--out", str(tmp_path / "out"), *options])


def test_errors_in_training_are_one_line(tmp_path, monkeypatch, tokenizer):
    """train() finds some problems only once the base model is there; they
    end the run with one line too, and genuine bugs keep their traceback."""
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": TEXTS[0]}) + "\n")
    base = tmp_path / "base"
    base_config(vocab_size=VOCAB).save_pretrained(base)
    monkeypatch.setattr(cli, "load_tokenizer", lambda path: tokenizer)
    monkeypatch.setattr(cli, "load_base", lambda path: None)
    argv = ["--base-model-path", str(base), "--data", str(data), "--out", str(tmp_path / "out")]
    for error, caught in [(ValueError("a problem with the base"), SystemExit), (RuntimeError("a bug"), RuntimeError)]:
        def failing_train(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(cli, "train", failing_train)
        with pytest.raises(caught, match=f"^(python -m eagle_gto.train: )?{error}$"):
            main(argv)


def test_regeneration_decodes_greedily_whatever_the_bases_generation_config():
    """transformers' generate() fills what it is not told from the base's
    generation_config.json (Qwen2.5-Instruct: repetition_penalty 1.05): the
    answers would not be the ones the engine's greedy decoding gives."""
    from transformers import GenerationConfig

    from eagle_gto.train.data import greedy_continue

    base = make_base()
    prompt = [0, 5, 9, 17, 33]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(base(torch.tensor([ids])).logits[0, -1].argmax()))
    argmax = ids[len(prompt):]
    settings = GenerationConfig(repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=12,
                                suppress_tokens=[argmax[0]], do_sample=True, top_k=5)
    base.generation_config = settings
    stop = next(t for t in range(VOCAB) if t not in argmax)
    assert greedy_continue(base, [prompt], 12, {stop}) == [argmax]
    assert base.generation_config is settings  # (put back)


# ----------------------------------------------------------------------- head shape
def llama_base(**config):
    from transformers import LlamaConfig

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=64, intermediate_size=128, num_hidden_layers=6, num_key_value_heads=2,
        **{"hidden_size": 64, "num_attention_heads": 4, **config})).eval()


def exported_and_loaded(head, folder):
    """The head as the engine's loader reads it back from the exported checkpoint."""
    from eagle_gto.checkpoint import build_head, load_checkpoint

    save_head(head, folder)
    return build_head(load_checkpoint(str(folder)))


@pytest.mark.parametrize("scaling, kept", [
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}, False),
    ({"rope_type": "dynamic", "factor": 2.0}, False),
    ({"rope_type": "linear", "factor": 2.0}, True),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64}, True),
])
def test_the_head_keeps_the_rope_scalings_it_implements(tmp_path, scaling, kept):
    """A yarn base (gpt-oss, long-context Qwen3) crashed after the base loaded:
    the head only implements default, linear and llama3 RoPE."""
    import warnings

    base = llama_base(rope_scaling=scaling)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        head = new_head(base, torch.arange(64), 32)
    dropped = [str(w.message) for w in caught if "RoPE scaling" in str(w.message)]
    assert (head.config.rope_scaling or {}).get("rope_type") == (scaling["rope_type"] if kept else None)
    assert len(dropped) == (0 if kept else 1)
    if not kept:
        assert f"base's {scaling['rope_type']!r} RoPE scaling" in dropped[0] and "default RoPE" in dropped[0]
    loaded = exported_and_loaded(head, tmp_path)
    assert torch.equal(loaded.inv_freq, head.inv_freq) and loaded.config.rope_scaling == head.config.rope_scaling



def test_the_head_config_copies_the_bases_settings():
    """The head's norm eps is the base's (a 1e-5 base got a 1e-6 head); a config without num_key_value_heads
    (an older one) has as many as attention heads; the draft vocabulary is capped at the base's."""
    from types import SimpleNamespace

    text = SimpleNamespace(hidden_size=64, num_attention_heads=4, vocab_size=VOCAB, intermediate_size=96,
                           rms_norm_eps=1e-5, rope_theta=50000.0, max_position_embeddings=512)
    cfg = head_config_for(text, draft_vocab_size=32000)
    assert (cfg["rms_norm_eps"], cfg["num_key_value_heads"], cfg["rope_theta"]) == (1e-5, 4, 50000.0)
    assert (cfg["draft_vocab_size"], cfg["intermediate_size"], cfg["vocab_size"]) == (VOCAB, 96, VOCAB)

def test_a_base_whose_head_dim_is_not_hidden_over_heads(tmp_path):
    """gpt-oss: hidden 2880, 64 heads of 64 (not 45); here 90 wide, 2 heads of 32."""
    base = llama_base(hidden_size=90, num_attention_heads=2, head_dim=32)
    head = new_head(base, torch.arange(64), 32)
    assert head.config.head_dim == 32 and head.midlayer.self_attn.q_proj.weight.shape == (64, 2 * 90)
    attach_target_embedding(head, base)
    ids = torch.randint(0, 64, (1, 12))
    target = target_outputs(base, ids)
    assert torch.isfinite(ttt_loss(head, target.features, ids, target.logits, torch.ones_like(ids), steps=2).loss)
    assert exported_and_loaded(head, tmp_path).config.head_dim == 32


def test_the_head_norm_starts_as_the_bases_final_norm():
    """Gemma's RMSNorm scales by (1 + weight), the head's by weight: a copied
    weight (zeros at init) made the head's output zero."""
    from transformers import GemmaConfig

    torch.manual_seed(0)
    gemma = AutoModelForCausalLM.from_config(GemmaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32)).eval()
    llama = llama_base()
    x = torch.randn(3, 64)
    for base in (gemma, llama):
        with torch.no_grad():
            base.get_decoder().norm.weight.uniform_(-0.5, 0.5)
            head = new_head(base, torch.arange(64), 32)
            torch.testing.assert_close(head.norm(x), base.get_decoder().norm(x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # A LayerNorm is no RMSNorm: the head's norm starts at ones.
        llama.model.norm = nn.LayerNorm(64)
        assert torch.equal(new_head(llama, torch.arange(64), 32).norm.weight, torch.ones(64))


# ----------------------------------------------------------------------- options
def test_learning_rate_and_clipping_options(tmp_path, tokenizer):
    """--max-grad-norm 0 zeroed every gradient (clip_grad_norm_ to 0): now it
    is no clipping, as in HF Trainer; a learning rate of 0 or below is refused."""
    for bad, message in [(dict(lr=0.0), "lr must be above 0, got 0.0"), (dict(lr=-1e-4), "lr must be above 0"),
                         (dict(max_grad_norm=-1.0), "max_grad_norm must be >= 0 .0: no clipping., got -1.0")]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**bad)
    base = make_base()
    samples = to_samples([{"text": t * 2} for t in TEXTS * 2], tokenizer)
    heads = {norm: train(base, samples, tmp_path / str(norm), TrainConfig(max_steps=3, batch_size=2, lr=1e-2,
                                                                        ttt_steps=1, max_grad_norm=norm),
                         draft_vocab_size=100, show_progress=False) for norm in (0.0, 1e9, 1e-3)}
    start = new_head(base, token_counts(samples, VOCAB), 100)
    assert not torch.equal(heads[0.0].fc.weight, start.fc.weight)
    for (name, a), b in zip(heads[0.0].state_dict().items(), heads[1e9].state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)
    # A bound below the gradients' norms clips them (AdamW's steps are scale-free: it shows from the second step on).
    assert not torch.allclose(heads[1e-3].fc.weight, heads[1e9].fc.weight, atol=1e-6, rtol=1e-5)
    decayed = train(base, samples, tmp_path / "decayed", TrainConfig(max_steps=3, batch_size=2, lr=1e-2, ttt_steps=1,
                                                                     max_grad_norm=0.0, weight_decay=0.5),
                    draft_vocab_size=100, show_progress=False)
    assert decayed.fc.weight.norm() < heads[0.0].fc.weight.norm()  # --weight-decay reaches AdamW



def test_a_step_of_accumulated_micro_batches_has_the_gradient_of_one_batch_of_them(tmp_path, tokenizer, monkeypatch):
    """--grad-accum 2 at --batch-size 1 is --batch-size 2 in two halves: the
    same gradient, not twice it (AdamW would hide a scale, clipping not)."""
    base = make_base()
    samples = to_samples([{"text": TEXTS[0]}] * 2, tokenizer)  # alike: every split has the same mean loss
    norms = []
    monkeypatch.setattr(trainer, "check_gradient_norm", lambda norm, step: norms.append(float(norm)))
    for batch_size, grad_accum in [(2, 1), (1, 2)]:
        train(base, samples, tmp_path / str(grad_accum), TrainConfig(max_steps=1, batch_size=batch_size,
                                                                     grad_accum=grad_accum, ttt_steps=2),
              draft_vocab_size=100, show_progress=False)
    assert norms[1] == pytest.approx(norms[0], rel=1e-4)


@pytest.mark.parametrize("options, message", [
    (dict(min_lr_ratio=-1.0), "min_lr_ratio must be between 0 and 1, got -1.0"),  # the cosine ended at -lr
    (dict(min_lr_ratio=3.0), "min_lr_ratio must be between 0 and 1, got 3.0"),
    (dict(min_lr_ratio=math.nan), "min_lr_ratio must be between 0 and 1, got nan"),
    (dict(warmup_ratio=-0.5), "warmup_ratio must be between 0 and 1, got -0.5"),
    (dict(warmup_ratio=2.0), "warmup_ratio must be between 0 and 1, got 2.0"),
    (dict(step_weight=-1.0), "step_weight must be >= 0, got -1.0"),  # as GTOConfig refuses it
    (dict(weight_decay=-0.1), "weight_decay must be >= 0, got -0.1"),
    (dict(epochs=0.0), "epochs must be a finite number above 0, got 0.0"),
    (dict(epochs=math.inf), "epochs must be a finite number above 0, got inf"),
    (dict(epochs=math.nan), "epochs must be a finite number above 0, got nan"),
    (dict(eval_every=-1), "eval_every must be >= 0, got -1"),
    # (it failed as a KeyError after training, before the export)
    (dict(export_dtype="fp16"), "export_dtype must be one of float32, float16, bfloat16, got 'fp16'"),
    # 0 may be meant as "none": what a run does instead (as GTO says it)
    (dict(save_every=0), "--save-every must be at least 1, got 0 (a --save-every past the run's steps checkpoints "
                         "only the last step)"),
    (dict(keep_checkpoints=0), "--keep-checkpoints must be at least 1, got 0 (the newest is the one --resume "
                               "continues from)"),
])
def test_config_refuses_values_that_would_misdirect_training(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(**options)


def test_the_learning_rate_stays_within_its_range_at_the_ends_of_the_ratios():
    for min_lr_ratio, warmup_ratio in [(0.0, 0.0), (1.0, 1.0), (0.0, 1.0), (1.0, 0.0)]:
        cfg = TrainConfig(lr=1e-3, min_lr_ratio=min_lr_ratio, warmup_ratio=warmup_ratio)
        assert all(0 < lr_at(step, 50, cfg) <= cfg.lr for step in range(50))


def test_resume_compares_the_head_options_as_resolved(tmp_path, monkeypatch, tokenizer):
    """The default --draft-vocab-size 32000, capped at this base's 320, makes
    the same head as 320: a resume with either is the same run."""
    base = make_base()
    samples = to_samples([{"text": t} for t in TEXTS], tokenizer)
    cfg = TrainConfig(max_steps=2, batch_size=2, ttt_steps=1, save_every=2)
    train(base, samples, tmp_path, cfg, draft_vocab_size=32000, show_progress=False)
    progress = tmp_path / "checkpoints" / "step-00000002" / "progress.json"
    assert json.loads(progress.read_text())["head_options"] == {"draft_vocab_size": VOCAB, "intermediate_size": 128}
    train(base, samples, tmp_path, cfg, draft_vocab_size=VOCAB, intermediate_size=128, resume=True,
          show_progress=False)
    # The CLI's check before the base loads reads the base's vocabulary from its config.json.
    base_config(vocab_size=VOCAB).save_pretrained(tmp_path / "base")

    class Passed(Exception):
        pass

    def load_tokenizer(path):
        raise Passed

    monkeypatch.setattr(cli, "load_tokenizer", load_tokenizer)
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": TEXTS[0]}) + "\n")
    with pytest.raises(Passed):  # (--draft-vocab-size 32000 by default; the other options the run's)
        main(["--base-model-path", str(tmp_path / "base"), "--data", str(data), "--out", str(tmp_path), "--resume",
              "--batch-size", "2", "--ttt-steps", "1"])
    # Checkpoints that recorded the options as typed resume too.
    record = json.loads(progress.read_text())
    progress.write_text(json.dumps({**record, "head_options": {"draft_vocab_size": 32000, "intermediate_size": None}}))
    train(base, samples, tmp_path, cfg, draft_vocab_size=VOCAB, resume=True, show_progress=False)
    with pytest.raises(ValueError, match=r"--intermediate-size 128 then, 96 now"):
        train(base, samples, tmp_path, cfg, draft_vocab_size=VOCAB, intermediate_size=96, resume=True,
              show_progress=False)


def test_a_run_killed_while_it_marks_a_checkpoint_complete_leaves_it_incomplete(tmp_path, monkeypatch):
    """progress.json was written in place: a run killed in the write left an empty file that marked the
    checkpoint complete, and every --resume then stopped on it with a JSON error."""
    older, newer = checkpoint_path(tmp_path, 2), checkpoint_path(tmp_path, 4)
    older.mkdir(parents=True)
    complete_checkpoint(tmp_path, older, {"step": 2}, keep=2)
    newer.mkdir()

    def killed_while_writing(descriptor):  # (written, not yet on the disk)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        complete_checkpoint(tmp_path, newer, {"step": 4}, keep=2)
    monkeypatch.undo()
    assert checkpoint_dirs(tmp_path) == [older]
    assert read_progress(older, 4) == {"step": 2}
    assert list(newer.iterdir()) == []  # (its half-written progress.json removed)


def test_a_checkpoint_is_marked_complete_on_the_disk(tmp_path, disk_writes):
    """A crash of the machine soon after progress.json was renamed into place could leave it empty, or the weights
    it marks complete unwritten: the checkpoint's files (in its folders too) are synced first, then progress.json
    before its rename, and the rename (the folder) after."""
    checkpoint = checkpoint_path(tmp_path, 2)
    (checkpoint / "optimizer").mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"w" * 7)
    (checkpoint / "optimizer" / "state.pt").write_bytes(b"s" * 5)
    complete_checkpoint(tmp_path, checkpoint, {"step": 2}, keep=2)
    written = len(json.dumps({"step": 2}) + "\n")
    folder = ("sync folder", checkpoint.stat().st_ino)
    assert disk_writes[:2] == [("sync file", 7), ("sync folder", (checkpoint / "optimizer").stat().st_ino)]
    assert disk_writes[2:] == [("sync file", 5), folder, ("sync file", written), ("rename", "progress.json"), folder]


def test_the_draft_vocabulary_is_the_most_frequent_ids_in_ascending_order():
    """formats.md: the Vd most frequent target ids (ties to the lower id), sorted ascending, d2t[i] = used[i] - i;
    t2d marks them; target_to_draft inverts d2t. A head trained on another order of the same ids would draft the
    same tokens here but not in engines that read the format (SpecForge, vLLM)."""
    counts = torch.tensor([5, 0, 9, 9, 1, 7, 9, 2])  # ids 2, 3, 6 tie at 9; then 5 (7), then 0 (5)
    d2t, t2d = build_vocab_mapping(counts, 4)
    used = [2, 3, 5, 6]
    assert d2t.tolist() == [u - i for i, u in enumerate(used)] and d2t.dtype == torch.long
    assert t2d.tolist() == [j in used for j in range(8)]
    assert target_to_draft(d2t, 8).tolist() == [used.index(j) if j in used else -1 for j in range(8)]
    d2t, t2d = build_vocab_mapping(counts, 3)  # the tie at the boundary keeps the lower ids
    assert (d2t + torch.arange(3)).tolist() == [2, 3, 6] and int(t2d.sum()) == 3
    identity, everything = build_vocab_mapping(counts, 8)
    assert not identity.any() and everything.all()


def test_ctrl_c_stops_a_run_in_one_line_that_says_how_to_go_on_and_it_resumes(tmp_path, tokenizer, monkeypatch,
                                                                                 capsys):
    """A KeyboardInterrupt (Ctrl-C, a scheduler's SIGINT) ended the run with a traceback: now one line naming the
    checkpoint --resume continues from (or that it starts again from step 0), and exit status 130, as GTO says
    it. Here it comes while a checkpoint is written, the oddest moment: the resumed runs end with the head of a
    run never stopped, and without the half-written checkpoints."""
    from accelerate import Accelerator

    base_dir, data = write_pair(tmp_path, tokenizer)
    options = ["--base-model-path", str(base_dir), "--data", str(data), "--model-type", "plain", "--draft-vocab-size",
               "100", "--max-steps", "4", "--save-every", "2", "--batch-size", "2", "--ttt-steps", "1",
               "--export-dtype", "float32"]
    main([*options, "--out", str(tmp_path / "straight")])
    real_save_state = Accelerator.save_state

    def killed_while_saving(step):
        def save_state(self, output_dir, **kwargs):
            real_save_state(self, output_dir, **kwargs)
            if output_dir.endswith(f"step-{step:08d}"):
                raise KeyboardInterrupt

        return save_state

    out = tmp_path / "run"
    prog = "python -m eagle_gto.train: "
    for step, resume, how in [
            (2, [], f"{out} holds no complete checkpoint yet: run the same command with --resume to start again there "
                    "from step 0"),
            (4, ["--resume"], f"run the same command with --resume to continue from {checkpoint_path(out, 2)}")]:
        monkeypatch.setattr(Accelerator, "save_state", killed_while_saving(step))
        capsys.readouterr()
        with pytest.raises((SystemExit, KeyboardInterrupt)) as stopped:  # (a KeyboardInterrupt would stop pytest)
            main([*options, "--out", str(out), *resume])
        assert stopped.type is SystemExit and stopped.value.code == 130
        err = capsys.readouterr().err
        assert err.endswith(f"\n{prog}interrupted; {how}\n")  # (a line of its own, not after the progress bar)
        assert not (checkpoint_path(out, step) / "progress.json").exists()
        if step == 2:  # a fresh run would write over it: it names --resume
            with pytest.raises(SystemExit, match=f"^{prog}{re.escape(str(out))} holds a run stopped before its first "
                                                 r"complete checkpoint \(metrics.jsonl, checkpoints\): pass --resume "
                                                 "to start it again there from step 0"):
                main([*options, "--out", str(out)])
    monkeypatch.undo()
    main([*options, "--out", str(out), "--resume"])
    assert f"resumed from {checkpoint_path(out, 2)} (step 2)" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    for name in ("model.safetensors", "metrics.jsonl"):
        straight, resumed = (tmp_path / "straight" / name).read_bytes(), (out / name).read_bytes()
        assert resumed == straight if name.endswith(".safetensors") else \
            [json.loads(line)["loss"] for line in resumed.splitlines()] == \
            pytest.approx([json.loads(line)["loss"] for line in straight.splitlines()], abs=1e-6)


def test_a_resume_that_finds_no_checkpoint_says_it_starts_from_step_0(tmp_path, tokenizer, capsys):
    samples = to_samples([{"text": t} for t in TEXTS], tokenizer)
    cfg = TrainConfig(max_steps=1, batch_size=2, ttt_steps=1)
    train(make_base(), samples, tmp_path / "run", cfg, draft_vocab_size=100, resume=True, show_progress=False)
    assert f"{tmp_path / 'run'} holds no complete checkpoint: starting from step 0\n" in capsys.readouterr().out


def test_a_checkpoint_written_over_one_a_kill_cut_short_keeps_no_window_of_its_processes(tmp_path, tokenizer):
    """A run of two processes killed while it wrote step 2 left rank 1's window there; resumed by one process,
    the run wrote step 2 over it, and a run resumed from that checkpoint logged rank 1's window again."""
    base = make_base()
    samples = to_samples([{"text": t * 2} for t in TEXTS * 3], tokenizer)
    cfg = TrainConfig(max_steps=4, batch_size=2, lr=1e-3, save_every=2, ttt_steps=2, log_every=3)
    train(base, samples, tmp_path / "a", cfg, draft_vocab_size=100, show_progress=False)
    cut_short = checkpoint_path(tmp_path / "b", 2)
    cut_short.mkdir(parents=True)
    window_file(cut_short, 1).write_text(json.dumps([[100.0, [100.0, 100.0], [0.0, 0.0], [5, 5]]]))
    train(base, samples, tmp_path / "b", cfg, draft_vocab_size=100, resume=True, show_progress=False)
    shutil.rmtree(checkpoint_path(tmp_path / "b", 4))  # stopped after step 2's checkpoint, then resumed
    train(base, samples, tmp_path / "b", cfg, draft_vocab_size=100, resume=True, show_progress=False)
    assert_same_logs(tmp_path / "a", tmp_path / "b", steps=[3, 4])


def test_resume_refuses_a_checkpoint_of_a_run_with_other_options(tmp_path, tokenizer, monkeypatch):
    """A resume with another --ttt-steps, --lr (any option the result depends on) or global batch went on
    silently, training a head that neither run's options describe (GTO refuses them). Its length, the split of
    its global batch, and how often it checkpoints, logs and evaluates may change."""
    base = make_base()
    samples = to_samples([{"text": t} for t in TEXTS], tokenizer)
    cfg = TrainConfig(max_steps=2, batch_size=2, ttt_steps=1, save_every=2)
    train(base, samples, tmp_path, cfg, draft_vocab_size=100, show_progress=False)
    checkpoint = re.escape(str(checkpoint_path(tmp_path, 2)))
    for changed, message in [
            (dict(ttt_steps=2, lr=2e-4), r"\(--ttt-steps 1 then, 2 now; --lr 0.0001 then, 0.0002 now\)"),
            (dict(batch_size=4), r"\(--batch-size x grad-accum x processes 2 then, 4 now\)")]:
        with pytest.raises(CheckpointMismatch, match=f"^{checkpoint} was written by a run with other options "
                                                     f"{message}: resume with the options that started"):
            train(base, samples, tmp_path, dataclasses.replace(cfg, **changed), draft_vocab_size=100, resume=True,
                  show_progress=False)
    free = dict(max_steps=3, batch_size=1, grad_accum=2, save_every=1, keep_checkpoints=1, log_every=2, eval_every=1)
    train(base, samples, tmp_path, dataclasses.replace(cfg, **free), draft_vocab_size=100, resume=True,
          show_progress=False)
    assert checkpoint_dirs(tmp_path) == [checkpoint_path(tmp_path, 3)]
    # The CLI says it before the base loads.
    base_config(vocab_size=VOCAB).save_pretrained(tmp_path / "base")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": TEXTS[0]}) + "\n")

    def load_base(path):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr(cli, "load_base", load_base)
    with pytest.raises(SystemExit, match=r"other options \(--lr 0.0001 then, 0.0003 now\)"):
        main(["--base-model-path", str(tmp_path / "base"), "--data", str(data), "--out", str(tmp_path), "--resume",
              "--draft-vocab-size", "100", "--batch-size", "2", "--ttt-steps", "1", "--lr", "3e-4"])


def test_resume_refuses_a_checkpoint_of_a_run_on_other_data(tmp_path, tokenizer):
    """A resume on other tokens (a --data file edited, another --max-length) went on silently: the run trained on
    a mix, its position in the data counted in another data set."""
    base = make_base()
    samples = to_samples([{"text": t} for t in TEXTS], tokenizer)
    cfg = TrainConfig(max_steps=4, batch_size=2, ttt_steps=1, save_every=2)
    train(base, samples, tmp_path, cfg, draft_vocab_size=100, show_progress=False)
    shutil.rmtree(checkpoint_path(tmp_path, 4))  # stopped after step 2
    for other in (samples[1:], to_samples([{"text": t} for t in TEXTS], tokenizer, max_length=8)):
        with pytest.raises(CheckpointMismatch, match=f"^{re.escape(str(checkpoint_path(tmp_path, 2)))} was "
                                                     "written by a run on other data: the training tokens"):
            train(base, other, tmp_path, cfg, draft_vocab_size=100, resume=True, show_progress=False)
    train(base, samples, tmp_path, cfg, draft_vocab_size=100, resume=True, show_progress=False)
    assert checkpoint_dirs(tmp_path)[-1] == checkpoint_path(tmp_path, 4)


def test_a_resume_with_other_eval_data_trains_on_with_a_warning(tmp_path, tokenizer):
    """--eval-data was not compared: a resume with another evaluation set went on silently, and metrics.jsonl's
    evaluations before and after it were of two sets. It changes what is logged, not the head trained: a warning
    (also for --eval-data added or left out); the same set, or a checkpoint that did not record it, says nothing."""
    base = make_base()
    samples = to_samples([{"text": t} for t in TEXTS], tokenizer)
    cfg = TrainConfig(max_steps=4, batch_size=2, ttt_steps=1, save_every=2)
    checkpoint = checkpoint_path(tmp_path, 2)

    def resume(eval_samples):
        shutil.rmtree(checkpoint_path(tmp_path, 4))  # stopped after step 2
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            train(base, samples, tmp_path, cfg, draft_vocab_size=100, eval_samples=eval_samples, resume=True,
                  show_progress=False)
        return [str(w.message) for w in said if "--eval-data" in str(w.message)]

    train(base, samples, tmp_path, cfg, draft_vocab_size=100, eval_samples=samples, show_progress=False)
    assert resume(samples) == []
    warning = (f"--eval-data differs from that of the run that wrote {checkpoint} (other files or contents, or given "
               "or left out): the head trains as it would have; metrics.jsonl's evaluations up to step 2 are of the "
               "other set")
    assert resume(samples[1:]) == [warning]
    assert resume(None) == [warning]  # (the step-2 checkpoint is still the first run's)
    progress = json.loads((checkpoint / "progress.json").read_text())
    del progress["eval_data"]  # written before checkpoints recorded it
    (checkpoint / "progress.json").write_text(json.dumps(progress))
    assert resume(samples[1:]) == []


def test_a_resume_on_another_base_of_the_same_shape_warns(tmp_path, tokenizer, monkeypatch):
    """--base-model-path was not compared: a resume on another model of the same shape went on silently, teaching
    the head from two bases. A warning (the same model may have moved); the same folder given by another path, or a
    checkpoint that did not record its base, says nothing."""
    base = make_base()
    samples = to_samples([{"text": t} for t in TEXTS], tokenizer)
    cfg = TrainConfig(max_steps=4, batch_size=2, ttt_steps=1, save_every=2)
    checkpoint = checkpoint_path(tmp_path / "out", 2)
    (tmp_path / "base-a").mkdir()
    (tmp_path / "base-b").mkdir()

    def resume(name):
        shutil.rmtree(checkpoint_path(tmp_path / "out", 4))  # stopped after step 2
        base.config._name_or_path = name
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            train(base, samples, tmp_path / "out", cfg, draft_vocab_size=100, resume=True, show_progress=False)
        return [str(w.message) for w in said if "base model" in str(w.message)]

    base.config._name_or_path = str(tmp_path / "base-a")
    train(base, samples, tmp_path / "out", cfg, draft_vocab_size=100, show_progress=False)
    monkeypatch.chdir(tmp_path)
    assert resume("base-a") == []  # (the same folder, relative)
    assert resume("base-b") == [f"the base model {str(tmp_path / 'base-b')!r} is not the one of the run that wrote "
                                f"{checkpoint} ({str(tmp_path / 'base-a')!r}): the head goes on learning from this "
                                "base's hidden states; if it is another model (not the same one moved), start a new "
                                "run with another --out"]
    progress = json.loads((checkpoint / "progress.json").read_text())
    del progress["base"]  # written before checkpoints recorded it
    (checkpoint / "progress.json").write_text(json.dumps(progress))
    assert resume("org/other-model") == []


def test_a_resume_in_another_precision_warns(tmp_path, tokenizer):
    """A run moved from a GPU (a bfloat16 base, bf16 autocast) to a CPU (float32, none) went on silently: there is
    no option to match the old run with, so not refused, but said."""
    base = make_base()
    samples = to_samples([{"text": t} for t in TEXTS], tokenizer)
    cfg = TrainConfig(max_steps=4, batch_size=2, ttt_steps=1, save_every=2)
    checkpoint = checkpoint_path(tmp_path, 2)
    train(base, samples, tmp_path, cfg, draft_vocab_size=100, show_progress=False)
    progress = json.loads((checkpoint / "progress.json").read_text())
    assert progress["precision"] == "base float32, head autocast no"
    on_a_gpu = {**progress, "precision": "base bfloat16, head autocast bf16"}
    (checkpoint / "progress.json").write_text(json.dumps(on_a_gpu))
    shutil.rmtree(checkpoint_path(tmp_path, 4))  # stopped after step 2
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        train(base, samples, tmp_path, cfg, draft_vocab_size=100, resume=True, show_progress=False)
    assert [str(w.message) for w in said if "precision" in str(w.message)] == [
        f"this run's precision (base float32, head autocast no) is not that of the run that wrote {checkpoint} "
        "(base bfloat16, head autocast bf16): training goes on, from hidden states computed in the new precision"]


def test_ctrl_c_while_accelerate_is_first_imported_is_one_line_too(tmp_path, monkeypatch, capsys):
    """A Ctrl-C early in a run cut accelerate's first import short: deciding which process speaks imported it
    again, and the run ended with an ImportError's traceback ("partially initialized module")."""
    calls = []

    def process_state():
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt  # (in the import)
        raise ImportError("cannot import name 'dispatch_model' from partially initialized module")

    monkeypatch.setattr(errors, "process_state", process_state)
    out = tmp_path / "run"
    with pytest.raises((SystemExit, KeyboardInterrupt, ImportError)) as stopped:
        main(["--base-model-path", "base", "--data", "data.jsonl", "--out", str(out)])
    assert stopped.type is SystemExit and stopped.value.code == 130
    assert capsys.readouterr().err == f"python -m eagle_gto.train: interrupted; nothing was written to {out}\n"


def test_a_resume_on_regenerated_answers_that_differ_by_a_token_is_a_warning(tmp_path, tokenizer):
    """--regenerate's answers to the same records may differ by a token on another GPU or number of processes
    (each batches other prompts together): the resume was refused, and without --save-data the run could not go
    on at all (GTO warns for its generated data). Other records are still refused."""
    base = make_base()
    samples = to_samples([{"text": t} for t in TEXTS], tokenizer)
    regenerated = records_fingerprint([{"text": t} for t in TEXTS], "plain", None, 512)
    cfg = TrainConfig(max_steps=4, batch_size=2, ttt_steps=1, save_every=2)
    train(base, samples, tmp_path, cfg, draft_vocab_size=100, show_progress=False, regenerated_from=regenerated)
    shutil.rmtree(checkpoint_path(tmp_path, 4))  # stopped after step 2
    other_answers = samples[:-1] + [to_samples([{"text": TEXTS[-1] + " x"}], tokenizer)[0]]
    other_records = records_fingerprint([{"text": t} for t in TEXTS[1:]], "plain", None, 512)
    with pytest.raises(CheckpointMismatch, match="was written by a run on other data"):
        train(base, other_answers, tmp_path, cfg, draft_vocab_size=100, resume=True, show_progress=False,
              regenerated_from=other_records)
    with pytest.warns(UserWarning, match="the base's regenerated answers differ from those of the run that wrote "
                                         f"{re.escape(str(checkpoint_path(tmp_path, 2)))}"):
        train(base, other_answers, tmp_path, cfg, draft_vocab_size=100, resume=True, show_progress=False,
              regenerated_from=regenerated)
    assert checkpoint_dirs(tmp_path)[-1] == checkpoint_path(tmp_path, 4)
    # (the key order of a record is no other record)
    assert records_fingerprint([{"a": 1, "b": 2}], "plain", None, 512) == \
        records_fingerprint([{"b": 2, "a": 1}], "plain", None, 512)


def test_the_base_runs_in_its_own_dtype_under_the_heads_autocast(tokenizer):
    """On a GPU the step runs under bf16 autocast, which ran the base's matmuls in bfloat16 too: a float16 base
    (Vicuna's) gave the head other features than the engine, which runs it in float16, gives it. Here a float32
    base under the CPU's bf16 autocast."""
    base = make_base()
    samples = to_samples([{"text": t} for t in TEXTS], tokenizer)

    def objective(features, input_ids, logits, loss_mask, attention_mask):  # what the head is given
        return features, logits

    plain = trainer.run_batch(objective, base, samples, torch.device("cpu"))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = trainer.run_batch(objective, base, samples, torch.device("cpu"))
    assert autocast[1].dtype == torch.float32
    assert torch.equal(autocast[0], plain[0]) and torch.equal(autocast[1], plain[1])
