"""Do this engine and the EAGLE reference accept the same drafts on the same weights?

    python -m eagle_gto.benchmarks.reference_parity --reference-path REF_SITE:EAGLE_CHECKOUT [--json OUT]

Loads one base model and draft head (default: the demo pair) into this
engine and into the EAGLE reference engine (github.com/SafeAILab/EAGLE,
which needs transformers 4.53: REF_SITE holds it, EAGLE_CHECKOUT its
`eagle/` package; it runs in a subprocess with that path first), answers the
first turn of each question greedily with the same prompt ids and tree
settings, and compares, question by question:

- the new tokens, over the length both produced (the reference may run a
  step's worth past `--max-new-tokens`);
- the number of draft tokens each iteration accepted. The reference's
  streamed steps each hold the previous bonus token and the accepted drafts,
  this engine's the accepted drafts and the bonus token, so step i of
  both carries the same acceptance count (compared over the iterations both
  ran; the reference is given room not to stop for length first);
- the draft tree of every iteration, as the set of its nodes' token paths
  from the root (the order of nodes inside a tree is each engine's own).
  A tree that differs is checked against the tree the reference's selection
  rule makes of this engine's candidates (its `torch.topk` may keep a node
  without its parent where scores tie) and against a near tie at the cut.

Identical trees on every iteration mean the two engines draft the same
candidates, and identical acceptance that they reach the same tau on the
same weights. Both run in float32 by default: in half precision the
reference rounds its draft log-probabilities to the model's dtype (this engine
works them out in float32), so trees differ wherever two candidates come
within that rounding at the cut, while tokens and acceptance still agree.
This engine runs eagerly here (the trees are read on the host every
iteration). Speed is `reference_engine`'s subject, not this one's.

The reference side (`--reference-side`) imports nothing of the engine.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from ..cli_help import show_defaults
from ..tree import check_tree_params
from .common import check_device, check_output_file, write_json

REPO_ROOT = Path(__file__).resolve().parents[2]
# Score gap at the cut (draft log-probability) within which the two
# implementations' rounding can swap two candidates: float32 differs by ~1e-6;
# the reference rounds half-precision log-probabilities to ~1e-2.
NEAR_TIE = {"float32": 1e-4, "bfloat16": 0.1, "float16": 0.02}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eagle_gto.benchmarks.reference_parity",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--reference-path", required=True,
                   help="PYTHONPATH entries for the reference side: transformers 4.53 and an EAGLE checkout")
    p.add_argument("--base-model-path", help="base model folder or hub id (default: the demo pair)")
    p.add_argument("--ea-model-path", help="draft head folder or hub id (default: the demo pair's default head)")
    p.add_argument("--demo-head", choices=("eagle3", "gto"), help="which demo head (without model paths)")
    p.add_argument("--model-type", default="auto", help="prompt format (see eagle_gto.chat)")
    p.add_argument("--benches", default="mt_bench,humaneval,gsm8k", help="comma-separated question sets")
    p.add_argument("--data-dir", help="folder of the question sets; default shared/data beside the repository")
    p.add_argument("--limit", type=int, default=10, help="questions per bench")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--total-token", type=int, default=60)
    p.add_argument("--depth", type=int, default=7)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--device", default="auto", help="cpu, cuda (auto: cuda when there is one)")
    p.add_argument("--dtype", choices=tuple(NEAR_TIE), default="float32",
                   help="both engines' (default float32: in half precision rounding changes many cuts)")
    p.add_argument("--reference-label", help="what the reference is (e.g. 'SafeAILab/EAGLE cb7e084'), for the record")
    p.add_argument("--json", help="write the settings, every question's record and the summary here")
    p.add_argument("--reference-side", nargs=2, metavar=("JOB", "RESULT"), help=argparse.SUPPRESS)
    show_defaults(p)
    args = p.parse_args(argv)
    if args.reference_side is None:
        check_output_file(p, "--json", args.json)
        from ..chat import MODEL_TYPES, model_type_arg
        from ..evaluation.questions import BENCHES

        args.model_type = model_type_arg(args.model_type)
        if args.model_type not in MODEL_TYPES:
            p.error(f"--model-type {args.model_type!r}: choose from {', '.join(MODEL_TYPES)}")
        args.benches = [b.strip() for b in args.benches.split(",") if b.strip()]
        unknown = sorted(set(args.benches) - set(BENCHES))
        if unknown or not args.benches:
            p.error(f"--benches: {'unknown ' + ', '.join(unknown) if unknown else 'none given'}; "
                    f"choose from {', '.join(BENCHES)}")
        for name in ("limit", "max_new_tokens", "max_length"):
            if getattr(args, name) < 1:
                p.error(f"--{name.replace('_', '-')} must be at least 1")
        if (args.base_model_path is None) != (args.ea_model_path is None):
            p.error("give both --base-model-path and --ea-model-path, or neither for the demo pair")
        if args.demo_head and args.base_model_path:
            p.error("--demo-head picks a demo head; it does not go with model paths")
        if args.device != "auto":
            check_device(p, args.device)
        try:  # (the head's vocabulary is checked once it loads)
            check_tree_params(args.total_token, args.depth, args.top_k)
        except ValueError as err:
            p.error(f"--total-token {args.total_token}, --depth {args.depth}, --top-k {args.top_k}: {err}")
    return args


# ---------------------------------------------------------------- this engine

def load_prompts(args: argparse.Namespace) -> list[dict]:
    """The first turn of each question, before any model loads."""
    from ..evaluation.questions import load_questions, question_file

    prompts = []
    for bench in args.benches:
        try:
            questions = load_questions(question_file(bench, args.data_dir), args.limit)
        except ValueError as err:
            raise SystemExit(f"{err} (--data-dir names the folder of the question sets)") from None
        prompts += [dict(bench=bench, question_id=q["question_id"], text=q["turns"][0]) for q in questions]
    if not prompts:
        raise SystemExit("no questions: the question files of --benches are empty")
    return prompts


def run_ours(args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """Load the pair into this engine; return the job for the reference side
    and this engine's record per question."""
    import torch

    from .. import EaModel
    from ..chat import build_prompt, chat_format, encode_prompt
    from ..demo import demo_paths
    from ..model_files import resolve_file

    prompts = load_prompts(args)
    base_path, head_path = ((args.base_model_path, args.ea_model_path) if args.base_model_path
                            else demo_paths(args.demo_head))
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    options = dict(dtype=getattr(torch, args.dtype)) | ({} if device == "cpu" else dict(device_map=device))
    # Eager steps: the trees are read on the host every iteration (a replayed
    # CUDA graph would skip the recording; its tokens are the eager ones).
    try:
        model = EaModel.from_pretrained(base_path, head_path, total_token=args.total_token, depth=args.depth,
                                        top_k=args.top_k, cuda_graphs=False, **options)
    except ValueError as err:  # (CheckpointError too) a pair that does not load, a --top-k past its head's vocabulary
        raise SystemExit(str(err)) from None
    if model.tokenizer is None:
        raise SystemExit("the base model has no tokenizer: prompts are built from the question text")
    is_llama3 = chat_format(args.model_type).is_llama3
    for prompt in prompts:
        text = build_prompt([{"role": "user", "content": prompt.pop("text")}], args.model_type, model.tokenizer)
        prompt["ids"] = encode_prompt(text, model.tokenizer, args.model_type)
        # Both engines must draft every iteration: near the end of the context this one goes on
        # one token at a time and the reference stops early, so answers end before that.
        if len(prompt["ids"]) + args.max_new_tokens + args.total_token > args.max_length:
            raise SystemExit(f"{prompt['bench']} question {prompt['question_id']}: its prompt has "
                             f"{len(prompt['ids'])} tokens; with --max-new-tokens {args.max_new_tokens} and a tree "
                             f"of {args.total_token} that does not fit in --max-length {args.max_length}")

    def generate(ids: list[int], max_new_tokens: int) -> dict:
        record = dict(trees=[], tie_rule_trees=[], cut_gaps=[])
        with recording_trees(record):
            out = model.eagenerate(torch.tensor([ids]), temperature=0.0, max_new_tokens=max_new_tokens,
                                   max_length=args.max_length, is_llama3=is_llama3)
        accepted = [s.num_accepted for s in model.last_stats.steps[1:]]  # the prefill accepts nothing
        if len(record["trees"]) != len(accepted):  # e.g. a compiled draft step that bypasses the recording, or
            # one-token steps at the end of the context (which the prompt check above rules out)
            raise RuntimeError(f"{len(record['trees'])} draft trees recorded for {len(accepted)} iterations")
        return dict(record, tokens=out[0, len(ids):].tolist(), accepted=accepted)

    generate(prompts[0]["ids"], 16)  # warm-up (a first generation makes the caches), not compared
    records = [dict(prompt, ours=generate(prompt["ids"], args.max_new_tokens)) for prompt in prompts]
    # Hub ids as the local snapshot this engine just read: the reference then
    # needs no network, and its base folder can be prepared (reference_base_folder).
    base_folder, head_folder = (str(resolve_file(path, "config.json").parent) for path in (base_path, head_path))
    job = dict(base=base_folder, head=head_folder, use_eagle3=model.ea_layer.kind == "eagle3", device=device,
               dtype=args.dtype, total_token=args.total_token, depth=args.depth, top_k=args.top_k,
               is_llama3=is_llama3, max_new_tokens=args.max_new_tokens,
               # The reference stops once the sequence passes max_length - total_token - 9:
               # room for that, so that it does not stop for length before this engine.
               reference_max_length=args.max_length + args.total_token + 10,
               prompts=[dict(bench=r["bench"], question_id=r["question_id"], ids=r["ids"]) for r in records])
    return job, records


