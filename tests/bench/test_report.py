import pytest

from bench.analysis import load_results
from bench.cli import main
from bench.compare import compare_runs
from bench.config import RunConfig
from bench.records import EpisodeLog, RunDirError, write_json_atomic
from bench.report import markdown_report, paired_comparison, success_table


def write_run(run_dir, outcomes, policy="noop", latency=None, stats=None, max_steps=300, caveat=None):
    """A run directory with the given outcome per (task, init) and made-up but valid records."""
    run_dir.mkdir(parents=True)
    cfg = RunConfig(suite="libero_goal", policy=policy)
    write_json_atomic(run_dir / "manifest.json", {
        "format": 1, "run_id": run_dir.name, "config": cfg.to_dict(), "protocol": {"max_steps": max_steps},
        "versions": {"mujoco": "3.3.3"}, "code": {"commit": "abc", "dirty": False}, "host": {"hostname": "h"},
        "started_at": "2026-01-01T00:00:00+00:00", "policy_caveat": caveat,
    })
    with EpisodeLog(run_dir) as log:
        for (task, init), outcome in outcomes.items():
            log.append({
                "key": f"libero_goal/{task}/{init}", "suite": "libero_goal", "task_index": task,
                "init_state_index": init, "outcome": outcome, "steps": 100 if outcome == "success" else 300,
                "queries": 3, "query_latency_ms": latency or [1.0, 2.0, 3.0],
                "latency_ms": None, "policy_stats": stats or {}, "error": "boom" if outcome == "error" else None,
            })
    return run_dir


def test_success_table_math(tmp_path):
    outcomes = {(0, i): "success" for i in range(3)} | {(0, 3): "failure", (0, 4): "error"}
    outcomes |= {(1, i): "failure" for i in range(2)}
    write_run(tmp_path / "a", outcomes, stats={"visual_tokens": 78.0})
    table = success_table(load_results(tmp_path / "a"))
    task0 = table[table.task == "0"].iloc[0]
    assert (task0.episodes, task0.success, task0.failure, task0.errors) == (5, 3, 1, 1)
    assert task0.success_rate == pytest.approx(0.75)  # the error is not a failure
    assert task0.ci95_low == pytest.approx(0.3006, abs=1e-4) and task0.ci95_high == pytest.approx(0.9544, abs=1e-4)
    assert task0.mean_steps == pytest.approx((3 * 100 + 300) / 4)
    total = table[table.task == "all"].iloc[0]
    assert (total.episodes, total.success, total.errors) == (7, 3, 1)
    assert total.success_rate == pytest.approx(0.5)
    assert total.latency_p50_ms == pytest.approx(2.0)
    assert total.visual_tokens == pytest.approx(78.0)


def test_pandas_success_column_ignores_errors(tmp_path):
    write_run(tmp_path / "a", {(0, 0): "success", (0, 1): "failure", (0, 2): "error"})
    df = load_results(tmp_path / "a")
    assert df.success.mean() == pytest.approx(0.5)
    assert {"config.policy", "versions.mujoco", "code.commit", "run_id"} <= set(df.columns)
    assert len(load_results(tmp_path)) == 3  # a directory of run directories works too


def test_a_policys_caveat_is_reported_once_per_run(tmp_path):
    write_run(tmp_path / "plain", {(0, 0): "success"})
    assert "Caveats" not in markdown_report(load_results(tmp_path))
    write_run(tmp_path / "cached", {(0, 0): "success", (0, 1): "failure"}, policy="vla_cache",
              caveat="an approximation")
    report = markdown_report(load_results(tmp_path))
    assert report.count("- cached (vla_cache): an approximation") == 1 and "- plain" not in report


def test_paired_comparison_and_mcnemar(tmp_path):
    base = {(0, i): "success" for i in range(10)}
    cand = {(0, i): ("failure" if i < 7 else "success") for i in range(10)} | {(1, 0): "success"}
    write_run(tmp_path / "base", base)
    write_run(tmp_path / "cand", cand)
    df = load_results(tmp_path)
    cmp = paired_comparison(df, "base", "cand")
    assert (cmp.pairs, cmp.only_baseline, cmp.only_candidate) == (10, 7, 0)
    assert cmp.drop_points == pytest.approx(70.0)
    assert cmp.p_value == pytest.approx(2 / 2**7)
    report = markdown_report(df)
    assert "Paired episodes" in report and "| cand | 10 |" in report
    write_run(tmp_path / "elsewhere", {(5, 0): "failure"})  # no episode in common with the baseline
    assert "| elsewhere | 0 | 0 | 0 | 0 | 0 | n/a | n/a |" in markdown_report(load_results(tmp_path))


