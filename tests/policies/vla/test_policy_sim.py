"""The oft policy drives real LIBERO episodes through bench run (tiny checkpoint, CPU)."""

import pytest

from bench.cli import main
from bench.records import read_episodes

pytestmark = pytest.mark.sim


def test_bench_run_with_a_checkpoint_records_tokens_and_flops(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    code = main(["run", "--suite", "libero_spatial", "--policy", "oft", "--checkpoint", str(tiny_checkpoint),
                 "--device", "cpu", "--tasks", "0", "--episodes-per-task", "1", "--max-steps", "24",
                 "--workers", "1", "--out", str(out), "--no-progress"])
    assert code == 0
    (record,) = read_episodes(out)
    assert record["outcome"] == "failure" and record["steps"] == 24, record.get("error")
    assert record["queries"] == 3
    stats = record["policy_stats"]
    assert stats["visual_tokens"] == 512 and stats["visual_tokens_llm"] == [512, 512]
    assert stats["tflops"] > 0
