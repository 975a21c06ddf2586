"""The benchmark suite: gen_answer on a tiny random pair in both modes, the
speed report on its output and on a hand-made answer file, resuming."""

import json
import os
import time
import warnings
from pathlib import Path

import pytest
import torch

from eagle_gto.chat import build_prompt
from eagle_gto.evaluation import gen_answer, speed
from eagle_gto.evaluation.questions import sort_answers
from eagle_gto.generation import GenerationStats, Step, TreeParams
from eagle_gto.jsonl import read_jsonl

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"benchmark questions not found at {DATA}")

TREE = ["--total-token", "10", "--depth", "3", "--top-k", "3"]


def byte_tokenizer():
    """A byte-level tokenizer: one id per byte, 256 in all."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A random Llama base with a byte-level tokenizer (256 ids = its vocab)
    and a random EAGLE-3 head."""
    return save_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def short_context_pair(tmp_path_factory):
    """tiny_pair's, with a base trained for a context of 512 tokens."""
    return save_pair(tmp_path_factory.mktemp("short"), max_position_embeddings=512)


def save_pair(root, **config):
    from transformers import AutoModelForCausalLM

    from eagle_gto.checkpoint import save_head
    from eagle_gto.tiny import base_config, head_config, random_head

    torch.manual_seed(0)
    cfg = base_config()
    for key, value in config.items():
        setattr(cfg, key, value)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "base")
    byte_tokenizer().save_pretrained(root / "base")
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
        assert sum(lengths[:-1]) < new <= sum(lengths) and 1 <= new <= 8  # the budget may cut the last step only
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
    # The second turn continues the conversation: its prompt holds the first answer
    # (as the model wrote it; the answer file strips it).
    first = questions[0]["turns"]
    conversation = next(m for m in prompts if len(m) == 3)  # the ea run's first question, second turn
    assert [m["role"] for m in conversation] == ["user", "assistant", "user"]
    assert conversation[0]["content"] == first[0] and conversation[2]["content"] == first[1]
    assert conversation[1]["content"].strip() == ea_answers[0]["choices"][0]["turns"][0]

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
    first = read_jsonl(DATA / bench / "question.jsonl")[0]
    assert len(answers) == 1 and answers[0]["question_id"] == first["question_id"]
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
    All: mean tok/s EA (30 + 20) / 2 = 25, plain (10 + 10) / 2 = 10, speedup
    25 / 10 = 2.5 (here also the mean of the ratios); EA tok/s = 70 / 3 = 23.333;
    plain tok/s = 70 / 7 = 10; speedup_total = 2.3333; tau = 70 / 20 = 3.5.
    Writing: tau 30 / 10 = 3; math: tau 40 / 10 = 4.
    Histogram over the EA accept lengths after each turn's prefill step:
    q1 [1 | 4, 4, 3, 3, 3, 3, 3, 3, 3] (sum 30), q2 [1 | 4, 5, 5, 5] and
    [1 | 5, 5, 5, 4] (sums 20, 20): 3 x7, 4 x4, 5 x6. Per draft round (the
    reference's tau): all (29 + 19 + 19) / (9 + 4 + 4) = 67 / 17, writing
    29 / 9, math 38 / 8."""
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
    assert everything["ea_mean_tokens_per_second"] == pytest.approx(25.0)
    assert everything["baseline_mean_tokens_per_second"] == pytest.approx(10.0)
    assert everything["speedup_mean_of_ratios"] == pytest.approx(2.5)
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
    # 17 rounds accepted 2 drafts or more (positions 1 and 2 always), 10 a third, 6 a fourth
    assert summary["acceptance_per_position"] == pytest.approx({"1": 1.0, "2": 1.0, "3": 10 / 17, "4": 6 / 10})
    assert everything["tau_per_round"] == pytest.approx(67 / 17)
    assert summary["groups"]["writing"]["tau_per_round"] == pytest.approx(29 / 9)
    assert summary["groups"]["math"]["tau_per_round"] == pytest.approx(38 / 8)

    table = speed.format_table(summary)
    assert "2.500" in table.splitlines()[2] and table.splitlines()[2].endswith("3.50       3.94")
    # Records without a mode are the reference's, whose idxs count no prefill iteration: the label says so.
    assert "tau: tokens per draft round (the reference's answers count no prefill" in table
    ours = [{**a, "mode": "ea"} for a in read_jsonl(ea)]
    ours_table = speed.format_table(speed.summarize(ours, read_jsonl(base)))
    assert "tau: tokens per target forward, prefill counted" in ours_table
    # Answers without accept_lengths (the reference's) have no rounds to count.
    plain_records = [{**a, "choices": [{k: v for k, v in a["choices"][0].items() if k != "accept_lengths"}]}
                     for a in read_jsonl(ea)]
    summary = speed.summarize(plain_records, read_jsonl(base))
    assert summary["groups"]["all"]["tau_per_round"] is None
    assert speed.format_table(summary).splitlines()[2].endswith("3.50          -")


def test_speed_cli_writes_report_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    ea = write(tmp_path / "ea.jsonl", [answer(1, "code", [12], [1.0], [3], [[1, 3, 4, 4]])])
    base = write(tmp_path / "base.jsonl", [answer(1, "code", [12], [4.0], [11])])
    summary = speed.main(["--ea-file", ea, "--baseline-file", base])
    assert summary["groups"]["code"]["speedup"] == pytest.approx(4.0)
    for name in ("speed.json", "speedup_tau.png", "accept_lengths.png"):
        assert (tmp_path / name).stat().st_size > 0
    with pytest.raises(ValueError, match="no question id in common"):
        other = write(tmp_path / "other.jsonl", [answer(2, "c", [1], [1.0], [0])])
        speed.main(["--ea-file", ea, "--baseline-file", other])


def test_speed_prints_the_acceptance_per_draft_position_when_answers_have_rounds(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(speed, "plot", lambda summary, out_dir: [])  # (the printed lines are the point)
    # rounds of 3, 4 and 4 tokens after the prefill: all 3 accepted 2 drafts, 2 of them a third
    ea = write(tmp_path / "ea.jsonl", [answer(1, "code", [12], [1.0], [3], [[1, 3, 4, 4]])])
    base = write(tmp_path / "base.jsonl", [answer(1, "code", [12], [4.0], [11])])
    speed.main(["--ea-file", ea, "--baseline-file", base])
    lines = capsys.readouterr().out.splitlines()
    assert "acceptance per draft position (accepted / reached): 1: 1.00  2: 1.00  3: 0.67" in lines
    # Answers without accept_lengths (the reference's): no rounds, so no such line.
    ea = write(tmp_path / "ea.jsonl", [answer(1, "code", [12], [1.0], [3])])
    assert speed.main(["--ea-file", ea, "--baseline-file", base])["acceptance_per_position"] == {}
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("acceptance")]


def test_speedup_is_the_ratio_of_mean_tokens_per_second(tmp_path):
    """The reference's speedup: mean tok/s with speculation / mean tok/s plain.
    Question 1: EA 10 tokens in 1 s (10 tok/s), plain 10 in 0.1 s (100 tok/s);
    question 2: EA 1000 in 10 s (100 tok/s), plain 1000 in 100 s (10 tok/s).
    Means 55 and 55: speedup 1.0. The mean of the per-question ratios,
    (0.1 + 10) / 2 = 5.05, and the totals, (1010 / 11) / (1010 / 100.1) = 9.1,
    are reported beside it."""
    ea = write(tmp_path / "ea.jsonl", [answer(1, "c", [10], [1.0], [4]), answer(2, "c", [1000], [10.0], [99])])
    base = write(tmp_path / "base.jsonl", [answer(1, "c", [10], [0.1], [9]), answer(2, "c", [1000], [100.0], [999])])
    everything = speed.summarize(read_jsonl(ea), read_jsonl(base))["groups"]["all"]
    assert everything["speedup"] == pytest.approx(1.0)
    assert everything["ea_mean_tokens_per_second"] == everything["baseline_mean_tokens_per_second"] == 55
    assert everything["speedup_mean_of_ratios"] == pytest.approx(5.05)
    assert everything["speedup_total"] == pytest.approx(9.1)


def test_answers_that_end_at_their_prefill_have_no_tau_per_round(tmp_path, monkeypatch, capsys):
    """Answers of one token a turn (--max-new-tokens 1) record only each turn's prefill step: there is no draft
    round to divide their tokens by, and the table says "-"."""
    monkeypatch.setattr(speed, "plot", lambda summary, out_dir: [])
    ea = write(tmp_path / "ea.jsonl", [answer(1, "code", [1], [0.1], [0], [[1]])])
    base = write(tmp_path / "base.jsonl", [answer(1, "code", [1], [0.2], [0])])
    summary = speed.main(["--ea-file", ea, "--baseline-file", base])
    assert summary["groups"]["all"]["tau_per_round"] is None and summary["acceptance_per_position"] == {}
    assert capsys.readouterr().out.splitlines()[2].endswith("-")


def test_speed_refuses_files_of_the_other_mode(tmp_path):
    ea_record = dict(answer(1, "c", [12], [1.0], [3]), mode="ea")
    base_record = dict(answer(1, "c", [12], [4.0], [11]), mode="baseline")
    ea, base = write(tmp_path / "ea.jsonl", [ea_record]), write(tmp_path / "base.jsonl", [base_record])
    assert speed.summarize(read_jsonl(ea), read_jsonl(base))["groups"]["all"]["speedup"] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="swapped"):
        speed.main(["--ea-file", base, "--baseline-file", ea, "--out-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--baseline-file"):
        speed.summarize([ea_record], [ea_record])


class ScriptedModel:
    """Stands in for EaModel in `gen_answer.Answerer`: every generation yields
    the same steps; the prompt and settings of each are recorded."""

    tree = TreeParams(total_token=10)

    def __init__(self, tokenizer, steps, vocab_size=None):
        self.tokenizer, self.steps, self.calls, self.warm_ups = tokenizer, steps, [], []
        self.vocab_size = vocab_size or len(tokenizer)

    def default_max_length(self):
        return 2048

    def warm_up(self, **settings):
        self.warm_ups.append(settings)
        return 0

    def generate_steps(self, input_ids, **settings):
        self.calls.append((self.tokenizer.decode(input_ids[0]), settings))
        self.last_stats = GenerationStats(prompt_length=input_ids.shape[1], steps=list(self.steps))
        yield from self.steps


@pytest.mark.parametrize("model_type", ["plain", "vicuna"])
def test_answerer_feeds_back_the_raw_answer_and_records_accepted_lengths(model_type):
    tokenizer = byte_tokenizer()
    ids = tokenizer(" Hi\n").input_ids  # an answer with a leading space and a final newline
    # The prefill yields one token; the second step accepted 4 drafts, of which the budget kept 2 + the bonus.
    steps = [Step(ids[:1], 0, 0.01), Step(ids[1:], 4, 0.01, "length")]
    model = ScriptedModel(tokenizer, steps)
    args = gen_answer.parse_args(["--model-type", model_type, "--device", "cpu", "--max-new-tokens", "4",
                                  "--temperature", "0.5", "--warmup", "1", "--system", "Be brief."])
    answerer = gen_answer.Answerer(model, args)
    question = {"question_id": 1, "turns": ["Q1", "Q2"]}
    answerer.warm_up(question)
    choice = answerer.answer(question)

    assert choice["turns"] == ["Hi", "Hi"]  # the answer file keeps the stripped text
    assert choice["new_tokens"] == [4, 4]
    assert choice["accept_lengths"] == [[1, 5], [1, 5]]  # accepted drafts + 1, not the 3 tokens kept
    (warm_prompt, warm_settings), (first, first_settings), (second, second_settings) = model.calls
    # --system opens the conversation (the plain format has no system slot: the first user turn)
    assert warm_prompt == first == build_prompt([{"role": "user", "content": "Q1"}], model_type, system="Be brief.")
    assert first.startswith("Be brief.")
    # turn 2 continues what the model wrote, whitespace included; vicuna writes the space before it itself
    assert second.startswith(first + " Hi\n") and not second.startswith(first + "  Hi")
    written = " Hi\n" if model_type == "plain" else "Hi\n"
    assert second == build_prompt([{"role": "user", "content": "Q1"}, {"role": "assistant", "content": written},
                                   {"role": "user", "content": "Q2"}], model_type, system="Be brief.")
    # the warm-up generates with the timed settings (mode, sampling, budget, stops), after preparing
    # the step shapes of every turn length with them
    assert warm_settings == first_settings == second_settings
    assert model.warm_ups == [{key: first_settings[key] for key in ("max_length", "temperature", "speculative")}]
    assert first_settings["temperature"] == 0.5 and first_settings["speculative"] is True


@pytest.mark.parametrize("cuda,dtype", [(False, torch.float32), (True, torch.float16)])
def test_auto_device_dtype_follows_where_the_model_goes(monkeypatch, cuda, dtype):
    """On a GPU the checkpoint's own half type (the demo base is saved in float16), as in every command."""
    loaded = {}

    def from_pretrained(*paths, **kwargs):
        loaded.update(kwargs)
        return ScriptedModel(byte_tokenizer(), [])

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(gen_answer.EaModel, "from_pretrained", from_pretrained)
    gen_answer.load_model(gen_answer.parse_args(["--device", "auto"]))
    assert loaded["dtype"] == dtype and loaded["device_map"] == "auto"


def test_resume_refuses_answers_of_another_run(tmp_path):
    questions = write(tmp_path / "q.jsonl", [{"question_id": 1, "turns": ["Q"]}, {"question_id": 2, "turns": ["Q"]}])
    path = tmp_path / "a.jsonl"
    run = ["--question-file", questions, "--answer-file", str(path), "--model-id", "m"]
    write(path, [dict(answer(1, "c", [1], [1.0], [0]), mode="baseline")])  # model_id "m", mode baseline
    with pytest.raises(ValueError, match="mode 'baseline'.*not this run's 'ea'"):
        gen_answer.main(run + ["--mode", "ea"])  # fails before loading a model
    with pytest.raises(ValueError, match="model_id 'm'.*not this run's 'other'"):
        gen_answer.main(run[:-1] + ["other", "--mode", "baseline"])


def test_max_new_tokens_is_checked_with_the_arguments(capsys):
    with pytest.raises(SystemExit):
        gen_answer.parse_args(["--max-new-tokens", "0"])
    assert "--max-new-tokens must be >= 1" in capsys.readouterr().err


def two_benches(tmp_path):
    """Two question sets numbered alike, as gsm8k and humaneval are (0, 1, ...)."""
    paths = []
    for bench, category in (("gsm8k", "math"), ("humaneval", "code")):
        (tmp_path / bench).mkdir()
        questions = [{"question_id": i, "category": category, "turns": [f"{bench} {i}"]} for i in range(2)]
        paths.append(write(tmp_path / bench / "question.jsonl", questions))
    return paths


def test_resume_refuses_answers_made_with_other_settings(tiny_pair, tmp_path):
    gsm8k, humaneval = two_benches(tmp_path)
    path = tmp_path / "a.jsonl"
    run_gen(tiny_pair, path, "--question-file", gsm8k, "--limit", "1", "--model-id", "m")
    settings = read_jsonl(path)[0]["settings"]
    assert settings["question_file"] == "gsm8k/question.jsonl" and settings["ea_model_path"] == tiny_pair[1]
    assert (settings["total_token"], settings["depth"], settings["top_k"], settings["max_new_tokens"]) == (10, 3, 3, 8)
    base, head = tiny_pair
    for pair, extra, message in [
        (tiny_pair, ["--question-file", humaneval], "question_file 'gsm8k/question.jsonl'.*not this run's 'humaneval/"),
        ((base, head + "-other"), ["--question-file", gsm8k], "ea_model_path '.*not this run's '.*-other'"),
        (tiny_pair, ["--question-file", gsm8k, "--total-token", "8", "--max-new-tokens", "4"],
         "total_token 10 .*not this run's 8; max_new_tokens 8 .*not this run's 4"),
        (tiny_pair, ["--question-file", gsm8k, "--max-length", "1000"], "max_length 2048 .*not this run's 1000"),
        (tiny_pair, ["--question-file", gsm8k, "--system", "Be brief."], "system None.*not this run's 'Be brief.'"),
    ]:
        with pytest.raises(ValueError, match=message):  # refused before a model loads
            run_gen(pair, path, *extra, "--limit", "2", "--model-id", "m")
    assert len(read_jsonl(path)) == 1


def test_the_context_is_the_base_models_unless_given(short_context_pair, tmp_path):
    """It was 2048 whatever the base (the servers' is the base's context): past a context of 512 the answers were
    made at positions the base was not trained for, with a warning."""
    gsm8k, _ = two_benches(tmp_path)
    path = tmp_path / "a.jsonl"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no "beyond the base model's max_position_embeddings")
        run_gen(short_context_pair, path, "--question-file", gsm8k, "--limit", "1")
    assert read_jsonl(path)[0]["settings"]["max_length"] == 512
    with pytest.warns(UserWarning, match="max_length=1024 is beyond the base model's max_position_embeddings"):
        run_gen(short_context_pair, tmp_path / "b.jsonl", "--question-file", gsm8k, "--limit", "1",
                "--max-length", "1024")
    # a file made with 1024 (as the former default, 2048): resumed only with it given
    with pytest.raises(ValueError, match=r"max_length 1024 .*not this run's 512 \(--max-length left out: the base "
                                         r"model's context; give the file's to resume it\)"):
        run_gen(short_context_pair, tmp_path / "b.jsonl", "--question-file", gsm8k, "--limit", "2")
    assert len(read_jsonl(tmp_path / "b.jsonl")) == 1


