"""The benchmark suite: gen_answer on a tiny random pair in both modes, the
speed report on its output and on a hand-made answer file, resuming."""

import json
from pathlib import Path

import pytest
import torch

from eagle_gto.chat import build_prompt
from eagle_gto.evaluation import gen_answer, speed
from eagle_gto.evaluation.questions import read_jsonl

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"benchmark questions not found at {DATA}")

TREE = ["--total-token", "10", "--depth", "3", "--top-k", "3"]


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A random Llama base with a byte-level tokenizer (256 ids = its vocab)
    and a random EAGLE-3 head."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from eagle_gto.checkpoint import save_head
    from eagle_gto.tiny import base_config, head_config, random_head

    root = tmp_path_factory.mktemp("pair")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    torch.manual_seed(0)
    cfg = base_config()
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "base")
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(root / "base")
    save_head(random_head(head_config(cfg, "eagle3", draft_vocab_size=128)), root / "head")
    return str(root / "base"), str(root / "head")


def run_gen(pair, answer_file, *extra):
    base, head = pair
    return gen_answer.main(["--base-model-path", base, "--ea-model-path", head, "--model-type", "plain",
                            "--max-new-tokens", "8", "--warmup", "1", "--device", "cpu",
                            "--answer-file", str(answer_file), *TREE, *extra])


def check_record(record, turns):
    assert {"question_id", "answer_id", "model_id", "choices", "tstamp", "category"} <= record.keys()
    choice = record["choices"][0]
    assert choice["index"] == 0
    for key in ("turns", "idxs", "new_tokens", "wall_time", "accept_lengths"):
        assert len(choice[key]) == turns, key
    for idx, new, wall, lengths in zip(choice["idxs"], choice["new_tokens"], choice["wall_time"],
                                       choice["accept_lengths"]):
        assert wall > 0
        assert idx == len(lengths) - 1  # idxs: 0-based index of the last iteration, prefill included
        assert new == sum(lengths) and 1 <= new <= 8
        assert lengths[0] == 1  # the prefill yields one token


@needs_data
def test_mt_bench_both_modes_then_speed(tiny_pair, tmp_path, monkeypatch):
    prompts = []  # every conversation gen_answer turns into a prompt

    def spy(messages, *args, **kwargs):
        prompts.append([dict(m) for m in messages])
        return build_prompt(messages, *args, **kwargs)

    monkeypatch.setattr(gen_answer, "build_prompt", spy)
    ea = run_gen(tiny_pair, tmp_path / "ea.jsonl", "--bench-name", "mt_bench", "--data-dir", str(DATA),
                 "--limit", "2", "--mode", "ea")
    base = run_gen(tiny_pair, tmp_path / "base.jsonl", "--bench-name", "mt_bench", "--mode", "baseline",
                   "--limit", "2", "--model-id", "tiny-plain")
    ea_answers, base_answers = read_jsonl(ea), read_jsonl(base)
    questions = read_jsonl(DATA / "mt_bench" / "question.jsonl")[:2]
    assert [a["question_id"] for a in ea_answers] == [q["question_id"] for q in questions]
    assert base_answers[0]["model_id"] == "tiny-plain" and base_answers[0]["mode"] == "baseline"
    for ea_answer, base_answer, question in zip(ea_answers, base_answers, questions):
        assert len(question["turns"]) == 2
        check_record(ea_answer, 2)
        check_record(base_answer, 2)
        assert ea_answer["category"] == question["category"]
        # greedy float32 speculative decoding is lossless: same text, same token counts
        assert ea_answer["choices"][0]["turns"] == base_answer["choices"][0]["turns"]
        assert ea_answer["choices"][0]["new_tokens"] == base_answer["choices"][0]["new_tokens"]
        assert base_answer["choices"][0]["idxs"] == [n - 1 for n in base_answer["choices"][0]["new_tokens"]]

    # per run: one unrecorded warm-up generation, then 2 questions x 2 turns
    assert len(prompts) == 2 * (1 + 4) and prompts[0] == [{"role": "user", "content": questions[0]["turns"][0]}]
    # The second turn continues the conversation: its prompt holds the first answer.
    first = questions[0]["turns"]
    assert [{"role": "user", "content": first[0]},
            {"role": "assistant", "content": ea_answers[0]["choices"][0]["turns"][0]},
            {"role": "user", "content": first[1]}] in prompts

    summary = speed.main(["--ea-file", str(ea), "--baseline-file", str(base), "--out-dir", str(tmp_path / "report")])
    groups = summary["groups"]
    assert set(groups) == {"all", questions[0]["category"]}
    assert groups["all"]["questions"] == 2 and groups["all"]["baseline_tau"] == 1.0
    assert groups["all"]["ea_tokens"] == sum(sum(a["choices"][0]["new_tokens"]) for a in ea_answers)
    turns = sum(len(a["choices"][0]["turns"]) for a in ea_answers)  # one prefill step each, not in the histogram
    assert sum(summary["accept_length_histogram"].values()) == groups["all"]["ea_iterations"] - turns
    assert json.loads((tmp_path / "report" / "speed.json").read_text())["groups"] == groups


@needs_data
@pytest.mark.parametrize("bench", ["humaneval", "gsm8k"])
def test_single_turn_benches(tiny_pair, tmp_path, bench):
    answers = read_jsonl(run_gen(tiny_pair, tmp_path / "a.jsonl", "--question-file",
                                 str(DATA / bench / "question.jsonl"), "--limit", "1", "--temperature", "0.8"))
    assert len(answers) == 1 and answers[0]["question_id"] == read_jsonl(DATA / bench / "question.jsonl")[0]["question_id"]
    check_record(answers[0], 1)