def test_compare_verdicts(tmp_path):
    write_run(tmp_path / "base", {(0, i): "success" for i in range(10)})
    write_run(tmp_path / "small", {(0, i): ("failure" if i == 0 else "success") for i in range(10)})
    write_run(tmp_path / "big", {(0, i): ("failure" if i < 7 else "success") for i in range(10)})
    df = load_results(tmp_path)
    assert not compare_runs(df, "base", "small", max_drop=15).regressed
    verdict = compare_runs(df, "base", "small", max_drop=5)
    assert verdict.regressed and any("more than the allowed 5" in line for line in verdict.lines)
    verdict = compare_runs(df, "base", "big", max_drop=80)
    assert verdict.regressed and any("significant" in line for line in verdict.lines)


def test_the_verdict_shows_what_a_query_costs_in_each_run(tmp_path):
    write_run(tmp_path / "base", {(0, i): "success" for i in range(4)}, latency=[10.0, 20.0, 30.0],
              stats={"tflops": 8.0, "visual_tokens": 512.0})
    write_run(tmp_path / "pruned", {(0, i): "success" for i in range(4)} | {(0, 4): "success"},
              latency=[5.0, 10.0, 15.0], stats={"tflops": 4.0, "visual_tokens": 256.0})
    verdict = compare_runs(load_results(tmp_path), "base", "pruned", max_drop=5)
    assert not verdict.regressed
    assert ("cost per query, baseline -> candidate: TFLOPs 8 -> 4 (0.500x); visual tokens 512.0 -> 256.0 "
            "(0.500x); latency p50 20 -> 10 ms (0.500x)") in verdict.lines
    write_run(tmp_path / "plain", {(0, i): "success" for i in range(4)})  # no cost figures: latency only
    lines = compare_runs(load_results(tmp_path), "plain", "base", max_drop=5).lines
    assert "cost per query, baseline -> candidate: latency p50 2 -> 20 ms (10.000x)" in lines


def test_a_candidate_cannot_pass_the_gate_by_erring(tmp_path):
    write_run(tmp_path / "base", {(0, i): "success" for i in range(10)})
    write_run(tmp_path / "errs", {(0, i): ("error" if i < 8 else "success") for i in range(10)})
    verdict = compare_runs(load_results(tmp_path), "base", "errs", max_drop=5)
    assert verdict.regressed and any("more errors (8) than the baseline (0)" in line for line in verdict.lines)
    assert "left out: episodes with an error in baseline 0, in candidate 8; episodes in one run only 0" in verdict.lines


def test_runs_under_different_protocols_are_not_compared(tmp_path):
    write_run(tmp_path / "base", {(0, i): "success" for i in range(10)})
    write_run(tmp_path / "short", {(0, i): "success" for i in range(10)}, max_steps=100)
    verdict = compare_runs(load_results(tmp_path), "base", "short", max_drop=5)
    assert verdict.regressed and "max_steps 300 vs 100" in verdict.lines[0]


def test_cli_compare_exit_codes(tmp_path, capsys):
    write_run(tmp_path / "base", {(0, i): "success" for i in range(10)})
    write_run(tmp_path / "same", {(0, i): "success" for i in range(10)})
    write_run(tmp_path / "worse", {(0, i): "failure" for i in range(10)})
    assert main(["compare", str(tmp_path / "base"), str(tmp_path / "same"), "--max-drop", "5"]) == 0
    assert main(["compare", str(tmp_path / "base"), str(tmp_path / "worse"), "--max-drop", "5"]) == 1
    assert "REGRESSION" in capsys.readouterr().out


