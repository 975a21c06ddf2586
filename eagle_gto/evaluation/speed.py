"""Compare a speculative and a plain answer file written by `gen_answer`.

    python -m eagle_gto.evaluation.speed --ea-file EA.jsonl --baseline-file BASE.jsonl [--out-dir DIR]

Questions are paired by question_id (ids present in only one file are left
out and listed; a file answering an id twice, as one joined by hand may, is
refused: gen_answer writes one answer per id); a pair whose question set (the `question_file` gen_answer
records), category or number of turns differ is refused: the files answer
different questions. So is a pair made with different settings where a fair
speedup needs the same: base model, prompt format, system prompt,
temperature, --max-new-tokens, --max-length, dtype (the one loaded, `dtype_used`,
where recorded), device (the draft head,
the tree, the seed, the mode and the model id may differ). A setting only
one side records (the reference's answers record none) passes. For question q and one side, T_q is the sum of new_tokens
over its turns, S_q the sum of wall_time and I_q the sum of (idxs + 1), the
number of iterations (target forwards, prefill included). Both sides come
from the same loop and are counted the same way. For a group of questions
(all of them, one category, or those whose answers record none: "(no category)",
a name no category may take):

- mean tokens/s of a side = mean over q of T_q / S_q;
- speedup = mean tokens/s with speculation / mean tokens/s plain, the ratio
  the reference's evaluation/speed.py prints;
- tokens/s of a side = sum T_q / sum S_q, and speedup_total = tokens/s with
  speculation / tokens/s plain: total tokens over total time (long answers
  weigh more);
- speedup_mean_of_ratios = mean over q of (T_q / S_q with speculation) /
  (T_q / S_q plain), kept for comparison (not what the reference reports);
- tau = sum T_q / sum I_q with speculation, tokens per iteration with the
  bonus token counted (plain decoding has exactly 1; reported as a check);
  the reference's answers (records without a mode) count no prefill in
  their idxs, so theirs is tokens per draft round, and the table says so;
- tau_per_round = tokens per draft-and-verify round from `accept_lengths`
  (accepted drafts + 1, prefill steps left out): the EAGLE reference's tau,
  a little above tau (by about (tau - 1) / rounds a turn).

Records carry the `mode` gen_answer ran in (records without one, such as the
reference's, are taken as they come): an --ea-file of baseline answers or a
--baseline-file of ea answers is refused, as is the same file given twice.
Bad input (also a record without the counts above, or with a question of no
tokens or no time) ends in one line `error: ...` and exit status 2.

Prints a table, writes `speed.json` (with the mode, model id and settings
of each side's first paired answer) and, with matplotlib, `speedup_tau.png`
(speedup and tau per category) and `accept_lengths.png`: the histogram of
tokens accepted per draft-and-verify iteration (accepted drafts + the bonus
token, before a stop token or the token budget cut the step), from the
answers' `accept_lengths`, prefill steps left out. From the same rounds it
prints the acceptance rate per draft position d: of the rounds whose first
d - 1 drafts were accepted, the share that accepted the d-th too (positions
below the longest round seen; the tree's depth, not the answers, bounds the rest).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

from ..jsonl import read_jsonl
from .questions import ALL, CATEGORY_RULE, NO_CATEGORY, check_answer_records, id_order, is_category, recorded_settings

# What a fair speedup holds fixed between the two runs (gen_answer's settings names).
SHARED_SETTINGS = ("base_model_path", "model_type", "system", "temperature", "max_new_tokens", "max_length",
                   "dtype", "device")
# The per-turn counts of a choice, and the JSON type of their entries.
COUNTS = {"new_tokens": int, "idxs": int, "wall_time": (int, float)}


def question_totals(answer: dict) -> dict:
    """T_q, S_q, I_q of one answer (its first choice), and its draft rounds
    and their tokens where it records `accept_lengths` (None otherwise)."""
    choice = answer["choices"][0]
    lengths = choice.get("accept_lengths")
    rounds = [n for turn in lengths for n in turn[1:]] if lengths else None  # (each turn's prefill left out)
    return {"tokens": sum(choice["new_tokens"]), "seconds": sum(choice["wall_time"]),
            "iterations": sum(i + 1 for i in choice["idxs"]),
            "rounds": None if rounds is None else len(rounds), "round_tokens": None if rounds is None else sum(rounds)}


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def reference_speedup(ea_speeds: list[float], baseline_speeds: list[float]) -> float:
    """The EAGLE reference's speedup: the mean of per-question (or per-prompt)
    tokens/s with speculation over the same mean of plain decoding."""
    return mean(ea_speeds) / mean(baseline_speeds)


def group_stats(pairs: list[tuple[dict, dict]]) -> dict:
    """Statistics of (speculative, plain) question totals, as in the module docstring."""
    def total(side: int, key: str) -> float:
        return sum(pair[side][key] for pair in pairs)

    ea_speeds = [ea["tokens"] / ea["seconds"] for ea, _ in pairs]
    base_speeds = [base["tokens"] / base["seconds"] for _, base in pairs]
    ea_tps = total(0, "tokens") / total(0, "seconds")
    base_tps = total(1, "tokens") / total(1, "seconds")
    return {
        "questions": len(pairs),
        "ea_tokens": total(0, "tokens"), "ea_seconds": total(0, "seconds"), "ea_iterations": total(0, "iterations"),
        "baseline_tokens": total(1, "tokens"), "baseline_seconds": total(1, "seconds"),
        "baseline_iterations": total(1, "iterations"),
        "ea_mean_tokens_per_second": mean(ea_speeds),
        "baseline_mean_tokens_per_second": mean(base_speeds),
        "ea_tokens_per_second": ea_tps,
        "baseline_tokens_per_second": base_tps,
        "speedup": reference_speedup(ea_speeds, base_speeds),
        "speedup_total": ea_tps / base_tps,
        "speedup_mean_of_ratios": mean([ea / base for ea, base in zip(ea_speeds, base_speeds)]),
        "tau": total(0, "tokens") / total(0, "iterations"),
        "baseline_tau": total(1, "tokens") / total(1, "iterations"),
        "tau_per_round": tau_per_round([ea for ea, _ in pairs]),
    }


def tau_per_round(totals: list[dict]) -> float | None:
    """Tokens per draft-and-verify round, the prefill left out: the EAGLE
    reference's tau (mean accepted drafts + 1); None where answers do not
    record their rounds (`accept_lengths`)."""
    if any(t["rounds"] is None for t in totals) or not sum(t["rounds"] for t in totals):
        return None
    return sum(t["round_tokens"] for t in totals) / sum(t["rounds"] for t in totals)


def check_mode(answers: list[dict], mode: str, side: str) -> None:
    """Refuse answers that gen_answer recorded in the other mode (files passed the wrong way round)."""
    wrong = [a["question_id"] for a in answers if a.get("mode", mode) != mode]
    if wrong:
        raise ValueError(f"the {side} answers hold records made in another mode than {mode!r} "
                         f"(question ids {wrong[:5]}): are --ea-file and --baseline-file swapped?")


def question_facts(answer: dict) -> dict:
    """What two answers to the same question share, where recorded."""
    facts = {"question set": answer.get("settings", {}).get("question_file"), "category": answer.get("category"),
             "number of turns": len(answer["choices"][0]["new_tokens"])}
    return {key: value for key, value in facts.items() if value is not None}


def shared_settings(answer: dict) -> dict:
    """The settings of an answer that a fair speedup holds fixed, where recorded."""
    settings = answer.get("settings", {})
    shared = {key: settings[key] for key in SHARED_SETTINGS if key in settings}
    if "dtype_used" in settings:  # the dtype loaded: --dtype auto and the name it resolved to compare alike
        shared["dtype"] = settings["dtype_used"]
    return shared


def differences(ea_facts: dict, base_facts: dict) -> list[str]:
    """Each fact recorded on both sides with different values, both named."""
    return [f"{key} {value!r} in --ea-file but {base_facts[key]!r} in --baseline-file"
            for key, value in ea_facts.items() if key in base_facts and base_facts[key] != value]


def check_pairs(ea: dict, base: dict, paired: list) -> None:
    """Refuse pairs that answer different questions under the same id (e.g.
    gsm8k and humaneval), or that were made with different SHARED_SETTINGS."""
    for qid in paired:
        different = differences(question_facts(ea[qid]), question_facts(base[qid]))
        if different:
            raise ValueError(f"question {qid}: {different[0]}: the two files answer different questions")
        different = differences(shared_settings(ea[qid]), shared_settings(base[qid]))
        if different:
            raise ValueError(f"question {qid}: the two files were made with different settings "
                             f"({'; '.join(different)}): their speeds do not compare")


def is_count(value, kind) -> bool:
    """A finite non-negative JSON number of the given type (true and false are not numbers here; Python's
    json reads Infinity, whose tokens per second, 0, would end in a division by zero)."""
    return isinstance(value, kind) and not isinstance(value, bool) and 0 <= value < math.inf


def answer_problem(answer: dict) -> str | None:
    """Why the speed report cannot use an answer (one of `check_answer_records`); None when it can."""
    choice = answer["choices"][0]
    for key, kind in COUNTS.items():
        values = choice.get(key)
        if not isinstance(values, list) or not values or not all(is_count(v, kind) for v in values):
            return f"{key} must be a non-empty list of finite non-negative numbers, one per turn"
    if len({len(choice[key]) for key in COUNTS}) > 1:
        return f"{', '.join(COUNTS)} must have the same number of turns"
    lengths = choice.get("accept_lengths", [])
    if not isinstance(lengths, list) or not all(
            isinstance(turn, list) and all(is_count(n, int) for n in turn) for turn in lengths):
        return "accept_lengths must be a list of lists of non-negative integers"
    if not is_category(answer.get("category")):
        return CATEGORY_RULE
    if sum(choice["new_tokens"]) == 0 or sum(choice["wall_time"]) == 0:  # tokens/s would be 0 or undefined
        return "no new tokens or no wall time: tokens per second are undefined"
    return None


def check_one_answer_per_question(answers: list[dict], label: str) -> None:
    """Refuse a question id answered twice (gen_answer writes one answer per id; a file joined by
    hand may hold two): pairing by id would silently count only the last."""
    first_record: dict = {}
    for number, answer in enumerate(answers, 1):
        qid = answer["question_id"]
        if qid in first_record:
            raise ValueError(f"{label}: question id {qid!r} is answered twice (records {first_record[qid]} and "
                             f"{number}): keep one answer per question")
        first_record[qid] = number


def read_answers(path: str | Path, option: str) -> list[dict]:
    """The answers of one file, refused with the file named when it is missing,
    empty or holds records that are not answers."""
    if not Path(path).is_file():
        raise ValueError(f"{option} {path}: no such file")
    answers = read_jsonl(path)
    if not answers:
        raise ValueError(f"{option} {path} holds no answers")
    check_answer_records(answers, f"{option} {path}")
    check_one_answer_per_question(answers, f"{option} {path}")
    for answer in answers:
        problem = answer_problem(answer)
        if problem:
            raise ValueError(f"{option} {path}: question {answer['question_id']!r}: {problem}")
    return answers


def summarize(ea_answers: list[dict], baseline_answers: list[dict]) -> dict:
    """The speed report of two answer lists (see the module docstring)."""
    check_mode(ea_answers, "ea", "speculative (--ea-file)")
    check_mode(baseline_answers, "baseline", "plain (--baseline-file)")
    ea = {a["question_id"]: a for a in ea_answers}
    base = {a["question_id"]: a for a in baseline_answers}
    paired = sorted(ea.keys() & base.keys(), key=id_order)
    if not paired:
        raise ValueError("the two answer files have no question id in common")
    check_pairs(ea, base, paired)
    by_group: dict[str, list] = {ALL: []}
    histogram: Counter = Counter()
    for qid in paired:
        pair = (question_totals(ea[qid]), question_totals(base[qid]))
        # (an empty category would print as a nameless row: it counts as none)
        category = ea[qid].get("category") or base[qid].get("category") or NO_CATEGORY
        by_group[ALL].append(pair)
        by_group.setdefault(category, []).append(pair)
        for lengths in ea[qid]["choices"][0].get("accept_lengths", []):
            histogram.update(lengths[1:])  # the prefill yields one token without drafting
    return {
        "questions": len(paired),
        "unpaired": sorted(ea.keys() ^ base.keys(), key=id_order),
        # gen_answer writes one set of settings per file: its first paired answer's
        "settings": {"ea": recorded_settings(ea[paired[0]]), "baseline": recorded_settings(base[paired[0]])},
        "groups": {name: group_stats(pairs) for name, pairs in by_group.items()},
        # gen_answer's idxs count the prefill as an iteration; the reference's (records without a mode) do not
        "tau_counts_prefill": all("mode" in ea[qid] for qid in paired),
        "accept_length_histogram": {str(k): histogram[k] for k in sorted(histogram)},
        "acceptance_per_position": acceptance_per_position(histogram),
    }


def acceptance_per_position(histogram: Counter) -> dict[str, float]:
    """{d: rounds that accepted d drafts / rounds that accepted d - 1}, for d
    below the longest round (a round of length n accepted n - 1 drafts)."""
    longest = max(histogram, default=0)
    reached = {d: sum(count for length, count in histogram.items() if length >= d) for d in range(1, longest + 1)}
    return {str(d): reached[d + 1] / reached[d] for d in range(1, longest)}


def format_table(summary: dict) -> str:
    width = max(14, 2 + max(len(name) for name in summary["groups"]))  # the longest category keeps its row aligned
    header = (f"{'category':<{width}}{'n':>5}{'tok/s EA':>11}{'tok/s base':>12}{'speedup':>9}{'(total)':>9}{'tau':>7}"
              f"{'tau/round':>11}")
    lines = [header, "-" * len(header)]
    for name, g in summary["groups"].items():
        per_round = "-" if g["tau_per_round"] is None else f"{g['tau_per_round']:.2f}"
        lines.append(f"{name:<{width}}{g['questions']:>5}{g['ea_mean_tokens_per_second']:>11.2f}"
                     f"{g['baseline_mean_tokens_per_second']:>12.2f}{g['speedup']:>9.3f}{g['speedup_total']:>9.3f}"
                     f"{g['tau']:>7.2f}{per_round:>11}")
    tau = "tokens per target forward, prefill counted" if summary["tau_counts_prefill"] else \
        "tokens per draft round (the reference's answers count no prefill iteration)"
    lines.append("tok/s: mean over questions; speedup: their ratio (as the reference); "
                 "(total): total tokens / total time, EA over plain;\n"
                 f"tau: {tau}; tau/round: tokens per draft round (the reference's)")
    if NO_CATEGORY in summary["groups"]:
        count = summary["groups"][NO_CATEGORY]["questions"]
        which = "the question" if count == 1 else f"the {count} questions"
        lines.append(f"{NO_CATEGORY}: {which} whose answers record no category (in neither file)")
    return "\n".join(lines)


def plot(summary: dict, out_dir: Path) -> list[Path]:
    """Bar charts of speedup and tau per category, and the accept-length histogram."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    names = list(summary["groups"])
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(names) * 2), 4))
    speedup_title = "speedup (mean tok/s EA / mean tok/s plain)"
    for ax, key, title in ((axes[0], "speedup", speedup_title), (axes[1], "tau", "tau")):
        values = [summary["groups"][n][key] for n in names]
        ax.bar(names, values, color=["tab:gray"] + ["tab:blue"] * (len(names) - 1))
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=45)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    paths = [out_dir / "speedup_tau.png", out_dir / "accept_lengths.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    hist = summary["accept_length_histogram"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([int(k) for k in hist], list(hist.values()))
    ax.set_xlabel("tokens accepted per iteration (accepted drafts + 1)")
    ax.set_ylabel("iterations")
    counted = "tau incl. prefill" if summary["tau_counts_prefill"] else "tau"
    ax.set_title(f"draft-and-verify iterations ({counted} = {summary['groups'][ALL]['tau']:.2f})")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def main(argv=None) -> dict:
    """Print the table, write speed.json and the plots; returns the summary.
    Bad input raises ValueError."""
    p = argparse.ArgumentParser(prog="python -m eagle_gto.evaluation.speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--ea-file", required=True, help="answers with speculation (gen_answer --mode ea)")
    p.add_argument("--baseline-file", required=True, help="answers with plain decoding (--mode baseline)")
    p.add_argument("--out-dir", help="where speed.json and the plots go (default: beside --ea-file)")
    args = p.parse_args(argv)
    if Path(args.ea_file).resolve() == Path(args.baseline_file).resolve():
        raise ValueError(f"--ea-file and --baseline-file are the same file ({args.ea_file})")
    summary = summarize(read_answers(args.ea_file, "--ea-file"), read_answers(args.baseline_file, "--baseline-file"))
    summary.update(ea_file=str(args.ea_file), baseline_file=str(args.baseline_file))
    out_dir = Path(args.out_dir or Path(args.ea_file).parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(format_table(summary))
    if summary["acceptance_per_position"]:
        print("acceptance per draft position (accepted / reached): "
              + "  ".join(f"{d}: {rate:.2f}" for d, rate in summary["acceptance_per_position"].items()))
    if summary["unpaired"]:
        print(f"left out (answered in one file only): {summary['unpaired']}")
    (out_dir / "speed.json").write_text(json.dumps(summary, indent=2) + "\n")
    try:
        paths = plot(summary, out_dir)
        print("plots: " + ", ".join(str(p) for p in paths))
    except ImportError:
        print("matplotlib is not installed (pip install 'eagle-gto[eval]'): no plots")
    print(f"summary: {out_dir / 'speed.json'}")
    return summary


def cli(argv=None) -> int:
    """The command line: bad input ends in one line `error: ...` and exit status 2."""
    try:
        main(argv)
    except (ValueError, OSError) as err:  # OSError: a file that cannot be read or written
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
