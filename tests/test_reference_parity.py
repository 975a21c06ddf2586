"""The reference-parity benchmark: its tree and step bookkeeping, the base
folder it prepares for the reference, and a run against a scripted stand-in
for the reference engine (the real one needs transformers 4.53 and an EAGLE
checkout, which CI does not have)."""

import json
import textwrap

import pytest
import torch
from test_tree import random_candidates

from eagle_gto.benchmarks import reference_parity as parity
from eagle_gto.demo import demo_paths
from eagle_gto.tree import select_tree


def paths_by_parents(tree) -> list[list[int]]:
    """Brute force: walk each node's parents up to the root."""
    tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
    paths = []
    for node in range(len(tokens)):
        path = [tokens[node]]
        while node != 0:
            node = parents[node]
            path.append(tokens[node])
        paths.append(path[::-1])
    return sorted(paths)


@pytest.mark.parametrize("seed", range(5))
def test_node_paths_are_the_trees_branches_in_any_node_order(seed):
    tokens, scores, parents = random_candidates(depth=3, top_k=3, seed=seed)
    tree = select_tree(torch.tensor(7), tokens, scores, parents, 12, 4)
    paths = parity.node_paths(tree.tokens.tolist(), tree.mask.tolist(), tree.depths.tolist())
    assert paths == paths_by_parents(tree) and len(paths) == 12
    order = torch.randperm(tree.size, generator=torch.Generator().manual_seed(seed))
    shuffled = parity.node_paths(tree.tokens[order].tolist(), tree.mask[order][:, order].tolist(),
                                 tree.depths[order].tolist())
    assert shuffled == paths
    changed = tree.tokens.clone()
    changed[-1] += 1000
    assert parity.node_paths(changed.tolist(), tree.mask.tolist(), tree.depths.tolist()) != paths


def test_compare_finds_first_differences_over_what_both_ran():
    tree_a, tree_b, tree_c = [[1], [1, 2]], [[1], [1, 3]], [[1], [1, 4]]
    ours = dict(tokens=[5, 6, 7, 8], accepted=[1, 0, 1], trees=[tree_a, tree_a, tree_a],
                tie_rule_trees=[tree_a, tree_a, tree_c], cut_gaps=[0.5, 1e-6, 0.5])
    same = dict(tokens=[5, 6, 7, 8, 9, 9], accepted=[1, 0, 1, 2], trees=[tree_a, tree_a, tree_a, tree_b])
    verdict = parity.compare(ours, same)
    assert verdict["same_tokens"] and verdict["first_differing_acceptance"] is None
    assert verdict["first_differing_tree"] is None and verdict["differing_trees"] == 0
    assert verdict["tau_ours"] == verdict["tau_reference"] == 5 / 3 and not verdict["reference_stopped_first"]
    other = dict(tokens=[5, 6, 0, 8, 9], accepted=[1, 1, 1], trees=[tree_a, tree_b, tree_c])
    verdict = parity.compare(ours, other)
    assert not verdict["same_tokens"]
    assert verdict["first_differing_acceptance"] == 1 and verdict["first_differing_tree"] == 1
    assert verdict["tree_difference"] == dict(only_ours=[(1, 2)], only_reference=[(1, 3)])
    # iteration 2's tree is what the reference's tie rule makes of our candidates;
    # iteration 1's is not, but our cut there was a near tie
    assert verdict["differing_trees"] == 2 and verdict["differing_trees_by_tie_rule"] == 1
    assert verdict["differing_trees_near_ties"] == 1 and verdict["cut_gaps_of_the_others"] == {1: 1e-6}
    assert parity.compare(ours, other, near_tie=1e-7)["differing_trees_near_ties"] == 0


