"""SparseVLM: budgets met (as a mean over the layers, or after the last stage), progressive
stages, recycling, FLOPs, the identity at a full budget."""

import json
import math
from itertools import pairwise

import pytest
import torch

from policies.base import PolicyOptionError, parse_options
from policies.pruning.adapters import SparseVLMPolicy
from policies.pruning.base import rows_attention
from policies.pruning.sparsevlm import (SparseVLMPruner, choose_raters, cluster_means, density_peaks, numerical_rank,
                                        rank_flops, rate_visual, redundancies, stage_layers)
from policies.vla import flops
from policies.vla.config import replace_llm, tiny_config
from policies.vla.hooks import QueryTrace
from policies.vla.model import OFTModel
from tests.tiny_vla import inputs, recorded_streams, tiny_model, toy_layer


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def deep_model():
    torch.manual_seed(0)
    return OFTModel(replace_llm(tiny_config(), num_layers=8)).eval()


def run(model, hooks, prompt_lengths=(9,)):
    """(actions, traces) of one forward with the plug-in."""
    pixels, proprio, prompts = inputs(batch=len(prompt_lengths), prompt_lengths=prompt_lengths)
    traces = [QueryTrace() for _ in prompts]
    with torch.no_grad():
        actions = model(pixels, proprio, prompts, 2, hooks=hooks, traces=traces)
    return actions, traces


def pruner_for(model, **options) -> SparseVLMPruner:
    args = {key: str(value) for key, value in options.items()}
    return SparseVLMPolicy.plugin(parse_options(SparseVLMPolicy.Options, args, "sparsevlm"), model.config)


def test_stage_layers_keep_their_relative_depth():
    assert stage_layers("2,6,15,19", 32) == [2, 6, 15, 19]
    assert stage_layers("2,6,15,19", 8) == [0, 2, 4, 5]
    assert stage_layers("2,6,15,19", 2) == [0]  # every stage clamps onto the only layer with one after it
    for bad in ("2,31", "x"):
        with pytest.raises(ValueError, match="layer"):
            stage_layers(bad, 32)


@pytest.mark.parametrize("budget", [192, 128, 64, 1])
@pytest.mark.parametrize("prompt_lengths", [(9,), (9, 14, 6)])
def test_a_budget_for_after_the_last_stage_is_met_exactly(model, budget, prompt_lengths):
    _, traces = run(model, pruner_for(model, budget=budget, budget_of="last"), prompt_lengths)
    for trace, length in zip(traces, prompt_lengths):
        assert trace.llm_visual_tokens == [512, budget]
        assert trace.llm_tokens[1] == 1 + budget + 1 + (length - 1) + 56 + 1


@pytest.mark.parametrize("budget", [300, 400])
def test_a_mean_budget_on_two_layers_leaves_the_second_what_the_first_did_not_spend(model, budget):
    _, traces = run(model, pruner_for(model, budget=budget), (9, 14))
    for trace in traces:
        assert trace.llm_visual_tokens == [512, 2 * budget - 512]


@pytest.mark.parametrize("budget", [192, 128, 66])
def test_a_mean_budget_is_the_mean_of_the_visual_tokens_entering_each_layer(deep_model, budget):
    pruner = pruner_for(deep_model, budget=budget)
    assert pruner.layers == [0, 2, 4, 5]  # the last stage's count enters layers 6 and 7
    _, traces = run(deep_model, pruner, (9, 14, 6))
    for trace in traces:
        visual = trace.llm_visual_tokens
        assert visual[0] == 512 and all(a >= b for a, b in pairwise(visual))
        assert abs(sum(visual) / 8 - budget) <= 2 / (2 * 8)  # the last stage's count lands it


def mean_schedule(budget: int, redundancy: float) -> list[int]:
    """Visual tokens entering each of 32 layers under a mean budget, counts only: each stage
    sees what the one before left, and every rater matrix has the given redundancy."""
    pruner = SparseVLMPruner(budget=budget, budget_of="mean", num_layers=32, visual_tokens=512)
    pruner.start(1)
    visual, per_layer = 512, []
    for layer in pruner.layers:
        pruner.account(layer, [visual])
        per_layer += [visual] * (layer + 1 - len(per_layer))
        visual = pruner.target(layer, 0, visual, redundancy)
    return per_layer + [visual] * (32 - len(per_layer))


