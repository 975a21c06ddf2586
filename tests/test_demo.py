"""The embedded demo pair: where it is, that it loads, that it is lossless
and that its head actually drafts well."""

import json
import re
from pathlib import Path

import pytest
import torch

import eagle_gto.__main__ as cli
import eagle_gto.demo as demo
from eagle_gto import CheckpointError, EaModel
from eagle_gto.demo import measure as measure_cli
from eagle_gto.demo.measure import humaneval_prompts, measure

HUMANEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "humaneval" / "question.jsonl"


@pytest.fixture(scope="module")
def model():
    return EaModel.from_pretrained(dtype=torch.float32)  # no paths: the demo pair


def test_demo_paths_name_loadable_folders():
    base, head = demo.demo_paths("eagle3")
    assert (Path(base) / "model.safetensors").is_file() and (Path(base) / "tokenizer.json").is_file()
    config = json.loads((Path(head) / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and "draft_vocab_size" in config
    assert demo.demo_paths()[0] == base
    with pytest.raises(ValueError, match="unknown demo head"):
        demo.demo_paths("medusa")


def test_default_head_and_missing_gto(tmp_path, monkeypatch):
    for name in ("base", "eagle3"):
        (tmp_path / name).mkdir()
    (tmp_path / "base" / "model.safetensors").write_bytes(b"")
    (tmp_path / "eagle3" / "config.json").write_text("{}")
    monkeypatch.setattr(demo, "ASSETS", tmp_path)
    assert demo.demo_paths() == (str(tmp_path / "base"), str(tmp_path / "eagle3"))
    with pytest.raises(CheckpointError, match="gto head is not built"):
        demo.demo_paths("gto")
    (tmp_path / "heads.json").write_text(json.dumps({"default": "gto"}))
    assert demo.demo_paths()[1] == str(tmp_path / "eagle3")  # named default absent: fall back
    (tmp_path / "gto").mkdir()
    (tmp_path / "gto" / "config.json").write_text("{}")
    assert demo.demo_paths()[1] == str(tmp_path / "gto")


def test_shipped_heads_share_the_base_and_the_default_is_the_better():
    base, eagle3 = demo.demo_paths(head="eagle3")
    gto_base, gto = demo.demo_paths(head="gto")
    assert gto_base == base and gto != eagle3
    index = json.loads((demo.ASSETS / "heads.json").read_text())
    mean = {name: sum(tau.values()) / len(tau) for name, tau in index["tau"].items()}
    assert index["default"] == max(mean, key=mean.get)
    assert demo.demo_paths() == demo.demo_paths(head=index["default"])
    for head in (eagle3, gto):
        m = EaModel.from_pretrained(base, head, dtype=torch.float32)
        ids = m.tokenizer("def add(a, b):\n", return_tensors="pt").input_ids
        assert m.use_eagle3  # both are EAGLE-3 heads of the same base
        assert torch.equal(m.eagenerate(ids, max_new_tokens=16), m.naivegenerate(ids, max_new_tokens=16))


def test_demo_pair_is_greedy_identical_to_plain_decoding(model):
    for text in ("import os\n\n\ndef main():\n", "class Stack:\n    def __init__(self):\n"):
        ids = model.tokenizer(text, return_tensors="pt").input_ids
        spec = model.eagenerate(ids, max_new_tokens=48)
        assert model.last_stats.iterations < model.last_stats.new_tokens  # drafts were accepted
        assert torch.equal(spec, model.naivegenerate(ids, max_new_tokens=48))


@pytest.mark.skipif(not HUMANEVAL.is_file(), reason=f"benchmark data not found at {HUMANEVAL}")
def test_demo_head_accepts_on_humaneval(model):
    prompts = humaneval_prompts(HUMANEVAL, model.tokenizer)[:4]
    result = measure(model, prompts, max_new_tokens=48)
    assert result.identical == len(prompts)
    assert result.tau > 1.5
    assert result.speedup == pytest.approx(result.spec_tps / result.plain_tps)  # the reference's definition


@pytest.mark.parametrize("argv,message", [
    (["--base-model-path", "some/base"], "give both --base-model-path and --ea-model-path"),
    (["--ea-model-path", "some/head"], "give both --base-model-path and --ea-model-path"),
    (["--limit", "0"], "--limit must be >= 1"),
])
def test_measure_refuses_bad_arguments_before_loading(monkeypatch, capsys, argv, message):
    def no_load(*args, **kwargs):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(EaModel, "from_pretrained", no_load)
    with pytest.raises(SystemExit):
        measure_cli.main(argv)
    assert message in capsys.readouterr().err


def test_cli_warms_up_both_timed_paths_with_their_settings_and_passes_the_formats_stops(model, monkeypatch, capsys):
    """On a GPU each mode and sampling setting records its own CUDA graph on
    first use, one per 256-slot attention view: the warm-up must run every
    (mode, settings) pair timed after it, model.warm_up at every view of the
    context (a long answer would otherwise record graphs while timed).
    The format's stop strings reach the engine as ids (a stand-in <|im_end|>)."""
    vocab = model.tokenizer.get_vocab()
    monkeypatch.setattr(model.tokenizer, "get_vocab", lambda: {**vocab, "<|im_end|>": 5})
    calls, events = [], []
    generate_steps, warm_up = model.generate_steps, model.warm_up

    def spy(input_ids, **settings):
        calls.append(settings)
        events.append(("generate", settings["speculative"]))
        return generate_steps(input_ids, **settings)

    def warm_up_spy(**settings):
        events.append(("warm_up", settings))
        return warm_up(**settings)

    monkeypatch.setattr(model, "generate_steps", spy)
    monkeypatch.setattr(model, "warm_up", warm_up_spy)
    monkeypatch.setattr(cli, "load_model", lambda args: model)
    assert cli.main(["--model-type", "qwen", "--temperature", "0.7", "--top-p", "0.9", "--max-new-tokens", "12"]) == 0
    sampling = dict(max_length=model.default_max_length(), temperature=0.7, top_p=0.9, top_k=0)
    assert events == [("warm_up", {**sampling, "speculative": True}), ("generate", True),
                      ("warm_up", {**sampling, "speculative": False}), ("generate", False),
                      ("generate", True), ("generate", False)]
    out = capsys.readouterr().out
    speedup = float(re.search(r"speedup ([\d.]+)x", out).group(1))
    found = re.search(r"an iteration cost ([\d.]+) plain steps and produced tau = ([\d.]+)", out)
    cost, tau = map(float, found.groups())
    assert speedup == pytest.approx(tau / cost, rel=0.1)  # rounded to two and one decimals
    without_budget = [{k: v for k, v in c.items() if k != "max_new_tokens"} for c in calls]
    assert [c["speculative"] for c in calls] == [True, False, True, False]  # warm-ups first, then the timed runs
    assert without_budget[:2] == without_budget[2:]
    assert all(c["temperature"] == 0.7 and c["top_p"] == 0.9 and c["stop_token_ids"] == [5] for c in calls)
    events.clear()
    assert cli.main(["--model-type", "plain", "--max-new-tokens", "4", "--no-compare"]) == 0
    greedy = dict(max_length=model.default_max_length(), temperature=0.0, top_p=0.0, top_k=0)
    assert events == [("warm_up", {**greedy, "speculative": True}), ("generate", True), ("generate", True)]


def test_without_a_dtype_a_cpu_load_is_float32_else_the_checkpoints():
    """The demo is saved in float16; half precision on the CPU is slow, so a
    load without a device map defaults to float32 (as transformers 4 did), and
    an explicit dtype is kept."""
    assert json.loads((Path(demo.demo_paths()[0]) / "config.json").read_text())["dtype"] == "float16"
    loaded = EaModel.from_pretrained()
    assert loaded.base_model.dtype == torch.float32 and next(loaded.ea_layer.parameters()).dtype == torch.float32
    half = EaModel.from_pretrained(torch_dtype=torch.float16)
    assert half.base_model.dtype == torch.float16


@pytest.mark.parametrize("argv,message", [
    (["--max-new-tokens", "0"], "error: max_new_tokens must be >= 1, got 0"),
    (["--temperature", "-1"], "error: temperature must be >= 0"),
    (["--top-k", "-1"], "error: top_k must be >= 0"),
    # bytes that are not UTF-8 (a latin-1 file pasted with $(cat ...)) reach sys.argv as lone surrogates
    (["--prompt", "caf\udce9"], "error: the prompt is not UTF-8 text: byte 0xe9 at character 3"),
    (["--prompt", "\udc80"], "error: the prompt is not UTF-8 text: byte 0x80 at character 0"),  # the lowest
    (["--prompt", "x\udcff"], "error: the prompt is not UTF-8 text: byte 0xff at character 1"),  # the highest
    # a lone surrogate no byte became (main called from Python): the character itself
    (["--prompt", "ab\ud800"], "error: the prompt is not UTF-8 text: '\\ud800' at character 2"),
])
def test_cli_refuses_bad_generation_settings_before_loading(monkeypatch, capsys, argv, message):
    def no_load(args):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(cli, "load_model", no_load)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(message)


def test_cli_prompt_longer_than_the_context_and_an_answer_the_context_ends(model, monkeypatch, capsys):
    """A prompt that leaves no room is one error line, before any generation; an answer cut by the
    context, not by --max-new-tokens, says so."""
    monkeypatch.setattr(cli, "load_model", lambda args: model)
    line = "x = 1\n"
    per_line = len(model.tokenizer(line * 2).input_ids) - len(model.tokenizer(line).input_ids)
    long = line * (model.default_max_length() // per_line + 1)
    assert cli.main(["--model-type", "plain", "--prompt", long, "--no-compare"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: the prompt has") and "context of 2048" in err
    near = line * ((model.default_max_length() - 12) // per_line)
    assert cli.main(["--model-type", "plain", "--prompt", near, "--max-new-tokens", "40", "--no-compare"]) == 0
    assert "(the answer ended where the context of 2048 tokens is full)" in capsys.readouterr().out
    assert cli.main(["--model-type", "plain", "--max-new-tokens", "8", "--no-compare"]) == 0
    assert "tokens is full" not in capsys.readouterr().out  # ended by --max-new-tokens


def test_measure_bad_tree_is_one_error_line(capsys):
    assert measure_cli.main(["--total-token", "1", "--humaneval", "/nonexistent"]) == 2
    assert capsys.readouterr().err.strip() == ("error: total_token must be >= 2 (the root and at least one "
                                               "draft token), got 1")


@pytest.mark.parametrize("lines,message", [
    ([], "empty.jsonl holds no questions"),
    (['{"id": 1, "prompt": "def f():"}'], "empty.jsonl: every question needs a question_id"),
    (['{"question_id": 1, "prompt": "def f():"}'], "empty.jsonl: question 1 needs a non-empty turns list"),
])
def test_measure_bad_humaneval_file_is_one_error_line_before_loading(tmp_path, monkeypatch, capsys, lines, message):
    """Read as gen_answer reads question files (an empty one was an IndexError once the held-out set had been
    measured)."""
    def no_load(*args, **kwargs):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(EaModel, "from_pretrained", no_load)
    path = tmp_path / "empty.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    assert measure_cli.main(["--humaneval", str(path), "--limit", "1", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {tmp_path}/") and message in err, err


def test_demo_build_passes_the_step_counts_given_and_refuses_zero(monkeypatch, capsys):
    from eagle_gto.demo import build

    ran = []
    monkeypatch.setattr(build.subprocess, "run", lambda command, check: ran.append(command))
    monkeypatch.setattr(build.build_head, "main", lambda argv: ran.append(argv))
    build.main(["--base-steps", "5", "--head-steps", "7"])
    assert ran[0][-2:] == ["--steps", "5"] and ran[1][-2:] == ["--steps", "7"]
    ran.clear()
    build.main([])
    assert "--steps" not in ran[0] + ran[1]  # the builders' own defaults
    for option in ("--base-steps", "--head-steps"):  # 0 was taken as "not given": the default's hours of training
        with pytest.raises(SystemExit) as info:
            build.main([option, "0"])
        assert info.value.code == 2 and f"{option} must be >= 1, got 0" in capsys.readouterr().err
    assert len(ran) == 2


def test_build_head_without_matplotlib_keeps_the_head_and_its_log(tmp_path, monkeypatch):
    """matplotlib is an extra: without it train() writes no training_curves.png, and the build goes on."""
    from eagle_gto.demo import build_head
    from eagle_gto.train import Sample, trainer

    def no_matplotlib(*args, **kwargs):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(trainer, "plot_metrics", no_matplotlib)
    ids = torch.randint(3, 2048, (2, 16), generator=torch.Generator().manual_seed(0)).tolist()
    monkeypatch.setattr(build_head, "build_samples", lambda *args: [Sample(s, [1] * len(s)) for s in ids])
    out = tmp_path / "head"
    build_head.main(["--out", str(out), "--steps", "1", "--batch-size", "2", "--draft-vocab-size", "64",
                     "--intermediate-size", "32", "--ttt-steps", "2", "--threads", "1"])
    assert sorted(f.name for f in out.iterdir()) == ["README.md", "config.json", "metrics.jsonl", "model.safetensors",
                                                     "training_log.json"]


def test_measure_prints_the_tree_used_and_no_length_warning(monkeypatch, capsys):
    """--total-token -1 picks a size when the model loads: the header shows it. The
    held-out prompts are whole files cut to --prompt-tokens: the tokenizer must not
    warn that they are longer than the model's context."""
    import transformers.tokenization_utils_base as tokenization

    warned = []
    monkeypatch.setattr(tokenization.logger, "warning", lambda message, *args, **kwargs: warned.append(message))
    argv = ["--total-token", "-1", "--limit", "1", "--max-new-tokens", "4", "--humaneval", "/nonexistent"]
    assert measure_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert int(re.search(r"total_token=(-?\d+) depth=7 top_k=10", out).group(1)) >= 2
    assert not [m for m in warned if "sequence length is longer" in m]
    rows = [line for line in out.splitlines() if line.startswith("| held-out")]
    assert len(rows) == 1 and rows[0].endswith("|    1/1    |")  # one prompt, greedy identical


def test_cli_prompt_of_no_tokens_is_one_error_line(model, monkeypatch, capsys):
    """An empty prompt with a tokenizer that adds no BOS (the demo's adds one: a stand-in encodes nothing)."""
    monkeypatch.setattr(cli, "load_model", lambda args: model)
    monkeypatch.setattr(cli, "encode_prompt", lambda text, tokenizer, model_type: [])
    assert cli.main(["--model-type", "plain", "--prompt", "", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: the prompt encodes to no tokens: give a non-empty --prompt"


def test_cli_says_whether_the_greedy_outputs_are_identical(model, monkeypatch, capsys):
    """The check compares the two runs' tokens: a plain run that differs is reported as such."""
    monkeypatch.setattr(cli, "load_model", lambda args: model)
    argv = ["--model-type", "plain", "--max-new-tokens", "8"]
    assert cli.main(argv) == 0
    assert "greedy outputs identical: yes" in capsys.readouterr().out
    naivegenerate = model.naivegenerate

    def one_token_off(*args, **kwargs):
        out = naivegenerate(*args, **kwargs).clone()
        out[0, -1] += 1
        return out

    monkeypatch.setattr(model, "naivegenerate", one_token_off)
    assert cli.main(argv) == 0
    assert "greedy outputs identical: NO" in capsys.readouterr().out


def test_cli_prompt_fits_with_one_token_to_spare(model, monkeypatch, capsys):
    """The engine's rule: the prompt and one new token fit in the context."""
    from eagle_gto.chat import build_prompt, encode_prompt

    monkeypatch.setattr(cli, "load_model", lambda args: model)
    prompt = "def f(x):\n"
    length = len(encode_prompt(build_prompt([{"role": "user", "content": prompt}], "plain"), model.tokenizer, "plain"))
    argv = ["--model-type", "plain", "--prompt", prompt, "--max-new-tokens", "1", "--no-compare"]
    monkeypatch.setattr(model, "default_max_length", lambda: length)
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.startswith(f"error: the prompt has {length} tokens, too many for the context "
                                              f"of {length} tokens")
    monkeypatch.setattr(model, "default_max_length", lambda: length + 1)
    assert cli.main(argv) == 0
    assert capsys.readouterr().err == ""


def test_cli_prints_the_answer_as_the_servers_and_gen_answer_write_it(model, monkeypatch, capsys):
    """The answer is cut before the format's stop string (a tokenizer without Qwen's <|im_end|> as one token
    writes it as text), as gen_answer and regeneration cut it."""
    prompt = "def f(x):\n"
    eagenerate = model.eagenerate

    def writes_the_end_as_text(input_ids, **options):
        eagenerate(input_ids, **options)  # (its stats)
        answer = model.tokenizer(" yes<|im_end|>\n<|im_start|>user", add_special_tokens=False).input_ids
        return torch.cat([input_ids, torch.tensor([answer])], dim=1)

    monkeypatch.setattr(cli, "load_model", lambda args: model)
    monkeypatch.setattr(model, "eagenerate", writes_the_end_as_text)
    assert cli.main(["--model-type", "qwen", "--prompt", prompt, "--max-new-tokens", "4", "--no-compare"]) == 0
    assert capsys.readouterr().out.split("-" * 60)[0] == prompt + " yes\n"


def test_cli_keeps_the_space_before_a_sentencepiece_answers_first_word(monkeypatch, capsys):
    """Decoded alone, "▁def" is "def": the answer is decoded after the prompt, as the servers decode it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from eagle_gto.tiny import base_config, head_config, random_head

    words = ["▁yes", "▁no", "▁def"]
    sentencepiece = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="▁no"))
    sentencepiece.pre_tokenizer, sentencepiece.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=sentencepiece)
    torch.manual_seed(0)
    config = base_config(vocab_size=len(words))
    tiny = EaModel(AutoModelForCausalLM.from_config(config).eval(), random_head(head_config(config, "eagle3")),
                   tokenizer, total_token=8, depth=3, top_k=2)
    monkeypatch.setattr(cli, "load_model", lambda args: tiny)
    assert cli.main(["--model-type", "plain", "--prompt", "def", "--max-new-tokens", "6", "--no-compare"]) == 0
    answer = tiny.eagenerate(torch.tensor([tokenizer("def").input_ids]), max_new_tokens=6)[0, 1:]
    written = "".join(tokenizer.convert_ids_to_tokens(answer.tolist())).replace("▁", " ")  # every word's space
    assert capsys.readouterr().out.split("-" * 60)[0] == "def" + written + "\n"


def test_cli_times_sampled_answers_over_the_same_number_of_tokens(model, monkeypatch, capsys):
    """Sampled, the plain run writes another answer than the speculative one: here one of 2 tokens, mostly its
    prefill (1 s). Its tokens/s against a longer answer's would say little, so both are timed over their first 2
    tokens, and the output says so."""
    from eagle_gto import GenerationStats, Step

    monkeypatch.setattr(cli, "load_model", lambda args: model)
    eagenerate, naivegenerate, records = model.eagenerate, model.naivegenerate, {}

    def speculative(*args, **kwargs):
        out = eagenerate(*args, **kwargs)
        records["speculative"] = model.last_stats
        return out

    def plain_of_two_tokens(*args, **kwargs):
        out = naivegenerate(*args, **kwargs)
        model.last_stats = GenerationStats(3, [Step([1], 0, 1.0), Step([2], 0, 0.01, "stop")])
        return out

    monkeypatch.setattr(model, "eagenerate", speculative)
    monkeypatch.setattr(model, "naivegenerate", plain_of_two_tokens)
    torch.manual_seed(0)
    assert cli.main(["--model-type", "plain", "--temperature", "0.8", "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr().out
    spec = records["speculative"]
    assert spec.new_tokens > 2
    assert f"of {spec.new_tokens} and 2 tokens; both are timed over the iterations that made their first 2" in out
    first = cli.first_tokens(spec, 2)  # the prefill and the first iteration
    assert first.steps == spec.steps[:2]
    row = re.search(r"^speculative +(\d+) +(\d+) +[\d.]+ +([\d.]+)$", out, re.M)
    assert (int(row.group(1)), int(row.group(2))) == (first.new_tokens, 2)
    assert float(row.group(3)) == pytest.approx(first.tokens_per_second, abs=0.06)
    assert re.search(r"^plain +2 +2 +1.00 +2.0$", out, re.M)  # 2 tokens in 1.01 s


def test_cli_greedy_rows_are_each_run_whole(model, monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_model", lambda args: model)
    assert cli.main(["--model-type", "plain", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert "sampling" not in out
    assert re.search(r"^speculative +12 ", out, re.M) and re.search(r"^plain +12 +12 +1.00 ", out, re.M)


def test_cli_says_a_greedy_top_k_is_not_the_trees(model, monkeypatch, capsys):
    """The servers' and gen_answer's --top-k is the draft tree's; here it samples, and greedy does not."""
    monkeypatch.setattr(cli, "load_model", lambda args: model)
    assert cli.main(["--model-type", "plain", "--top-k", "5", "--max-new-tokens", "4", "--no-compare"]) == 0
    assert "the draft tree's is --tree-top-k" in capsys.readouterr().err
    assert cli.main(["--model-type", "plain", "--top-k", "5", "--temperature", "0.7", "--max-new-tokens", "4",
                     "--no-compare"]) == 0
    assert "--tree-top-k" not in capsys.readouterr().err


def test_cli_reads_a_temperature_up_to_1e_5_as_greedy(model, monkeypatch, capsys):
    """The engine decodes greedily up to 1e-5 (as the reference): the CLI compares and warns as for 0, not as
    for two sampled answers."""
    monkeypatch.setattr(cli, "load_model", lambda args: model)
    assert cli.main(["--model-type", "plain", "--temperature", "1e-6", "--top-k", "5", "--max-new-tokens", "6"]) == 0
    captured = capsys.readouterr()
    assert "greedy outputs identical: yes" in captured.out and "sampling" not in captured.out
    assert "greedy decoding (--temperature 1e-06) does not sample" in captured.err


def test_cli_shows_no_speedup_when_an_answer_ends_at_its_first_token(model, monkeypatch, capsys):
    """A sampled plain answer that stops at its first token leaves only the two prefills to compare: their ratio
    says nothing of speculative decoding, so no speedup (nor iteration cost) is printed."""
    from eagle_gto import GenerationStats, Step

    monkeypatch.setattr(cli, "load_model", lambda args: model)
    naivegenerate = model.naivegenerate

    def plain_of_one_token(*args, **kwargs):
        out = naivegenerate(*args, **kwargs)
        model.last_stats = GenerationStats(3, [Step([1], 0, 1.0, "stop")])
        return out

    monkeypatch.setattr(model, "naivegenerate", plain_of_one_token)
    torch.manual_seed(0)
    assert cli.main(["--model-type", "plain", "--temperature", "0.8", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert "no speedup to show: the runs compare over one token" in out
    assert not re.search(r"^speedup ", out, re.M) and "an iteration cost" not in out
    assert re.search(r"^speculative +1 +1 +1.00 ", out, re.M) and re.search(r"^plain +1 +1 +1.00 ", out, re.M)
