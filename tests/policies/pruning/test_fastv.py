"""FastV: exact drop count after layer k-1, ranked by the last token's attention from q and k."""

import pytest
import torch

from policies.pruning.fastv import FastVPruner
from policies.vla import flops
from policies.vla.hooks import QueryTrace
from tests.tiny_vla import inputs, toy_layer


@pytest.mark.parametrize("k, r", [(2, 0.5), (3, 0.75), (1, 0.3)])
def test_drops_floor_r_visual_tokens_from_layer_k(model8, k, r):
    pixels, proprio, prompts = inputs()
    trace = QueryTrace()
    with torch.no_grad():
        model8(pixels, proprio, prompts, 2, hooks=FastVPruner(k, r), traces=[trace])
    kept = 512 - int(r * 512)
    assert trace.llm_visual_tokens == [512] * k + [kept] * (8 - k)
    assert trace.llm_tokens[k] == trace.llm_tokens[0] - int(r * 512)


class Recorder(FastVPruner):
    def after_layer(self, layer, stream, q, k):
        if layer == self.k - 1:
            self.before, self.q, self.k_ = stream, q, k
        out = super().after_layer(layer, stream, q, k)
        if layer == self.k - 1:
            self.after = out
        return out


def explicit_attention(q, k, padding):
    """Every head's full attention matrix, written out: softmax(q k^T / sqrt(d)) over the
    unpadded keys, with each key head shared by its group of query heads."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5
    if padding is not None:
        logits = logits.masked_fill(padding[:, None, None, :], float("-inf"))
    return logits.softmax(dim=-1)  # (B, H, T, T)


@pytest.mark.parametrize("prompt_lengths", [(9,), (9, 14)])
def test_kept_tokens_are_those_the_last_token_attends_to_most(model8, prompt_lengths):
    pixels, proprio, prompts = inputs(batch=len(prompt_lengths), prompt_lengths=prompt_lengths, seed=1)
    hook = Recorder(2, 0.5)
    with torch.no_grad():
        model8(pixels, proprio, prompts, 2, hooks=hook)
    before, after = hook.before, hook.after
    last_row = explicit_attention(hook.q, hook.k_, before.padding)[:, :, -1].mean(dim=1)  # (B, T)
    for b in range(len(prompts)):
        visual_columns = before.visual[b].nonzero().flatten()
        scores = last_row[b, visual_columns]
        expected = visual_columns[scores.argsort(descending=True)[:256]]
        kept_positions = set(after.position_ids[b][after.visual[b]].tolist())
        assert kept_positions == set(before.position_ids[b, expected].tolist())


def test_the_drop_count_is_floor_r_times_the_visual_tokens_in_exact_arithmetic():
    from fractions import Fraction

    visual = 100
    stream, q, k = toy_layer(120, visual)
    for r in ("0.53", "0.29", "0.57", "0.5"):
        out = FastVPruner(1, float(r)).after_layer(0, stream, q, k)
        dropped = visual - int(out.visual.sum())
        assert dropped == int(Fraction(r) * visual)  # 0.53: 53, 0.29: 29 (float32 gives 52, double 28)


def test_r_zero_reproduces_the_unpruned_model_exactly(model8):
    pixels, proprio, prompts = inputs()
    with torch.no_grad():
        assert torch.equal(model8(pixels, proprio, prompts, 2), model8(pixels, proprio, prompts, 2, hooks=FastVPruner(2, 0.0)))


def test_flops_equal_the_counter_and_batches_work(model8):
    pixels, proprio, prompts = inputs(batch=2, prompt_lengths=(9, 13))
    traces = [QueryTrace(), QueryTrace()]
    with torch.no_grad():
        batched = model8(pixels, proprio, prompts, 2, hooks=FastVPruner(2, 0.5), traces=traces)
        single = model8(pixels[1:], proprio[1:], prompts[1:], 2, hooks=FastVPruner(2, 0.5))
    assert torch.allclose(batched[1:], single, atol=1e-5)
    pixels, proprio, prompts = inputs()
    trace = QueryTrace()
    with torch.no_grad():
        model8(pixels, proprio, prompts, 2, hooks=FastVPruner(2, 0.5), traces=[trace])
    _, counted = flops.counted_flops(model8, pixels, proprio, prompts, 2, hooks=FastVPruner(2, 0.5))
    assert flops.query_flops(flops.model_dims(model8), trace)["total"] == counted["total"]


def test_invalid_settings_are_named():
    with pytest.raises(ValueError, match="k >= 1"):
        FastVPruner(0, 0.5)
    with pytest.raises(ValueError, match=r"r must be in \[0, 1\)"):
        FastVPruner(2, 1.0)


@pytest.mark.parametrize("r", [0.29, 0.3, 0.5, 0.53, 0.75, 0.1, 0.9, 0.333, 0.6667, 0.125])
def test_the_host_and_the_device_drop_the_same_counts(r):
    counts = torch.arange(0, 4097)
    for pruner in (FastVPruner(2, r), FastVPruner(2, keep=int(r * 1000))):
        assert pruner.dropped(counts).tolist() == pruner.dropped_on_host(counts.tolist())
    assert FastVPruner(2, 0.29).dropped_on_host([100]) == [29]  # not 28: 0.29 * 100 is 28.999999999999996

