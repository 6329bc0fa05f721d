"""LightVLA*: learnable queries, placement after an LLM layer, saved with the checkpoint."""

import dataclasses
import shutil

import pytest
import torch

from policies.base import PolicyOptionError
from policies.pruning.lightvla_star import LightVLAStarPruner, parse_placement
from policies.registry import make_policy
from policies.vla import flops
from policies.vla.graphs import HostReads
from policies.vla.hooks import QueryTrace
from tests.tiny_vla import fake_observation, inputs, tiny_model


class CaptureSelection(LightVLAStarPruner):
    """Keeps copies of the stream the selection is given and of the one it returns."""

    def select(self, stream):
        kept = super().select(stream)
        # copies: the layers after the selection replace the streams' hidden states
        self.given, self.kept = (dataclasses.replace(s, hidden=s.hidden.clone()) for s in (stream, kept))
        return kept


def test_inference_keeps_the_distinct_argmax_of_the_queries_after_layer_l():
    model = tiny_model()
    pruner = CaptureSelection(64, num_queries=32, after_layer=1)
    pixels, proprio, prompts = inputs()
    trace = QueryTrace()
    with torch.no_grad():
        model(pixels, proprio, prompts, 2, hooks=pruner, traces=[trace])
        given, kept = pruner.given, pruner.kept
        columns = given.visual[0].nonzero().flatten()
        chosen = sorted(set(pruner.scores(given.hidden[:, columns])[0].argmax(dim=-1).tolist()))
    assert trace.llm_visual_tokens == [512, len(chosen)] and 1 <= len(chosen) <= 32
    # the chosen tokens, in their order, with their RoPE positions; the other tokens unchanged
    assert kept.position_ids[0][kept.visual[0]].tolist() == given.position_ids[0, columns[chosen]].tolist()
    assert torch.equal(kept.hidden[0][kept.visual[0]], given.hidden[0, columns[chosen]])
    assert torch.equal(kept.hidden[0][~kept.visual[0]], given.hidden[0][~given.visual[0]])
    _, counted = flops.counted_flops(model, pixels, proprio, prompts, 2, hooks=pruner)
    assert flops.query_flops(flops.model_dims(model), trace)["total"] == counted["total"]


@pytest.mark.parametrize("after", [0, 1])
def test_keeping_every_token_reproduces_the_unpruned_model_exactly(after):
    model = tiny_model()
    pixels, proprio, prompts = inputs(batch=2, prompt_lengths=(9, 12))
    with torch.no_grad():
        unpruned = model(pixels, proprio, prompts, 2)
        pruned = model(pixels, proprio, prompts, 2, hooks=LightVLAStarPruner(64, 32, after, keep=512))
    assert torch.equal(pruned, unpruned)


@pytest.mark.parametrize("after", [0, 1])
def test_llm_placement_batches_match_single_queries(after):
    model = tiny_model()
    pixels, proprio, prompts = inputs(batch=3, prompt_lengths=(9, 12, 9), seed=4)
    pruner = LightVLAStarPruner(64, num_queries=32, after_layer=after)
    traces = [QueryTrace() for _ in range(3)]
    with torch.no_grad():
        batched = model(pixels, proprio, prompts, 2, hooks=pruner, traces=traces)
        for i in range(3):
            trace = QueryTrace()
            single = model(pixels[i:i + 1], proprio[i:i + 1], prompts[i:i + 1], 2, hooks=pruner, traces=[trace])
            assert torch.allclose(batched[i], single[0], atol=1e-5)
            assert trace.llm_visual_tokens == traces[i].llm_visual_tokens
    assert len({t.llm_visual_tokens[-1] for t in traces}) > 1  # the samples keep different counts


def test_the_queries_initialisation_is_configurable():
    a, b = LightVLAStarPruner(64, 16, seed=3, init_std=0.02), LightVLAStarPruner(64, 16, seed=3, init_std=0.02)
    assert torch.equal(a.queries, b.queries)
    assert a.queries.std().item() == pytest.approx(0.02, rel=0.1)
    assert not torch.equal(a.queries, LightVLAStarPruner(64, 16, seed=4, init_std=0.02).queries)
    with pytest.raises(ValueError, match="standard deviation must be positive"):
        LightVLAStarPruner(64, 16, init_std=0.0)


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
    assert parse_placement("llm:3", 32, 22) == ("llm", 3)
    assert parse_placement("vision:8", 32, 22) == ("vision", 8)
    for bad in ("llm:32", "vision:22", "llm:x", "tower:1"):
        with pytest.raises(ValueError, match="placement must be llm:L"):
            parse_placement(bad, 32, 22)


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


def test_queries_come_from_the_snapshot_a_repository_id_names(tiny_checkpoint, tmp_path, hub_cache):
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    trained = LightVLAStarPruner(64, num_queries=24, seed=7)
    trained.save(ckpt, step=1000)
    hub_cache("owner/tiny-star", ckpt)
    policy = make_policy("lightvla_star", {"checkpoint": "owner/tiny-star", "queries": "24"})
    assert torch.equal(policy.hooks().queries.detach(), trained.queries.detach())


