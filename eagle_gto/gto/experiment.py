"""GTO against continued token-level training, with ablations, on the demo
pair (the option sweep that chose the defaults is sweep.py).

    python -m eagle_gto.gto experiment --out runs/gto-experiment [training options] [--ship]

Every run starts from the same head (the demo EAGLE-3 head by default), sees
the same training windows in the same order and takes the same number of
optimizer steps:
- control: L_token only (continued EAGLE-3 training);
- gto: L_token + omega * L_GTO (smooth max, debiased by the frozen start head);
- gto-no-debias, gto-mean, gto-max: the ablations, each gto with one option changed.
RUNS sets objective, reward and debias for every run, so the command refuses them.
Then tau (greedy decoding, 60/7/10 by default, `model.last_stats`: generated
tokens / target forwards over a prompt set) of the start head and of every
trained head on the held-out stdlib prompts and the HumanEval prompts of
`eagle_gto.demo.measure`, always on the CPU in float32 (EVALUATION).
Training never sees either prompt set.
Each finished run keeps its result in OUT/RUN/result.json (the start head's
in OUT/start.json), and the settings that produced it beside it
(result.settings.json, start.settings.json): rerunning the same command
resumes after the last one; a command with other settings is refused.
`--ship` copies the GTO head into eagle_gto/demo/assets/gto and writes
assets/heads.json naming the better of eagle3 and gto as the demo default.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
import shutil
import time
from pathlib import Path

import torch

from ..train.outputs import check_new_out
from ..tree import check_tree_params
from .trainer import GTOConfig, check_data, load_models, load_streams, resolve_device, train

# Every run names every option that makes it what its name says, so no command-line value can change what a run
# labelled "gto" (and shipped as the GTO head) is: `experiment` refuses these options (RUN_OPTIONS).
GTO_RUN = dict(objective="gto", reward="smoothmax", debias=True)
RUNS = {
    "control": {**GTO_RUN, "objective": "token"},  # L_token only: reward and debias are not read
    "gto": GTO_RUN,
    "gto-no-debias": {**GTO_RUN, "debias": False},
    "gto-mean": {**GTO_RUN, "reward": "mean"},
    "gto-max": {**GTO_RUN, "reward": "max"},
}
RUN_OPTIONS = {name: f"experiment sets {name} per run ({', '.join(f'{run}: {o[name]}' for run, o in RUNS.items())}); "
               "choose runs with --runs, or train one setting with `python -m eagle_gto.gto`" for name in GTO_RUN}
EVALUATION = dict(device="cpu", dtype="float32")  # where evaluate() measures tau, whatever --device and --dtype


def accepted_length(model, prompts: list[list[int]], max_new_tokens: int) -> float:
    """tau over a prompt set: generated tokens / target forwards (the bonus
    token counted, the prefill a forward), pooled over the prompts as
    `eagle_gto.demo.measure` counts it."""
    new_tokens = iterations = 0
    for prompt in prompts:
        model.eagenerate(torch.tensor([prompt]), max_new_tokens=max_new_tokens)
        new_tokens += model.last_stats.new_tokens
        iterations += model.last_stats.iterations
    return new_tokens / iterations


def humaneval_file(given: Path | None) -> Path | None:
    """The HumanEval questions to measure on. A file given with --humaneval
    must exist (a typo would silently drop the set); the default, shared/data
    beside the repository (`eagle_gto.demo.measure.DEFAULT_HUMANEVAL`,
    absent outside that layout), is skipped with a note when missing."""
    from ..demo.measure import DEFAULT_HUMANEVAL

    if given is not None:
        if not given.is_file():
            raise ValueError(f"--humaneval {given}: no such file")
        return given.resolve()
    if DEFAULT_HUMANEVAL.is_file():
        return DEFAULT_HUMANEVAL
    print(f"{DEFAULT_HUMANEVAL} not found: HumanEval skipped (--humaneval FILE measures it)", flush=True)
    return None


def file_record(path: Path | None) -> dict | None:
    """Which file a measurement read: its path, size and sha256 (a changed file is other settings)."""
    if path is None:
        return None
    data = path.read_bytes()
    return {"path": str(path), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def prompt_sets(tokenizer, humaneval: Path | None, limit: int) -> dict[str, list[list[int]]]:
    from ..demo.measure import heldout_prompts, humaneval_prompts

    sets = {"heldout": heldout_prompts(tokenizer)[:limit]}
    if humaneval is not None:
        sets["humaneval"] = humaneval_prompts(humaneval, tokenizer)[:limit]
    return sets


def evaluate(base_path: str, head_path: str, sets: dict, tree: tuple[int, int, int], max_new_tokens: int) -> dict:
    """tau of every set, on the CPU in float32 (EVALUATION), whatever device and dtype the heads trained with."""
    from .. import EaModel

    total_token, depth, top_k = tree
    model = EaModel.from_pretrained(base_path, head_path, total_token=total_token, depth=depth, top_k=top_k,
                                    dtype=getattr(torch, EVALUATION["dtype"]))  # no device_map: on the CPU
    return {name: accepted_length(model, prompts, max_new_tokens) for name, prompts in sets.items()}


def table(results: dict, names: list[str]) -> str:
    sets = list(next(iter(results.values()))["tau"])
    control = results.get("control", {}).get("tau")
    lines = ["| head | " + " | ".join(f"tau {s}" for s in sets) + " | mean | vs control |",
             "|---|" + "---|" * (len(sets) + 2)]
    for name in names:
        tau = results[name]["tau"]
        mean = sum(tau.values()) / len(tau)
        versus = f"{100 * (mean / (sum(control.values()) / len(control)) - 1):+.1f}%" if control else "-"
        lines.append(f"| {name} | " + " | ".join(f"{tau[s]:.3f}" for s in sets) + f" | {mean:.3f} | {versus} |")
    return "\n".join(lines)


def ship(run_dir: Path, results: dict, settings: dict) -> None:
    """GTO head -> assets/gto (its export is float16); heads.json names the better default."""
    from ..demo import ASSETS

    target = ASSETS / "gto"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(run_dir / "head", target)
    (target / "gto_training.json").write_text(json.dumps({**settings, "results": results}, indent=2) + "\n")
    mean = {name: sum(results[key]["tau"].values()) / len(results[key]["tau"])
            for name, key in (("eagle3", "start"), ("gto", "gto"))}
    index = {"default": max(mean, key=mean.get),
             "tau": {"eagle3": results["start"]["tau"], "gto": results["gto"]["tau"]},
             "measured": settings["measured"], "date": settings["date"]}
    (ASSETS / "heads.json").write_text(json.dumps(index, indent=2) + "\n")
    (target / "README.md").write_text(_head_readme(settings, results, index["default"]))


def _head_readme(settings: dict, results: dict, default: str) -> str:
    t, names = {**settings["training"], **settings["runs"]["gto"]}, [name for name in results if name != "start"]
    verdict = ("better than the EAGLE-3 head: it is the demo default" if default == "gto" else
               "not better than the EAGLE-3 head, so `../heads.json` keeps `eagle3` as the demo default")
    return f"""# Demo GTO head