def test_a_reference_that_stops_first_is_compared_over_what_it_ran():
    tree = [[1], [1, 2]]
    ours = dict(tokens=[5, 6, 7, 8, 9, 10, 11], accepted=[1, 0, 2, 1], trees=[tree] * 4,
                tie_rule_trees=[tree] * 4, cut_gaps=[0.5] * 4)
    verdict = parity.compare(ours, dict(tokens=[5, 6, 7, 8], accepted=[1, 0], trees=[tree] * 3))
    assert verdict["same_tokens"] and verdict["first_differing_acceptance"] is None
    assert verdict["first_differing_tree"] is None and verdict["reference_stopped_first"]
    assert verdict["iterations"] == 2
    verdict = parity.compare(ours, dict(tokens=[5, 6, 0], accepted=[1, 1], trees=[tree] * 2))
    assert not verdict["same_tokens"] and verdict["first_differing_acceptance"] == 1


def test_trees_missing_from_a_record_are_an_error_not_agreement():
    ours = dict(tokens=[5, 6, 7], accepted=[1, 0], trees=[], tie_rule_trees=[], cut_gaps=[])
    with pytest.raises(ValueError, match="trees recorded"):
        parity.compare(ours, dict(tokens=[5, 6, 7, 8], accepted=[1, 0, 3], trees=[[[1]]] * 4))


def test_a_path_the_reference_holds_twice_shows_in_the_difference():
    ours = dict(tokens=[5], accepted=[0], trees=[[[1], [1, 2], [1, 3]]], tie_rule_trees=[[[1]]], cut_gaps=[1.0])
    verdict = parity.compare(ours, dict(tokens=[5], accepted=[0], trees=[[[1], [1, 2], [1, 2]]]))
    assert verdict["tree_difference"] == dict(only_ours=[(1, 3)], only_reference=[(1, 2)])


@pytest.mark.parametrize("seed", range(4))
def test_the_reference_rule_keeps_our_tree_where_no_scores_tie(seed):
    tokens, scores, parents = random_candidates(depth=3, top_k=3, seed=seed)
    tree = select_tree(torch.tensor(7), tokens, scores, parents, 12, 4)
    ours = parity.node_paths(tree.tokens.tolist(), tree.mask.tolist(), tree.depths.tolist())
    assert parity.reference_rule_paths(7, tokens, scores, parents, 12) == ours


def test_the_reference_rule_hangs_a_node_without_its_parent_under_another():
    # candidates: 0 (token 1, under the root), 1 (token 2, under the root), 2 (token 3, under 0)
    tokens, parents = torch.tensor([1, 2, 3]), torch.tensor([0, 0, 1])
    scores = torch.tensor([-5.0, -1.0, -0.5])  # 2 is kept, its parent 0 is not
    assert parity.reference_rule_paths(7, tokens, scores, parents, 3) == [[7], [7, 2], [7, 2, 3]]


def test_the_base_folder_gets_an_index_and_a_tokenizer_class_transformers_4_knows(tmp_path):
    base, _ = demo_paths()
    prepared = parity.reference_base_folder(base, tmp_path)
    assert prepared != base
    index = json.loads((tmp_path / "base" / "model.safetensors.index.json").read_text())
    from safetensors import safe_open
    with safe_open(f"{base}/model.safetensors", framework="pt") as f:
        assert set(index["weight_map"]) == set(f.keys()) and "model.embed_tokens.weight" in index["weight_map"]
    config = json.loads((tmp_path / "base" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "backend" not in config
    assert json.loads((tmp_path / "base" / "config.json").read_text())["model_type"] == "llama"
    # A base saved as one pytorch_model.bin gets that file's index.
    bin_base = tmp_path / "bin"
    bin_base.mkdir()
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "lm_head.weight": torch.zeros(2, 2)},
               bin_base / "pytorch_model.bin")
    (tmp_path / "scratch").mkdir()
    assert parity.reference_base_folder(str(bin_base), tmp_path / "scratch") == str(tmp_path / "scratch" / "base")
    index = json.loads((tmp_path / "scratch" / "base" / "pytorch_model.bin.index.json").read_text())
    assert index["weight_map"] == {"model.embed_tokens.weight": "pytorch_model.bin",
                                   "lm_head.weight": "pytorch_model.bin"}
    # What the reference can read passes as is, and so does what is not a folder.
    ready = tmp_path / "ready"
    ready.mkdir()
    (ready / "model.safetensors.index.json").write_text("{}")
    assert parity.reference_base_folder(str(ready), tmp_path / "unused") == str(ready)
    assert parity.reference_base_folder("meta-llama/Llama-3.1-8B", tmp_path) == "meta-llama/Llama-3.1-8B"


