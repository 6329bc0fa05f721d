"""A run directory: ``manifest.json`` plus append-only ``episodes.jsonl``.

Each finished episode is one JSON line, written and fsynced before the next episode starts,
so a run killed at any moment loses at most the episode in flight. A torn last line (the
process died mid-write) is ignored on reading and cut off before appending.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
EPISODES = "episodes.jsonl"


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
    return json.loads(path.read_text())


def read_episodes(run_dir: Path) -> list[dict]:
    """Complete records only; a torn final line is skipped."""
    records, _ = _scan(Path(run_dir) / EPISODES)
    return records


def _scan(path: Path) -> tuple[list[dict], int]:
    """Records and the byte length of the valid prefix of the file."""
    if not path.exists():
        return [], 0
    records, valid = [], 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
            valid += len(line)
    return records, valid


class EpisodeLog:
    """Append-only writer for ``episodes.jsonl``."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / EPISODES
        records, valid = _scan(self.path)
        self.records = records
        self.done_keys = {r["key"] for r in records}
        if self.path.exists() and self.path.stat().st_size != valid:
            with open(self.path, "r+b") as f:  # drop the torn tail of a killed run
                f.truncate(valid)
        self._file = open(self.path, "a")

    def append(self, record: dict) -> None:
        if record["key"] in self.done_keys:
            raise RunDirError(f"episode {record['key']} is already recorded")
        self._file.write(json.dumps(record, sort_keys=True, allow_nan=False) + "\n")
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
