"""Analytic FLOPs equal FlopCounterMode's count, and the full size's terms are the architecture's."""

import torch

from policies.vla import flops
from policies.vla.hooks import Hooks, QueryTrace
from tests.tiny_vla import inputs, tiny_model


class DropHalfVisualAfterLayer0(Hooks):
    """A toy pruning plug-in: after layer 0 keep every second visual token (positions kept)."""

    def after_layer(self, layer, stream, q, k):
        if layer != 0:
            return stream
        visual_index = stream.visual[0].nonzero().flatten()
        drop = visual_index[1::2]
        keep = torch.ones(stream.hidden.shape[1], dtype=torch.bool)
        keep[drop] = False
        stream.hidden = stream.hidden[:, keep]
        stream.position_ids = stream.position_ids[:, keep]
        stream.visual, stream.task = stream.visual[:, keep], stream.task[:, keep]
        return stream


def analytic_and_counted(model, hooks=None, prompt_lengths=(9,)):
    pixels, proprio, prompts = inputs(batch=len(prompt_lengths), prompt_lengths=prompt_lengths)
    traces = [QueryTrace() for _ in prompts]
    with torch.no_grad():
        model(pixels, proprio, prompts, 2, hooks=hooks, traces=traces)
    _, counted = flops.counted_flops(model, pixels, proprio, prompts, 2, hooks=hooks)
    dims = flops.model_dims(model)
    return sum(flops.query_flops(dims, t)["total"] for t in traces), counted["total"], traces


def test_analytic_count_equals_the_flop_counter_on_the_tiny_model():
    analytic, counted, traces = analytic_and_counted(tiny_model())
    assert analytic == counted
    assert traces[0].llm_tokens == [1 + 512 + 1 + 8 + 56 + 1] * 2


def test_analytic_count_follows_pruned_token_counts():
    model = tiny_model()
    analytic, counted, traces = analytic_and_counted(model, DropHalfVisualAfterLayer0())
    assert traces[0].llm_visual_tokens == [512, 256]
    assert analytic == counted
    unpruned, _, _ = analytic_and_counted(model)
    assert analytic < unpruned


def test_full_size_terms_on_the_meta_device():
    from policies.vla.config import full_config
    from policies.vla.model import OFTModel

    with torch.device("meta"):
        model = OFTModel(full_config())
    prompt = 29
    pixels = torch.empty(1, 12, 224, 224, device="meta")
    traces = [QueryTrace()]
    prompts = [[1] + [5] * (prompt - 1)]
    _, counted = flops.counted_flops(model, pixels, torch.empty(1, 8, device="meta"), prompts, 2, traces=traces)
    terms = flops.query_flops(flops.model_dims(model), traces[0])
    n = 1 + 512 + 1 + (prompt - 1) + 56 + 1
    assert traces[0].llm_tokens == [n] * 32
    assert terms["llm_linear"] == 32 * 2 * n * (4 * 4096 ** 2 + 3 * 4096 * 11008)
    assert terms["llm_attention"] == 32 * 4 * n * n * 4096
    assert terms["projector"] == 2 * 512 * (2176 * 8704 + 8704 * 4096 + 4096 * 4096)
    assert terms["action_head"] == 2 * 8 * (7 * 4096 * 4096 + 2 * 4096 * 4096 + 4096 * 7)
    assert terms["total"] == counted["total"]