@pytest.mark.parametrize("options, refused", [({"queries": "128"}, "holds 24 queries, configured 128: set queries=24"),
                                              ({"queries": "24", "placement": "llm:0"},
                                               "placement 'llm:1', configured 'llm:0': set placement=llm:1")])
def test_queries_of_another_count_or_placement_are_refused(tiny_checkpoint, tmp_path, options, refused):
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    LightVLAStarPruner(64, num_queries=24, after_layer=1).save(ckpt, step=1000)
    with pytest.raises(PolicyOptionError, match=refused):
        make_policy("lightvla_star", {"checkpoint": str(ckpt), **options})


def test_a_query_file_without_its_placement_loads_and_trained_queries_ignore_the_init_options(tiny_checkpoint,
                                                                                              tmp_path):
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    trained = LightVLAStarPruner(64, num_queries=24, seed=7)
    torch.save({"queries": trained.queries.detach()}, ckpt / "token_queries--1000_checkpoint.pt")  # the older format
    policy = make_policy("lightvla_star", {"checkpoint": str(ckpt), "queries": "24"})
    assert torch.equal(policy.hooks().queries.detach(), trained.queries.detach())
    other_init = make_policy("lightvla_star", {"checkpoint": str(ckpt), "queries": "24", "query_std": "0.1"})
    assert "query_std" not in policy.identity()["options"] and policy.identity() == other_init.identity()
    random = make_policy("lightvla_star", {"checkpoint": str(ckpt), "queries": "24", "random_queries": "true"})
    assert random.identity()["options"]["query_std"] == 1.0  # untrained queries: their initialisation counts


def test_the_policy_options_set_the_untrained_queries(tiny_checkpoint):
    options = {"checkpoint": str(tiny_checkpoint), "random_queries": "true", "queries": "16"}
    a = make_policy("lightvla_star", {**options, "query_std": "0.5", "query_seed": "9"}).hooks().queries
    b = LightVLAStarPruner(64, 16, after_layer=1, seed=9, init_std=0.5).queries
    assert torch.equal(a.detach().cpu().float(), b.detach())
    with pytest.raises(PolicyOptionError, match="query_std must be positive"):
        make_policy("lightvla_star", {**options, "query_std": "-1"})


def test_untrained_queries_only_when_asked(tiny_checkpoint):
    policy = make_policy("lightvla_star", {"checkpoint": str(tiny_checkpoint), "random_queries": "true"})
    assert policy.identity()["weights"]["queries"] == "random"


class CaptureStream(LightVLAStarPruner):
    def before_llm(self, stream):
        self.stream = stream
        return super().before_llm(stream)


def vision_pruner(queries=16, block=0, keep=0):
    return CaptureStream(32, num_queries=queries, keep=keep, vision_block=block, prefix_tokens=(5, 0))


def test_vision_placement_prunes_both_towers_from_the_next_block():
    model = tiny_model()
    pruner = vision_pruner()
    pixels, proprio, prompts = inputs()
    trace = QueryTrace()
    with torch.no_grad():
        model(pixels, proprio, prompts, 2, hooks=pruner, traces=[trace])
        with HostReads() as reads:  # (a trace reads its token counts at the end)
            model(pixels, proprio, prompts, 2, hooks=vision_pruner())
    assert reads.count == 1  # the kept counts, once for both towers and the LLM
    kept_per_image = pruner._patch_keep.sum(dim=1).tolist()
    assert all(1 <= n <= 16 for n in kept_per_image)
    # DINOv2 (5 prefix tokens) and SigLIP (none): blocks 0 and 1 run, block 1 after the selection
    assert trace.vision_tokens[0] == [[261, 261], [5 + n for n in kept_per_image]]
    assert trace.vision_tokens[1] == [[256, 256], kept_per_image]
    assert trace.projector_tokens == sum(kept_per_image) == trace.llm_visual_tokens[0]
    # kept tokens keep their original RoPE slots: 1 + image * 256 + patch
    stream = pruner.stream
    expected = [1 + i * 256 + p for i in range(2) for p in pruner._patch_keep[i].nonzero().flatten().tolist()]
    assert stream.position_ids[0][stream.visual[0]].tolist() == expected
    first_task = stream.position_ids[0][stream.task[0]][0]
    assert int(first_task) == 513  # proprio keeps the slot after all 512 patches
    _, counted = flops.counted_flops(model, pixels, proprio, prompts, 2, hooks=vision_pruner())
    assert flops.query_flops(flops.model_dims(model), trace)["total"] == counted["total"]


