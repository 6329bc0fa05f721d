"""The GPU fine-tuning script, run end to end on the tiny model on the CPU (with a smaller large
batch): a step that would fail on the scarce device should fail here first."""

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
    env = {**os.environ, "SIZE": "tiny", "DEVICE": "cpu", "DTYPE": "bf16", "OUT": str(tmp_path),
           "PYTHON": sys.executable, "LARGE_BATCH": "16"}
    done = subprocess.run(["bash", str(REPO / "scripts" / "device_finetune.sh")], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not (tmp_path / "finetune_failed.txt").exists()
    assert {p.name for p in tmp_path.iterdir()} == {
        "finetune_summary.txt", "device_finetune.log", "finetune_b8.json", "finetune_b64.json",
        "finetune_log.jsonl", "finetune_checkpoint.json"}
    assert (tmp_path / "device_finetune.log").read_text().count("step took") == 4
    small, large = (json.loads((tmp_path / f"finetune_{n}.json").read_text()) for n in ("b8", "b64"))
    assert (small["batch_size"], large["batch_size"], large["grad_accumulation"]) == (8, 16, 8)
    assert small["dtype"] == "bfloat16" and small["step_ms"]["n"] == 5
    log = [json.loads(line) for line in (tmp_path / "finetune_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "loss" in e] == [3, 6, 9, 12] and any("val_loss" in e for e in log)
    profiled = json.loads((tmp_path / "finetune_checkpoint.json").read_text())
    assert profiled["policy_args"]["checkpoint"].endswith("checkpoint") and profiled["visual_tokens_llm"] > 0
