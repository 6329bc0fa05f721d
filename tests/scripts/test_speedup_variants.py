"""The speedup comparison keeps every variant it measured when one variant fails (a compilation
error on a GPU machine, say), and the target report names the failure."""

import importlib.util
import json
import sys

import pytest

from tests.scripts import load_script

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="the model extra is not installed")


def test_a_failing_variant_is_recorded_and_the_others_kept(tmp_path, monkeypatch):
    variants = load_script("speedup_variants")
    measure = variants.measure

    def failing_compile(model, device, dtype, base, speedups):
        if speedups.compile_towers:
            raise RuntimeError("no C compiler found")
        return measure(model, device, dtype, base, speedups)

    monkeypatch.setattr(variants, "measure", failing_compile)
    save = tmp_path / "variants.json"
    monkeypatch.setattr(sys, "argv", ["speedup_variants.py", "--size", "tiny", "--device", "cpu", "--repeats", "2",
                                      "--warmup", "1", "--variants", "plain", "compiled towers", "fused gate/up",
                                      "--save", str(save)])
    assert variants.main() == 1
    rows = json.loads(save.read_text())["variants"]
    assert list(rows) == ["plain", "compiled towers", "fused gate/up"]
    assert rows["compiled towers"]["error"] == "RuntimeError: no C compiler found"
    assert "max_abs_diff" in rows["fused gate/up"] and "latency_ms" in rows["plain"]
    lines = load_script("device_targets").target_lines(tmp_path)
    assert "variant compiled towers: failed: RuntimeError: no C compiler found" in lines
    assert any(line.startswith("variant fused gate/up: OFT") for line in lines)