def test_vision_placement_batches_match_single_queries():
    model = tiny_model()
    pixels, proprio, prompts = inputs(batch=2, prompt_lengths=(9, 11), seed=3)
    with torch.no_grad():
        batched = model(pixels, proprio, prompts, 2, hooks=vision_pruner())
        single = torch.cat([model(pixels[i:i + 1], proprio[i:i + 1], prompts[i:i + 1], 2, hooks=vision_pruner())
                            for i in range(2)])
    assert torch.allclose(batched, single, atol=1e-5, rtol=0)


@pytest.mark.parametrize("keep", [78, 79])
def test_vision_placement_forces_keep_tokens_over_the_images(keep):
    model = tiny_model()
    pruner = vision_pruner(keep=keep)
    pixels, proprio, prompts = inputs(batch=2, prompt_lengths=(9, 11))
    traces = [QueryTrace(), QueryTrace()]
    with torch.no_grad():
        model(pixels, proprio, prompts, 2, hooks=pruner, traces=traces)
    assert [t.llm_visual_tokens[0] for t in traces] == [keep, keep]
    assert pruner._patch_keep.sum(dim=1).tolist() == [keep - keep // 2, keep // 2] * 2  # per image


def test_vision_placement_from_the_policy_options(tiny_checkpoint):
    policy = make_policy("lightvla_star", {"checkpoint": str(tiny_checkpoint), "random_queries": "true",
                                           "placement": "vision:1", "queries": "8"})
    out = policy.act([fake_observation(2)])[0]
    assert out.stats["visual_tokens"] <= 16
    early = make_policy("lightvla_star", {"checkpoint": str(tiny_checkpoint), "random_queries": "true",
                                          "placement": "vision:0", "queries": "8"})
    stats = early.act([fake_observation(2)])[0].stats
    kept = stats["visual_tokens"]  # over both images; DINOv2 adds 5 prefix tokens per image
    assert stats["tokens_vision_featurizer"] == [2 * (256 + 5), kept + 2 * 5]
    assert stats["tokens_vision_fused_featurizer"] == [2 * 256, kept] and kept <= 16
    with pytest.raises(PolicyOptionError, match="vision:B with 0 <= B < 2"):
        make_policy("lightvla_star", {"checkpoint": str(tiny_checkpoint), "random_queries": "true",
                                      "placement": "vision:2"})


class CaptureSlots(CaptureStream):
    def on_vision_block(self, tower, block, tokens):
        change = super().on_vision_block(tower, block, tokens)
        if change is not None:
            self.block_output, self.slots = getattr(self, "block_output", []) + [tokens], getattr(self, "slots", []) + [change]
        return change


def test_vision_placement_training_fills_query_slots_in_both_towers():
    model = tiny_model().train()
    pruner = CaptureSlots(32, num_queries=16, vision_block=0, prefix_tokens=(5, 0))
    pruner.train()
    pruner.set_progress(3, 10)
    pixels, proprio, prompts = inputs()
    trace = QueryTrace()
    model(pixels, proprio, prompts, 2, hooks=pruner, traces=[trace]).abs().mean().backward()
    # every image becomes 16 slots in both towers from the next block on, and 2 x 16 LLM tokens
    assert trace.vision_tokens[0] == [[261, 261], [5 + 16, 5 + 16]]
    assert trace.vision_tokens[1] == [[256, 256], [16, 16]]
    assert trace.llm_visual_tokens == [32, 32]
    # the forward value of a slot is the patch it selected, in both towers (prefix tokens untouched)
    chosen = pruner._slot_patches
    for tower, prefix in enumerate((5, 0)):
        before, after = pruner.block_output[tower], pruner.slots[tower].tokens
        assert torch.equal(after[:, :prefix], before[:, :prefix])
        picked = before[:, prefix:].gather(1, chosen[..., None].expand(-1, -1, before.shape[-1]))
        assert torch.allclose(after[:, prefix:], picked, atol=1e-6, rtol=0)
    # each slot takes its patch's RoPE slot: 1 + image * 256 + patch
    stream = pruner.stream
    expected = [1 + i * 256 + p for i in range(2) for p in chosen[i].tolist()]
    assert stream.position_ids[0][stream.visual[0]].tolist() == expected
    # the straight-through path trains the queries and both towers' blocks up to the selection
    assert pruner.queries.grad.abs().sum() > 0
    for tower in ("featurizer", "fused_featurizer"):
        grad = model.vision_backbone.get_parameter(f"{tower}.blocks.0.attn.qkv.weight").grad
        assert grad is not None and grad.abs().sum() > 0
    _, counted = flops.counted_flops(model, pixels, proprio, prompts, 2, hooks=pruner)
    assert flops.query_flops(flops.model_dims(model), trace)["total"] == counted["total"]


def test_vision_placement_training_needs_no_more_queries_than_patches():
    model = tiny_model().train()
    pruner = vision_pruner(queries=300)
    pruner.train()
    pixels, proprio, prompts = inputs()
    with pytest.raises(ValueError, match="at most 256 queries"):
        model(pixels, proprio, prompts, 2, hooks=pruner)
