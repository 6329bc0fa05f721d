"""LightVLA: scoring as the reference, union-of-argmax keep, positions, batching, training path."""

import math

import pytest
import torch

from policies.pruning.base import keep_tokens
from policies.pruning.lightvla import LightVLAPruner, lightvla_scores, straight_through, union_of_argmax
from policies.vla import flops
from policies.vla.hooks import QueryTrace, TokenStream
from tests.tiny_vla import inputs, tiny_model, toy_stream


def direct_scores(p, t):
    def norm(x):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    p, t = norm(p), norm(t)
    queries = norm(torch.softmax(p @ t.T / math.sqrt(p.shape[-1]), dim=-1) @ t)
    return queries @ p.T / math.sqrt(p.shape[-1])


def test_scores_follow_the_reference_formula():
    s = toy_stream()
    ours = lightvla_scores(s.hidden[:, 1:17], s.hidden[:, 17:])
    assert ours.shape == (1, 16, 16)
    assert torch.allclose(ours[0], direct_scores(s.hidden[0, 1:17], s.hidden[0, 17:]), atol=1e-5)


def test_inference_keeps_the_distinct_argmax_in_order_with_original_positions():
    s = toy_stream()
    scores = lightvla_scores(s.hidden[:, 1:17], s.hidden[:, 17:])
    chosen = sorted(set(scores[0].argmax(-1).tolist()))
    out = LightVLAPruner().before_llm(s)
    assert int(out.visual.sum()) == len(chosen) < 16
    visual_positions = out.position_ids[0][out.visual[0]].tolist()
    assert visual_positions == [1 + j for j in chosen]  # original RoPE positions, original order
    assert out.position_ids[0, 0] == 0 and out.position_ids[0, -1] == s.position_ids[0, -1]
    assert torch.equal(out.hidden[0][out.visual[0]], s.hidden[0, [1 + j for j in chosen]])


def test_batches_with_different_keep_counts_match_single_queries():
    model = tiny_model()
    pixels, proprio, prompts = inputs(batch=3, prompt_lengths=(9, 12, 9), seed=4)
    traces = [QueryTrace() for _ in range(3)]
    with torch.no_grad():
        batched = model(pixels, proprio, prompts, 2, hooks=LightVLAPruner(), traces=traces)
        singles, single_traces = [], []
        for i in range(3):
            trace = QueryTrace()
            singles.append(model(pixels[i:i + 1], proprio[i:i + 1], prompts[i:i + 1], 2, hooks=LightVLAPruner(),
                                 traces=[trace]))
            single_traces.append(trace)
    assert torch.allclose(batched, torch.cat(singles), atol=1e-5, rtol=0)
    counts = [t.llm_visual_tokens[0] for t in traces]
    assert counts == [t.llm_visual_tokens[0] for t in single_traces]
    assert len(set(counts)) > 1 and max(counts) < 512


def test_the_streams_carry_their_counts_and_a_query_reads_the_host_once():
    # On a GPU each read waits for the queued kernels: the assembled stream and every stream
    # keep_tokens makes carry their counts, so LightVLA reads only its kept counts.
    from policies.vla.graphs import HostReads
    from policies.vla.hooks import read_sizes

    class Capture(LightVLAPruner):
        def before_llm(self, stream):
            self.given, self.kept = stream, super().before_llm(stream)
            return self.kept

    model, pruner = tiny_model(), Capture()
    pixels, proprio, prompts = inputs(batch=2, prompt_lengths=(9, 14))
    model.use_cuda_graphs()  # on a CPU the graphed parts run as stand-ins, as a GPU query runs them
    with torch.inference_mode(), HostReads() as reads:
        model(pixels, proprio, prompts, 2, hooks=pruner)
    model.use_cuda_graphs(False)
    assert reads.count == 1
    for stream in (pruner.given, pruner.kept):
        real = ~stream.padding if stream.padding is not None else torch.ones_like(stream.visual)
        assert stream.sizes == read_sizes(real, stream.visual, stream.task)
    assert pruner.given.sizes.task == (1 + 8 + 56 + 1, 1 + 13 + 56 + 1)
    assert pruner.kept.sizes.visual != pruner.given.sizes.visual


