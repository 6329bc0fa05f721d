"""A run directory: ``manifest.json`` plus append-only ``episodes.jsonl``.

Each finished episode is one JSON line, written and fsynced before the next episode starts,
so a run killed at any moment loses at most the episode in flight. A torn last line (the
process died mid-write: no newline) is ignored on reading and cut off before appending; a
finished line that does not parse is an error, so that no recorded episode is dropped unseen.
One process at a time appends to a run (a lock on the file). The one rewrite is
``withdraw_errors`` (``bench run --resume DIR --retry-errors``), and only after the records it
takes out are kept in ``retried_errors.jsonl``.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
EPISODES = "episodes.jsonl"
RETRIED_ERRORS = "retried_errors.jsonl"  # records of error episodes that were run again


class RunDirError(RuntimeError):
    pass


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(run_dir: Path) -> dict:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise RunDirError(f"{run_dir} is not a run directory: {MANIFEST} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunDirError(f"{path} is not valid JSON: {exc}") from None


def read_episodes(run_dir: Path) -> list[dict]:
    """Complete records only; a torn final line is skipped."""
    records, _ = _scan(Path(run_dir) / EPISODES)
    return records


def _scan(path: Path) -> tuple[list[dict], int]:
    """Records and the byte length of the valid prefix of the file: all of it but a torn last line."""
    if not path.exists():
        return [], 0
    records, valid = [], 0
    with open(path, "rb") as f:
        lines = f.readlines()
    for number, line in enumerate(lines, 1):
        if not line.endswith(b"\n"):  # only the last line can be unfinished
            break
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            # A finished line (its newline is written last) that does not parse was damaged after
            # it was written, not torn by a kill: cutting it would drop a recorded episode.
            follow = f" and {len(lines) - number} more line(s) follow it" if number < len(lines) else ""
            raise RunDirError(f"{path}, line {number}, is damaged{follow}; repair or remove that line "
                              "(nothing was changed)") from None
        valid += len(line)
    return records, valid


def _line(record: dict) -> str:
    return json.dumps(record, sort_keys=True, allow_nan=False) + "\n"


def _write_lines(path: Path, records: list[dict], mode: str) -> None:
    with open(path, mode) as f:
        f.writelines(_line(r) for r in records)
        f.flush()
        os.fsync(f.fileno())


class EpisodeLog:
    """Append-only writer for ``episodes.jsonl``."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / EPISODES
        self._file = self._open_locked()
        try:
            records, valid = _scan(self.path)
        except RunDirError:
            self._file.close()
            raise
        self.records = records
        self.done_keys = {r["key"] for r in records}
        if self.path.stat().st_size != valid:
            self._file.truncate(valid)  # drop the torn tail of a killed run

    def _open_locked(self):
        file = open(self.path, "a")
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            raise RunDirError(f"{self.path.parent} is in use: another process is running episodes into it") from None
        except OSError as exc:  # a file system without locks: run, but say what is not guarded
            print(f"warning: {self.path} cannot be locked ({exc}); do not run two processes into this run",
                  file=sys.stderr)
        return file

    def withdraw_errors(self) -> list[dict]:
        """Take the episodes recorded as errors out of the run so that they run again (a server
        or a GL context that failed for a while). Their records are kept: appended to
        ``retried_errors.jsonl`` first, before ``episodes.jsonl`` is replaced by the others."""
        errors = [r for r in self.records if r["outcome"] == "error"]
        if not errors:
            return []
        kept = [r for r in self.records if r["outcome"] != "error"]
        _write_lines(self.path.parent / RETRIED_ERRORS, errors, "a")
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        _write_lines(tmp, kept, "w")
        os.replace(tmp, self.path)
        previous, self._file = self._file, self._open_locked()  # the new file, locked before the old lets go
        previous.close()
        self.records, self.done_keys = kept, {r["key"] for r in kept}
        return errors

    def append(self, record: dict) -> None:
        if record["key"] in self.done_keys:
            raise RunDirError(f"episode {record['key']} is already recorded")
        self._file.write(_line(record))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.records.append(record)
        self.done_keys.add(record["key"])

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
