"""Policies of one's own: by module path, or declared by an installed package."""

import pytest

from bench.config import RunConfig
from bench.records import read_episodes, read_manifest
from bench.runner import execute
from policies import list_policies, make_policy
from policies.registry import UnknownPolicyError
from tests.fakes import fake_env

MODULE = '''
from dataclasses import dataclass

import numpy as np

from policies.base import Policy, PolicyOutput


class HoldStill(Policy):
    """Holds still; ``close`` shuts the gripper."""

    name = "hold_still"
    needs_images = False

    @dataclass
    class Options(Policy.Options):
        close: bool = False

    def act(self, observations):
        chunk = np.zeros((self.chunk_length, 7))
        chunk[:, 6] = 1.0 if self.options.close else -1.0
        return [PolicyOutput(chunk.copy(), {"held": 1}) for _ in observations]


class NotAPolicy:
    pass
'''


@pytest.fixture
def own_package(tmp_path, monkeypatch):
    """A module of one's own on the path, and an installed distribution that declares it."""
    (tmp_path / "lab_policies.py").write_text(MODULE)
    dist = tmp_path / "lab_policies-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lab-policies\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[vla_bench.policies]\nhold_still = lab_policies:HoldStill\n"
                                           "noop = lab_policies:HoldStill\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_a_policy_given_by_module_path_takes_its_options(own_package):
    policy = make_policy("lab_policies:HoldStill", {"close": "true", "chunk_length": "4"})
    (output,) = policy.act([None])
    assert output.actions.shape == (4, 7) and (output.actions[:, 6] == 1.0).all()


def test_an_installed_package_declares_policies_by_name_without_taking_a_builtin_one(own_package):
    listed = dict(list_policies())
    assert listed["hold_still"] == "installed by lab-policies (lab_policies:HoldStill)"
    assert make_policy("hold_still").name == "hold_still"
    assert listed["noop"].startswith("holds still") and type(make_policy("noop")).__module__ == "policies.simple"


def test_policies_that_cannot_be_found_are_named(own_package):
    with pytest.raises(UnknownPolicyError, match="unknown policy 'holdstill'.*hold_still, or module.path:ClassName"):
        make_policy("holdstill")
    with pytest.raises(UnknownPolicyError, match="module 'lab_nowhere' cannot be imported"):
        make_policy("lab_nowhere:HoldStill")
    for name in ("lab_policies:Missing", "lab_policies:NotAPolicy"):
        with pytest.raises(UnknownPolicyError, match=f"lab_policies has no Policy subclass '{name.split(':')[1]}'"):
            make_policy(name)


def test_a_run_with_ones_own_policy_records_it_and_resumes(own_package, tmp_path):
    config = RunConfig(suite="libero_goal", policy="lab_policies:HoldStill", policy_args={"close": "true"},
                       tasks=[0, 1], episodes_per_task=1, max_steps=8, workers=2)
    summary = execute(config, tmp_path / "run", env_factory=fake_env, progress=False)
    assert summary.outcomes == {"success": 0, "failure": 2, "error": 0}
    records = read_episodes(tmp_path / "run")
    assert all(r["policy_stats"]["held"] == 1 for r in records)
    manifest = read_manifest(tmp_path / "run")
    assert manifest["config"]["policy"] == "lab_policies:HoldStill"
    again = execute(config, tmp_path / "run", resume=True, env_factory=fake_env, progress=False)
    assert (again.ran_now, again.recorded) == (0, 2)
