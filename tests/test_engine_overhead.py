"""The engine benchmarks on tiny shapes (CPU): engine overhead, operation counts."""

import json
import subprocess
import sys

import pytest
import torch

from eagle_gto.benchmarks import engine_overhead, op_count

PROG = "python -m eagle_gto.benchmarks."


def test_tiny_shape_report(tmp_path, capsys):
    out = tmp_path / "overhead.json"
    result = engine_overhead.main(["--shape", "tiny", "--hidden-size", "32", "--device", "cpu", "--prompt-length", "8",
                                   "--new-tokens", "6", "--repeats", "1", "--total-tokens", "4,8", "--depth", "2",
                                   "--top-k", "3", "--tau", "4", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["dtype"] == "float32" and result["device"] == "cpu"
    assert result["shape"]["hidden_size"] == 32 and result["shape"]["num_layers"] == 6

    # Weight bytes by hand for hidden 32, 6 layers, heads 4/2 (head dim 8),
    # intermediate 128, vocab 256, untied, float32:
    # embedding + lm_head 2*256*32; per layer q,o 2*32*32 + k,v 2*32*16 +
    # MLP 3*32*128 + 2 norms 2*32; final norm 32.
    params = 2 * 256 * 32 + 6 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 128 + 2 * 32) + 32
    assert result["weight_bytes"] == 4 * params
    # A step reads one row of the (untied) input embedding table, not all 256.
    assert result["read_bytes"] == 4 * (params - 255 * 32)
    assert result["read_floor_ms"] == pytest.approx(result["floor_ms"] * result["read_bytes"] / result["weight_bytes"])

    for key in ("copy_bandwidth_gb_s", "floor_ms", "hf_generate_ms"):
        assert result[key] > 0, key
    assert result["floor_ms"] == pytest.approx(1000 * result["weight_bytes"] / (result["copy_bandwidth_gb_s"] * 1e9))
    assert list(result["engines"]) == ["eager"]  # CUDA graphs only on a GPU
    eager = result["engines"]["eager"]
    assert eager["plain_ms"] > 0
    assert eager["plain_x_floor"] == pytest.approx(eager["plain_ms"] / result["floor_ms"])
    assert set(eager["iterations"]) == {"4", "8"}
    for it in eager["iterations"].values():
        assert it["ms"] > 0 and 1.0 <= it["tau"] <= 6
        assert it["x_plain"] == pytest.approx(it["ms"] / eager["plain_ms"])
        assert it["predicted_speedup"] == pytest.approx(4 * eager["plain_ms"] / it["ms"])
        assert it["projected_tokens_per_s"] == pytest.approx(4000 / it["ms"])
    table = capsys.readouterr().out
    assert "| eager: `naivegenerate`, per token |" in table and "total_token 8" in table


def test_the_table_gives_every_engines_measured_tau_and_a_chosen_attention_kernel():
    """The "measured tau" line showed the first engine's only, unnamed."""
    def engine(tau):
        return {"plain_ms": 1.0, "iterations": {"10": {"ms": 2.0, "tau": tau, "x_plain": 2.0, "predicted_speedup": 1.0,
                                                       "projected_tokens_per_s": 500.0}}}

    result = {"shape": {"hidden_size": 64, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2,
                        "intermediate_size": 128, "vocab_size": 256}, "tree": {"depth": 3, "top_k": 3},
              "floor_ms": 0.5, "read_floor_ms": 0.4, "weight_bytes": 10**6, "read_bytes": 9 * 10**5,
              "copy_bandwidth_gb_s": 2.0, "hf_generate_ms": 1.5, "device_name": "stand-in", "dtype": "float32",
              "date": "2026-01-01", "prompt_length": 8, "new_tokens": 6, "repeats": 1, "tau_assumed": 4.0,
              "engines": {"eager": engine(1.25), "graphs": engine(1.5)}}
    table = engine_overhead.format_table(result).splitlines()
    assert [line for line in table if "measured tau" in line] == [
        "eager: measured tau with these random weights: total_token 10: 1.25",
        "graphs: measured tau with these random weights: total_token 10: 1.50"]
    assert "attention" not in table[0]  # (torch's choice: auto)
    # A run of another attention kernel (stage 10's math) read like a default one: only its JSON named it
    other = engine_overhead.format_table({**result, "sdpa_backend": "math"}).splitlines()
    assert other[0].startswith("engine overhead, stand-in, float32, attention math, 2026-01-01:")


def test_graphs_need_a_gpu(capsys):
    with pytest.raises(SystemExit) as info:
        engine_overhead.main(["--shape", "tiny", "--device", "cpu", "--engines", "eager,graphs"])
    assert info.value.code == 2 and "graphs needs a CUDA device" in capsys.readouterr().err


def test_sdpa_backend_choice_is_applied_and_recorded(monkeypatch):
    chosen = []
    real = engine_overhead.sdpa_backend
    monkeypatch.setattr(engine_overhead, "sdpa_backend", lambda name: chosen.append(name) or real(name))
    result = engine_overhead.main(["--shape", "tiny", "--device", "cpu", "--prompt-length", "8", "--new-tokens", "3",
                                   "--repeats", "1", "--total-tokens", "4", "--depth", "2", "--top-k", "2",
                                   "--sdpa-backend", "math"])
    assert chosen == ["math"] and result["sdpa_backend"] == "math"


def test_kernel_summary_of_a_trace():
    # two replays of the same three kernels, 10 us apart, plus a CPU event
    kernels = [("gemm", 5.0), ("topk", 1.0), ("gemm", 3.0)]
    events = [{"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 50}]
    for replay in range(2):
        for i, (name, dur) in enumerate(kernels):
            events.append({"cat": "kernel", "name": name, "ts": 100 + 30 * replay + 10 * i, "dur": dur})
    summary = engine_overhead.summarise_kernels(events[::-1], 2)
    assert summary["kernels_per_replay"] == 3
    assert summary["kernel_us_per_replay"] == 9.0
    assert summary["span_us_per_replay"] == (130 + 20 + 3 - 100) / 2
    assert summary["by_name"] == [{"name": "gemm", "calls": 2.0, "us": 8.0}, {"name": "topk", "calls": 1.0, "us": 1.0}]
    assert summary["sequence"] == [["gemm", 5.0], ["topk", 1.0], ["gemm", 3.0]]


def test_rejects_a_tree_the_depth_cannot_fill(capsys):
    with pytest.raises(SystemExit):
        engine_overhead.main(["--shape", "tiny", "--device", "cpu", "--total-tokens", "4,50", "--depth", "2",
                              "--top-k", "3"])
    assert "total_token=50" in capsys.readouterr().err


def test_op_count_by_part(tmp_path):
    """Parts add up to the total, and compacting the KV cache costs the same
    few operations whatever the number of layers (one stack per device)."""
    results = [op_count.main(["--layers", str(n), "--total-token", "8", "--depth", "3", "--top-k", "3"])
               for n in (3, 6)]
    for result in results:
        for step in ("plain_step", "iteration"):
            assert sum(result[step].values()) == result[step.replace("_step", "") + "_total"]
        assert set(result["plain_step"]) <= {"verify (target forward)", "pick tokens", "other"}
        assert result["iteration"]["draft tree"] > 0 and result["iteration"]["extend head"] > 0
    three, six = (r["iteration"] for r in results)
    assert 0 < three["compact KV"] == six["compact KV"] <= 6
    assert six["verify (target forward)"] > three["verify (target forward)"]
    assert six["draft tree"] == three["draft tree"]  # the head does not depend on the base's depth


@pytest.mark.parametrize("module", ["reference_engine", "reference_parity"])
def test_reference_benchmarks_import_nothing_of_the_engine(module):
    """They run under the transformers 4.53 the EAGLE reference needs, where
    the engine cannot be imported (eagle_gto.cli_help, their --help's defaults, imports only argparse)."""
    code = (f"import sys, eagle_gto.benchmarks.{module}; "
            "loaded = [m for m in sys.modules if m.startswith(('eagle_gto.', 'transformers'))]; print(loaded); "
            # (the checks of tree.py and devices.py and dtype_option's --dtype, shared with engine_overhead, need
            # nothing but torch; cli_help only argparse)
            "assert not [m for m in loaded if not m.startswith(('eagle_gto.benchmarks', 'eagle_gto.tree', "
            "'eagle_gto.cli_help', 'eagle_gto.devices', 'eagle_gto.dtype_option'))], loaded")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gpu_equality_without_cuda_says_so(monkeypatch, capsys):
    from eagle_gto.benchmarks import gpu_equality

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as info:
        gpu_equality.main([])
    assert info.value.code == 2 and "CUDA is not available here" in capsys.readouterr().err


def test_gpu_equality_writes_its_json_into_a_new_folder(tmp_path, capsys):
    """As the other benchmarks' --json (write_json): a folder that does not exist yet is made (the rows of a GPU
    session were lost at the end of the run)."""
    from eagle_gto.benchmarks import gpu_equality

    rows = [{"model": "demo", "prompt": 0, "path": "plain, graphs", "tau": 1.0, "first_difference": None}]
    path = tmp_path / "new" / "equality.json"
    gpu_equality.report(rows, str(path))
    assert json.loads(path.read_text()) == rows
    assert "| demo | 0 | plain, graphs | 1.0 | - |  |" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--total-tokens", "10,abc"], "--total-tokens 10,abc"),
    (["--total-tokens", "1"], "--total-tokens 1, --depth 7, --top-k 10: total_token"),
    # it named --total-tokens alone, as a list
    (["--depth", "0"], "--total-tokens 10,30,60,100, --depth 0, --top-k 10: depth and top_k must be >= 1"),
    (["--prompt-length", "1990", "--new-tokens", "40", "--total-tokens", "60"],
     "--prompt-length 1990 + --new-tokens 40 + the largest tree 60 must fit in --max-length 2048"),
    (["--device", "cuda"], "--device cuda: CUDA is not available here"),
    (["--unfused"], "--unfused goes with --compile"),
    # the profile is of CUDA graph replays: on the CPU (eager only) it would silently profile nothing
    (["--profile", "5"], "--profile profiles the graphs engine (CUDA graphs): it needs a CUDA --device"),
    (["--profile", "5", "--trace", "t.json"], "--profile profiles the graphs engine"),
    (["--trace", "t.json"], "--trace goes with --profile"),
    (["--profile", "-1"], "--profile must be >= 0"),
    # torch has no CPU kernel of these: a traceback once the model was built and transformers' generate timed
    (["--sdpa-backend", "cudnn"], "--sdpa-backend cudnn runs on a CUDA --device only: on a CPU choose flash or math"),
    (["--sdpa-backend", "efficient"], "--sdpa-backend efficient runs on a CUDA --device only"),
    (["--engines", "eager,eager"], "--engines eager,eager: name each engine once"),
    # tokens per iteration, the bonus token counted: below 1 the projected speedups and tokens/s meant nothing
    (["--tau", "0"], "--tau must be at least 1 (tokens per iteration, the bonus token counted), got 0.0"),
    (["--tau", "nan"], "--tau must be at least 1"),
    # shapes the model or its head cannot take: refused before a model is built
    (["--shape", "tiny", "--num-layers", "2"], "--num-layers must be at least 3 (an EAGLE-3 head reads three"),
    (["--shape", "tiny", "--hidden-size", "100"], "--hidden-size 100 / --num-heads 4 = head dim 25: it must be even"),
    (["--shape", "tiny", "--num-heads", "3"], "--hidden-size 64 must be a multiple of --num-heads 3"),
    (["--shape", "tiny", "--num-kv-heads", "3"], "--num-heads 4 must be a multiple of --num-kv-heads 3"),
    (["--shape", "tiny", "--vocab-size", "0"], "--vocab-size must be >= 1, got 0"),
    (["--shape", "tiny", "--num-kv-heads", "0"], "--num-kv-heads must be >= 1, got 0"),
    (["--shape", "tiny", "--vocab-size", "5", "--top-k", "6"], "--top-k 6 is larger than the draft vocabulary (5"),
    (["--shape", "small", "--vocab-size", "5"], "--top-k 10 is larger than the draft vocabulary (5"),  # the preset's
])
def test_settings_that_would_time_the_wrong_thing_are_refused(argv, message, monkeypatch, capsys):
    """(Past the end of the context the engine steps one token at a time: those would be averaged in.)"""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        engine_overhead.parse_args(["--device", "cpu"] + argv)
    assert message in capsys.readouterr().err


def test_profile_needs_the_graphs_engine_which_a_gpu_runs_by_default(two_gpus, capsys):
    args = engine_overhead.parse_args(["--device", "cuda", "--profile", "5", "--trace", "t.json"])
    assert args.engines == ["eager", "graphs"] and args.profile == 5
    assert engine_overhead.parse_args(["--device", "cuda:1", "--engines", "graphs", "--profile", "1"]).profile == 1
    with pytest.raises(SystemExit) as info:  # the results were written over the trace at the end
        engine_overhead.parse_args(["--device", "cuda", "--profile", "5", "--trace", "out.json", "--json",
                                    "./out.json"])
    assert info.value.code == 2 and "--trace and --json name the same file (./out.json)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        engine_overhead.parse_args(["--device", "cuda", "--engines", "eager", "--profile", "5"])
    assert info.value.code == 2 and "--profile profiles the graphs engine" in capsys.readouterr().err


def test_a_gpu_the_machine_lacks_is_refused(two_gpus, capsys):
    """It passed the checks and failed in torch's words once the model was being built."""
    with pytest.raises(SystemExit) as info:
        engine_overhead.parse_args(["--device", "cuda:2"])
    assert info.value.code == 2 and f"--device cuda:2: there is no GPU 2 here; {two_gpus}" in capsys.readouterr().err


def test_shapes_the_engine_takes_pass(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert engine_overhead.parse_args(["--device", "cuda"]).model_shape == engine_overhead.SHAPES["llama3-8b"]
    shape = engine_overhead.parse_args(["--device", "cpu", "--num-layers", "3", "--hidden-size", "32", "--num-heads",
                                        "16", "--num-kv-heads", "1", "--vocab-size", "3000"]).model_shape
    assert (shape.num_layers, shape.hidden_size, shape.num_heads, shape.num_kv_heads) == (3, 32, 16, 1)
    assert (shape.vocab_size, shape.draft_vocab_size) == (3000, None)  # the small preset's 4000 drafts over all


@pytest.mark.parametrize("argv,message", [(["--total-token", "1"], "total_token must be >= 2"),
                                          # its head drafts over 512 tokens: a traceback once the model was built
                                          (["--top-k", "513"], "top_k=513 is larger than the draft head's vocabulary "
                                                               "(512 tokens)")])
def test_op_count_refuses_a_tree_that_cannot_be(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(op_count, "build_model", lambda *args, **kwargs: pytest.fail("built a model"))
    with pytest.raises(SystemExit) as info:
        op_count.main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_op_count_refuses_a_base_an_eagle3_head_cannot_read(capsys):
    with pytest.raises(SystemExit):
        op_count.main(["--layers", "2"])
    assert "--layers must be at least 3 (an EAGLE-3 head reads three decoder layers), got 2" in capsys.readouterr().err


@pytest.mark.parametrize("tool", ["engine_overhead", "op_count", "gpu_equality", "reference_engine",
                                  "reference_parity"])
@pytest.mark.parametrize("where,message", [("folder", "a folder, not a file"),
                                           ("under_a_file", "is a file, not a folder")])
def test_a_json_path_that_cannot_be_written_is_refused_before_measuring(tool, where, message, tmp_path, monkeypatch,
                                                                       capsys):
    """--json was written only at the end: a folder given for it (or a path under a file) failed with a traceback
    once the whole measurement (minutes on a GPU) was done, and its results were lost."""
    import importlib

    def no_model(*args, **kwargs):
        raise AssertionError("built a model")

    module = importlib.import_module(f"eagle_gto.benchmarks.{tool}")
    for name in ("build_model", "build_reference", "load_prompts"):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, no_model)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # (gpu_equality runs on a GPU only)
    (tmp_path / "file").write_text("")
    path = {"folder": tmp_path, "under_a_file": tmp_path / "file" / "out.json"}[where]
    argv = ["--json", str(path)] + (["--reference-path", "x"] if tool == "reference_parity" else [])
    with pytest.raises(SystemExit) as info:
        getattr(module, "parse_args" if tool == "reference_parity" else "main")(argv)
    expected = message if where == "folder" else f"{tmp_path / 'file'} {message}"
    assert info.value.code == 2 and f"--json {path}: {expected}" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [(["--prompts", "0"], "--prompts must be >= 1, got 0"),
                                          (["--new-tokens", "0"], "--new-tokens must be >= 1, got 0")])
def test_gpu_equality_refuses_a_run_that_would_compare_nothing(argv, message, monkeypatch, capsys):
    """--prompts 0 left the random model unchecked (an empty table read as all paths equal); --new-tokens 0
    failed in the engine after the demo pair had loaded."""
    from eagle_gto.benchmarks import gpu_equality

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_equality.EaModel, "from_pretrained", lambda *args, **kwargs: pytest.fail("loaded"))
    with pytest.raises(SystemExit) as info:
        gpu_equality.main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--total-tokens", "10,abc"], "--total-tokens 10,abc: give tree sizes as comma-separated integers, e.g. 10,30,60"),
    (["--total-tokens", "1"], "--total-tokens 1, --depth 7, --top-k 10: total_token must be >= 2"),
    (["--total-tokens", "200", "--depth", "1"], "--total-tokens 200, --depth 1, --top-k 10: total_token=200 needs 199 "
                                                "draft nodes"),
    # small's head drafts over 4000 tokens
    (["--top-k", "4001"], "--top-k 4001: top_k=4001 is larger than the draft head's vocabulary (4000 tokens)"),
    (["--new-tokens", "1"], "need --new-tokens >= 2, --repeats >= 1 and --prompt-length >= 1"),
    (["--repeats", "0"], "need --new-tokens >= 2"),
    (["--prompt-length", "0"], "need --new-tokens >= 2"),
    (["--seed", str(2**64)], f"--seed {2**64} is out of range"),
    (["--device", "cuda"], "--device cuda: CUDA is not available here"),
    (["--device", "gpu"], "--device gpu: not a device torch knows (cuda, cuda:1 or cpu)"),
    # the reference stops (max_length - its tree - 10): steps past that would not be timed
    (["--prompt-length", "1880", "--new-tokens", "64", "--total-tokens", "100"],
     "--prompt-length 1880 + --new-tokens 64 + the largest tree 100 + 10 (the engine stops that far short of it) "
     "must fit in --max-length 2048"),
    # its head reads layers 2, n/2 and n-3: tiny's 6 layers give it two
    (["--shape", "tiny"], "--shape tiny: the reference's EAGLE-3 head reads base layers 2, n/2 and n-3, which 6 "
                          "layers do not keep apart ([2, 3]): use --shape small or llama3-8b"),
    (["--shape", "small"], "the EAGLE reference is not importable: put an EAGLE checkout (its eagle/ package) and "
                           "transformers 4.53 first on PYTHONPATH"),
])
def test_reference_engine_refuses_bad_arguments_in_one_line_before_building(argv, message, monkeypatch, capsys):
    """Bad arguments ended in a traceback: some when the reference was built, some after (a --total-tokens that
    does not parse, a tree its depth cannot fill, --repeats 0 once the model was built and timed)."""
    from eagle_gto.benchmarks import reference_engine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(reference_engine, "build_reference", lambda *args, **kwargs: pytest.fail("built"))
    with pytest.raises(SystemExit) as info:
        reference_engine.main(["--device", "cpu"] + argv)
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (after argparse's usage)
    assert info.value.code == 2 and last.startswith(f"{PROG}reference_engine: error: ") and message in last


def test_reference_engine_needs_transformers_4_first_on_the_path(monkeypatch, capsys):
    """Under this project's transformers 5 the reference's modeling files fail to import: said in one line."""
    import importlib.util

    import transformers

    from eagle_gto.benchmarks import reference_engine

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())  # an EAGLE checkout on the path
    with pytest.raises(SystemExit) as info:
        reference_engine.parse_args(["--device", "cpu"])
    assert info.value.code == 2
    assert (f"error: transformers {transformers.__version__} comes first on PYTHONPATH: the reference needs 4.53"
            in capsys.readouterr().err)
    monkeypatch.setattr(transformers, "__version__", "4.53.3")
    args = reference_engine.parse_args(["--device", "cpu", "--total-tokens", "10,60"])
    assert (args.shape, args.total_tokens) == ("small", [10, 60])


def test_engine_overhead_refuses_a_device_torch_does_not_know(capsys):
    with pytest.raises(SystemExit) as info:
        engine_overhead.parse_args(["--device", "gpu"])
    assert info.value.code == 2 and "--device gpu: not a device torch knows" in capsys.readouterr().err
