"""Real LIBERO episodes through the CLI: one per suite, the report, and a resume."""

import json

import pytest

from bench.cli import main
from bench.records import read_episodes
from bench.serve import ServerThread
from policies import make_policy

pytestmark = pytest.mark.sim

SUITES = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_long": 520}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for suite in SUITES:
        code = main(["run", "--suite", suite, "--policy", "noop", "--tasks", "0", "--episodes-per-task", "1",
                     "--out", str(root / suite), "--no-progress", "--json"])
        assert code == 0
    return root


def test_noop_fails_each_suite_after_its_full_budget(runs):
    for suite, budget in SUITES.items():
        (record,) = read_episodes(runs / suite)
        assert record["outcome"] == "failure", record["error"]
        assert record["steps"] == budget
        assert record["queries"] == budget // 8 + (budget % 8 > 0)
    assert read_episodes(runs / "libero_long")[0]["suite"] == "libero_10"


def test_report_over_the_real_runs(runs, capsys):
    assert main(["report", *(str(runs / s) for s in SUITES)]) == 0
    out = capsys.readouterr().out
    for suite in ("libero_spatial", "libero_object", "libero_goal", "libero_10"):
        assert f"| noop | {suite} | all | 1 | 0.0 |" in out


def test_resume_adds_nothing(runs, capsys):
    before = (runs / "libero_goal" / "episodes.jsonl").read_text()
    assert main(["run", "--resume", str(runs / "libero_goal"), "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ran_now"] == 0 and summary["recorded"] == 1
    assert (runs / "libero_goal" / "episodes.jsonl").read_text() == before


def test_random_policy_with_video(tmp_path):
    out = tmp_path / "video_run"
    assert main(["run", "--suite", "libero_spatial", "--policy", "random", "--tasks", "1", "--init-states", "3",
                 "--max-steps", "16", "--video", "--out", str(out), "--no-progress"]) == 0
    (record,) = read_episodes(out)
    assert record["outcome"] == "failure" and record["steps"] == 16
    video = out / "videos" / record["video"]
    assert video.name == "libero_spatial--task1--init3--failure.mp4"
    import imageio.v2 as imageio

    frames = imageio.mimread(video)
    assert len(frames) == 17 and frames[0].shape == (256, 512, 3)


def test_pool_serial_and_a_served_policy_give_the_same_real_outcomes(tmp_path):
    with ServerThread(make_policy("scripted")) as server:
        for mode, workers, policy in (("serial", "1", ["scripted"]), ("pool", "2", ["scripted"]),
                                      ("served", "2", ["remote", "--policy-arg", f"address={server.address}"])):
            assert main(["run", "--suite", "libero_object", "--policy", *policy, "--tasks", "0,1", "--init-states",
                         "0", "--workers", workers, "--out", str(tmp_path / mode), "--no-progress", "--json"]) == 0
    serial, pool, served = (sorted((r["key"], r["outcome"], r["steps"]) for r in read_episodes(tmp_path / m))
                            for m in ("serial", "pool", "served"))
    assert serial == pool == served and len(serial) == 2
