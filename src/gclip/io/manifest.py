"""The run's JSON-lines manifest: appended one durable line per image, compacted on start and at the end."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

from .outputs import atomic_path, output_error

__all__ = ["Manifest", "manifest_name"]


def manifest_name(shard: tuple[int, int] | None = None) -> str:
    """``manifest.jsonl``, or ``manifest-00003-of-00008.jsonl`` for shard 3 of 8."""
    if shard is None or shard[1] == 1:
        return "manifest.jsonl"
    return f"manifest-{shard[0]:05d}-of-{shard[1]:05d}.jsonl"


class Manifest:
    """A JSON-lines file with one record per image, keyed by the record's ``"key"``.

    Records are appended with flush + fsync, so a killed run loses at most the line being written; a cut
    line is dropped when the file is read back. :meth:`compact` rewrites the file atomically with one record
    per key (the last one written wins), sorted by key, so a resumed run ends with the same file as an
    uninterrupted one.

    >>> m = Manifest("out/manifest.jsonl")  # doctest: +SKIP
    >>> m.append({"key": "a/x", "path": "a/x.jpg"}); m.compact()  # doctest: +SKIP
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: IO[str] | None = None

    def read(self) -> dict[str, dict[str, Any]]:
        """The records by key (last wins); lines that are not whole JSON objects are skipped."""
        records: dict[str, dict[str, Any]] = {}
        if not self.path.is_file():
            return records
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and "key" in record:
                    records[str(record["key"])] = record
        return records

    def compact(self) -> dict[str, dict[str, Any]]:
        """Rewrite the file (atomically) with one record per key, sorted by key; returns the records."""
        self.close()
        records = self.read()
        if records or self.path.exists():
            with atomic_path(self.path) as tmp:
                with open(tmp, "w", encoding="utf-8") as f:
                    for key in sorted(records):
                        f.write(json.dumps(records[key], ensure_ascii=False, sort_keys=True) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
        return records

    def append(self, record: dict[str, Any]) -> None:
        """Append one record durably (flush + fsync).

        Raises:
            OutputError: the line cannot be written (a cut line is dropped when the file is read back).
        """
        try:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open across appends
            self._file.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as e:
            raise output_error(self.path, e) from e

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