@contextlib.contextmanager
def recording_trees(record: dict):
    """For every draft tree this engine builds, append to `record`: its node
    paths ("trees"), those of the tree the reference's selection rule makes
    of the same candidates ("tie_rule_trees"), and the score gap between the
    last candidate kept and the first one left out ("cut_gaps")."""
    from .. import drafter

    select = drafter.select_tree

    def select_and_record(root, tokens, scores, parents, total_token, max_depth):
        tree = select(root, tokens, scores, parents, total_token, max_depth)
        record["trees"].append(node_paths(tree.tokens.tolist(), tree.mask.tolist(), tree.depths.tolist()))
        record["tie_rule_trees"].append(reference_rule_paths(int(root), tokens, scores, parents, total_token))
        ranked = scores.sort(descending=True).values
        record["cut_gaps"].append(float(ranked[total_token - 2] - ranked[total_token - 1])
                                  if len(ranked) >= total_token else float("inf"))
        return tree

    drafter.select_tree = select_and_record  # draft_tree looks it up on every call
    try:
        yield
    finally:
        drafter.select_tree = select


def reference_rule_paths(root: int, tokens, scores, parents, total_token: int) -> list[list[int]]:
    """Node paths of the tree the EAGLE reference selects from these
    candidates (`select_tree`'s arguments): the best `total_token - 1` by
    `torch.topk`, whose order among equal scores is arbitrary, each node hung
    under the kept node its parent's number sorts to. Where scores tie, a
    node can be kept without its parent and then hangs under another node."""
    import torch

    kept = torch.sort(torch.topk(scores, total_token - 1).indices).values
    parent = parents[kept]  # candidate number + 1, 0 for the root
    parent_node = torch.where(parent == 0, 0, torch.searchsorted(kept, parent - 1) + 1).tolist()
    mask = torch.eye(total_token, dtype=torch.bool)
    mask[:, 0] = True
    for node, up in enumerate(parent_node, start=1):  # in creation order, as the reference builds it
        mask[node] |= mask[up]
    return node_paths([root] + tokens[kept].tolist(), mask.tolist(), (mask.sum(dim=1) - 1).tolist())


