"""Draft-head training (eagle_gto.train): data, features, the TTT unroll and
its loss, the training loop with resume, export and reload."""

import dataclasses
import json
import shutil

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from eagle_gto import EaModel
from eagle_gto.chat import build_prompt
from eagle_gto.checkpoint import save_head
from eagle_gto.drafter import Drafter
from eagle_gto.target import TargetRunner, eagle3_feature_layers
from eagle_gto.tiny import base_config, head_config, random_head
from eagle_gto.train import Sample, TrainConfig, new_head, target_outputs, to_samples, token_counts, train, ttt_loss
from eagle_gto.train.data import encode_conversation, read_records, to_messages
from eagle_gto.train import trainer
from eagle_gto.train.trainer import checkpoint_dirs, main
from eagle_gto.train.ttt import unroll

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
    long = {"messages": [{"role": "user", "content": "hello there " * 20}, {"role": "assistant", "content": "x = 1"}]}
    with pytest.warns(UserWarning, match="1 of 2 records have no loss tokens within the first 30"):
        assert len(to_samples([long, good], tokenizer, "plain", max_length=30)) == 1
    with pytest.raises(ValueError, match="0 have no loss tokens .*, 1 have none within --max-length 30"):
        to_samples([long], tokenizer, "plain", max_length=30)
    with pytest.raises(ValueError, match="log_every must be at least 1"):
        TrainConfig(log_every=0)


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


def test_a_resumed_run_logs_the_same_averages(tmp_path, tokenizer):
    """The micro-batch results since the last log are checkpointed: a run
    resumed between two logs averages over the same steps."""
    base = make_base()
    samples = to_samples([{"text": t * 2} for t in TEXTS * 3], tokenizer)
    cfg = TrainConfig(max_steps=4, batch_size=2, lr=1e-3, save_every=2, ttt_steps=2, log_every=3)
    train(base, samples, tmp_path / "a", cfg, draft_vocab_size=100, show_progress=False)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-00000002", tmp_path / "b" / "checkpoints" / "step-00000002")
    train(base, samples, tmp_path / "b", cfg, draft_vocab_size=100, resume=True, show_progress=False)
    straight, resumed = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
                         for run in "ab")
    assert [m["step"] for m in resumed] == [m["step"] for m in straight] == [3, 4]
    for a, b in zip(straight, resumed):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["acc"] == pytest.approx(b["acc"], abs=1e-6)


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
    # the base's answers would be generated (hours) and then lost
    (["--regenerate", "--save-data", "/nonexistent-folder/regen.jsonl"], None,
     "--save-data /nonexistent-folder/regen.jsonl: there is no folder /nonexistent-folder"),
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

    def load_base(path):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr(trainer, "load_base", load_base)
    with pytest.raises(SystemExit, match=message):
        main(["--base-model-path", "unused", "--data", str(data), "--out", str(out), *options])


def test_cli_wrong_base_paths_are_one_line(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": TEXTS[0]}) + "\n")
    head = tmp_path / "head"
    save_head(random_head(head_config(base_config(vocab_size=VOCAB), "eagle3", draft_vocab_size=100)), head)
    for path, message in [(tmp_path / "missing", "missing"), (head, "draft head")]:
        with pytest.raises(SystemExit, match=f"python -m eagle_gto.train: .*{message}"):
            main(["--base-model-path", str(path), "--data", str(data), "--out", str(tmp_path / "out")])
