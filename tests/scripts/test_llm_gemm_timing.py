"""The LLM product timing script runs on the CPU with small weights and prints every product at
every token count, and one layer's total."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="the model extra is not installed")


def test_every_product_and_token_count_is_timed(tmp_path):
    save = tmp_path / "gemm.json"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "llm_gemm_timing.py"), "--device", "cpu", "--dims",
                           "tiny", "--tokens", "165", "599", "--autotune-tokens", "--repeats", "3", "--save", str(save)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(save.read_text())["rows"]
    assert {(r["product"], r["tokens"]) for r in rows} == {(p, t) for p in ("q/k/v fused", "o", "gate/up fused",
                                                                            "gate alone", "down") for t in (165, 599)}
    assert all(r["ms"] > 0 and r["gemm"] == "default" for r in rows)
    assert "one layer's products at 165 tokens, default" in done.stdout
