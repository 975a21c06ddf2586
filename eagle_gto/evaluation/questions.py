"""Question and answer files (JSON lines) shared by `gen_answer` and `speed`."""

from __future__ import annotations

import json
from pathlib import Path

from ..files import write_atomically
from ..jsonl import read_jsonl

BENCHES = ("mt_bench", "humaneval", "gsm8k")
ALL = "all"  # the speed report's group of every question: no category may take its name
NO_CATEGORY = "(no category)"  # its group of the questions without one: nor this (it would merge with them)
CATEGORY_RULE = f"category must be a string other than {ALL!r} and {NO_CATEGORY!r}"
REPO_ROOT = Path(__file__).resolve().parents[2]


def default_data_dir() -> Path | None:
    """`shared/data` beside the repository, where the question sets live
    (they are not shipped inside the project); None when absent."""
    folder = REPO_ROOT.parent / "shared" / "data"
    return folder if folder.is_dir() else None


def question_file(bench: str, data_dir: str | Path | None = None) -> Path:
    """DATA_DIR/BENCH/question.jsonl, DATA_DIR defaulting to `default_data_dir()`."""
    folder = Path(data_dir) if data_dir is not None else default_data_dir()
    if folder is None:
        raise ValueError(f"no data directory: pass --data-dir (holding {bench}/question.jsonl) or --question-file")
    path = folder / bench / "question.jsonl"
    if not path.is_file():
        raise ValueError(f"question file not found: {path}")
    return path


def is_question_id(value) -> bool:
    """Question ids are JSON integers or strings (a file may mix them)."""
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def is_category(value) -> bool:
    """A question's category is a string, or none (null or absent): speed groups answers by it
    (a category named ALL would be counted into that group a second time, one named NO_CATEGORY
    merged with the questions that have none)."""
    return isinstance(value, (str, type(None))) and value not in (ALL, NO_CATEGORY)


def id_order(question_id: int | str) -> tuple:
    """Sort key of question ids: integers in order, then strings (the two do not compare)."""
    return isinstance(question_id, str), question_id


def check_question(question, path: Path) -> None:
    """Refuse a question gen_answer cannot answer turn by turn."""
    if not isinstance(question, dict) or not is_question_id(question.get("question_id")):
        raise ValueError(f"{path}: every question needs a question_id (an integer or a string)")
    turns = question.get("turns")
    # a string is iterable too: it would be answered one character per turn
    if not isinstance(turns, list) or not turns or not all(isinstance(turn, str) for turn in turns):
        raise ValueError(f"{path}: question {question['question_id']!r} needs a non-empty turns list "
                         f"of strings, not {turns!r:.60}")
    # it would be asked as nothing: an empty prompt stops the run part-way, without naming the question
    blank = next((number for number, turn in enumerate(turns, 1) if not turn.strip()), None)
    if blank is not None:
        raise ValueError(f"{path}: question {question['question_id']!r}: turn {blank} is empty (or only whitespace)")
    # gen_answer copies it into every answer, where speed would refuse it once both runs are done
    if not is_category(question.get("category")):
        raise ValueError(f"{path}: question {question['question_id']!r}: {CATEGORY_RULE}, "
                         f"not {question['category']!r:.60}")