# A stand-in for the reference package (eagle.model.ea_model) that replays a
# script in the reference's conventions: the tree of iteration 0 is built
# before the first streamed step, each later tree before the step that
# precedes it is yielded, and every streamed step holds the last bonus token
# and the accepted drafts.
FAKE_REFERENCE = textwrap.dedent('''
    import json, os
    import torch

    class Head:
        def topK_genrate(self, tree):
            paths = tree
            tokens = torch.tensor([[p[-1] for p in paths]])
            mask = torch.tensor([[[[float(q == p[:len(q)]) for q in paths] for p in paths]]])
            return tokens, None, mask, torch.tensor([len(p) - 1 for p in paths])

    class EaModel:
        @classmethod
        def from_pretrained(cls, **kwargs):
            model = cls()
            model.ea_layer = Head()
            model.script = json.loads(open(os.environ["FAKE_REFERENCE_SCRIPT"]).read())
            model.calls = 0
            return model

        def eval(self):
            return self

        def ea_generate(self, input_ids, max_new_tokens, **kwargs):
            run = self.script[min(self.calls, len(self.script) - 1)]
            self.calls += 1
            tokens, trees = list(run["tokens"]), run["trees"]
            self.ea_layer.topK_genrate(trees[0])
            for i, accepted in enumerate(run["accepted"]):
                if i + 1 < len(trees):
                    self.ea_layer.topK_genrate(trees[i + 1])
                chunk, tokens = tokens[: accepted + 1], tokens[accepted + 1:]
                input_ids = torch.cat((input_ids, torch.tensor([chunk])), dim=1)
                yield input_ids
''')