The demo EAGLE-3 head (`../eagle3`) fine-tuned with Group Tree Optimization (Phase II) for the
base model in `../base`, by

    {settings["command"]}

- Training: {t["steps"]} AdamW steps (lr {t["lr"]}), {t["windows"]} windows of {t["window_length"]} tokens
  per step, {t["groups_per_window"]} groups of m = {t["group_size"]} adjacent roots per window;
  L_token + {t["omega"]} * L_GTO, reward {t["reward"]} (eta {t["eta"]}), debiased: {t["debias"]},
  delta {t["delta"]}, eps {t["eps"]}, training trees {t["total_token"]}/{t["depth"]}/{t["top_k"]}.
- Exported in the EAGLE-3 format, {t["export_dtype"]} weights; {settings["device"]}, {settings["date"]}.
- tau (greedy, {"/".join(str(v) for v in settings["measured"]["tree"].values())}, \
{settings["measured"]["max_new_tokens"]} new tokens; {settings["evaluation"]}) vs the start head and the runs
  {", ".join(names)}:

{table(results, ["start"] + names)}

This head is {verdict}; `demo_paths(head="gto")` loads it. `gto_training.json` has every option,
the measurement settings and all results.
"""


def main(argv: list[str] | None = None) -> None:
    from .__main__ import checkpoint_options, config_from, config_parser, input_errors

    parser = config_parser("GTO vs continued token-level training (and ablations) on one start head. Each run sets "
                           f"{', '.join(RUN_OPTIONS)} itself (see --runs).", " experiment", fixed=RUN_OPTIONS,
                           out_help="output folder: start.json, a folder per run (its head/, metrics, result.json), "
                                    "results.json, results.md")
    checkpoint_options(parser, refused="experiment keeps no checkpoints: it keeps each finished run's result, so "
                       "rerunning the same command resumes after the last finished run")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    parser.add_argument("--limit", type=int, default=16, help="prompts per evaluation set")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per evaluation prompt")
    parser.add_argument("--eval-tree", default="60,7,10", help="total_token,depth,top_k of the tau measurement")
    parser.add_argument("--humaneval", type=Path, help="HumanEval question.jsonl (must exist); none: "
                        "shared/data/humaneval/question.jsonl beside the repository, skipped with a note when "
                        "missing")
    parser.add_argument("--ship", action="store_true", help="install the GTO head as the demo's gto head")
    parser.set_defaults(out="runs/gto-experiment", export_dtype="float16")
    args = parser.parse_args(argv)
    with input_errors(" experiment"):
        names = [n.strip() for n in args.runs.split(",") if n.strip()]
        unknown = set(names) - set(RUNS)
        if unknown:
            raise ValueError(f"unknown runs {', '.join(sorted(unknown))}; choose from {', '.join(RUNS)}")
        if args.ship and "gto" not in names:  # found now, not after hours of the other runs
            raise ValueError("--ship needs the gto run in --runs")
        for flag in ("limit", "max_new_tokens"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
        tree = eval_tree(args.eval_tree)
        humaneval = humaneval_file(args.humaneval)
        options = config_from(args).recorded_options()
        out = Path(options.pop("out"))
        check_new_out(out)
        check_data(GTOConfig(**options))  # before the models load
    torch.manual_seed(options["seed"])
    started = time.perf_counter()
    with input_errors(" experiment"):
        models = load_models(GTOConfig(**options))
        eval_tree(args.eval_tree, models.head.config.draft_vocab_size)  # every head shares the start head's
    base_path = models.base.name_or_path
    head_path = options["head"] or _demo_head_path()
    sets = prompt_sets(models.tokenizer, humaneval, args.limit)
    measured = {"tree": dict(zip(("total_token", "depth", "top_k"), tree)), "greedy": True,
                "max_new_tokens": args.max_new_tokens, "prompts": {k: len(v) for k, v in sets.items()},
                "humaneval": file_record(humaneval), **EVALUATION}
    # The settings each result depends on: a kept result is reused only when they match (checked up front).
    made_by = {"start": {"base": base_path, "head": head_path, "measured": measured},
               **{name: {"training": {**options, **RUNS[name]}, "measured": measured} for name in names}}
    files = {"start": out / "start.json", **{name: out / name / "result.json" for name in names}}
    with input_errors(" experiment"):
        for name, path in files.items():
            _check_kept(path, made_by[name])
    results = {"start": _kept(files["start"], made_by["start"], lambda: {
        "tau": evaluate(base_path, head_path, sets, tree, args.max_new_tokens)})}
    print("start", results["start"], flush=True)
    streams = None
    for name in names:

        def run(name=name):
            nonlocal streams
            with input_errors(" experiment"):  # e.g. too little --data for the windows
                streams = streams or load_streams(GTOConfig(**options), models)  # every run sees the same data
            cfg = GTOConfig(**{**options, **RUNS[name], "out": str(out / name)})
            run_started = time.perf_counter()
            with input_errors(" experiment"):  # (a diverged run: one line)
                summary = train(cfg, load_models(cfg, models), streams)
            return {"tau": evaluate(base_path, str(out / name / "head"), sets, tree, args.max_new_tokens),
                    "train": summary, "seconds": round(time.perf_counter() - run_started, 1)}

        results[name] = _kept(files[name], made_by[name], run)
        print(name, results[name], flush=True)
    settings = {
        "command": "python -m eagle_gto.gto experiment " + " ".join(argv if argv is not None else []),
        "training": {k: v for k, v in options.items() if k not in RUN_OPTIONS},  # the options all runs share
        "runs": {name: RUNS[name] for name in names},
        "measured": measured,
        "date": datetime.date.today().isoformat(),
        "device": training_device(GTOConfig(**options)),
        "evaluation": f"tau measured on the {EVALUATION['device'].upper()} in {EVALUATION['dtype']} "
                      "(whatever the training device and --dtype)",
        "seconds": round(time.perf_counter() - started, 1),
    }
    report = table(results, ["start"] + names)
    (out / "results.json").write_text(json.dumps({**settings, "results": results}, indent=2) + "\n")
    (out / "results.md").write_text(report + "\n")
    print(report)
    if args.ship:
        ship(out / "gto", results, settings)


def training_device(cfg: GTOConfig) -> str:
    """The device the runs trained on, in words (the base model's dtype with it)."""
    device = torch.device(resolve_device(cfg))
    if device.type == "cpu":
        name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    elif device.type == "cuda":
        name = f"{torch.cuda.get_device_name(device)} ({device})"
    else:
        name = str(device)
    return f"trained on {name}, base in {cfg.base_dtype}"


def eval_tree(text: str, draft_vocab_size: int | None = None) -> tuple[int, int, int]:
    """--eval-tree total_token,depth,top_k, a tree the engine can build (with a head of `draft_vocab_size`)."""
    try:
        total_token, depth, top_k = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--eval-tree {text!r}: expected three whole numbers total_token,depth,top_k") from None
    try:
        check_tree_params(total_token, depth, top_k, draft_vocab_size)
    except ValueError as err:
        raise ValueError(f"--eval-tree {text!r}: {err}") from None
    return total_token, depth, top_k


def _kept(path: Path, settings: dict, compute) -> dict:
    """A finished run's result from its file, so that an interrupted
    experiment resumes where it stopped (the data is deterministic); the
    settings that produced it are written beside it (main first checks,
    with _check_kept, that a kept result was made with `settings`)."""
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _check_kept(path: Path, settings: dict) -> None:
    """A kept result stands for `settings` only if they produced it:
    otherwise it would be reported (and shipped) under the wrong settings."""
    if not path.is_file():
        return
    made = path.with_suffix(".settings.json")
    if not made.is_file():
        raise ValueError(f"{path} has no record of the settings that produced it ({made.name}): "
                         "choose another --out")
    changed = differences(json.loads(made.read_text()), json.loads(json.dumps(settings)))
    if changed:
        raise ValueError(f"{path} was made with other settings: {'; '.join(changed)}. Rerun with its settings, "
                         "or choose another --out")


def differences(then: dict, now: dict, prefix: str = "") -> list[str]:
    """'key (value then, value now)' for every setting that differs, nested keys dotted (also what a sweep point's
    folder was made with against its options now, in sweep.py)."""
    changed = []
    for key in dict.fromkeys([*then, *now]):
        a, b = then.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key} ({a!r} then, {b!r} now)")
    return changed


def _demo_head_path() -> str:
    from ..demo import demo_paths

    return demo_paths(head="eagle3")[1]
