"""Fixtures for the model-core and plug-in tests: a tokenizer and a tiny checkpoint on disk."""

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
