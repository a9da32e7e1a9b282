"""What makes ``tarkit predict`` resumable: each finished item is on disk at once and whole, and a re-run into the
same folder skips what is there.

Images are written through :func:`tarkit.resumable.atomic_write` (a kill leaves the old file or none, never half
a PNG), an item's folder gets its marker file last, and JSONL rows are appended a batch at a time and flushed to
disk. A row cut by a kill (the file's last line without its newline) is dropped with a warning when the file is
reopened, and its item is predicted again.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image

from tarkit.data import DataWarning
from tarkit.resumable import atomic_write
from tarkit_plugins.jsonl import read_jsonl


def save_image(image: Image.Image, path: str | Path) -> None:
    """``image`` as a PNG at ``path``, whole or not at all."""
    with atomic_write(path) as handle:
        image.save(handle, format="PNG")


def write_text(path: str | Path, text: str) -> None:
    """``text`` (UTF-8) at ``path``, whole or not at all: the marker of a finished item."""
    with atomic_write(path) as handle:
        handle.write(text.encode("utf-8"))


class ResumableJsonl:
    """A JSONL output that keeps the rows a previous, interrupted run wrote, and knows their keys.

    Args:
        path: the file; created with its folder on the first append.
        key: the field naming a row's item (``question_id``, ``image``): :attr:`done` holds the values seen.
    """

    def __init__(self, path: str | Path, key: str):
        self.path, self.key = Path(path), key
        self.done: set[Any] = set()
        if self.path.is_file():
            self._drop_torn_last_line()
            self.done = {row[key] for row in read_jsonl(self.path, required=(key,))}

    def _drop_torn_last_line(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            kept = data[: data.rfind(b"\n") + 1]
            warnings.warn(
                f"{self.path}: its last line was cut off (an interrupted run); dropped it, its item is predicted again",
                DataWarning,
                stacklevel=3,
            )
            with atomic_write(self.path) as handle:
                handle.write(kept)

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        """Add ``rows`` at the end of the file, on disk before this returns."""
        rows = list(rows)
        if not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
            handle.flush()
            os.fsync(handle.fileno())
        self.done.update(row[self.key] for row in rows)


def report_skipped(count: int, folder: str | Path) -> None:
    """One line on stderr when a re-run found items already complete in ``folder``."""
    if count:
        print(f"tarkit predict: {count} item(s) already complete in {folder} were skipped", file=sys.stderr)