@pytest.mark.parametrize("budget", [64, 79, 128, 141, 192, 203, 300])
@pytest.mark.parametrize("redundancy", [0.0, 0.5, 0.99])
def test_rank_deficient_raters_delete_more_early_and_the_mean_still_lands(budget, redundancy):
    visual = mean_schedule(budget, redundancy)
    assert all(a >= b >= 1 for a, b in pairwise(visual))
    assert visual[3] <= mean_schedule(budget, 0.0)[3]  # the first stage deletes at least its geometric share
    assert abs(sum(visual) / 32 - budget) <= 12 / (2 * 32)  # 12 layers see the last stage's count


def test_a_mean_budget_out_of_reach_is_refused_by_name(model, deep_model):
    # on 8 layers, stage layer 0 and every later layer at 1 token: a mean of (512 + 7) / 8
    with pytest.raises(PolicyOptionError, match=r"sparsevlm: budget 64 is out of reach .* at least 64\.9"):
        pruner_for(deep_model, budget=64)
    assert pruner_for(deep_model, budget=65).budget == 65
    assert pruner_for(model, budget=64, budget_of="last").budget == 64


def test_deeper_models_prune_progressively(deep_model):
    _, traces = run(deep_model, pruner_for(deep_model, budget=64, budget_of="last"), (9, 14))
    for trace in traces:
        visual = trace.llm_visual_tokens
        assert visual[0] == 512
        assert all(a >= b for a, b in pairwise(visual))
        # stage layers 0, 2, 4 and 5 rate and prune their output: the next layer sees fewer
        reductions = [layer for layer in range(1, 8) if visual[layer] < visual[layer - 1]]
        assert len(reductions) >= 2 and set(reductions) <= {1, 3, 5, 6}
        assert visual[6:] == [64] * 2  # after the last stage


@pytest.mark.parametrize("prompt_lengths", [(9,), (9, 14, 6)])
def test_each_stage_reads_the_host_once_whatever_the_batch(deep_model, prompt_lengths):
    # On a GPU each read waits for the queued layers: a stage reads the Gram matrices of its
    # samples' rater matrices with their rater counts (one copy); it knows the kept counts.
    from policies.vla.graphs import HostReads

    pruner = pruner_for(deep_model, budget=128)
    pixels, proprio, prompts = inputs(batch=len(prompt_lengths), prompt_lengths=prompt_lengths)
    with torch.no_grad(), HostReads() as reads:
        deep_model(pixels, proprio, prompts, 2, hooks=pruner)  # no trace: its counts are one more read
    assert len(pruner.layers) == 4 and reads.count == 4


def test_the_raters_are_chosen_among_the_prompts_text_tokens(model, monkeypatch):
    from policies.pruning import sparsevlm

    seen = []
    original = sparsevlm.rate_visual
    monkeypatch.setattr(sparsevlm, "rate_visual",
                        lambda attention, raters: seen.append(attention) or original(attention, raters))
    run(model, pruner_for(model, budget=300), prompt_lengths=(9, 14))
    # BOS and the prompt's last piece among 9 and 14 tokens: 8 and 13 text tokens after the visual
    # block; the proprio token before them and the 56 action slots and stop token after them are not
    assert [a.shape[0] for a in seen] == [8, 13]


def test_recycling_changes_the_output(model):
    plain, _ = run(model, pruner_for(model, budget=64, budget_of="last", recycle=0.0))
    recycled, traces = run(model, pruner_for(model, budget=64, budget_of="last", recycle=0.3))
    assert traces[0].llm_visual_tokens == [512, 64]
    assert not torch.equal(plain, recycled)


def reference_density_peaks(x, clusters):
    """DPC-KNN written out member by member, for a few members: centres and assignment."""
    n = len(x)
    d = [[float(torch.linalg.vector_norm(x[i] - x[j])) / x.shape[1] ** 0.5 for j in range(n)] for i in range(n)]
    density = [math.exp(-sum(v * v for v in sorted(row)[:clusters]) / clusters) for row in d]
    largest = max(max(row) for row in d)
    reach = [min([d[i][j] for j in range(n) if density[j] > density[i]] or [largest]) for i in range(n)]
    centres = sorted(range(n), key=lambda i: -reach[i] * density[i])[:clusters]
    assign = [centres.index(i) if i in centres else min(range(clusters), key=lambda c: d[centres[c]][i])
              for i in range(n)]
    return centres, assign


