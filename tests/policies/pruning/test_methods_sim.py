"""Every token-reduction method drives a real LIBERO episode (tiny checkpoint, CPU) and
records the visual tokens entering each LLM layer."""

import pytest

from bench.cli import main
from bench.records import read_episodes, read_manifest

pytestmark = pytest.mark.sim

METHODS = {
    "lightvla": [],
    "lightvla_star": ["random_queries=true", "queries=32"],
    "fastv": ["k=1", "r=0.5"],
    "sparsevlm": ["budget=300"],  # a mean over the 2 layers: 512, then 88
    "vla_cache": ["similarity=0.9"],
    "divprune": [],  # the reference's ratio: round(0.098 * 512) = 50
    "pyramiddrop": ["layers=16", "ratios=0.25"],  # one stage, before layer 1 of 2
    "adp": ["gate=static"],  # every query prunes (the motion gate lets none of an episode's first three)
}


@pytest.mark.parametrize("method", METHODS)
def test_method_runs_an_episode_and_records_its_tokens(method, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / method
    args = ["run", "--suite", "libero_spatial", "--policy", method, "--checkpoint", str(tiny_checkpoint),
            "--device", "cpu", "--tasks", "0", "--episodes-per-task", "1", "--max-steps", "24", "--workers", "1",
            "--out", str(out), "--no-progress"]
    for arg in METHODS[method]:
        args += ["--policy-arg", arg]
    assert main(args) == 0
    (record,) = read_episodes(out)
    assert (read_manifest(out)["policy_caveat"] is not None) == (method == "vla_cache")
    assert record["outcome"] == "failure" and record["steps"] == 24, record.get("error")
    stats = record["policy_stats"]
    per_layer = stats["visual_tokens_llm"]
    assert len(per_layer) == 2 and per_layer[0] <= 512 and stats["tflops"] > 0
    if method == "fastv":
        assert per_layer == [512, 256]
        capsys.readouterr()
        assert main(["report", str(out)]) == 0
        assert "| fastv checkpoint=tiny-oft k=1 r=0.5 | libero_spatial |" in capsys.readouterr().out
    elif method == "sparsevlm":
        assert per_layer == [512, 88]
    elif method == "divprune":
        assert per_layer == [50, 50]
    elif method == "pyramiddrop":
        assert per_layer == [512, 128]
    elif method == "adp":
        assert per_layer == [384, 384] and stats["pruned"] == 1
    elif method == "vla_cache":
        assert stats["reused_tokens"] > 0  # mean over the 3 queries; the first reuses nothing
        capsys.readouterr()
        assert main(["report", str(out)]) == 0
        assert "## Caveats" in capsys.readouterr().out  # its reuse is an approximation with OFT
    else:
        assert per_layer[-1] < 512
