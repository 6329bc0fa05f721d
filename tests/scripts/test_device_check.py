"""The GPU measurement script, run end to end on the tiny model on the CPU: device time is
scarce, so a step that would fail there should fail here first."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="the model extra is not installed")


def test_every_step_runs_and_writes_its_results(tmp_path):
    env = {**os.environ, "SIZE": "tiny", "DEVICE": "cpu", "DTYPE": "bf16", "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(REPO / "scripts" / "device_check.sh")], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not (tmp_path / "failed.txt").exists()
    files = {p.name for p in tmp_path.iterdir()}
    assert files == {"summary.txt", "oft.json", "sweep.json", "variants.json", "sweep_plain.json", "kernels.json",
                     "device_check.log"}
    log = (tmp_path / "device_check.log").read_text()  # everything printed, not only the end a remote run returns
    assert log.count("step took") == 6 and "| method |" in log
    every = ["compile_kernels", "compile_towers", "parallel_towers", "fuse_gate_up"]
    variants = json.loads((tmp_path / "variants.json").read_text())["variants"]
    assert variants["plain"]["max_abs_diff"] == {"oft": 0.0, "lightvla": 0.0}
    assert variants["all"]["speedups"] == every
    for name in ("sweep.json", "sweep_plain.json"):  # the default on a CPU is no speedups
        rows = json.loads((tmp_path / name).read_text())
        assert len(rows) == 12 and not [r for r in rows if "error" in r]
        assert all(r["speedups"] == [] for r in rows)
    assert json.loads((tmp_path / "oft.json").read_text())["yardstick"]["library"] == "transformers"
    summary = (tmp_path / "summary.txt").read_text()
    assert "OFT one query p50" in summary and "no speedups: OFT p50" in summary and "variant all:" in summary
    kernels = json.loads((tmp_path / "kernels.json").read_text())["results"]
    assert [(r["policy"], r["speedups"]) for r in kernels] == [("oft", []), ("oft", every),
                                                                 ("lightvla", []), ("lightvla", every)]


def test_targets_warn_where_graphs_failed_and_a_latency_is_partly_eager(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    from device_targets import graph_warnings

    rows = [{"policy": "oft", "cuda_graphs": {"failures": [], "eager_calls": 0}},
            {"policy": "sparsevlm", "policy_args": {"budget": "64"},
             "cuda_graphs": {"failures": ["RuntimeError: capture"], "eager_calls": 3}}]
    (tmp_path / "sweep.json").write_text(json.dumps(rows))
    (tmp_path / "oft.json").write_text(json.dumps(rows[0]))
    (warning,) = graph_warnings(tmp_path)
    assert warning.startswith("WARNING sweep.json sparsevlm") and "1 graph captures failed, 3 calls" in warning
