"""Checkpoints named by Hugging Face Hub repository id, found in the local Hub cache.

OpenVLA-OFT's evaluation takes its checkpoint as a repository id
(``moojink/openvla-7b-oft-finetuned-libero-spatial``). The same name works here once the
repository is in the local cache (``hf download REPO``): it resolves to that snapshot's
directory, offline. Nothing is fetched, so a run never waits on the network or downloads
15 GB unasked; the error for a repository not in the cache gives the command that fetches it.
``REPO@REVISION`` names a branch, tag or commit; without it, the cached ``main``.
"""

from __future__ import annotations

import re
from pathlib import Path

# owner/name as the Hub allows them, with an optional @revision
REPO_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")


class HubCacheError(ValueError):
    pass


def hub_repo_id(name: str) -> tuple[str, str | None] | None:
    """(repository, revision) if ``name`` reads as a repository id, else None."""
    match = REPO_ID.fullmatch(name)
    return (match["repo"], match["revision"]) if match else None


def cached_snapshot(repo: str, revision: str | None = None) -> tuple[Path, dict]:
    """The cached snapshot directory of ``repo`` and what identifies it: the repository and the
    commit the snapshot holds (the snapshot directory's name)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise HubCacheError(f"{repo} reads as a Hugging Face Hub repository, but huggingface_hub is not "
                            "installed to find it in the local cache (pip install huggingface_hub)") from None
    wanted = f"{repo}@{revision}" if revision else repo
    try:
        snapshot = Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except Exception as exc:  # the library's not-found errors vary with its version
        fetch = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
        raise HubCacheError(f"checkpoint directory {wanted} does not exist, and the local Hugging Face Hub cache "
                            f"holds no repository {wanted} ({type(exc).__name__}); fetch it with '{fetch}'") from None
    return snapshot, {"repo": repo, "revision": snapshot.name}