def test_a_context_too_short_for_the_new_tokens_says_what_to_lower(short_context_pair, tmp_path, monkeypatch):
    """The default --max-new-tokens 1024 leaves no room in the context of a base trained for 1024 tokens: the
    refusal named a --max-length the command was not given, and not what to change. It came once the model had
    loaded; the base's context is read from its config.json first."""
    def load_model(args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(gen_answer, "load_model", load_model)
    gsm8k, _ = two_benches(tmp_path)
    with pytest.raises(ValueError, match=r"^the base model's context, 512 tokens \(--max-length left out\), leaves "
                                         r"no room for a prompt with --max-new-tokens 512 and a tree of \d+: lower "
                                         r"--max-new-tokens$"):
        run_gen(short_context_pair, tmp_path / "a.jsonl", "--question-file", gsm8k, "--max-new-tokens", "512")


def test_a_file_made_with_the_former_default_resumes_where_it_is_the_bases_context(tiny_pair, tmp_path):
    """The former default, 2048, is the context of a base trained for more: such answer files resume as they did."""
    gsm8k, _ = two_benches(tmp_path)
    path = tmp_path / "a.jsonl"
    run_gen(tiny_pair, path, "--question-file", gsm8k, "--limit", "1", "--max-length", "2048")
    run_gen(tiny_pair, path, "--question-file", gsm8k, "--limit", "2")
    assert [a["settings"]["max_length"] for a in read_jsonl(path)] == [2048, 2048]


def test_default_model_id_names_the_head_and_the_tree():
    def model_id(*argv):
        return gen_answer.default_model_id(gen_answer.parse_args(["--device", "cpu", *argv]))

    pair = ["--base-model-path", "models/Llama-3-8B", "--ea-model-path", "heads/EAGLE3"]
    assert model_id(*pair) == "Llama-3-8B-EAGLE3-ea-temperature-0.0-tree-60-7-10"
    assert model_id() == "demo-ea-temperature-0.0-tree-60-7-10"
    assert model_id("--total-token", "-1", "--mode", "baseline") == "demo-baseline-temperature-0.0-tree-auto-7-10"
    others = [pair[:3] + ["heads/GTO"], pair + ["--total-token", "30"], pair + ["--depth", "5"],
              pair + ["--top-k", "8"]]
    assert len({model_id(*pair)} | {model_id(*argv) for argv in others}) == 5


def test_speed_refuses_answers_to_different_questions(tmp_path):
    def record(qid, category, turns, question_file=None):
        a = answer(qid, category, [4] * turns, [1.0] * turns, [1] * turns)
        return dict(a, settings={"question_file": question_file}) if question_file else a

    ea = [record(0, "math", 1, "gsm8k/question.jsonl")]
    with pytest.raises(ValueError, match="question 0: question set 'gsm8k/question.jsonl' in --ea-file but "
                                         "'humaneval/question.jsonl' in --baseline-file"):
        speed.summarize(ea, [record(0, "math", 1, "humaneval/question.jsonl")])
    with pytest.raises(ValueError, match="question 0: category 'math' in --ea-file but 'code'"):
        speed.summarize(ea, [record(0, "code", 1)])
    with pytest.raises(ValueError, match="question 0: number of turns 1 in --ea-file but 2"):
        speed.summarize(ea, [record(0, "math", 2)])
    # the reference's answers record no question set (nor, here, a category): they pair by id as before
    assert speed.summarize(ea, [record(0, None, 1)])["questions"] == 1


def cli_error(cli, argv, capsys):
    """Exit status and the one line on stderr of a command line (the argument checks exit through SystemExit)."""
    try:
        code = cli(argv)
    except SystemExit as exit:
        code = exit.code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return code, lines[0]


@pytest.mark.parametrize("argv,message", [
    (["--data-dir", "/nonexistent"], "question file not found: /nonexistent/mt_bench/question.jsonl"),
    (["--question-file", "/nonexistent.jsonl"], "question file not found: /nonexistent.jsonl"),
    # a data directory passed as the question file was "not found"
    (["--question-file", "{folder}"], "is a folder, not a question file: a folder of question sets goes to "
                                      "--data-dir"),
    (["--question-file", "{no_turns}"], "q.jsonl: question 1 needs a non-empty turns list of strings"),
    # a string is not a list of turns: it would be answered one character per turn
    (["--question-file", "{string_turns}"], "strturns.jsonl: question 1 needs a non-empty turns list of strings"),
    # an empty turn would be an empty prompt: the run would stop part-way, at that question
    (["--question-file", "{empty_turn}"], "blank.jsonl: question 2: turn 2 is empty (or only whitespace)"),
    (["--question-file", "{blank_turn}"], "blank2.jsonl: question 'x': turn 1 is empty (or only whitespace)"),
    # speed refuses it in the answers: refused before answering anything
    (["--question-file", "{number_category}"], "cat.jsonl: question 1: category must be a string other than 'all' and "
                                                "'(no category)', not 5"),
    (["--question-file", "{all_category}"], "all.jsonl: question 1: category must be a string other than 'all' and "
                                            "'(no category)', not 'all'"),
    (["--question-file", "{no_id}"], "noid.jsonl: every question needs a question_id (an integer or a string)"),
    # one answer would replace the other
    (["--question-file", "{duplicate}"], "dup.jsonl: question id 1 appears twice"),
    (["--question-file", "{latin1}"], "latin1.jsonl is not UTF-8 text"),
    (["--question-file", "{good}", "--answer-file", "{folder}"], "Is a directory"),
    (["--question-file", "{good}", "--answer-file", "{not_answers}"], "every record needs a question_id"),
    (["--question-file", "{good}", "--answer-file", "{under_a_file}"], "File exists"),  # checked before loading
    # a question file passed as the answer file: its questions passed as answered, or it was rewritten with answers
    (["--question-file", "{good}", "--answer-file", "{good}"], "good.jsonl: question 1: choices must be"),
    (["--question-file", "{good}", "--answer-file", "{duplicate}"], "dup.jsonl: question 1: choices must be"),
    (["--question-file", "{empty}"], "holds no questions"),
    (["--question-file", "{garbage}"], "holds no questions"),
    (["--max-length", "0"], "--max-length 0 leaves no room for a prompt"),
    # the data directory was silently ignored beside a question file
    (["--question-file", "{good}", "--data-dir", "{folder}"],
     "--data-dir and --question-file both say where the questions are: pass one"),
    (["--total-token", "1"], "total_token must be >= 2"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    # refused by the engine only once the model had loaded
    (["--temperature", "inf"], "--temperature must be a finite number >= 0, got inf"),
    (["--seed", str(2**64)], f"--seed {2**64} is out of range: torch's seeds are integers from {-2**63} to "
                             f"{2**64 - 1}"),
    (["--device", "cuda"], "--device cuda: CUDA is not available"),
])
def test_gen_answer_bad_input_is_one_error_line_before_loading(tmp_path, monkeypatch, capsys, argv, message):
    def no_load(*args, **kwargs):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(gen_answer.EaModel, "from_pretrained", no_load)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    files = {"no_turns": write(tmp_path / "q.jsonl", [{"question_id": 1, "turns": []}]),
             "string_turns": write(tmp_path / "strturns.jsonl", [{"question_id": 1, "turns": "hello world"}]),
             "empty_turn": write(tmp_path / "blank.jsonl", [{"question_id": 1, "turns": ["Q"]},
                                                            {"question_id": 2, "turns": ["Q", ""]}]),
             "blank_turn": write(tmp_path / "blank2.jsonl", [{"question_id": "x", "turns": [" \n\t"]}]),
             "number_category": write(tmp_path / "cat.jsonl", [{"question_id": 1, "category": 5, "turns": ["Q"]}]),
             "all_category": write(tmp_path / "all.jsonl", [{"question_id": 1, "category": "all", "turns": ["Q"]}]),
             "no_id": write(tmp_path / "noid.jsonl", [{"question_id": [1], "turns": ["Q"]}]),
             "duplicate": write(tmp_path / "dup.jsonl", [{"question_id": i, "turns": ["Q"]} for i in (1, 2, 1)]),
             "good": write(tmp_path / "good.jsonl", [{"question_id": 1, "turns": ["Q"]}]),
             "not_answers": write(tmp_path / "list.jsonl", [[1, 2]]),
             "folder": str(tmp_path), "under_a_file": str(tmp_path / "good.jsonl" / "a.jsonl"),
             "latin1": str(tmp_path / "latin1.jsonl"),
             "empty": write(tmp_path / "empty.jsonl", []), "garbage": str(tmp_path / "garbage.jsonl")}
    (tmp_path / "garbage.jsonl").write_text("garbage\n")
    (tmp_path / "latin1.jsonl").write_bytes('{"question_id": 1, "turns": ["caf\u00e9"]}\n'.encode("latin-1"))
    argv = [a.format(**files) for a in argv]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the garbage line's warning
        code, line = cli_error(gen_answer.cli, ["--answer-file", str(tmp_path / "a.jsonl"), *argv], capsys)
    assert code == 2 and line.startswith("error: ") and message in line


def test_speed_bad_input_is_one_error_line(tmp_path, capsys):
    ea = write(tmp_path / "ea.jsonl", [dict(answer(1, "c", [12], [1.0], [3]), mode="ea")])
    base = write(tmp_path / "base.jsonl", [dict(answer(1, "c", [12], [4.0], [11]), mode="baseline")])
    empty = write(tmp_path / "empty.jsonl", [])
    not_answers = write(tmp_path / "q.jsonl", [{"question_id": 1, "turns": ["Q"]}])
    for argv, message in [
        (["--ea-file", str(tmp_path / "missing.jsonl"), "--baseline-file", base], "--ea-file"),
        (["--ea-file", ea, "--baseline-file", empty], f"error: --baseline-file {empty} holds no answers"),
        (["--ea-file", ea, "--baseline-file", not_answers],
         f"error: --baseline-file {not_answers}: question 1: choices must be a non-empty list"),
        (["--ea-file", base, "--baseline-file", ea], "swapped"),
        (["--ea-file", ea, "--baseline-file", str(tmp_path / "." / "ea.jsonl")], "are the same file"),
    ]:
        code, line = cli_error(speed.cli, argv + ["--out-dir", str(tmp_path)], capsys)
        assert code == 2 and line.startswith("error: ") and message in line, line
    assert speed.cli(["--ea-file", ea, "--baseline-file", base, "--out-dir", str(tmp_path)]) == 0


def settings(**changes):
    """gen_answer's settings of a greedy run, with `changes`."""
    return {"question_file": "mt_bench/question.jsonl", "base_model_path": "base", "ea_model_path": "head",
            "model_type": "llama3", "system": None, "temperature": 0.0, "seed": 0, "total_token": 60, "depth": 7,
            "top_k": 10, "max_new_tokens": 16, "max_length": 2048, "device": "cuda", "dtype": "auto", **changes}


def timed(qid, mode, model_id, run_settings, seconds=1.0):
    return dict(answer(qid, "writing", [12], [seconds], [3]), mode=mode, model_id=model_id, settings=run_settings)


def test_speed_refuses_files_made_with_other_settings(tmp_path):
    base = [timed(81, "baseline", "plain", settings(), 4.0)]
    # sampling at 4 tokens against greedy at 16: both settings named, with both values
    with pytest.raises(ValueError, match="question 81: the two files were made with different settings "
                                         r"\(temperature 0.7 in --ea-file but 0.0 in --baseline-file; "
                                         r"max_new_tokens 4 in --ea-file but 16 in --baseline-file\)"):
        speed.summarize([timed(81, "ea", "m", settings(temperature=0.7, max_new_tokens=4))], base)
    for key, value in [("base_model_path", "other-base"), ("model_type", "plain"), ("system", "Be brief."),
                       ("max_length", 4096), ("dtype", "float16"), ("device", "cpu")]:
        with pytest.raises(ValueError, match=f"{key} {value!r} in --ea-file but"):
            speed.summarize([timed(81, "ea", "m", settings(**{key: value}))], base)
    with pytest.raises(ValueError, match="question set 'gsm8k/question.jsonl' in --ea-file"):
        speed.summarize([timed(81, "ea", "m", settings(question_file="gsm8k/question.jsonl"))], base)

    # what the speculative run adds (its head, its tree) and its own seed and model id may differ
    ea_settings = settings(ea_model_path="gto-head", total_token=20, depth=4, top_k=4, seed=1)
    ea = write(tmp_path / "ea.jsonl", [timed(81, "ea", "Llama-GTO-ea", ea_settings)])
    summary = speed.main(["--ea-file", ea, "--baseline-file", write(tmp_path / "base.jsonl", base),
                          "--out-dir", str(tmp_path)])
    assert summary["groups"]["all"]["speedup"] == pytest.approx(4.0)
    # speed.json records what each side was made with
    assert json.loads((tmp_path / "speed.json").read_text())["settings"] == {
        "ea": {"mode": "ea", "model_id": "Llama-GTO-ea", **ea_settings},
        "baseline": {"mode": "baseline", "model_id": "plain", **settings()}}


GOOD = answer(81, "c", [12], [4.0], [11])


def good_with(**changes):
    """GOOD with `changes` to its choice."""
    return dict(GOOD, choices=[dict(GOOD["choices"][0], **changes)])


@pytest.mark.parametrize("record,message", [
    ({"question_id": 81, "choices": [{}]}, "question 81: new_tokens must be a non-empty list"),
    (dict(GOOD, choices="abc"), "question 81: choices must be a non-empty list of objects"),
    (good_with(new_tokens=["12"]), "new_tokens must be a non-empty list of finite non-negative numbers"),
    (good_with(wall_time=[-1.0]), "wall_time must be a non-empty list of finite non-negative numbers"),
    # (json reads Infinity): 0 tokens per second, a division by zero
    (good_with(wall_time=[float("inf")]), "wall_time must be a non-empty list of finite non-negative numbers"),
    (good_with(idxs=[11, 3]), "new_tokens, idxs, wall_time must have the same number of turns"),
    (good_with(accept_lengths=5), "accept_lengths must be a list of lists"),
    (dict(GOOD, category=["c"]), "category must be a string"),
    # the group of every question: the answer was counted into it twice
    (dict(GOOD, category="all"), "question 81: category must be a string other than 'all'"),
    (dict(GOOD, settings="greedy"), "question 81: settings must be an object"),
    (dict(GOOD, question_id=None), "every record needs a question_id"),
    (good_with(new_tokens=[0]), "question 81: no new tokens or no wall time"),  # tokens/s 0: a division by 0
    (good_with(wall_time=[0.0]), "question 81: no new tokens or no wall time"),
])
def test_speed_bad_records_are_one_error_line(tmp_path, capsys, record, message):
    """Records speed cannot count are refused when read, naming the file and the question."""
    ea = write(tmp_path / "ea.jsonl", [answer(81, "c", [12], [1.0], [3])])
    base = write(tmp_path / "base.jsonl", [record])
    code, line = cli_error(speed.cli, ["--ea-file", ea, "--baseline-file", base, "--out-dir", str(tmp_path)], capsys)
    assert code == 2 and line.startswith(f"error: --baseline-file {base}: ") and message in line, line


def test_speed_unwritable_out_dir_is_one_error_line(tmp_path, capsys):
    ea = write(tmp_path / "ea.jsonl", [answer(81, "c", [12], [1.0], [3])])
    base = write(tmp_path / "base.jsonl", [GOOD])
    code, line = cli_error(speed.cli, ["--ea-file", ea, "--baseline-file", base, "--out-dir", base], capsys)
    assert code == 2 and line.startswith("error: ") and "File exists" in line


def test_mixed_integer_and_string_ids_sort_integers_first(tmp_path):
    path = write(tmp_path / "a.jsonl", [answer("x2", "c", [4], [1.0], [1]), answer(1, "c", [4], [1.0], [1]),
                                        answer("a", "c", [4], [1.0], [1])])
    sort_answers(path)
    assert [a["question_id"] for a in read_jsonl(path)] == [1, "a", "x2"]
    summary = speed.summarize(read_jsonl(path), read_jsonl(path)[:2])
    assert summary["questions"] == 2 and summary["unpaired"] == ["x2"]


def test_answers_are_filed_under_the_question_files_bench(tiny_pair, tmp_path, monkeypatch):
    gsm8k, _ = two_benches(tmp_path)
    monkeypatch.chdir(tmp_path)
    base, head = tiny_pair
    path = gen_answer.main(["--base-model-path", base, "--ea-model-path", head, "--model-type", "plain",
                            "--question-file", gsm8k, "--limit", "1", "--max-new-tokens", "2", "--warmup", "0",
                            "--device", "cpu", "--model-id", "m", *TREE])
    assert path == Path("runs", "eval", "gsm8k", "m.jsonl") and len(read_jsonl(path)) == 1

    def bench(*argv):
        return gen_answer.bench_label(gen_answer.parse_args(["--device", "cpu", *argv]))

    assert bench("--question-file", "mine.jsonl") == "mine"  # a file of one's own: its name
    assert bench("--question-file", gsm8k, "--bench-name", "humaneval") == "humaneval"  # named: as named
    assert bench() == "mt_bench"


def test_an_auto_tree_is_recorded_and_a_resume_with_another_is_refused(tiny_pair, tmp_path, monkeypatch):
    """--total-token -1 picks the tree by timing (on a GPU): two runs may pick two sizes."""
    gsm8k, _ = two_benches(tmp_path)
    path = tmp_path / "a.jsonl"
    run_gen(tiny_pair, path, "--question-file", gsm8k, "--limit", "1", "--total-token", "-1")
    settings = read_jsonl(path)[0]["settings"]
    assert settings["total_token"] == -1 and settings["total_token_used"] >= 2
    monkeypatch.setattr(gen_answer.EaModel, "_pick_total_token", lambda self, depth, top_k: 2)
    with pytest.raises(ValueError, match=f"total_token_used {settings['total_token_used']} .*not this run's 2"):
        run_gen(tiny_pair, path, "--question-file", gsm8k, "--limit", "2", "--total-token", "-1")
    assert len(read_jsonl(path)) == 1


def answerer(model, *argv):
    return gen_answer.Answerer(model, gen_answer.parse_args(["--device", "cpu", "--warmup", "0", *argv]))


def test_the_context_before_the_load_is_read_as_transformers_reads_the_config(tmp_path):
    """config.json read through transformers' config class, as the loaded base's: a Qwen2 whose sliding window is
    switched off (use_sliding_window) has none, whatever sliding_window says; a model_type transformers does not
    know is left to the check after the load."""
    from eagle_gto.context_length import base_context

    qwen = {"model_type": "qwen2", "max_position_embeddings": 4096, "sliding_window": 256, "use_sliding_window": False}
    for name, config in (("qwen", qwen), ("custom", {"model_type": "my-own-model", "max_position_embeddings": 64})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    assert base_context(str(tmp_path / "qwen")) == 2048
    assert base_context(str(tmp_path / "custom")) is None
    assert base_context(None) == 2048  # the demo base


def test_the_context_before_the_load_of_a_multimodal_base_is_its_text_models(tmp_path):
    """Llama-4's and Qwen3.5's config.json nest the text model's context in text_config, and AutoModelForCausalLM
    loads that text model alone, with that config: the check before the load read the outer config, which has no
    context, so 2048 where the loaded base has 1024 (the refusal came only after the load)."""
    from eagle_gto.context_length import base_context

    for model_type in ("llama4", "qwen3_5"):
        (tmp_path / model_type).mkdir()
        config = {"model_type": model_type, "text_config": {"max_position_embeddings": 1024}}
        (tmp_path / model_type / "config.json").write_text(json.dumps(config))
        assert base_context(str(tmp_path / model_type)) == 1024


def test_a_config_transformers_refuses_is_reported_by_the_load(tmp_path, monkeypatch, capsys):
    """A config.json value transformers' config class refuses (hidden_size "64") raised its validation error,
    a traceback, from the context check before the load; the load says it in one line, as before that check."""
    from eagle_gto.context_length import base_context

    def load_model(args):
        raise ValueError("the load's own refusal")

    monkeypatch.setattr(gen_answer, "load_model", load_model)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": "64"}))
    assert base_context(str(tmp_path / "base")) is None
    questions = write(tmp_path / "q.jsonl", [{"question_id": 1, "turns": ["Q"]}])
    run = ["--question-file", questions, "--answer-file", str(tmp_path / "a.jsonl"), "--device", "cpu",
           "--base-model-path", str(tmp_path / "base"), "--ea-model-path", "head", "--model-type", "plain"]
    assert cli_error(gen_answer.cli, run, capsys) == (2, "error: the load's own refusal")


def test_a_context_the_loaded_model_leaves_no_room_in_is_refused():
    """The refusal before the load reads config.json; the one after it (a tree picked by timing, or a config
    transformers has no class for) reads the loaded base's context, with the same words."""
    model = ScriptedModel(byte_tokenizer(), [])
    with pytest.raises(ValueError, match=r"^the base model's context, 2048 tokens \(--max-length left out\), leaves "
                                         r"no room for a prompt with --max-new-tokens 2038 and a tree of 10: lower "
                                         r"--max-new-tokens$"):
        answerer(model, "--max-new-tokens", "2038")
    assert answerer(model, "--max-new-tokens", "2037").prompt_budget == 1


def test_a_prompt_longer_than_its_budget_keeps_its_end():
    """The budget is the context less the answer's tokens and a draft tree's (the same in both modes); a
    longer prompt keeps its last tokens, the question's end and the generation prompt."""
    tokenizer = byte_tokenizer()
    model = ScriptedModel(tokenizer, [Step(tokenizer("a").input_ids, 0, 0.01, "length")])
    argv = ["--model-type", "vicuna", "--max-length", "64", "--max-new-tokens", "4", *TREE]
    question = " ".join(f"word{i}" for i in range(40))
    full = build_prompt([{"role": "user", "content": question}], "vicuna")
    budget = 64 - 4 - model.tree.total_token
    assert len(tokenizer(full).input_ids) > budget
    with pytest.warns(UserWarning, match=f"cut to its last {budget}"):
        answerer(model, *argv).answer({"question_id": 1, "turns": [question]})
    assert model.calls[0][0] == tokenizer.decode(tokenizer(full).input_ids[-budget:])


LETTERS = "abcdefghijklmnopqrstuvwxyz"


class SamplingModel(ScriptedModel):
    """Each generation draws its letter from the global generator, as sampling does."""

    def generate_steps(self, input_ids, **settings):
        letter = LETTERS[int(torch.randint(len(LETTERS), ()))]
        self.steps = [Step(self.tokenizer(letter).input_ids, 0, 0.01, "length")]
        return super().generate_steps(input_ids, **settings)


def test_every_question_is_answered_from_the_seed():
    """The seed is reset before each question: its sampled answer does not depend on the questions
    answered before it (a resumed run, a --limit)."""
    model = SamplingModel(byte_tokenizer(), [])
    ask = answerer(model, "--model-type", "plain", "--temperature", "1", "--seed", "3")
    first, _, again = (ask.answer({"question_id": q, "turns": [t, t]}) for q, t in ((1, "A"), (2, "B"), (1, "A")))
    assert first["turns"] == again["turns"]
    torch.manual_seed(3)
    assert first["turns"] == [LETTERS[int(torch.randint(len(LETTERS), ()))] for _ in range(2)]


class SlowModel(ScriptedModel):
    """Takes `delay` seconds a generation, while its steps claim almost none."""

    delay = 0.05

    def generate_steps(self, input_ids, **settings):
        time.sleep(self.delay)
        return super().generate_steps(input_ids, **settings)


def test_wall_time_is_the_turns_own_time():
    """Measured around the whole turn (as the reference does), not the steps' own timings."""
    tokenizer = byte_tokenizer()
    model = SlowModel(tokenizer, [Step(tokenizer("a").input_ids, 0, 1e-6, "length")])
    choice = answerer(model, "--model-type", "plain").answer({"question_id": 1, "turns": ["Q"]})
    assert choice["wall_time"][0] >= SlowModel.delay > model.last_stats.seconds


@pytest.mark.parametrize("model_type", ["qwen", "llama3", "plain"])
def test_the_formats_stops_reach_the_engine(model_type):
    """Qwen's <|im_end|>, <|im_start|> and <|endoftext|> (tokens of its tokenizer) and Llama-3's <|eot_id|> end
    a turn."""
    tokenizer = byte_tokenizer()
    qwen_stops = ["<|im_end|>", "<|im_start|>", "<|endoftext|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": qwen_stops})
    model = ScriptedModel(tokenizer, [Step(tokenizer("a").input_ids, 0, 0.01, "length")])
    answerer(model, "--model-type", model_type).answer({"question_id": 1, "turns": ["Q"]})
    settings = model.calls[0][1]
    ids = tokenizer.convert_tokens_to_ids(qwen_stops)
    assert settings["stop_token_ids"] == (ids if model_type == "qwen" else [])
    assert settings["is_llama3"] is (model_type == "llama3")


def test_a_format_stop_token_past_the_model_vocabulary_is_refused_before_any_question(tmp_path, monkeypatch, capsys):
    """A tokenizer with Qwen's <|im_end|> added past the model's rows: the engine refused the first question."""
    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    model = ScriptedModel(tokenizer, [Step(tokenizer("a").input_ids, 0, 0.01, "length")], vocab_size=256)
    monkeypatch.setattr(gen_answer.EaModel, "from_pretrained", lambda *args, **kwargs: model)
    questions = write(tmp_path / "q.jsonl", [{"question_id": 1, "turns": ["Q"]}])
    path = tmp_path / "a.jsonl"
    argv = ["--question-file", questions, "--answer-file", str(path), "--device", "cpu", "--model-type", "qwen"]
    code, line = cli_error(gen_answer.cli, argv, capsys)
    assert (code, line) == (2, "error: the qwen format's stop token ids [256] lie outside the model's vocabulary "
                               "[0, 256): is the tokenizer this model's?")
    assert model.calls == [] and not path.exists()
    assert gen_answer.cli(argv[:-1] + ["vicuna"]) == 0 and len(read_jsonl(path)) == 1  # no such stop: answered


@pytest.mark.parametrize("option,value", [("--seed", "1"), ("--device", "auto"), ("--dtype", "float32"),
                                          ("--temperature", "0.5"), ("--model-type", "vicuna"),
                                          ("--max-length", "4096"), ("--base-model-path", "other-base")])
def test_resume_refuses_a_run_with_any_other_setting(tmp_path, monkeypatch, option, value):
    """An answer file holds one run: any setting the answers depend on that differs is refused, before a
    model loads."""
    def no_load(*args, **kwargs):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(gen_answer.EaModel, "from_pretrained", no_load)
    questions = write(tmp_path / "q.jsonl", [{"question_id": 1, "turns": ["Q"]}, {"question_id": 2, "turns": ["Q"]}])
    path = tmp_path / "a.jsonl"
    run = ["--question-file", questions, "--answer-file", str(path), "--model-id", "m", "--device", "cpu",
           "--base-model-path", "base", "--ea-model-path", "head", "--model-type", "plain"]
    settings = gen_answer.run_settings(gen_answer.parse_args(run), Path(questions))
    settings["max_length"] = 2048  # (the base's context, recorded once the model has loaded)
    write(path, [dict(answer(1, "c", [1], [1.0], [0]), mode="ea", settings=settings)])
    assert gen_answer.main(run + ["--limit", "1"]) == path  # the same run: nothing left to answer
    with pytest.raises(ValueError, match=f"{option[2:].replace('-', '_')} .*not this run's"):
        gen_answer.main(run + [option, value])


def test_a_relative_question_file_is_recorded_by_its_folder(tmp_path, monkeypatch):
    """`--question-file question.jsonl` run from its folder is the same question set as the path from elsewhere
    (or --bench-name): the same label, so the answers resume and pair with speed."""
    def no_load(*args, **kwargs):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(gen_answer.EaModel, "from_pretrained", no_load)
    gsm8k, _ = two_benches(tmp_path)
    path = tmp_path / "a.jsonl"
    run = ["--answer-file", str(path), "--model-id", "m", "--device", "cpu", "--limit", "1"]
    settings = gen_answer.run_settings(gen_answer.parse_args(run), Path(gsm8k))
    assert settings["question_file"] == "gsm8k/question.jsonl"
    write(path, [dict(answer(0, "math", [1], [1.0], [0]), mode="ea", settings=settings)])
    monkeypatch.chdir(tmp_path / "gsm8k")
    assert gen_answer.main(run + ["--question-file", "question.jsonl"]) == path  # resumed: nothing left to answer


def test_sorting_an_answer_file_keeps_the_latest_answer_of_a_question(tmp_path):
    path = write(tmp_path / "a.jsonl", [dict(answer(2, "c", [4], [1.0], [1]), answer_id="old"),
                                        answer(1, "c", [4], [1.0], [1]),
                                        dict(answer(2, "c", [4], [1.0], [1]), answer_id="new")])
    sort_answers(path)
    assert [(a["question_id"], a["answer_id"]) for a in read_jsonl(path)] == [(1, "1"), (2, "new")]


@pytest.mark.parametrize("when", ["writing", "moving"])
def test_an_interrupted_sort_keeps_every_answer_and_leaves_nothing_beside_them(tmp_path, monkeypatch, when):
    """Sorting rewrites the whole answer file at the end of a run: cut short (Ctrl-C), it lost answers; later it
    kept them but left its half-written ANSWERS.sorting beside them."""
    path = write(tmp_path / "a.jsonl", [answer(2, "c", [4], [1.0], [1]), answer(1, "c", [4], [1.0], [1])])
    before = Path(path).read_text()

    def interrupted(*args):
        raise KeyboardInterrupt

    # (written, not yet on the disk; or on the disk, not yet renamed)
    monkeypatch.setattr(os, "fsync" if when == "writing" else "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sort_answers(path)
    assert Path(path).read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]


def test_the_sorted_answer_file_is_on_the_disk_before_it_replaces_the_old_one(tmp_path, disk_writes):
    """A crash of the machine (not a Ctrl-C) soon after the rename could leave the answer file empty: the sorted
    copy is synced before it is renamed over the answers, and the rename (the folder) after."""
    path = write(tmp_path / "a.jsonl", [answer(2, "c", [4], [1.0], [1]), answer(1, "c", [4], [1.0], [1])])
    size = Path(path).stat().st_size
    sort_answers(path)
    assert disk_writes == [("sync file", size), ("rename", "a.jsonl"), ("sync folder", tmp_path.stat().st_ino)]
    assert [a["question_id"] for a in read_jsonl(path)] == [1, 2]


def test_speed_lists_the_ids_of_either_file_left_unpaired_and_takes_either_sides_category():
    ea = [answer(1, None, [12], [1.0], [3]), answer(2, "code", [12], [1.0], [3])]
    base = [answer(1, "math", [12], [4.0], [11]), answer(3, "math", [12], [4.0], [11])]
    summary = speed.summarize(ea, base)
    assert summary["unpaired"] == [2, 3]
    assert set(summary["groups"]) == {"all", "math"}  # question 1: the baseline's category


def test_answers_without_a_category_are_kept_apart_from_a_category_of_any_name(tmp_path, capsys):
    """They were grouped as "unknown": a real category of that name merged with them. Their row's name is one no
    category may take, and the table says what it holds."""
    ea = [answer(1, None, [12], [1.0], [3]), answer(2, "unknown", [12], [2.0], [3]), answer(3, "", [12], [1.0], [3])]
    base = [answer(1, None, [12], [4.0], [11]), answer(2, "unknown", [12], [4.0], [11]),
            answer(3, None, [12], [4.0], [11])]
    summary = speed.summarize(ea, base)
    groups = summary["groups"]
    assert list(groups) == ["all", "(no category)", "unknown"]
    assert (groups["(no category)"]["questions"], groups["unknown"]["questions"]) == (2, 1)
    assert groups["unknown"]["speedup"] == pytest.approx(2.0)
    table = speed.format_table(summary).splitlines()
    assert table[-1] == "(no category): the 2 questions whose answers record no category (in neither file)"
    one = speed.format_table(speed.summarize(ea[:1], base[:1])).splitlines()[-1]  # (it said "the 1 questions")
    assert one == "(no category): the question whose answers record no category (in neither file)"
    assert not any(line.startswith("(no category)") for line in speed.format_table(speed.summarize(
        ea[1:2], base[1:2])).splitlines())
    # the name is taken: a question file or an answer that uses it is refused, as "all" is
    path = write(tmp_path / "q.jsonl", [{"question_id": 1, "category": "(no category)", "turns": ["Q"]}])
    with pytest.raises(ValueError, match="category must be a string other than 'all' and '\\(no category\\)'"):
        gen_answer.load_questions(path)
    assert speed.answer_problem(answer(1, "(no category)", [12], [1.0], [3])) == speed.CATEGORY_RULE


def test_baseline_tau_counts_the_baselines_own_tokens():
    """Sampled runs answer with different lengths: each side's tau is its tokens over its iterations."""
    ea = [answer(1, "c", [12], [1.0], [3])]
    base = [answer(1, "c", [10], [4.0], [9])]
    everything = speed.summarize(ea, base)["groups"]["all"]
    assert (everything["tau"], everything["baseline_tau"]) == (12 / 4, 10 / 10)


def test_a_file_saved_with_a_byte_order_mark_keeps_its_first_record(tmp_path):
    """Editors on Windows save UTF-8 with a BOM: it is no part of the first line's JSON."""
    from eagle_gto.evaluation.questions import load_questions

    path = tmp_path / "q.jsonl"
    path.write_text("\ufeff" + "".join(json.dumps({"question_id": i, "turns": ["Q"]}) + "\n" for i in (1, 2)),
                    encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no line is skipped
        assert [q["question_id"] for q in load_questions(path)] == [1, 2]


def test_speed_refuses_a_question_id_answered_twice_in_one_file(tmp_path, capsys):
    """gen_answer writes one answer per question id; a file joined by hand may hold two, and the report
    counted only the last."""
    ea = write(tmp_path / "ea.jsonl", [answer(1, "c", [12], [1.0], [3]), answer(2, "c", [12], [1.0], [3]),
                                       answer(1, "c", [12], [9.0], [3])])
    base = write(tmp_path / "base.jsonl", [answer(1, "c", [12], [4.0], [11]), answer(2, "c", [12], [4.0], [11])])
    code, line = cli_error(speed.cli, ["--ea-file", ea, "--baseline-file", base, "--out-dir", str(tmp_path)], capsys)
    assert code == 2 and line == (f"error: --ea-file {ea}: question id 1 is answered twice (records 1 and 3): "
                                  f"keep one answer per question")
    assert not (tmp_path / "speed.json").exists()


def test_a_model_that_fails_to_load_leaves_no_answer_file_behind(tmp_path, monkeypatch, capsys):
    """The answer file was created (empty) before the model loaded: a failed start left it, and its folders."""
    def fails(*args, **kwargs):
        raise OSError("no such model: missing-base")

    monkeypatch.setattr(gen_answer.EaModel, "from_pretrained", fails)
    questions = write(tmp_path / "q.jsonl", [{"question_id": 1, "turns": ["Q"]}, {"question_id": 2, "turns": ["Q"]}])
    path = tmp_path / "runs" / "eval" / "a.jsonl"
    run = ["--question-file", questions, "--answer-file", str(path), "--model-id", "m", "--device", "cpu",
           "--base-model-path", "missing-base", "--ea-model-path", "head", "--model-type", "plain",
           "--max-length", "2048"]  # (given: the base's config.json, read for its context, is not read)
    assert cli_error(gen_answer.cli, run, capsys) == (2, "error: no such model: missing-base")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.jsonl"]
    # an answer file of the same run, resumed: kept byte for byte
    path.parent.mkdir(parents=True)
    settings = gen_answer.run_settings(gen_answer.parse_args(run), Path(questions))
    before = write(path, [dict(answer(1, "c", [1], [1.0], [0]), mode="ea", settings=settings)]) and path.read_text()
    assert cli_error(gen_answer.cli, run, capsys)[0] == 2
    assert path.read_text() == before and sorted(p.name for p in path.parent.iterdir()) == ["a.jsonl"]


def test_a_long_category_name_keeps_the_speed_table_aligned():
    """The category column was 14 characters wide: a longer name pushed its row's numbers off their columns."""
    ea = [answer(1, "a_very_long_category_name", [12], [1.0], [3]), answer(2, "math", [12], [1.0], [3])]
    base = [answer(1, "a_very_long_category_name", [12], [4.0], [11]), answer(2, "math", [12], [4.0], [11])]
    header, rule, *rows = speed.format_table(speed.summarize(ea, base)).splitlines()[:5]
    assert rows[1].startswith("a_very_long_category_name ")
    assert {len(line) for line in (header, rule, *rows)} == {len(header)}
    assert {line.index("4.000") for line in rows} == {header.index("speedup") + len("speedup") - len("4.000")}


def test_the_dtype_auto_loaded_is_recorded_and_refuses_a_resume_that_loads_another(tmp_path, monkeypatch):
    """--dtype auto on a GPU is the checkpoint's half type: the same options load float16 for one base and
    bfloat16 for another (or, before, bfloat16 for both). The answers record the dtype loaded; a file whose
    answers record none (written before) resumes with the same options as it did."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "float16"}))
    questions = write(tmp_path / "q.jsonl", [{"question_id": 1, "turns": ["Q"]}, {"question_id": 2, "turns": ["Q"]}])
    path = tmp_path / "a.jsonl"
    run = ["--question-file", questions, "--answer-file", str(path), "--model-id", "m", "--device", "cuda",
           "--base-model-path", str(base), "--ea-model-path", "head", "--model-type", "plain"]
    settings = gen_answer.run_settings(gen_answer.parse_args(run), Path(questions))
    assert (settings["dtype"], settings["dtype_used"]) == ("auto", "float16")
    write(path, [dict(answer(1, "c", [1], [1.0], [0]), mode="ea", settings={**settings, "dtype_used": "bfloat16"})])
    with pytest.raises(ValueError, match="dtype_used 'bfloat16' .*not this run's 'float16'"):
        gen_answer.main(run)
    old = {key: value for key, value in settings.items() if key != "dtype_used"}
    write(path, [dict(answer(1, "c", [1], [1.0], [0]), mode="ea", settings=old)])
    assert gen_answer.main(run + ["--limit", "1"]) == path  # the same options: nothing left to answer


def test_speed_compares_the_dtype_loaded_where_recorded():
    """--dtype auto that loaded bfloat16 and --dtype bfloat16 ran alike; auto that loaded float16 did not."""
    base = [timed(81, "baseline", "plain", settings(dtype="auto", dtype_used="bfloat16"), 4.0)]
    summary = speed.summarize([timed(81, "ea", "m", settings(dtype="bfloat16", dtype_used="bfloat16"))], base)
    assert summary["groups"]["all"]["speedup"] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="dtype 'float16' in --ea-file but 'bfloat16' in --baseline-file"):
        speed.summarize([timed(81, "ea", "m", settings(dtype="auto", dtype_used="float16"))], base)