def test_cli_report_markdown_and_csv(tmp_path, capsys):
    write_run(tmp_path / "a", {(0, 0): "success", (0, 1): "error"})
    csv_path = tmp_path / "t.csv"
    assert main(["report", str(tmp_path / "a"), "--csv", str(csv_path)]) == 0
    out = capsys.readouterr().out
    assert "| a | noop | libero_goal | 0 | 2 | 100.0 |" in out
    assert "Errors (1; not counted as failures)" in out
    header = csv_path.read_text().splitlines()[0].split(",")
    assert {"success_rate", "ci95_low", "ci95_high", "errors", "latency_p99_ms"} <= set(header)


def test_the_suites_only_table_has_one_row_per_run_and_suite(tmp_path, capsys):
    write_run(tmp_path / "a", {(0, 0): "success", (1, 0): "failure", (2, 0): "success"},
              stats={"visual_tokens": 78.0, "tflops": 2.9})
    write_run(tmp_path / "b", {(0, 0): "failure", (1, 0): "failure"})
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--suites-only"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.split("## Paired")[0].splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| run | policy | suite | episodes | success_% |") and len(rows) == 3
    (a,) = [row for row in rows if row.startswith("| a | noop | libero_goal | 3 | 66.7 |")]
    assert a.endswith("| 2.9 | 78.0 |")  # tflops, visual_tokens
    assert [row for row in rows if row.startswith("| b | noop | libero_goal | 2 | 0.0 |")]


def test_a_run_of_errors_only_is_reported_with_empty_rates(tmp_path, capsys):
    write_run(tmp_path / "a", {(0, 0): "error", (0, 1): "error"})
    assert main(["report", str(tmp_path / "a")]) == 0
    assert "| a | noop | libero_goal | 0 | 2 |  |  | 2 |" in capsys.readouterr().out


def test_a_run_named_twice_counts_once_and_runs_of_one_name_stay_apart(tmp_path, capsys):
    write_run(tmp_path / "r" / "a", {(0, i): "success" for i in range(4)})
    write_run(tmp_path / "x" / "run1", {(0, i): "success" for i in range(4)})
    write_run(tmp_path / "y" / "run1", {(0, i): "failure" for i in range(4)}, policy="random")
    assert main(["report", str(tmp_path / "r"), str(tmp_path / "r" / "a"), str(tmp_path / "x"),
                 str(tmp_path / "y")]) == 0
    out = capsys.readouterr().out
    assert "| a | noop | libero_goal | all | 4 | 100.0 |" in out
    assert "| x/run1 | noop | libero_goal | all | 4 | 100.0 |" in out
    assert "| y/run1 | random | libero_goal | all | 4 | 0.0 |" in out


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["run", "--suite", "libero_100"]) == 2
    assert "unknown suite 'libero_100'; valid suites:" in capsys.readouterr().err
    assert main(["run", "--suite", "libero_goal", "--policy", "nope"]) == 2
    assert "unknown policy 'nope'" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no run directory" in capsys.readouterr().err
    assert main(["run", "--suite", "libero_goal", "--policy", "random", "--policy-arg", "speed=2"]) == 2
    assert "has no option 'speed'" in capsys.readouterr().err


def test_policy_label_shows_the_options_but_not_the_device_or_the_checkpoint_path():
    from bench.analysis import policy_label

    config = {"policy": "fastv", "policy_args": {"r": "0.5", "k": "2", "device": "cuda",
                                                  "checkpoint": "/data/ckpts/openvla-7b-oft-libero-10"}}
    assert policy_label(config) == "fastv checkpoint=openvla-7b-oft-libero-10 k=2 r=0.5"
    assert policy_label({"policy": "noop", "policy_args": {}}) == "noop"


def test_a_moved_run_and_a_new_run_of_its_old_name_stay_apart(tmp_path, capsys):
    import shutil

    write_run(tmp_path / "smoke", {(0, i): "success" for i in range(4)})
    shutil.move(tmp_path / "smoke", tmp_path / "smoke_old")  # its manifest still says "smoke"
    write_run(tmp_path / "smoke", {(0, i): "failure" for i in range(4)})
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| smoke_old | noop | libero_goal | all | 4 | 100.0 |" in out
    assert "| smoke | noop | libero_goal | all | 4 | 0.0 |" in out
    write_run(tmp_path / "a" / "x" / "run1", {(0, 0): "success"})
    write_run(tmp_path / "b" / "x" / "run1", {(0, 0): "failure"})
    assert sorted(load_results(tmp_path / "*" / "x")["run_id"]) == ["a/x/run1", "b/x/run1"]


