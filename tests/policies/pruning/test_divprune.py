"""DivPrune: the reference's greedy max-min choice, kept counts, order and positions, exact
identity when everything is kept, batches, FLOPs, graphs without host reads."""

import numpy as np
import pytest
import torch

from policies.base import PolicyOptionError
from policies.pruning.divprune import DivPrunePruner, cosine_distances, max_min_diverse
from policies.registry import make_policy
from policies.vla import flops
from policies.vla.hooks import QueryTrace
from tests.tiny_vla import inputs, tiny_model, toy_stream


def reference_choice(features: np.ndarray, count: int) -> list[int]:
    """The reference's loop, written out: the first token by its column's second-smallest
    distance, each next by the minimum over all chosen rows, recomputed at every step."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    distance = 1.0 - unit @ unit.T
    chosen = []
    for i in range(count):
        scores = np.sort(distance, axis=0)[1] if i == 0 else distance[chosen].min(axis=0)
        chosen.append(int(np.argmax(scores)))
    return chosen


@pytest.mark.parametrize("v, d, count", [(16, 8, 5), (64, 32, 20), (512, 64, 50)])
def test_the_choice_is_the_reference_greedy_max_min(v, d, count):
    features = torch.randn(2, v, d, generator=torch.Generator().manual_seed(v), dtype=torch.float64)
    picks = max_min_diverse(cosine_distances(features).double(), count)
    for b in range(2):
        assert picks[b].tolist() == reference_choice(features[b].numpy(), count)
    assert picks[0].tolist() != picks[1].tolist()  # each sample is chosen on its own


def test_each_token_is_chosen_once_even_among_duplicates():
    # Four distinct directions, each four times: after the four, every score is 0; a chosen
    # token is not chosen again, the next is a duplicate not yet taken.
    base = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    features = base.repeat(4, 1)[None]
    picks = max_min_diverse(cosine_distances(features), 10)[0].tolist()
    assert len(set(picks)) == 10
    assert sorted(p % 4 for p in picks[:4]) == [0, 1, 2, 3]  # the four directions come first


@pytest.mark.parametrize("positions", ["renumber", "keep"])
def test_the_chosen_tokens_stay_in_order_with_renumbered_or_original_positions(positions):
    s = toy_stream()
    chosen = sorted(reference_choice(s.hidden[0, 1:17].double().numpy(), 5))
    out = DivPrunePruner(keep=5, positions=positions).before_llm(s)
    assert out.sizes.visual == (5,) and out.hidden.shape[1] == 1 + 5 + 6
    assert torch.equal(out.hidden[0, out.visual[0]], s.hidden[0, [1 + j for j in chosen]])
    visual_positions = out.position_ids[0][out.visual[0]].tolist()
    if positions == "keep":
        assert visual_positions == [1 + j for j in chosen] and out.position_ids[0, -1] == 1 + 16 + 5
    else:
        assert out.position_ids[0].tolist() == list(range(12))


def test_the_kept_count_is_the_rounded_ratio_or_keep_and_flops_equal_the_counter():
    model = tiny_model()
    pixels, proprio, prompts = inputs()
    for pruner, kept in ((DivPrunePruner(), round(0.098 * 512)), (DivPrunePruner(ratio=0.25), 128),
                         (DivPrunePruner(keep=78), 78)):
        trace = QueryTrace()
        with torch.no_grad():
            model(pixels, proprio, prompts, 2, hooks=pruner, traces=[trace])
        assert trace.llm_visual_tokens == [kept] * model.config.llm.num_layers
        _, counted = flops.counted_flops(model, pixels, proprio, prompts, 2, hooks=pruner)
        assert flops.query_flops(flops.model_dims(model), trace)["total"] == counted["total"]


@pytest.mark.parametrize("positions", ["renumber", "keep"])
def test_keeping_every_token_reproduces_the_unpruned_model_exactly(positions):
    # One sample's positions are already 0, 1, ...: renumbering them changes nothing either.
    model = tiny_model()
    pixels, proprio, prompts = inputs()
    with torch.no_grad():
        plain = model(pixels, proprio, prompts, 2)
        kept = model(pixels, proprio, prompts, 2, hooks=DivPrunePruner(ratio=1.0, positions=positions))
    assert torch.equal(plain, kept)


def test_a_padded_batch_matches_single_queries():
    model = tiny_model()
    pixels, proprio, prompts = inputs(batch=3, prompt_lengths=(9, 14, 6), seed=4)
    with torch.no_grad():
        batched = model(pixels, proprio, prompts, 2, hooks=DivPrunePruner(keep=40))
        singles = [model(pixels[i:i + 1], proprio[i:i + 1], prompts[i:i + 1], 2, hooks=DivPrunePruner(keep=40))
                   for i in range(3)]
    assert torch.allclose(batched, torch.cat(singles), atol=1e-5, rtol=0)


def test_graphed_queries_equal_eager_ones_and_read_nothing_on_the_host():
    from policies.vla.graphs import HostReads

    model = tiny_model()
    pixels, proprio, prompts = inputs(batch=2, prompt_lengths=(9, 14))
    with torch.inference_mode():
        eager = model(pixels, proprio, prompts, 2, hooks=DivPrunePruner(keep=30))
        model.use_cuda_graphs()  # on a CPU the graphed parts run as stand-ins, refusing host reads
        try:
            with HostReads() as reads:
                graphed = model(pixels, proprio, prompts, 2, hooks=DivPrunePruner(keep=30))
        finally:
            model.use_cuda_graphs(False)
    assert torch.equal(eager, graphed)
    assert reads.count == 0


def test_bad_settings_are_named(tiny_checkpoint):
    with pytest.raises(PolicyOptionError, match="keep=600 exceeds the query's 512 visual tokens"):
        make_policy("divprune", {"checkpoint": str(tiny_checkpoint), "keep": "600"})
    with pytest.raises(PolicyOptionError, match="ratio must be a fraction"):
        make_policy("divprune", {"checkpoint": str(tiny_checkpoint), "ratio": "0"})
    with pytest.raises(PolicyOptionError, match="positions must be one of renumber, keep"):
        make_policy("divprune", {"checkpoint": str(tiny_checkpoint), "positions": "shift"})
