import json

import pytest

from bench.cli import _config_from_args, build_parser, main
from bench.config import RunConfig
from bench.config_file import SETTINGS, read_config_file
from bench.runner import execute
from tests.fakes import fake_env


def config_from(argv):
    return _config_from_args(build_parser().parse_args(["run", *argv]))


def test_a_yaml_file_gives_the_settings_the_flags_would(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "suite: libero_long\n"
        "policy: fastv\n"
        "policy_args: {k: 2, r: 0.5, cuda_graphs: false, size: tiny}\n"
        "tasks: 0-1\n"
        "episodes_per_task: 2\n"
        "max_steps: 40\n"
        "workers: 1\n"
    )
    from_flags = config_from(["--suite", "libero_long", "--policy", "fastv", "--policy-arg", "k=2", "--policy-arg",
                              "r=0.5", "--policy-arg", "cuda_graphs=false", "--policy-arg", "size=tiny",
                              "--tasks", "0,1", "--episodes-per-task", "2", "--max-steps", "40", "--workers", "1"])
    assert config_from(["--config", str(path)]) == from_flags


def test_flags_override_the_file_and_options_join_it(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"suite": "libero_goal", "policy": "fastv", "policy_args": {"k": 2, "r": 0.5},
                                "init_states": [0, 7], "seed": 3}))
    config = config_from(["--config", str(path), "--policy-arg", "r=0.75", "--episodes-per-task", "1", "--seed", "4"])
    assert config.policy_args == {"k": "2", "r": "0.75"}
    # One episode selection replaces the other rather than clashing with it.
    assert (config.episodes_per_task, config.init_states, config.seed) == (1, None, 4)


def test_a_runs_manifest_runs_the_same_configuration_again(tmp_path):
    recorded = RunConfig(suite="libero_10", policy="random", policy_args={"scale": "0.5"}, tasks=[1],
                         episodes_per_task=2, seed=7, max_steps=12, workers=1)
    execute(recorded, tmp_path / "first", env_factory=fake_env, progress=False)
    again = config_from(["--config", str(tmp_path / "first" / "manifest.json")])
    assert again == recorded
    execute(again, tmp_path / "again", env_factory=fake_env, progress=False)
    plans = [json.loads((tmp_path / run / "manifest.json").read_text())["plan"] for run in ("first", "again")]
    assert plans[0] == plans[1] == ["libero_10/1/0", "libero_10/1/1"]


@pytest.mark.parametrize("text, problem", [
    ("suite: libero_goal\nepisodes: 3\n", "unknown setting 'episodes'; settings: suite, policy"),
    ("episodes_per_task: 0\n", "episodes_per_task: must be at least 1, got 0"),
    ("episodes_per_task: two\n", "episodes_per_task: expected a number, got 'two'"),
    ("max_steps: true\n", "max_steps: expected a number, got True"),
    ("tasks: [0, x]\n", "tasks: expected a list of task indices"),
    ("tasks: 3-1\n", "tasks: task range '3-1' in '3-1' is empty"),
    ("policy_args: [k, 2]\n", "policy_args: expected a mapping of option names to values"),
    ("policy_args: {k: [2]}\n", "policy_args: expected a text, number or true/false"),
    ("video: yes please\n", "video: expected true or false"),
    ("watchdog_s: .nan\n", "watchdog_s: must be a number of seconds more than 0"),
    ("- libero_goal\n", "must hold a mapping of settings, holds list"),
    ("suite: [unclosed\n", "does not parse"),
])
def test_a_bad_file_is_refused_naming_the_setting(tmp_path, text, problem):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=problem.replace("[", r"\[")):
        read_config_file(path)


def test_every_run_setting_can_come_from_a_file():
    import dataclasses

    assert set(SETTINGS) == {f.name for f in dataclasses.fields(RunConfig)}


def test_config_errors_reach_the_user_before_anything_runs(tmp_path, capsys):
    assert main(["run", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file" in capsys.readouterr().err and not (tmp_path / "results").exists()
    path = tmp_path / "run.yaml"
    path.write_text("policy: random\n")
    assert main(["run", "--config", str(path)]) == 2
    assert "--suite is required" in capsys.readouterr().err
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "manifest.json").write_text("{}")
    assert main(["run", "--config", str(path), "--resume", str(tmp_path / "done")]) == 2
    assert "a resumed run keeps its recorded settings" in capsys.readouterr().err