def test_a_run_compared_with_its_copy_or_itself_pairs_every_episode(tmp_path, capsys):
    import shutil

    write_run(tmp_path / "candidate", {(0, i): "success" for i in range(10)})
    shutil.copytree(tmp_path / "candidate", tmp_path / "baseline")
    for pair in (("baseline", "candidate"), ("candidate", "candidate")):
        assert main(["compare", *(str(tmp_path / name) for name in pair), "--max-drop", "5"]) == 0
        assert "OK" in capsys.readouterr().out
    write_run(tmp_path / "empty", {})
    assert main(["compare", str(tmp_path / "baseline"), str(tmp_path / "empty"), "--max-drop", "5"]) == 2
    assert "holds no recorded episodes" in capsys.readouterr().err


def test_a_damaged_line_before_other_records_is_an_error_and_nothing_is_cut(tmp_path, capsys):
    run = write_run(tmp_path / "a", {(0, i): "success" for i in range(5)})
    path = run / "episodes.jsonl"
    original = path.read_bytes()
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = lines[1][:20] + "\n"
    path.write_text("".join(lines))
    before = path.read_bytes()
    assert main(["report", str(run)]) == 2
    assert "line 2, is damaged and 3 more line(s) follow it" in capsys.readouterr().err
    with pytest.raises(RunDirError, match="line 2"):
        EpisodeLog(run)
    assert path.read_bytes() == before
    raw = before.split(b"\n")
    raw[1] = raw[1].replace(b'"key"', b'"k\xffy"')  # a byte that is not even text
    path.write_bytes(b"\n".join(raw))
    assert main(["report", str(run)]) == 2
    assert "line 2, is damaged" in capsys.readouterr().err
    # A finished last line (newline and all) that does not parse was not torn by a kill.
    damaged_last = b"".join(original.splitlines(keepends=True)[:4]) + b'{"key": "libero_goal/0/4", "outc\n'
    path.write_bytes(damaged_last)
    with pytest.raises(RunDirError, match="line 5, is damaged; repair"):
        EpisodeLog(run)
    assert path.read_bytes() == damaged_last


def test_one_process_at_a_time_writes_a_run(tmp_path):
    run = write_run(tmp_path / "a", {(0, 0): "success"})
    with EpisodeLog(run):
        with pytest.raises(RunDirError, match="in use"):
            EpisodeLog(run)
    with EpisodeLog(run) as log:  # free again
        assert log.done_keys == {"libero_goal/0/0"}


