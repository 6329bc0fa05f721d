"""The speedups the GPU script carries forward: the fastest OFT variant whose actions stay within
the tolerance of plain, never a failed one, and none when nothing qualifies."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("best_speedups", REPO / "scripts" / "best_speedups.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(speedups, oft_ms, diff):
    return {"speedups": speedups, "latency_ms": {"oft": {"p50": oft_ms}, "lightvla": {"p50": oft_ms / 2}},
            "max_abs_diff": {"oft": diff, "lightvla": diff / 2}}


VARIANTS = {
    "plain": _row([], 20.0, 0.0),
    "parallel towers": _row(["parallel_towers"], 19.5, 0.0),
    "compiled LLM chains": _row(["compile_kernels"], 18.0, 0.2),  # fastest, but changes the actions
    "all": {"speedups": ["compile_kernels", "compile_towers"], "error": "RuntimeError: no C compiler"},
}


def test_the_fastest_within_the_tolerance_wins():
    best = _module().best_variant(VARIANTS, tolerance=0.05)
    assert best[0] == "parallel towers"
    assert _module().best_variant(VARIANTS, tolerance=0.5)[0] == "compiled LLM chains"


def test_nothing_measured_gives_none():
    assert _module().best_variant({"all": VARIANTS["all"]}, tolerance=0.05) is None


def test_the_command_prints_what_bench_profile_takes(tmp_path):
    path = tmp_path / "variants.json"
    path.write_text(json.dumps({"variants": VARIANTS}))
    run = [sys.executable, str(REPO / "scripts" / "best_speedups.py")]
    done = subprocess.run(run + [str(path)], capture_output=True, text=True, check=True)
    assert done.stdout == "parallel_towers\n" and "parallel towers" in done.stderr
    missing = subprocess.run(run + [str(tmp_path / "none.json")], capture_output=True, text=True, check=True)
    assert missing.stdout == "\n" and "no such file" in missing.stderr
