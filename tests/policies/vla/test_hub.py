"""Checkpoints named by Hugging Face Hub repository id: found in the local Hub cache, offline."""

import pytest
import torch

from policies.base import PolicyOptionError
from policies.registry import make_policy
from policies.vla.checkpoint import CheckpointError, checkpoint_identity, load_checkpoint
from policies.vla.hub import hub_repo_id
from tests.tiny_vla import fake_observation


def test_a_cached_repository_loads_its_snapshot_and_records_the_commit(tiny_checkpoint, hub_cache):
    commit = hub_cache("owner/tiny-oft", tiny_checkpoint)
    from_hub, from_dir = load_checkpoint("owner/tiny-oft"), load_checkpoint(tiny_checkpoint)
    assert from_hub.directory.name == commit
    assert from_hub.identity["hub"] == {"repo": "owner/tiny-oft", "revision": commit}
    # the links into the cache's blobs identify the same files as the directory they came from
    assert from_hub.identity["digest"] == checkpoint_identity(tiny_checkpoint)["digest"]
    assert "hub" not in from_dir.identity
    for key, value in from_dir.model.state_dict().items():
        assert torch.equal(value, from_hub.model.state_dict()[key]), key


def test_a_revision_picks_its_snapshot(tiny_checkpoint, tmp_path, hub_cache):
    main = hub_cache("owner/tiny-oft", tiny_checkpoint)
    other = hub_cache("owner/tiny-oft", tiny_checkpoint, ref="v2")
    assert main != other
    assert load_checkpoint("owner/tiny-oft@v2").identity["hub"]["revision"] == other
    assert load_checkpoint(f"owner/tiny-oft@{main}").identity["hub"]["revision"] == main


def test_a_repository_missing_from_the_cache_is_an_error_giving_the_fetch_command(hub_cache):
    with pytest.raises(CheckpointError, match=r"does not exist, .* no repository owner/missing .* 'hf download owner/missing'"):
        load_checkpoint("owner/missing")
    with pytest.raises(CheckpointError, match=r"'hf download owner/missing --revision v3'"):
        load_checkpoint("owner/missing@v3")


def test_a_directory_comes_before_a_repository_of_the_same_name(tiny_checkpoint, hub_cache, tmp_path, monkeypatch):
    hub_cache("owner/tiny-oft", tiny_checkpoint)
    local = tmp_path / "owner" / "tiny-oft"
    local.parent.mkdir()
    local.symlink_to(tiny_checkpoint)
    monkeypatch.chdir(tmp_path)
    assert "hub" not in load_checkpoint("owner/tiny-oft").identity


@pytest.mark.parametrize("name, expected", [
    ("moojink/openvla-7b-oft-finetuned-libero-spatial", ("moojink/openvla-7b-oft-finetuned-libero-spatial", None)),
    ("TTJiang/LightVLA-libero-10@main", ("TTJiang/LightVLA-libero-10", "main")),
    ("/abs/path", None), ("./rel/path", None), ("a/b/c", None), ("single", None), ("~/ckpt", None),
])
def test_what_reads_as_a_repository_id(name, expected):
    assert hub_repo_id(name) == expected


def test_the_policy_takes_a_repository_id(tiny_checkpoint, hub_cache):
    commit = hub_cache("owner/tiny-oft", tiny_checkpoint)
    policy = make_policy("oft", {"checkpoint": "owner/tiny-oft"})
    assert policy.identity()["weights"]["hub"] == {"repo": "owner/tiny-oft", "revision": commit}
    assert policy.act([fake_observation(0)])[0].actions.shape == (8, 7)
    with pytest.raises(PolicyOptionError, match="hf download owner/other"):
        make_policy("oft", {"checkpoint": "owner/other"})