def load_questions(path: str | Path, limit: int | None = None) -> list[dict]:
    """The questions of a file, all checked (also those past `limit`)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a question file: a folder of question sets goes to --data-dir "
                         f"(with --bench-name), a file such as {path / 'gsm8k' / 'question.jsonl'} to --question-file")
    if not path.is_file():
        raise ValueError(f"question file not found: {path}")
    questions = read_jsonl(path)
    if not questions:
        raise ValueError(f"{path} holds no questions")
    seen = set()
    for question in questions:
        check_question(question, path)
        if question["question_id"] in seen:  # answers are filed by id: one would replace the other
            raise ValueError(f"{path}: question id {question['question_id']!r} appears twice")
        seen.add(question["question_id"])
    return questions[:limit] if limit is not None else questions


def check_answer_records(answers: list, label: str) -> None:
    """Refuse records of an answer file (named by `label`) that are not answers:
    each needs a question_id, choices and, where it records them, settings as an object."""
    for answer in answers:
        if not isinstance(answer, dict) or not is_question_id(answer.get("question_id")):
            raise ValueError(f"{label}: every record needs a question_id (an integer or a string): "
                             f"is it an answer file?")
        # A question file has ids too: taken for answers, its questions would pass as answered, or be rewritten
        choices = answer.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise ValueError(f"{label}: question {answer['question_id']!r}: choices must be a non-empty list of "
                             f"objects (gen_answer's format): is it an answer file?")
        if not isinstance(answer.get("settings", {}), dict):
            raise ValueError(f"{label}: question {answer['question_id']!r}: settings must be an object")


def recorded_settings(answer: dict) -> dict:
    """The mode, model_id and `settings` an answer records, in one dict
    (gen_answer writes all three; the reference's answers only a model_id)."""
    recorded = {key: answer[key] for key in ("mode", "model_id") if key in answer}
    return {**recorded, **answer.get("settings", {})}


def answered_ids(path: str | Path, settings: dict, notes: dict | None = None) -> set:
    """Question ids already in an answer file (empty when it does not exist).
    Its answers must have been made with the given `settings` (e.g.
    mode="ea", max_new_tokens=1024), or resuming would mix two runs in one
    file; a setting an answer does not record (the reference's) passes.
    `notes`: said beside a setting that differs (how this run came to it)."""
    path = Path(path)
    answers = read_jsonl(path) if path.exists() else []
    check_answer_records(answers, str(path))
    differences = {}
    for answer in answers:
        recorded = recorded_settings(answer)
        for key, value in settings.items():
            if key in recorded and recorded[key] != value:
                note = f" ({notes[key]})" if key in (notes or {}) else ""
                differences.setdefault(key, f"{key} {recorded[key]!r} (question {answer['question_id']}), "
                                            f"not this run's {value!r}{note}")
    if differences:
        raise ValueError(f"{path} holds answers made with other settings: {'; '.join(differences.values())}: "
                         f"use another answer file")
    return {a["question_id"] for a in answers}


def sort_answers(path: str | Path) -> None:
    """Rewrite an answer file ordered by question id, one answer per id (the
    latest wins), as the reference does after a run."""
    latest = {a["question_id"]: a for a in read_jsonl(path)}
    lines = [json.dumps(latest[k], ensure_ascii=False) + "\n" for k in sorted(latest, key=id_order)]
    write_atomically(path, "".join(lines), ".sorting")  # an interrupted rewrite must not cut the answers short


def check_writable(path: str | Path) -> None:
    """Fail (OSError) before any answer is generated where the answer file
    cannot be written, leaving nothing new behind: a missing file (and its
    missing folders) is created and removed again, so that a start that fails
    later (a model that does not load) leaves no empty answer file; an
    existing one is opened for appending, never truncated."""
    path = Path(path)
    missing = [folder for folder in path.parents if not folder.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            with path.open("a", encoding="utf-8"):
                pass
        else:
            path.open("x", encoding="utf-8").close()
            path.unlink()
    finally:
        for folder in missing:  # innermost first: each is empty once the one inside it is gone
            if folder.exists():  # (mkdir may have failed part-way)
                folder.rmdir()


def append_answer(path: str | Path, record: dict) -> None:
    """Add one answer line, flushed at once so an interrupted run keeps
    every finished question (and can resume after it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    broken_tail = False
    if path.exists() and path.stat().st_size > 0:
        with path.open("rb") as f:
            f.seek(-1, 2)
            broken_tail = f.read(1) != b"\n"
    with path.open("a", encoding="utf-8") as f:
        if broken_tail:  # a half-written line: start on a fresh one so the new record stays readable
            f.write("\n")
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