def reference_env(reference_path: str) -> dict:
    """The environment of the reference side: `reference_path` first on PYTHONPATH."""
    paths = [reference_path, str(REPO_ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths))


def check_reference(reference_path: str) -> None:
    """Exit at once when the reference cannot be imported from `reference_path`, rather than after this engine
    has answered every question (minutes of a lent GPU)."""
    probe = "import transformers, eagle.model.ea_model; print(transformers.__version__)"
    done = subprocess.run([sys.executable, "-c", probe], env=reference_env(reference_path), capture_output=True,
                          text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"--reference-path {reference_path}: the EAGLE reference cannot be imported from it "
                         f"({last}); it needs transformers 4.53 and an EAGLE checkout (the folder holding eagle/)")


def run_reference(job: dict, reference_path: str) -> dict:
    """Run the reference side in a subprocess with `reference_path` first on PYTHONPATH."""
    with tempfile.TemporaryDirectory(prefix="eagle-parity-") as folder:
        job_file, result_file = Path(folder) / "job.json", Path(folder) / "result.json"
        job_file.write_text(json.dumps(job))
        command = [sys.executable, "-m", "eagle_gto.benchmarks.reference_parity", "--reference-path",
                   reference_path, "--reference-side", str(job_file), str(result_file)]
        done = subprocess.run(command, env=reference_env(reference_path))
        if done.returncode != 0 or not result_file.is_file():
            raise SystemExit(f"the reference side failed (exit status {done.returncode}); its output is above")
        return json.loads(result_file.read_text())