@needs_data
def test_resume_skips_answered_ids(tiny_pair, tmp_path):
    path = tmp_path / "a.jsonl"
    gsm8k = ["--bench-name", "gsm8k", "--data-dir", str(DATA)]
    run_gen(tiny_pair, path, *gsm8k, "--limit", "1")
    first = read_jsonl(path)
    with path.open("a") as f:
        f.write('{"question_id": 5, "answ')  # a line cut short by an interrupted run
    with pytest.warns(UserWarning, match="not valid JSON"):
        run_gen(tiny_pair, path, *gsm8k, "--limit", "2")
    second = read_jsonl(path)
    assert len(second) == 2 and second[0] == first[0]  # question 0 was not answered again
    ids = [q["question_id"] for q in read_jsonl(DATA / "gsm8k" / "question.jsonl")[:2]]
    assert [a["question_id"] for a in second] == ids
    before = path.read_text()
    run_gen(tiny_pair, path, *gsm8k, "--limit", "2")  # nothing left: the file is untouched
    assert path.read_text() == before


def answer(qid, category, new_tokens, wall_time, idxs, accept_lengths=None):
    choice = {"index": 0, "turns": ["x"] * len(new_tokens), "idxs": idxs, "new_tokens": new_tokens,
              "wall_time": wall_time}
    if accept_lengths is not None:
        choice["accept_lengths"] = accept_lengths
    return {"question_id": qid, "answer_id": str(qid), "model_id": "m", "category": category,
            "choices": [choice], "tstamp": 0.0}


def write(path, answers):
    path.write_text("".join(json.dumps(a) + "\n" for a in answers))
    return str(path)


def test_speed_arithmetic_by_hand(tmp_path):
    """Question 1 (writing): EA 30 tokens in 1.0 s over 10 iterations (30 tok/s),
    plain 30 tokens in 3.0 s (10 tok/s): ratio 3.0.
    Question 2 (math, two turns): EA 20 + 20 tokens in 0.5 + 1.5 s over 5 + 5
    iterations (20 tok/s), plain 40 tokens in 2 + 2 s (10 tok/s): ratio 2.0.
    Question 3 is answered only with speculation: left out.
    All: speedup = (3.0 + 2.0) / 2 = 2.5; EA tok/s = 70 / 3 = 23.333;
    plain tok/s = 70 / 7 = 10; speedup_total = 2.3333; tau = 70 / 20 = 3.5.
    Writing: tau 30 / 10 = 3; math: tau 40 / 10 = 4.
    Histogram over the EA accept lengths after each turn's prefill step:
    q1 [1 | 4, 4, 3, 3, 3, 3, 3, 3, 3] (sum 30), q2 [1 | 4, 5, 5, 5] and
    [1 | 5, 5, 5, 4] (sums 20, 20): 3 x7, 4 x4, 5 x6."""
    ea = write(tmp_path / "ea.jsonl", [
        answer(1, "writing", [30], [1.0], [9], [[1, 4, 4, 3, 3, 3, 3, 3, 3, 3]]),
        answer(2, "math", [20, 20], [0.5, 1.5], [4, 4], [[1, 4, 5, 5, 5], [1, 5, 5, 5, 4]]),
        answer(3, "math", [10], [1.0], [3]),
    ])
    base = write(tmp_path / "base.jsonl", [
        answer(1, "writing", [30], [3.0], [29]),
        answer(2, "math", [20, 20], [2.0, 2.0], [19, 19]),
    ])
    summary = speed.summarize(read_jsonl(ea), read_jsonl(base))
    assert summary["questions"] == 2 and summary["unpaired"] == [3]
    everything = summary["groups"]["all"]
    assert everything["speedup"] == pytest.approx(2.5)
    assert everything["ea_tokens_per_second"] == pytest.approx(70 / 3)
    assert everything["baseline_tokens_per_second"] == pytest.approx(10.0)
    assert everything["speedup_total"] == pytest.approx(7 / 3)
    assert everything["tau"] == pytest.approx(3.5)
    assert everything["baseline_tau"] == pytest.approx(1.0)
    assert summary["groups"]["writing"]["speedup"] == pytest.approx(3.0)
    assert summary["groups"]["writing"]["tau"] == pytest.approx(3.0)
    assert summary["groups"]["math"]["speedup"] == pytest.approx(2.0)
    assert summary["groups"]["math"]["tau"] == pytest.approx(4.0)
    assert summary["accept_length_histogram"] == {"3": 7, "4": 4, "5": 6}

    table = speed.format_table(summary)
    assert "2.500" in table.splitlines()[2] and "3.50" in table.splitlines()[2]


def test_speed_cli_writes_report_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    ea = write(tmp_path / "ea.jsonl", [answer(1, "code", [12], [1.0], [3], [[1, 3, 4, 4]])])
    base = write(tmp_path / "base.jsonl", [answer(1, "code", [12], [4.0], [11])])
    summary = speed.main(["--ea-file", ea, "--baseline-file", base])
    assert summary["groups"]["code"]["speedup"] == pytest.approx(4.0)
    for name in ("speed.json", "speedup_tau.png", "accept_lengths.png"):
        assert (tmp_path / name).stat().st_size > 0
    with pytest.raises(ValueError, match="no question id in common"):
        speed.main(["--ea-file", ea, "--baseline-file", write(tmp_path / "other.jsonl", [answer(2, "c", [1], [1.0], [0])])])