def test_numbers_out_of_range_are_refused_before_anything_runs(tmp_path, capsys):
    for argv, message in (
        (["run", "--suite", "libero_goal", "--max-steps", "-5"], "--max-steps: must be at least 1, got -5"),
        (["run", "--suite", "libero_goal", "--max-batch", "-1"], "--max-batch: must be at least 0"),
        (["run", "--suite", "libero_goal", "--watchdog", "0"], "--watchdog: must be a number of seconds more than 0"),
        (["speed", "--tasks", "0"], "--tasks: must be at least 1"),
        (["profile", "--batch", "0"], "--batch: must be at least 1"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(["run", "--suite", "libero_goal", "--tasks", "3-1", "--out", str(out)]) == 2
    assert "task range '3-1' in '3-1' is empty" in capsys.readouterr().err
    assert main(["run", "--suite", "libero_goal", "--policy", "noop", "--chunk-length", "16", "--out", str(out)]) == 2
    assert "noop answers with chunks of 8 actions" in capsys.readouterr().err
    assert not out.exists()


def test_paths_that_cannot_be_used_are_clear_errors(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["run", "--suite", "libero_goal", "--policy", "noop", "--out", str(afile)]) == 2
    assert "is a file, not a run directory" in capsys.readouterr().err
    write_run(tmp_path / "a", {(0, 0): "success"})
    capsys.readouterr()
    assert main(["report", str(tmp_path / "a"), "--csv", str(tmp_path / "no" / "such" / "dir" / "t.csv")]) == 2
    assert "non-existent directory" in capsys.readouterr().err
    assert main(["run", "--suite", "libero_goal", "--policy", "oft", "--policy-arg", "size=tiny",
                 "--device", "bogus", "--out", str(tmp_path / "r")]) == 2
    assert "unknown device 'bogus'" in capsys.readouterr().err


def test_worker_pool_warmup_marks_are_not_a_statistic():
    from bench.runner import summarize_stats

    assert summarize_stats([{"tflops": 1.0, "warmup": True}, {"tflops": 3.0}]) == {"tflops": 2.0}


def test_the_report_does_not_pair_runs_made_under_different_protocols(tmp_path, capsys):
    write_run(tmp_path / "base", {(0, i): "success" for i in range(4)})
    write_run(tmp_path / "short", {(0, i): "failure" for i in range(4)}, max_steps=100)
    assert main(["report", str(tmp_path / "base"), str(tmp_path / "short")]) == 0
    out = capsys.readouterr().out
    assert "| short | 4 | 4 | 0 | 4 | 0 | n/a | n/a | max_steps 300 vs 100 |" in out


def test_a_watchdog_must_be_a_finite_number_of_seconds(capsys):
    for value in ("inf", "nan", "-1"):
        with pytest.raises(SystemExit):
            main(["run", "--suite", "libero_goal", "--watchdog", value])
        assert "--watchdog" in capsys.readouterr().err


def test_published_rates_are_well_formed_and_their_averages_add_up():
    from bench.analysis import load_published
    from bench.report import LIBERO_FOUR

    table = load_published()
    assert not table.duplicated(["method", "source", "suite", "note"]).any()
    checked = 0
    for (method, source), rows in table.groupby(["method", "source"]):
        by_suite = rows.set_index("suite")
        if set(LIBERO_FOUR) <= set(by_suite.index) and "average" in by_suite.index:
            # Published to one decimal: the mean of the four can differ from the average by rounding only.
            mean = by_suite.loc[list(LIBERO_FOUR), "success_pct"].mean()
            assert abs(mean - by_suite.loc["average", "success_pct"]) <= 0.05 + 1e-9, (method, source)
            checked += 1
    assert checked > 0


@pytest.mark.parametrize("row, problem", [
    ("X,base,libero_100,50.0,,paper,", "line 2: unknown suite 'libero_100'"),
    ("X,base,libero_goal,120,,paper,", "line 2: success_pct 120 is not a percentage"),
    ("X,base,libero_goal,high,,paper,", "line 2: success_pct high is not a percentage"),
    ("X,,libero_goal,50,,paper,", "line 2: method, base_model and source are required"),
])
def test_a_malformed_published_file_is_refused_naming_the_line(tmp_path, row, problem):
    from bench.analysis import PUBLISHED_COLUMNS, load_published

    path = tmp_path / "published.csv"
    path.write_text(",".join(PUBLISHED_COLUMNS) + "\n" + row + "\n")
    with pytest.raises(ValueError, match=problem):
        load_published(path)


def test_published_rows_are_listed_apart_and_only_for_the_runs_suites(tmp_path, capsys):
    from bench.analysis import load_published
    from bench.report import LIBERO_FOUR, published_rows

    write_run(tmp_path / "a", {(0, 0): "success", (0, 1): "failure"})
    csv_path = tmp_path / "t.csv"
    assert main(["report", str(tmp_path / "a"), "--published", "--csv", str(csv_path)]) == 0
    out = capsys.readouterr().out
    ours, published = out.split("## Published elsewhere (not measured by these runs)")
    assert "OpenVLA-OFT" not in ours and "| a | noop | libero_goal | all | 2 | 50.0 |" in ours
    assert "| OpenVLA-OFT | OpenVLA-OFT (Llama-2-7B) | libero_goal | 97.9 | 512 |" in published
    assert "libero_spatial" not in published and "average" not in published
    assert "OpenVLA-OFT" not in csv_path.read_text()  # the CSV is the runs' table only
    assert main(["report", str(tmp_path / "a")]) == 0
    assert "Published" not in capsys.readouterr().out

    table = load_published()
    assert set(published_rows(table, ["libero_90"]).suite) == set()
    assert set(published_rows(table, LIBERO_FOUR).suite) == set(LIBERO_FOUR) | {"average"}