# -------------------------------------------------------------- the reference

def reference_base_folder(base: str, scratch: Path) -> str:
    """The base as the reference can load it. It reads the input embedding
    through a shard index and loads tokenizers by class name: a local folder
    without an index (one `model.safetensors`) or with a tokenizer class of
    transformers 5 gets a scratch copy of links with both added."""
    folder = Path(base)
    if not folder.is_dir():  # run_ours passes local folders; anything else goes as is
        return base
    index = folder / "model.safetensors.index.json"
    needs_index = not index.is_file() and not (folder / "pytorch_model.bin.index.json").is_file()
    tokenizer_config = folder / "tokenizer_config.json"
    config = json.loads(tokenizer_config.read_text()) if tokenizer_config.is_file() else {}
    new_tokenizer = config.get("tokenizer_class") == "TokenizersBackend"
    if not needs_index and not new_tokenizer:
        return base
    copy = scratch / "base"
    copy.mkdir()
    for item in folder.iterdir():
        (copy / item.name).symlink_to(item.resolve())
    if needs_index:
        for weights in ("model.safetensors", "pytorch_model.bin"):
            if (folder / weights).is_file():
                names = tensor_names(folder / weights)
                (copy / f"{weights}.index.json").write_text(
                    json.dumps({"metadata": {}, "weight_map": dict.fromkeys(names, weights)}))
                break
    if new_tokenizer:
        (copy / tokenizer_config.name).unlink()
        config = {k: v for k, v in config.items() if k != "backend"} | {"tokenizer_class": "PreTrainedTokenizerFast"}
        (copy / tokenizer_config.name).write_text(json.dumps(config))
    return str(copy)


def tensor_names(weights: Path) -> list[str]:
    import torch

    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(weights, framework="pt") as f:
            return list(f.keys())
    return list(torch.load(weights, map_location="cpu", weights_only=True, mmap=True))


def reference_side(job_file: str, result_file: str) -> None:
    import torch
    from eagle.model.ea_model import EaModel as ReferenceModel

    job = json.loads(Path(job_file).read_text())
    device = torch.device(job["device"])
    with tempfile.TemporaryDirectory(prefix="eagle-reference-base-") as scratch:
        kwargs = dict(torch_dtype=getattr(torch, job["dtype"]))
        if device.type != "cpu":
            kwargs["device_map"] = job["device"]
        model = ReferenceModel.from_pretrained(
            use_eagle3=job["use_eagle3"], base_model_path=reference_base_folder(job["base"], Path(scratch)),
            ea_model_path=job["head"], total_token=job["total_token"], depth=job["depth"], top_k=job["top_k"],
            **kwargs).eval()

    trees: list = []
    build = model.ea_layer.topK_genrate  # (sic) the reference's name; its callers look it up on the head

    def build_and_record(*args, **kwargs):
        tokens, retrieve_indices, mask, positions = build(*args, **kwargs)
        trees.append(node_paths(tokens[0].tolist(), mask[0, 0].bool().tolist(), positions.tolist()))
        return tokens, retrieve_indices, mask, positions

    model.ea_layer.topK_genrate = build_and_record

    def generate(ids: list[int], max_new_tokens: int) -> dict:
        trees.clear()
        lengths = [len(ids)]
        for out in model.ea_generate(torch.tensor([ids], device=device), temperature=0.0,
                                     max_new_tokens=max_new_tokens, max_length=job["reference_max_length"],
                                     is_llama3=job["is_llama3"]):
            lengths.append(out.shape[1])
        # Each streamed step holds the last bonus token and the accepted drafts.
        accepted = [b - a - 1 for a, b in zip(lengths, lengths[1:])]
        return dict(tokens=out[0, len(ids):].tolist(), accepted=accepted, trees=list(trees))

    with torch.no_grad():
        generate(job["prompts"][0]["ids"], 16)  # warm-up, as on this engine's side
        results = [generate(p["ids"], job["max_new_tokens"]) for p in job["prompts"]]
    import transformers

    Path(result_file).write_text(json.dumps(dict(transformers=transformers.__version__, results=results)))