def test_keep_everything_reproduces_the_unpruned_model_exactly():
    model = tiny_model()
    pixels, proprio, prompts = inputs()
    with torch.no_grad():
        plain = model(pixels, proprio, prompts, 2)
        kept = model(pixels, proprio, prompts, 2, hooks=LightVLAPruner(keep=512))
    assert torch.equal(plain, kept)
    stream = toy_stream()
    assert torch.equal(keep_tokens(stream, torch.ones_like(stream.visual)).hidden, stream.hidden)


def test_forced_keep_count_and_flops_equal_the_counter():
    model = tiny_model()
    pixels, proprio, prompts = inputs()
    trace = QueryTrace()
    with torch.no_grad():
        model(pixels, proprio, prompts, 2, hooks=LightVLAPruner(keep=78), traces=[trace])
    _, counted = flops.counted_flops(model, pixels, proprio, prompts, 2, hooks=LightVLAPruner(keep=78))
    assert trace.llm_visual_tokens == [78, 78]
    assert flops.query_flops(flops.model_dims(model), trace)["total"] == counted["total"]


def test_training_mode_keeps_512_slots_with_the_selected_positions():
    s = toy_stream()
    pruner = LightVLAPruner()
    pruner.training = True
    out = pruner.before_llm(s)
    assert out.hidden.shape == s.hidden.shape and int(out.visual.sum()) == 16
    scores = lightvla_scores(s.hidden[:, 1:17], s.hidden[:, 17:])
    assert out.position_ids[0, 1:17].tolist() == (1 + scores[0].argmax(-1)).tolist()
    # forward value of W @ P is the selected tokens themselves (duplicates allowed)
    assert torch.allclose(out.hidden[0, 1:17], s.hidden[0, 1 + scores[0].argmax(-1)], atol=1e-6)
    # without noise the training selection names as many distinct tokens as inference keeps
    assert pruner.selected_tokens.tolist() == union_of_argmax(scores).sum(dim=1).tolist()
    assert 0 < int(pruner.selected_tokens[0]) < 16  # duplicates: fewer than the 16 slots


def test_noise_is_annealed_to_zero():
    pruner = LightVLAPruner()
    pruner.set_progress(0, 100)
    assert pruner.noise_scale == 1.0
    pruner.set_progress(75, 100)
    assert pruner.noise_scale == pytest.approx(0.25)
    pruner.set_progress(100, 100)
    assert pruner.noise_scale == 0.0
    with pytest.raises(ValueError, match="max_steps must be at least 1"):
        pruner.set_progress(0, 0)


def test_training_noise_is_uniform_scaled_and_absent_at_inference():
    s = toy_stream(seed=3)
    scores = lightvla_scores(s.hidden[:, 1:17], s.hidden[:, 17:])
    torch.manual_seed(5)
    noise = torch.rand_like(scores)  # U[0, 1), drawn as the pruner will draw it
    for scale in (0.0, 0.5, 3.0):
        torch.manual_seed(5)
        weights, indices = straight_through(scores, scale)
        assert torch.equal(indices, (scores + scale * noise).argmax(dim=-1))
        assert torch.allclose(weights, torch.nn.functional.one_hot(indices, 16).float(), atol=1e-6)
    torch.manual_seed(5)
    assert not torch.equal(straight_through(scores, 3.0)[1], scores.argmax(dim=-1))  # the noise matters
    pruner = LightVLAPruner()
    pruner.noise_scale = 3.0  # inference ignores it
    out = pruner.before_llm(s)
    assert out.position_ids[0][out.visual[0]].tolist() == [1 + j for j in sorted(set(scores[0].argmax(-1).tolist()))]


@pytest.mark.parametrize("training", [False, True])
def test_gradients_flow_through_the_selection_only_in_training(training):
    s = toy_stream(seed=2)
    s.hidden.requires_grad_(True)
    pruner = LightVLAPruner()
    pruner.training = training
    out = pruner.before_llm(s)
    weights = torch.randn_like(out.hidden)
    (out.hidden * weights).sum().backward()
    task_grad = s.hidden.grad[0, 17:]
    identity_part = weights[0, -6:]
    if training:  # the soft part of the straight-through estimator reaches the task tokens' scores
        assert not torch.allclose(task_grad, identity_part, atol=1e-6)
    else:  # only the gather: task tokens pass through, dropped visual tokens get nothing
        assert torch.equal(task_grad, identity_part)
        kept = set(union_of_argmax(lightvla_scores(s.hidden[:, 1:17].detach(), s.hidden[:, 17:].detach()))[0]
                   .nonzero().flatten().tolist())
        for j in set(range(16)) - kept:
            assert torch.count_nonzero(s.hidden.grad[0, 1 + j]) == 0


