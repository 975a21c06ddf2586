"""Question and answer files (JSON lines) shared by `gen_answer` and `speed`."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

BENCHES = ("mt_bench", "humaneval", "gsm8k")
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


def read_jsonl(path: str | Path) -> list[dict]:
    """All records of a JSON-lines file. A line that does not parse (the
    half-written last line of an interrupted run) is skipped with a warning."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            warnings.warn(f"{path}:{number}: skipping a line that is not valid JSON")
    return records


def load_questions(path: str | Path, limit: int | None = None) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"question file not found: {path}")
    questions = read_jsonl(path)
    if not questions:
        raise ValueError(f"{path} holds no questions")
    for q in questions:
        if not isinstance(q, dict) or "question_id" not in q or not q.get("turns"):
            raise ValueError(f"{path}: every question needs a question_id and a non-empty turns list")
    return questions[:limit] if limit is not None else questions


def recorded_settings(answer: dict) -> dict:
    """The mode, model_id and `settings` an answer records, in one dict
    (gen_answer writes all three; the reference's answers only a model_id)."""
    recorded = {key: answer[key] for key in ("mode", "model_id") if key in answer}
    return {**recorded, **answer.get("settings", {})}


def answered_ids(path: str | Path, settings: dict) -> set:
    """Question ids already in an answer file (empty when it does not exist).
    Its answers must have been made with the given `settings` (e.g.
    mode="ea", max_new_tokens=1024), or resuming would mix two runs in one
    file; a setting an answer does not record (the reference's) passes."""
    path = Path(path)
    answers = read_jsonl(path) if path.exists() else []
    differences = {}
    for answer in answers:
        recorded = recorded_settings(answer)
        for key, value in settings.items():
            if key in recorded and recorded[key] != value:
                differences.setdefault(key, f"{key} {recorded[key]!r} (question {answer['question_id']}), "
                                            f"not this run's {value!r}")
    if differences:
        raise ValueError(f"{path} holds answers made with other settings: {'; '.join(differences.values())}: "
                         f"use another answer file")
    return {a["question_id"] for a in answers}


def sort_answers(path: str | Path) -> None:
    """Rewrite an answer file ordered by question id, one answer per id (the
    latest wins), as the reference does after a run."""
    latest = {a["question_id"]: a for a in read_jsonl(path)}
    lines = [json.dumps(latest[k], ensure_ascii=False) + "\n" for k in sorted(latest)]
    Path(path).write_text("".join(lines), encoding="utf-8")


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