# ------------------------------------------------------------------ comparing

def node_paths(tokens: list[int], mask: list[list[bool]], depths: list[int]) -> list[list[int]]:
    """A draft tree as the sorted token paths from the root to each node:
    `mask[i][j]` says j is i or an ancestor of i, `depths` are distances from
    the root. Equal for two trees with the same nodes in any order."""
    paths = []
    for row in mask:
        ancestors = sorted((depths[j], j) for j, visible in enumerate(row) if visible)
        paths.append([tokens[j] for _, j in ancestors])
    return sorted(paths)


def compare(ours: dict, reference: dict, near_tie: float = NEAR_TIE["float32"]) -> dict:
    """One question's verdict, over the iterations both engines ran (iteration
    i of both verifies the i-th tree) and the tokens both produced. A tree
    that differs is put down to the reference's tie rule when it is the tree
    that rule makes of this engine's candidates, and counted as a (near) tie
    when, of the rest, the last candidate this engine kept scores within
    `near_tie` of the first it left out: the two implementations round
    differently, so such candidates can change sides."""
    accepted_ours, accepted_reference = ours["accepted"], reference["accepted"]
    compared = min(len(accepted_ours), len(accepted_reference))
    if len(ours["trees"]) != len(accepted_ours) or len(reference["trees"]) < compared:
        raise ValueError(f"trees recorded: {len(ours['trees'])} (this engine) and {len(reference['trees'])} "
                         f"(reference) for {len(accepted_ours)} and {len(accepted_reference)} iterations")
    length = min(len(ours["tokens"]), len(reference["tokens"]))
    differing_acceptance = [i for i in range(compared) if accepted_ours[i] != accepted_reference[i]]
    differing_trees = [i for i in range(compared) if reference["trees"][i] != ours["trees"][i]]
    by_tie_rule = [i for i in differing_trees if reference["trees"][i] == ours["tie_rule_trees"][i]]
    others = [i for i in differing_trees if i not in by_tie_rule]
    nodes = {}  # at the first differing tree: the nodes (token paths) only one engine drafted, with repeats
    if differing_trees:
        paths_ours = Counter(map(tuple, ours["trees"][differing_trees[0]]))
        paths_reference = Counter(map(tuple, reference["trees"][differing_trees[0]]))
        nodes = dict(only_ours=sorted((paths_ours - paths_reference).elements()),
                     only_reference=sorted((paths_reference - paths_ours).elements()))
    return dict(same_tokens=ours["tokens"][:length] == reference["tokens"][:length], iterations=compared,
                reference_stopped_first=len(accepted_reference) < len(accepted_ours),
                first_differing_acceptance=differing_acceptance[0] if differing_acceptance else None,
                first_differing_tree=differing_trees[0] if differing_trees else None, tree_difference=nodes,
                differing_trees=len(differing_trees), differing_trees_by_tie_rule=len(by_tie_rule),
                differing_trees_near_ties=sum(ours["cut_gaps"][i] < near_tie for i in others),
                cut_gaps_of_the_others={i: ours["cut_gaps"][i] for i in others},
                tau_ours=sum(a + 1 for a in accepted_ours[:compared]) / max(compared, 1),
                tau_reference=sum(a + 1 for a in accepted_reference[:compared]) / max(compared, 1))