def test_clusters_are_density_peaks_and_average_their_members():
    gen = torch.Generator().manual_seed(0)
    # three groups of members around three points, and a straggler
    base = torch.randn(3, 16, generator=gen) * 4
    members = torch.cat([base[i] + 0.3 * torch.randn(n, 16, generator=gen) for i, n in enumerate((5, 4, 3))]
                        + [torch.randn(1, 16, generator=gen)])
    centres, assign = density_peaks(members, 3)
    expected_centres, expected_assign = reference_density_peaks(members, 3)
    assert centres.tolist() == expected_centres and assign.tolist() == expected_assign
    assert len(set(assign[:5].tolist())) == len(set(assign[5:9].tolist())) == len(set(assign[9:12].tolist())) == 1
    merged = cluster_means(members, assign, 3)
    for c in range(3):
        assert torch.allclose(merged[c], members[assign == c].mean(dim=0), atol=1e-6)


def test_importance_is_the_raters_mean_attention_and_the_rank_their_redundancy():
    # Rows over [BOS, 3 visual, 2 more]; text rows 1 and 2 are the raters and look at the image alike.
    rows = torch.tensor([[0.9, 0.05, 0.05, 0.0, 0.0, 0.0],
                         [0.1, 0.3, 0.2, 0.2, 0.1, 0.1],
                         [0.1, 0.3, 0.2, 0.2, 0.1, 0.1],
                         [0.5, 0.1, 0.3, 0.1, 0.0, 0.0]])
    raters = torch.tensor([False, True, True, False])
    importance, gram, count = rate_visual(rows[:, 1:4], raters)
    assert torch.equal(importance, torch.tensor([0.3, 0.2, 0.2]))  # row 3's 0.3 on token 1 is not a rater's
    assert int(count) == 2
    # with a second sample whose two raters see the image differently: rank two, no redundancy
    other = rate_visual(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]), torch.tensor([True, True]))
    eps = torch.finfo(rows.dtype).eps
    assert redundancies([gram, other[1]], [count, other[2]], [3, 3], eps) == [0.5, 0.0]  # rank one of two


def test_raters_are_the_text_tokens_the_image_looks_at_most():
    gen = torch.Generator().manual_seed(0)
    visual, text = torch.randn(2, 7, 16, generator=gen), torch.randn(2, 5, 16, generator=gen)
    # sample 1 has 4 text tokens (the last 4 of 5) and 6 visual tokens (the last 6 of 7)
    text_valid = torch.tensor([[True] * 5, [False] + [True] * 4])
    visual_valid = torch.tensor([[True] * 7, [False] + [True] * 6])
    raters = choose_raters(visual, visual_valid, text, text_valid)
    for b, (v0, t0) in enumerate([(0, 0), (1, 1)]):
        # the reference: softmax over the text of visual . text, averaged over the visual tokens, above the mean
        score = (visual[b, v0:] @ text[b, t0:].T).softmax(dim=-1).mean(dim=0)
        expected = (score > score.mean()) | (score == score.max())
        assert raters[b, t0:].tolist() == expected.tolist() and not raters[b, :t0].any()
        assert 1 <= int(expected.sum()) < len(expected)


def test_raters_are_chosen_once_per_query_before_layer_0(deep_model, monkeypatch):
    from policies.pruning import sparsevlm

    chosen, used = [], []
    original_choose, original_rate = sparsevlm.choose_raters, sparsevlm.rate_visual
    monkeypatch.setattr(sparsevlm, "choose_raters", lambda *a: chosen.append(original_choose(*a)) or chosen[-1])
    monkeypatch.setattr(sparsevlm, "rate_visual",
                        lambda attention, raters: used.append(raters) or original_rate(attention, raters))
    run(deep_model, pruner_for(deep_model, budget=128))
    assert len(chosen) == 1 and len(used) == 4  # one choice, four stages
    assert all(torch.equal(r, chosen[0][0]) for r in used)


