"""JSONL files: read strictly (each malformed line named with its file and number), written one row a line."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tarkit.data import DataFormatError


def iter_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` of a JSONL file, so callers checking more than ``required`` can name the line too;
    blank lines skipped; a malformed line (JSON or UTF-8) or a missing field names file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file")
    with path.open("rb") as handle:  # decoded line by line, so bad UTF-8 is reported with its line
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(f"{path}:{number}: not UTF-8 ({err.reason}); save the file as UTF-8") from err
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{path}:{number}: not valid JSON ({err.msg}); fix or remove the line") from err
            if not isinstance(row, dict):
                raise DataFormatError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            missing = [key for key in required if key not in row]
            if missing:
                raise DataFormatError(f"{path}:{number}: missing field(s) {', '.join(missing)}")
            yield number, row


def read_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Rows of a JSONL file; blank lines skipped; a malformed line or a missing field names file and line."""
    return [row for _, row in iter_jsonl(path, required)]


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path
