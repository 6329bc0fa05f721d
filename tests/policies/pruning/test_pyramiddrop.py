"""PyramidDrop: staged counts, ranking by the stage layer's own queries and keys of the tokens
still there, exact identity when everything is kept, batches, FLOPs, graphs without reads."""

import math

import pytest
import torch

from policies.base import PolicyOptionError
from policies.pruning.pyramiddrop import PyramidDropPruner
from policies.registry import make_policy
from policies.vla import flops
from policies.vla.hooks import Hooks, QueryTrace
from policies.vla.model import prompt_margins
from tests.tiny_vla import inputs

STAGES = dict(layers=(2, 4, 6), ratios=(0.5, 0.25, 0.125))


def pruner(model, **options):
    return PyramidDropPruner(**{**STAGES, "text_margins": prompt_margins(model.config), **options})


def test_each_stage_keeps_its_share_of_the_visual_tokens_from_its_layer_on(model8):
    pixels, proprio, prompts = inputs()
    trace = QueryTrace()
    with torch.no_grad():
        model8(pixels, proprio, prompts, 2, hooks=pruner(model8), traces=[trace])
    assert trace.llm_visual_tokens == [512] * 2 + [256] * 2 + [128] * 2 + [64] * 2
    assert trace.llm_tokens[2] == trace.llm_tokens[0] - 256


class QKAt(Hooks):
    """The queries and keys layer ``layer`` computes in an unpruned query."""

    def __init__(self, layer):
        self.layer = layer

    def wants_qk(self, layer):
        return layer == self.layer

    def after_layer(self, layer, stream, q, k):
        if layer == self.layer:
            self.q, self.k, self.stream = q, k, stream
        return stream


class Seen(PyramidDropPruner):
    def before_layer(self, layer, stream, queries_keys):
        out = super().before_layer(layer, stream, queries_keys)
        if layer == 2:
            self.kept_positions = out.position_ids[0][out.visual[0]].tolist()
        return out


@pytest.mark.parametrize("query", ["instruction", "last"])
def test_the_first_stage_ranks_by_the_stage_layers_attention_of_the_unpruned_tokens(model8, query):
    # Written out as the reference does it: layer 2's q and k of layer 1's output, the ranking
    # token's row, softmax, mean over heads, the most attended visual tokens in order.
    pixels, proprio, prompts = inputs()
    full = QKAt(2)
    seen = Seen(**STAGES, text_margins=prompt_margins(model8.config), query=query, positions="keep")
    with torch.no_grad():
        model8(pixels, proprio, prompts, 2, hooks=full)
        model8(pixels, proprio, prompts, 2, hooks=seen)
    row = full.q.shape[2] - (1 if query == "last" else 56 + 1 + 1)  # the stop token; the prompt's last
    keys = full.k[0].repeat_interleave(full.q.shape[1] // full.k.shape[1], dim=0)  # grouped key heads
    scores = torch.einsum("hd,htd->ht", full.q[0, :, row], keys) / math.sqrt(full.q.shape[-1])
    attention = scores.softmax(dim=-1).mean(dim=0)[1:513]  # visual columns 1-512
    expected = sorted(1 + int(i) for i in attention.topk(256).indices)
    assert seen.kept_positions == expected


def test_the_instruction_and_the_stop_token_rank_differently(model8):
    pixels, proprio, prompts = inputs()
    kept = {}
    for query in ("instruction", "last"):
        seen = Seen(**STAGES, text_margins=prompt_margins(model8.config), query=query, positions="keep")
        with torch.no_grad():
            model8(pixels, proprio, prompts, 2, hooks=seen)
        kept[query] = seen.kept_positions
    assert kept["instruction"] != kept["last"]


@pytest.mark.parametrize("positions", ["renumber", "keep"])
def test_keeping_every_token_reproduces_the_unpruned_model_exactly(model8, positions):
    pixels, proprio, prompts = inputs()
    with torch.no_grad():
        plain = model8(pixels, proprio, prompts, 2)
        kept = model8(pixels, proprio, prompts, 2, hooks=pruner(model8, ratios=(1.0, 1.0, 1.0), positions=positions))
    assert torch.equal(plain, kept)


def test_renumbered_positions_count_from_0_and_kept_ones_stay(model8):
    pixels, proprio, prompts = inputs()
    positions = {}
    for mode in ("renumber", "keep"):
        seen = Seen(**STAGES, text_margins=prompt_margins(model8.config), positions=mode)
        with torch.no_grad():
            model8(pixels, proprio, prompts, 2, hooks=seen)
        positions[mode] = seen.kept_positions
    assert positions["renumber"] == list(range(1, 257))  # BOS at 0, then the kept visual tokens
    assert len(positions["keep"]) == 256 and positions["keep"][-1] > 256


def test_flops_equal_the_counter(model8):
    pixels, proprio, prompts = inputs()
    trace = QueryTrace()
    with torch.no_grad():
        model8(pixels, proprio, prompts, 2, hooks=pruner(model8), traces=[trace])
    _, counted = flops.counted_flops(model8, pixels, proprio, prompts, 2, hooks=pruner(model8))
    assert flops.query_flops(flops.model_dims(model8), trace)["total"] == counted["total"]


def test_a_padded_batch_matches_single_queries(model8):
    pixels, proprio, prompts = inputs(batch=3, prompt_lengths=(9, 14, 6), seed=3)
    traces = [QueryTrace() for _ in range(3)]
    with torch.no_grad():
        batched = model8(pixels, proprio, prompts, 2, hooks=pruner(model8), traces=traces)
        singles = [model8(pixels[i:i + 1], proprio[i:i + 1], prompts[i:i + 1], 2, hooks=pruner(model8))
                   for i in range(3)]
    assert torch.allclose(batched, torch.cat(singles), atol=1e-5, rtol=0)
    assert all(t.llm_visual_tokens == [512] * 2 + [256] * 2 + [128] * 2 + [64] * 2 for t in traces)


def test_graphed_queries_equal_eager_ones_and_read_nothing_on_the_host(model8):
    from policies.vla.graphs import HostReads

    pixels, proprio, prompts = inputs(batch=2, prompt_lengths=(9, 14))
    with torch.inference_mode():
        eager = model8(pixels, proprio, prompts, 2, hooks=pruner(model8))
        model8.use_cuda_graphs()
        try:
            with HostReads() as reads:
                graphed = model8(pixels, proprio, prompts, 2, hooks=pruner(model8))
        finally:
            model8.use_cuda_graphs(False)
    assert torch.equal(eager, graphed)
    assert reads.count == 0


def test_bad_settings_are_named(tiny_checkpoint):
    def build(**options):
        make_policy("pyramiddrop", {"checkpoint": str(tiny_checkpoint), **options})

    with pytest.raises(PolicyOptionError, match=r"fall on layers \[1, 1, 1\] of this 2-layer LLM"):
        build()  # the tiny model has 2 layers
    with pytest.raises(PolicyOptionError, match="one ratio per stage layer"):
        build(layers="16", ratios="0.5,0.25")
    with pytest.raises(PolicyOptionError, match="query must be one of instruction, last"):
        build(layers="16", ratios="0.5", query="first")
    with pytest.raises(ValueError, match="increasing and 1 or later"):
        PyramidDropPruner(layers=(0, 4), ratios=(0.5, 0.25))
    with pytest.raises(ValueError, match="do not grow from stage to stage"):
        PyramidDropPruner(layers=(2, 4), ratios=(0.25, 0.5))