def test_a_run_reports_what_the_reference_does_differently(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data" / "mt_bench"
    data.mkdir(parents=True)
    (data / "question.jsonl").write_text(json.dumps({"question_id": 1, "turns": ["def add(a, b):"]}) + "\n")
    argv = ["--reference-path", str(tmp_path / "fake"), "--benches", "mt_bench", "--data-dir", str(tmp_path / "data"),
            "--limit", "1", "--max-new-tokens", "24", "--total-token", "10", "--depth", "3", "--top-k", "3"]
    _, records = parity.run_ours(parity.parse_args(argv))
    ours = records[0]["ours"]
    assert len(ours["trees"]) == len(ours["accepted"]) >= 3
    assert all(len(tree) == 10 and tree[0] == tree[0][:1] for tree in ours["trees"])

    package = tmp_path / "fake" / "eagle" / "model"
    package.mkdir(parents=True)
    for folder in (package.parent, package):
        (folder / "__init__.py").write_text("")
    (package / "ea_model.py").write_text(FAKE_REFERENCE)
    trees = [[list(p) for p in tree] for tree in ours["trees"]]
    warm_up = dict(tokens=[0] * 64, accepted=[0] * 16, trees=trees[:1] * 17)
    faithful = dict(tokens=ours["tokens"] + [0, 0], accepted=ours["accepted"] + [1], trees=trees + trees[-1:])
    script = tmp_path / "script.json"
    monkeypatch.setenv("FAKE_REFERENCE_SCRIPT", str(script))

    script.write_text(json.dumps([warm_up, faithful]))
    result = parity.main(argv)
    assert result["summary"][0] | dict(same_tokens=1, same_acceptance=1, same_trees=1) == result["summary"][0]
    assert result["summary"][0]["tau_reference"] == result["summary"][0]["tau_ours"]

    moved = [list(p) for p in trees[2]]
    moved[-1][-1] += 1  # one node of iteration 2's tree drafts another token
    accepted = list(ours["accepted"])
    accepted[1:3] = [accepted[1] + 1, accepted[2] - 1] if accepted[2] > 0 else [accepted[1] + 1, accepted[2]]
    unfaithful = dict(faithful, trees=trees[:2] + [moved] + trees[3:] + trees[-1:], accepted=accepted + [1])
    script.write_text(json.dumps([warm_up, unfaithful]))
    capsys.readouterr()
    result = parity.main(argv)
    verdict = result["records"][0]["verdict"]
    assert verdict["first_differing_acceptance"] == 1 and verdict["first_differing_tree"] == 2
    assert verdict["tree_difference"]["only_reference"] == [tuple(moved[-1])]
    assert result["summary"][0]["same_trees"] == 0 and result["summary"][0]["same_acceptance"] == 0
    out = capsys.readouterr().out
    assert "acceptance first differs at iteration 1" in out and "other trees from iteration 2" in out


def test_a_reference_path_without_the_reference_is_refused_before_this_engine_runs(tmp_path, monkeypatch):
    """Not after this engine has answered every question (minutes of a lent GPU)."""
    monkeypatch.setattr(parity, "run_ours", lambda args: pytest.fail("this engine ran before the check"))
    with pytest.raises(SystemExit, match="the EAGLE reference cannot be imported from it .*No module named 'eagle'"):
        parity.main(["--reference-path", str(tmp_path / "nowhere")])


@pytest.mark.parametrize("argv,message", [
    (["--benches", "mt_bench,foo"], "unknown foo"),
    (["--benches", ","], "none given"),
    (["--model-type", "llama4"], "--model-type 'llama4'"),
    (["--limit", "0"], "--limit must be at least 1"),
    (["--base-model-path", "b"], "give both"),
    (["--demo-head", "gto", "--base-model-path", "b", "--ea-model-path", "h"], "does not go with model paths"),
    # tracebacks once the reference had been probed and the questions read, as this engine loaded the pair
    (["--total-token", "1"], "--total-token 1, --depth 7, --top-k 10: total_token must be >= 2"),
    (["--depth", "0"], "--depth 0, --top-k 10: depth and top_k must be >= 1"),
    (["--total-token", "200", "--depth", "1"], "total_token=200 needs 199 draft nodes"),
    (["--device", "gpu"], "--device gpu: not a device torch knows (cuda, cuda:1 or cpu)"),
    (["--device", "cuda"], "--device cuda: CUDA is not available here"),
])
def test_bad_arguments_are_refused_before_any_model_loads(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as info:
        parity.parse_args(["--reference-path", "x"] + argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_a_top_k_past_the_heads_vocabulary_is_one_line(tmp_path):
    """Known once the head loads: a traceback from the engine's own check."""
    data = tmp_path / "data" / "mt_bench"
    data.mkdir(parents=True)
    (data / "question.jsonl").write_text(json.dumps({"question_id": 1, "turns": ["hi"]}) + "\n")
    args = parity.parse_args(["--reference-path", "x", "--benches", "mt_bench", "--data-dir", str(tmp_path / "data"),
                              "--top-k", "5000", "--device", "cpu"])
    with pytest.raises(SystemExit, match=r"^top_k=5000 is larger than the draft head's vocabulary \(\d+ tokens\)$"):
        parity.run_ours(args)


@pytest.mark.parametrize("setup,extra,message", [
    ("empty", [], "no questions"),
    ("missing", [], "--data-dir names the folder"),
    ("long", ["--max-length", "40"], "that does not fit in --max-length 40"),
    ("answer", ["--max-length", "150"], "with --max-new-tokens 128 and a tree of 60 that does not fit"),
])
def test_bad_selections_give_clear_errors(tmp_path, setup, extra, message, monkeypatch):
    data = tmp_path / "data" / "mt_bench"
    data.mkdir(parents=True)
    questions = {"empty": "", "long": json.dumps({"question_id": 1, "turns": ["word " * 50]}) + "\n",
                 "one": json.dumps({"question_id": 1, "turns": ["hi"]}) + "\n"}
    questions["answer"] = questions["one"]  # a short prompt whose answer would reach the end of the context
    if setup != "missing":
        (data / "question.jsonl").write_text(questions[setup])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = parity.parse_args(["--reference-path", "x", "--benches", "mt_bench", "--data-dir",
                              str(tmp_path / ("nowhere" if setup == "missing" else "data"))] + extra)
    with pytest.raises(SystemExit, match=message):
        parity.run_ours(args)
