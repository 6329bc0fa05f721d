"""LightVLA*: learnable queries, placement after an LLM layer, saved with the checkpoint."""

import shutil

import pytest
import torch

from policies.base import PolicyOptionError
from policies.pruning.lightvla_star import LightVLAStarPruner, parse_placement
from policies.registry import make_policy
from policies.vla import flops
from policies.vla.hooks import QueryTrace
from tests.policies.vla.conftest import fake_observation, tiny_model
from tests.policies.vla.test_model import inputs


def test_inference_keeps_the_distinct_argmax_of_the_queries_after_layer_l():
    model = tiny_model()
    pruner = LightVLAStarPruner(64, num_queries=32, after_layer=1)
    pixels, proprio, prompts = inputs()
    trace = QueryTrace()
    with torch.no_grad():
        model(pixels, proprio, prompts, 2, hooks=pruner, traces=[trace])
    assert trace.llm_visual_tokens[0] == 512
    assert 1 <= trace.llm_visual_tokens[1] <= 32
    _, counted = flops.counted_flops(model, pixels, proprio, prompts, 2, hooks=pruner)
    assert flops.query_flops(flops.model_dims(model), trace)["total"] == counted["total"]


def test_training_selects_one_slot_per_query_and_trains_the_queries():
    model = tiny_model().train()
    pruner = LightVLAStarPruner(64, num_queries=16, after_layer=0)
    pruner.train()
    pruner.set_progress(5, 10)
    pixels, proprio, prompts = inputs()
    trace = QueryTrace()
    model(pixels, proprio, prompts, 2, hooks=pruner, traces=[trace]).abs().mean().backward()
    assert trace.llm_visual_tokens == [16, 16]
    assert pruner.queries.grad is not None and pruner.queries.grad.abs().sum() > 0


def test_placement_parsing():
    assert parse_placement("llm:3", 32) == 3
    for bad in ("llm:32", "vision:4", "llm:x"):
        with pytest.raises(ValueError, match="placement must be llm:L"):
            parse_placement(bad, 32)


def test_queries_round_trip_with_a_checkpoint(tiny_checkpoint, tmp_path):
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    with pytest.raises(PolicyOptionError, match="token_queries"):
        make_policy("lightvla_star", {"checkpoint": str(ckpt)})
    trained = LightVLAStarPruner(64, num_queries=24, seed=7)
    trained.save(ckpt, step=1000)
    policy = make_policy("lightvla_star", {"checkpoint": str(ckpt), "queries": "24"})
    assert torch.equal(policy.hooks().queries.detach(), trained.queries.detach())
    assert policy.identity()["weights"]["queries"] == "token_queries--1000_checkpoint.pt"
    out = policy.act([fake_observation(0)])[0]
    assert out.stats["visual_tokens_llm"][0] == 512 and out.stats["visual_tokens_llm"][1] <= 24


def test_untrained_queries_only_when_asked(tiny_checkpoint):
    policy = make_policy("lightvla_star", {"checkpoint": str(tiny_checkpoint), "random_queries": "true"})
    assert policy.identity()["weights"]["queries"] == "random"
