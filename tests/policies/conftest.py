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
