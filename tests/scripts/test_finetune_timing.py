"""The fine-tuning timing script runs the real training step on the tiny model and reports it."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="the model extra is not installed")


def test_times_training_steps_of_each_trainable_policy(tmp_path):
    for policy, accumulation in (("oft", "1"), ("lightvla", "2")):
        save = tmp_path / f"{policy}.json"
        done = subprocess.run([sys.executable, str(REPO / "scripts" / "finetune_timing.py"), "--policy", policy,
                               "--repeats", "2", "--warmup", "1", "--batch-size", "2", "--lora-rank", "4",
                               "--grad-accumulation", accumulation, "--save", str(save)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(save.read_text())
        assert result["policy"] == policy and result["device"] == "cpu" and result["step_ms"]["n"] == 2
        assert result["grad_accumulation"] == int(accumulation)
        assert 0 < result["step_ms"]["min"] <= result["step_ms"]["p50"] and result["peak_memory_mb"] > 0
        assert result["trainable_parameters"] > 0 and result["samples_per_s"] > 0
