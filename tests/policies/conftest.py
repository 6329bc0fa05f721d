"""Fixtures for the model-core and plug-in tests: a tokenizer and a tiny checkpoint on disk,
and the tiny model with 8 LLM layers."""

from __future__ import annotations

import importlib.util

import pytest

from tests.tiny_vla import write_checkpoint, write_tokenizer

if importlib.util.find_spec("torch") is None:  # the model extra is not installed
    collect_ignore_glob = ["vla/test_*.py", "pruning/test_*.py"]


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tok")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer_file):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-oft", tokenizer_file)


@pytest.fixture(scope="module")
def model8():
    """The tiny model with 8 LLM layers (one per test module: tests may switch its graphs)."""
    import torch

    from policies.vla.config import replace_llm, tiny_config
    from policies.vla.model import OFTModel

    torch.manual_seed(0)
    return OFTModel(replace_llm(tiny_config(), num_layers=8)).eval()

@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty local Hugging Face Hub cache (offline) and a function that puts a checkpoint
    directory in it as ``hf download`` leaves one: blobs, a snapshot of links to them named by
    the commit, and the ref naming the commit."""
    import hashlib

    from huggingface_hub import constants

    root = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # a test never reaches for the network

    def add(repo: str, directory, ref: str = "main") -> str:
        commit = hashlib.sha1(f"{repo}@{ref}".encode()).hexdigest()
        stored = root / ("models--" + repo.replace("/", "--"))
        snapshot = stored / "snapshots" / commit
        (stored / "blobs").mkdir(parents=True, exist_ok=True)
        snapshot.mkdir(parents=True)
        for path in sorted(directory.iterdir()):
            blob = stored / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
            blob.write_bytes(path.read_bytes())
            (snapshot / path.name).symlink_to(blob)
        (stored / "refs").mkdir(exist_ok=True)
        (stored / "refs" / ref).write_text(commit)
        return commit

    return add