@pytest.mark.parametrize("rows, columns", [(40, 512), (87, 512), (512, 40), (6, 6)])
def test_the_rank_from_the_gram_matrix_equals_torchs_matrix_rank(rows, columns):
    gen = torch.Generator().manual_seed(rows + columns)
    for rank in sorted({1, 2, min(rows, columns) // 2, min(rows, columns) - 1, min(rows, columns)}):
        # Rows mixing ``rank`` attention rows, as raters that see the image alike give.
        base = (3 * torch.randn(rank, columns, generator=gen)).softmax(dim=-1)
        matrix = torch.rand(rows, rank, generator=gen).softmax(dim=-1) @ base
        assert numerical_rank(matrix) == int(torch.linalg.matrix_rank(matrix))
        if rank <= min(rows, columns) // 2:  # near full rank, random mixtures can be singular
            assert numerical_rank(matrix) == rank


def test_the_cluster_takes_its_centres_slot():
    visual = 20
    stream, q, k = toy_layer(27, visual)
    # Budget 5 from 20: 16 removed, the 9 most important of them (int(0.5 * 16) + 1) recycled into one cluster.
    pruner = SparseVLMPruner(budget=5, layers=[0], recycle=0.5, cluster_size=100)
    assert pruner.removal_plan(visual, 5) == (16, 9, 1)
    pruner.start(1)
    pruner.before_llm(stream)
    out = pruner.after_layer(0, stream, q, k)

    columns = torch.arange(1, 1 + visual)
    importance, _, _ = rate_visual(rows_attention(q[:, :, -6:], k, None)[0][:, columns], pruner._raters[0])
    ranked = columns[importance.argsort(descending=True)]
    kept, recycled = ranked[:4], ranked[4:13]
    (centre,) = density_peaks(stream.hidden[0, recycled], 1)[0].tolist()  # one cluster: the densest member leads
    assert out.position_ids[0][out.visual[0]].tolist() == sorted(kept.tolist() + [int(recycled[centre])])
    hidden = dict(zip(out.position_ids[0].tolist(), out.hidden[0]))
    for column in kept.tolist():
        assert torch.equal(hidden[column], stream.hidden[0, column])
    assert torch.allclose(hidden[int(recycled[centre])], stream.hidden[0, recycled].mean(dim=0), atol=1e-6)


def test_renumbered_the_cluster_follows_the_kept_visual_tokens_and_positions_count_from_0():
    stream, q, k = toy_layer(27, 20)
    outputs = {}
    for positions in ("keep", "renumber"):
        pruner = SparseVLMPruner(budget=5, layers=[0], recycle=0.5, cluster_size=100, positions=positions)
        pruner.start(1)
        pruner.before_llm(stream)
        outputs[positions] = pruner.after_layer(0, stream, q, k)
    kept, out = outputs["keep"], outputs["renumber"]
    # 16 of 20 visual tokens removed, one aggregated token in the centre's slot: 12 tokens left
    assert out.position_ids[0].tolist() == list(range(12))
    rows = list(zip(kept.position_ids[0].tolist(), kept.hidden[0], kept.visual[0].tolist()))
    (aggregate,) = [row for row in rows if not torch.equal(row[1], stream.hidden[0, row[0]])]
    others = [row for row in rows if row is not aggregate]
    after_visual = 1 + sum(visual for _, _, visual in others)  # BOS and the kept visual tokens
    expected = others[:after_visual] + [aggregate] + others[after_visual:]
    assert torch.equal(out.hidden[0], torch.stack([hidden for _, hidden, _ in expected]))
    assert out.visual[0].tolist() == [visual for _, _, visual in expected]


def test_renumbered_positions_count_each_samples_real_tokens_from_0(deep_model):
    pruner = pruner_for(deep_model, budget=128)
    stages = recorded_streams(pruner, pruner.layers)
    renumbered, _ = run(deep_model, pruner, (9, 14, 6))
    # the samples' prompts differ in length: their streams are padded
    assert len(stages) == 4 and all(out.padding is not None for out in stages)
    for out in stages:
        for b, real in enumerate(out.real()):
            assert out.position_ids[b][real].tolist() == list(range(int(real.sum())))
    kept, _ = run(deep_model, pruner_for(deep_model, budget=128, positions="keep"), (9, 14, 6))
    assert not torch.equal(renumbered, kept)


def test_removal_plan_counts_aggregates_towards_the_target():
    # The reference's counts: the top 30% of the removed tokens plus one, in a tenth of them plus one clusters.
    pruner = SparseVLMPruner(budget=64, layers=[0], recycle=0.3, cluster_size=10)
    for visual, target in [(512, 64), (512, 401), (401, 400), (100, 1)]:
        removed, recycled, clusters = pruner.removal_plan(visual, target)
        assert visual - removed + clusters == target
        assert recycled == 3 * removed // 10 + 1 and clusters == min(recycled // 10 + 1, target)
    assert SparseVLMPruner(budget=64, layers=[0], recycle=0.0).removal_plan(512, 64) == (448, 0, 0)


def scoring_flops(model, pruner, trace) -> float:
    """The plug-in's own matrix products: the rater choice, text rows over all keys, the recycled
    members' pairwise distances, and the Gram product of the text rows' attention to the visual tokens."""
    dims = flops.model_dims(model)
    text = trace.llm_tokens[0] - 1 - 512 - 1 - 57  # all but BOS, the visual block, proprio, action slots and stop
    total = 2 * 512 * text * dims.hidden  # choosing the raters from the embeddings
    for stage in pruner.layers:
        tokens, visual = trace.llm_tokens[stage], trace.llm_visual_tokens[stage]
        total += 2 * text * tokens * dims.q_dim
        _, recycled, clusters = pruner.removal_plan(visual, trace.llm_visual_tokens[stage + 1])
        total += 2 * recycled * recycled * dims.hidden if clusters else 0  # the recycled tokens' distances
        total += rank_flops(text, visual)
    return total


@pytest.mark.parametrize("recycle", [0.0, 0.3])
def test_analytic_flops_with_the_plugins_own_products_equal_the_flop_counter(model, recycle):
    pruner = pruner_for(model, budget=64, budget_of="last", recycle=recycle)
    pixels, proprio, prompts = inputs()
    traces = [QueryTrace()]
    _, counted = flops.counted_flops(model, pixels, proprio, prompts, 2, hooks=pruner, traces=traces)
    analytic = flops.query_flops(flops.model_dims(model), traces[0])["total"]
    assert traces[0].llm_visual_tokens == [512, 64]
    assert traces[0].plugin_flops == scoring_flops(model, pruner, traces[0])
    assert counted["total"] == analytic


def test_on_the_meta_device_the_flop_counter_equals_the_analytic_count():
    with torch.device("meta"):
        model = OFTModel(tiny_config()).eval()
    pruner = pruner_for(model, budget=64, budget_of="last")
    traces = [QueryTrace()]
    pixels = torch.empty(1, 12, 224, 224, device="meta")
    _, counted = flops.counted_flops(model, pixels, torch.empty(1, 8, device="meta"), [[1] + [5] * 8], 2,
                                     hooks=pruner, traces=traces)
    assert traces[0].llm_visual_tokens == [512, 64]
    assert counted["total"] == flops.query_flops(flops.model_dims(model), traces[0])["total"]


def test_a_budget_of_every_token_changes_nothing(model):
    pixels, proprio, prompts = inputs(batch=2, prompt_lengths=(9, 12))
    with torch.no_grad():
        unpruned = model(pixels, proprio, prompts, 2)
    pruned, traces = run(model, pruner_for(model, budget=512), (9, 12))
    assert torch.equal(pruned, unpruned)
    assert traces[0].llm_visual_tokens == [512, 512]


@pytest.mark.parametrize("option, value", [("budget", "0"), ("layers", "2,x"), ("layers", "6,31"),
                                           ("recycle", "1.5"), ("cluster_size", "0"), ("budget_of", "first"),
                                           ("positions", "shift")])
def test_invalid_options_are_named(model, option, value):
    with pytest.raises(PolicyOptionError, match=f"sparsevlm: {option}"):
        pruner_for(model, **{option: value})


def test_bench_profile_meets_the_budget_on_the_full_size(capsys):
    from bench.cli import main

    assert main(["profile", "--policy", "sparsevlm", "--keep", "64", "--size", "full", "--device", "meta",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    visual = result["visual_tokens_per_layer"]
    # the first stage, layer 2, rates with its own attention: layer 3 is the first to see fewer
    assert visual[:3] == [512] * 3 and visual[3] < 512
    assert abs(sum(visual) / 32 - 64) <= 12 / (2 * 32)  # 12 layers see the last stage's count
    assert result["tflops_counted"] == pytest.approx(result["tflops_per_query"], rel=1e-9)
