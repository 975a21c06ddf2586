"""JSON-lines files: questions, answers, training data and metrics logs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path


def numbered_lines(path: str | Path) -> list[tuple[int, str]]:
    """(line number, line) for each non-blank line of a UTF-8 text file."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # (a BOM, as Windows editors write, is no JSON)
    except UnicodeDecodeError as err:  # its own message does not name the file
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    return [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]


def read_jsonl(path: str | Path) -> list:
    """All records of a JSON-lines file. A line that does not parse (the
    half-written last line of an interrupted run) is skipped with a warning."""
    records = []
    for number, line in numbered_lines(path):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            warnings.warn(f"{path}:{number}: skipping a line that is not valid JSON")
    return records


def read_log(path: str | Path) -> list[tuple[str, object]]:
    """(line, record) for each line of a log that an interrupted run may have
    left: a last line that does not parse (the write the interruption cut
    short) is dropped with a warning; one before it is an error naming it."""
    lines = numbered_lines(path)
    records = []
    for index, (number, line) in enumerate(lines):
        try:
            records.append((line, json.loads(line)))
        except json.JSONDecodeError as err:
            if index < len(lines) - 1:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg}); only the last line can be one an "
                                 "interruption cut short: fix or remove this one") from None
            warnings.warn(f"{path}:{number}: dropping a last line that is not valid JSON (a write cut short)")
    return records
