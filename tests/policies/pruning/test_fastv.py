"""FastV: exact drop count after layer k-1, ranked by the last token's attention from q and k."""

import pytest
import torch

from policies.pruning.base import last_token_attention
from policies.pruning.fastv import FastVPruner
from policies.vla import flops
from policies.vla.config import replace_llm, tiny_config
from policies.vla.hooks import QueryTrace
from policies.vla.model import OFTModel
from tests.tiny_vla import inputs


@pytest.fixture(scope="module")
def model8():
    torch.manual_seed(0)
    return OFTModel(replace_llm(tiny_config(), num_layers=8)).eval()


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
            self.before = stream
            self.attention = last_token_attention(q, k, stream.padding)
        out = super().after_layer(layer, stream, q, k)
        if layer == self.k - 1:
            self.after = out
        return out


def test_kept_tokens_are_those_the_last_token_attends_to_most(model8):
    pixels, proprio, prompts = inputs(seed=1)
    hook = Recorder(2, 0.5)
    with torch.no_grad():
        model8(pixels, proprio, prompts, 2, hooks=hook)
    visual_columns = hook.before.visual[0].nonzero().flatten()
    scores = hook.attention[0, visual_columns]
    expected = set(visual_columns[scores.argsort(descending=True)[:256]].tolist())
    kept_positions = set(hook.after.position_ids[0][hook.after.visual[0]].tolist())
    assert kept_positions == {int(hook.before.position_ids[0, c]) for c in expected}
    # the attention row sums to one over all keys
    assert torch.allclose(hook.attention.sum(-1), torch.ones(1), atol=1e-5)


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