def summarize(records: list[dict]) -> list[dict]:
    rows = []
    for bench in dict.fromkeys(r["bench"] for r in records):
        verdicts = [r["verdict"] for r in records if r["bench"] == bench]
        iterations = sum(v["iterations"] for v in verdicts)
        rows.append(dict(
            bench=bench, questions=len(verdicts), iterations=iterations,
            same_tokens=sum(v["same_tokens"] for v in verdicts),
            same_acceptance=sum(v["first_differing_acceptance"] is None for v in verdicts),
            same_trees=sum(v["first_differing_tree"] is None for v in verdicts),
            reference_stopped_first=sum(v["reference_stopped_first"] for v in verdicts),
            **{key: sum(v[key] for v in verdicts) for key in
               ("differing_trees", "differing_trees_by_tie_rule", "differing_trees_near_ties")},
            tau_ours=sum(v["tau_ours"] * v["iterations"] for v in verdicts) / max(iterations, 1),
            tau_reference=sum(v["tau_reference"] * v["iterations"] for v in verdicts) / max(iterations, 1)))
    return rows


def print_report(rows: list[dict], records: list[dict], header: str) -> None:
    print(header + "\n")
    print("| bench | questions | iterations | same tokens | same acceptance, every iteration "
          "| same draft trees, every iteration | iterations with another tree (of them: tie rule / (near) tie) "
          "| tau (this engine) | tau (reference) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['bench']} | {r['questions']} | {r['iterations']} | {r['same_tokens']} | {r['same_acceptance']} "
              f"| {r['same_trees']} | {r['differing_trees']} ({r['differing_trees_by_tie_rule']} / "
              f"{r['differing_trees_near_ties']}) | {r['tau_ours']:.2f} | {r['tau_reference']:.2f} |")
    for record in records:
        v = record["verdict"]
        notes = [] if v["same_tokens"] else ["tokens differ"]
        if v["first_differing_acceptance"] is not None:
            notes.append(f"acceptance first differs at iteration {v['first_differing_acceptance']}")
        if v["differing_trees"]:
            notes.append(f"{v['differing_trees']} other trees from iteration {v['first_differing_tree']} "
                         f"({v['differing_trees_by_tie_rule']} the reference's tie rule; score gaps at the cut "
                         f"of the others: {v['cut_gaps_of_the_others']})")
        if v["reference_stopped_first"]:
            notes.append("the reference stopped first")
        if notes:
            print(f"{record['bench']} {record['question_id']}: " + "; ".join(notes))


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.reference_side:
        reference_side(*args.reference_side)
        return {}
    check_reference(args.reference_path)
    import torch
    import transformers

    job, records = run_ours(args)
    reference = run_reference(job, args.reference_path)
    for record, theirs in zip(records, reference["results"]):
        record["verdict"] = compare(record["ours"], theirs, NEAR_TIE[args.dtype])
        record["reference"] = theirs
        for side in (record["ours"], theirs):  # compared; too large to keep
            for key in ("trees", "tie_rule_trees", "cut_gaps"):
                side.pop(key, None)
    rows = summarize(records)
    settings = {k: v for k, v in job.items() if k != "prompts"} | dict(
        model_type=args.model_type, benches=args.benches, limit=args.limit, near_tie=NEAR_TIE[args.dtype],
        max_length=args.max_length, reference=args.reference_label)
    result = dict(date=datetime.date.today().isoformat(), torch=torch.__version__,
                  transformers=transformers.__version__, reference_transformers=reference["transformers"],
                  settings=settings, summary=rows, records=records)
    print_report(rows, records, f"Greedy, tree {args.total_token}/{args.depth}/{args.top_k}, "
                 f"{args.max_new_tokens} new tokens, {job['device']} {job['dtype']}, transformers "
                 f"{transformers.__version__} (this engine) / {reference['transformers']} (reference"
                 f"{', ' + args.reference_label if args.reference_label else ''}), {result['date']}")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