class CaptureInput(LightVLAPruner):
    """Keeps the visual tokens LightVLA is given, to read their gradients."""

    def before_llm(self, stream):
        stream.hidden.retain_grad()
        self.given = stream
        return super().before_llm(stream)


@pytest.mark.parametrize("training", [False, True])
def test_gradients_reach_unselected_tokens_and_the_towers_only_in_training(training):
    model = tiny_model().train()
    pruner = CaptureInput()
    pruner.training = training
    pruner.set_progress(10, 100)
    pixels, proprio, prompts = inputs()
    model(pixels, proprio, prompts, 2, hooks=pruner).abs().mean().backward()
    given = pruner.given
    visual_grad = given.hidden.grad[0][given.visual[0]]  # (512, D)
    reached = visual_grad.abs().sum(dim=-1) > 0
    if training:  # the soft part of W reaches every visual token, and through them the towers
        assert bool(reached.all())
    else:  # only the kept tokens pass a gradient: the selection itself is not differentiable
        with torch.no_grad():
            scores = lightvla_scores(given.hidden[:, 1:513], given.hidden[:, 513:])
        kept = union_of_argmax(scores)[0]
        assert torch.equal(reached, kept) and int(kept.sum()) < 512
    assert model.vision_backbone.featurizer.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.language_model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def kept_positions(pruner, stream, generator_seeds):
    """The original positions of the visual tokens each sample keeps."""
    pruner.generators = [torch.Generator().manual_seed(x) for x in generator_seeds]
    out = pruner.before_llm(stream)
    return [set(out.position_ids[i][out.visual[i]].tolist()) for i in range(out.visual.shape[0])]


def test_the_papers_ablations_add_random_tokens_or_drop_a_share_of_the_selection():
    s = toy_stream(batch=2, visual=64, task=6, seed=3)
    learned = kept_positions(LightVLAPruner(), s, [])
    more = kept_positions(LightVLAPruner(extra_random=5), s, [1, 2])
    fewer = kept_positions(LightVLAPruner(drop_kept=0.25), s, [1, 2])
    for i in range(2):
        assert learned[i] < more[i] and len(more[i]) == len(learned[i]) + 5  # the learned tokens and 5 others
        assert fewer[i] < learned[i] and len(fewer[i]) == len(learned[i]) - round(0.25 * len(learned[i]))
    # row i draws from generator i alone: a sample keeps the same tokens in a batch and alone
    second = TokenStream(s.hidden[1:], s.position_ids[1:], s.visual[1:], s.task[1:])
    assert kept_positions(LightVLAPruner(extra_random=5), second, [2]) == [more[1]]
    assert kept_positions(LightVLAPruner(extra_random=5), s, [7, 2])[0] != more[0]  # and its seed decides


def test_the_ablation_policy_draws_per_episode(tiny_checkpoint):
    from policies import make_policy
    from policies.base import EpisodeInfo
    from tests.tiny_vla import fake_observation

    args = {"checkpoint": str(tiny_checkpoint), "device": "cpu"}
    a, b = fake_observation(1), fake_observation(2)
    learned = [out.stats["visual_tokens"] for out in make_policy("lightvla", args).act([a, b])]
    policy = make_policy("lightvla", {**args, "extra_random": "3"})

    def episodes(seed_a, seed_b):
        for obs, seed in ((a, seed_a), (b, seed_b)):
            policy.reset(EpisodeInfo(obs.episode_id, "libero_spatial", 0, "t", obs.instruction, 0, seed))
        return [out.stats["visual_tokens"] for out in policy.act([a, b])], policy._hooks.generators

    counts, generators = episodes(5, 6)
    assert counts == [n + 3 for n in learned]
    first = [g.get_state() for g in generators]
    episodes(5, 9)
    second = [g.get_state() for g in policy._hooks.generators]
    assert torch.equal(first[0], second[0]) and not torch.equal(first[1], second[1])  # each episode its own draws


def test_ablation_options_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="keep forces a count"):
        LightVLAPruner(keep=78, extra_random=10)
    with pytest.raises(ValueError, match=r"drop_kept in \[0, 1\)"):
        LightVLAPruner(drop_kept=1.0)
