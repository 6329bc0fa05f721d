"""ADP: the reference's selection and per-image counts, its motion gate step by step, exact
identity for queries that do not prune, mixed batches, FLOPs, graphs without host reads, and
the policy's gate per episode."""

import numpy as np
import pytest
import torch

from policies.base import PolicyOptionError
from policies.pruning.adp import ADPPruner, MotionGate, image_weights
from policies.registry import make_policy
from policies.vla import flops
from policies.vla.hooks import QueryTrace
from policies.vla.model import prompt_margins
from tests.tiny_vla import fake_observation, inputs


class Seen(ADPPruner):
    """ADP that keeps layer 0's input stream and what it made of it."""

    def before_layer(self, layer, stream, queries_keys):
        out = super().before_layer(layer, stream, queries_keys)
        if layer == 0:
            self.seen = (stream, out)
        return out


def pruner(model, **options) -> Seen:
    return Seen(images=model.config.num_images, text_margins=prompt_margins(model.config), **options)


@pytest.mark.parametrize("ratio, agentview, wrist", [
    (0.75, 154, 230), (0.7, 143, 215), (0.65, 133, 200), (0.6, 123, 184), (0.55, 113, 169),
    (0.5, 102, 154), (0.4, 82, 123), (0.3, 62, 92),
    (0.95, 194, 256),  # the wrist's share, 292, is cut to its 256 patches, as in the reference
])
def test_each_image_keeps_its_share_rounded_as_the_reference(ratio, agentview, wrist):
    assert ADPPruner(ratio=ratio).counts(512) == [agentview, wrist]


def test_the_split_of_more_images_and_a_forced_count():
    assert image_weights([0.4, 0.6], 3) == [0.4, 0.3, 0.3]  # the wrist share over the others
    assert ADPPruner(keep=78).counts(512) == [31, 47]
    assert ADPPruner(ratio=0.5, split=(1, 1)).counts(512) == [128, 128]
    with pytest.raises(ValueError, match="one weight per camera image"):
        image_weights([0.2, 0.3, 0.5], 2)


def reference_kept(model, stream, ratio, split) -> list[int]:
    """The reference's selection written out in float64 for one sample: layer 0's RMSNorm, q of
    BOS, the prompt and the stop token, k of the visual tokens, no RoPE, mean logit over heads
    and rows, each image's top tokens; kept indices in order."""
    layer = model.language_model.model.layers[0]
    x = stream.hidden[0].double()
    norm = layer.input_layernorm
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.double()
    before, after = prompt_margins(model.config)
    t, visual_columns = x.shape[0], torch.nonzero(stream.visual[0])[:, 0]
    text = int(stream.task[0].sum()) - before - after
    rows = [0, *range(t - after - text, t - after), t - 1]
    attn = layer.self_attn
    h, kvh, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = (x[rows] @ attn.q_proj.weight.double().T).view(len(rows), h, hd).transpose(0, 1)
    k = (x[visual_columns] @ attn.k_proj.weight.double().T).view(-1, kvh, hd).transpose(0, 1)
    k = k.repeat_interleave(h // kvh, dim=0)  # grouped key heads serve several query heads
    importance = ((q @ k.transpose(-1, -2)) / hd ** 0.5).mean(dim=(0, 1))
    counts = ADPPruner(ratio=ratio, split=split).counts(len(visual_columns))
    patches = len(visual_columns) // len(counts)
    kept = []
    for i, c in enumerate(counts):
        kept += (importance[i * patches:(i + 1) * patches].topk(c).indices + i * patches).tolist()
    return sorted(kept)


@pytest.mark.parametrize("ratio, split", [(0.75, (0.4, 0.6)), (0.3, (0.4, 0.6)), (0.5, (1.0, 0.0))])
def test_the_kept_tokens_are_the_reference_selection(model8, ratio, split):
    pixels, proprio, prompts = inputs(prompt_lengths=(11,), seed=3)
    hooks = pruner(model8, ratio=ratio, split=split, positions="keep")
    with torch.no_grad():
        model8(pixels, proprio, prompts, 2, hooks=hooks)
    before, after = hooks.seen
    kept = (after.position_ids[0][after.visual[0]] - 1).tolist()  # original positions: BOS is 0
    assert kept == reference_kept(model8, before, ratio, split)
    if split[1] == 0:  # the wrist image keeps its minimum of one token
        assert sum(j >= 256 for j in kept) == 1


@pytest.mark.parametrize("positions", ["renumber", "keep"])
def test_positions_are_renumbered_or_kept(model8, positions):
    pixels, proprio, prompts = inputs()
    hooks = pruner(model8, positions=positions)
    with torch.no_grad():
        model8(pixels, proprio, prompts, 2, hooks=hooks)
    before, after = hooks.seen
    assert after.sizes.visual == (384,) and after.hidden.shape[1] == before.hidden.shape[1] - 128
    if positions == "renumber":
        assert after.position_ids[0].tolist() == list(range(after.hidden.shape[1]))
    else:
        assert after.position_ids[0, -1] == before.position_ids[0, -1]


def test_a_query_that_does_not_prune_is_the_unpruned_model_exactly(model8):
    pixels, proprio, prompts = inputs()
    resting = pruner(model8)
    resting.pruning = [False]
    everything = pruner(model8, ratio=1.0)  # keeps all 512; renumbering positions 0, 1, ... changes nothing
    with torch.no_grad():
        plain = model8(pixels, proprio, prompts, 2)
        assert torch.equal(plain, model8(pixels, proprio, prompts, 2, hooks=resting))
        assert torch.equal(plain, model8(pixels, proprio, prompts, 2, hooks=everything))
    assert resting.cost() == [0.0]


def test_a_padded_batch_that_prunes_some_samples_matches_single_queries(model8):
    pixels, proprio, prompts = inputs(batch=3, prompt_lengths=(9, 14, 6), seed=4)
    gates = [True, False, True]
    batched = pruner(model8)
    batched.pruning = gates
    traces = [QueryTrace() for _ in range(3)]
    with torch.no_grad():
        together = model8(pixels, proprio, prompts, 2, hooks=batched, traces=traces)
        singles = []
        for i in range(3):
            single = pruner(model8)
            single.pruning = [gates[i]]
            singles.append(model8(pixels[i:i + 1], proprio[i:i + 1], prompts[i:i + 1], 2, hooks=single))
    assert torch.allclose(together, torch.cat(singles), atol=1e-5, rtol=0)
    assert [t.llm_visual_tokens[0] for t in traces] == [384, 512, 384]
    with pytest.raises(ValueError, match="told which of 2 samples prune, the query has 3"):
        batched.pruning = [True, False]
        with torch.no_grad():
            model8(pixels, proprio, prompts, 2, hooks=batched)


def test_flops_equal_the_counter(model8):
    pixels, proprio, prompts = inputs()
    hooks = pruner(model8)
    trace = QueryTrace()
    with torch.no_grad():
        model8(pixels, proprio, prompts, 2, hooks=hooks, traces=[trace])
    _, counted = flops.counted_flops(model8, pixels, proprio, prompts, 2, hooks=pruner(model8))
    breakdown = flops.query_flops(flops.model_dims(model8), trace)
    assert breakdown["total"] == counted["total"] and breakdown["plugin"] > 0


@pytest.mark.parametrize("gates", [[True, True], [False, True]])
def test_graphed_queries_equal_eager_ones_and_read_nothing_on_the_host(model8, gates):
    from policies.vla.graphs import HostReads

    pixels, proprio, prompts = inputs(batch=2, prompt_lengths=(9, 14))
    hooks = pruner(model8)
    hooks.pruning = gates
    with torch.inference_mode():
        eager = model8(pixels, proprio, prompts, 2, hooks=hooks)
        model8.use_cuda_graphs()  # on a CPU the graphed parts run as stand-ins, refusing host reads
        try:
            with HostReads() as reads:
                graphed = model8(pixels, proprio, prompts, 2, hooks=hooks)
        finally:
            model8.use_cuda_graphs(False)
    assert torch.equal(eager, graphed)
    assert reads.count == 0


def trailing_ones(states: list[int]) -> int:
    run = 0
    for state in reversed(states):
        if not state:
            break
        run += 1
    return run


def reference_states(steps: np.ndarray, chunk: int, decision="extrema", window=3, initial=0, last_state=False,
                     max_pruned=3) -> list[int]:
    """Each query's state over a trajectory of positions (one per env step, a query every chunk
    steps), as the reference loop's controller gives them, written out from its windows: the
    samples it holds when a window closes are the query's position and every step's after it."""
    deltas = []
    for start in range(0, len(steps) - chunk, chunk):
        samples = steps[start:start + chunk + 1]
        deltas.append(float(np.linalg.norm(samples[-1] - samples[0])))
    states, means = [initial], []
    for k, d in enumerate(deltas[:-1]):  # the window after query k decides query k + 1
        if decision == "avg":
            means.append(d if not means else (means[-1] + d) / 2)
            wanted = int(d >= means[-1])
        elif k + 1 < window:
            wanted = initial
        else:
            earlier = deltas[k + 1 - window:k]
            wanted = 1 if d >= max(earlier) else 0 if d < min(earlier) else (states[-1] if last_state else 1)
        # The limiter counts the pruned queries in a row, the initial one included.
        states.append(0 if max_pruned and wanted and trailing_ones(states) >= max_pruned else wanted)
    return states


@pytest.mark.parametrize("options", [
    {}, {"window": 5}, {"last_state": True}, {"max_pruned": 0}, {"initial": 1}, {"decision": "avg"},
    {"decision": "avg", "max_pruned": 2, "initial": 1},
])
def test_the_gate_follows_the_reference_controller(options):
    rng = np.random.default_rng(len(str(options)))
    chunk = 8
    # Bursts of motion and rest, as a manipulation episode has them.
    speeds = np.repeat(rng.choice([0.0, 0.001, 0.01, 0.03], size=40), chunk)
    steps = np.cumsum(rng.normal(size=(len(speeds), 3)) * speeds[:, None], axis=0)
    expected = reference_states(steps, chunk, **options)
    gate = MotionGate(**options)
    assert [int(gate.prunes(steps[q * chunk])) for q in range(len(expected))] == expected
    assert 0 < sum(expected) < len(expected)  # both states occur


def test_by_default_the_first_three_queries_keep_every_token_and_at_most_three_in_a_row_prune():
    gate = MotionGate()
    # Speeding up: each displacement is larger than those before it.
    states = [int(gate.prunes(np.array([0.01 * q * q, 0.0, 0.0]))) for q in range(11)]
    assert states == [0, 0, 0, 1, 1, 1, 0, 1, 1, 1, 0]


def test_the_policy_gates_each_episode_by_its_own_motion(tiny_checkpoint):
    from policies.base import EpisodeInfo

    policy = make_policy("adp", {"checkpoint": str(tiny_checkpoint), "device": "cpu"})
    moving, resting = fake_observation(1), fake_observation(2)
    pruned = {moving.episode_id: [], resting.episode_id: []}
    for q in range(5):
        moving.proprio[:3] += 0.01 * (q + 1)  # speeding up, it prunes from the fourth query on
        for obs, out in zip((moving, resting), policy.act([moving, resting])):  # one batch, two episodes
            pruned[obs.episode_id].append(out.stats["pruned"])
            assert out.stats["visual_tokens"] == (384 if out.stats["pruned"] else 512)
    assert pruned == {moving.episode_id: [0, 0, 0, 1, 1], resting.episode_id: [0, 0, 0, 1, 1]}
    # At rest every displacement is 0, at least the largest before it: the reference prunes too.
    policy.reset(EpisodeInfo(moving.episode_id, "libero_spatial", 0, "task", moving.instruction, 0, 0))
    (out,) = policy.act([moving])
    assert out.stats["pruned"] == 0  # a new episode starts with every token
    static = make_policy("adp", {"checkpoint": str(tiny_checkpoint), "device": "cpu", "gate": "static"})
    assert static.act([moving])[0].stats["pruned"] == 1


def test_bad_settings_are_named(tiny_checkpoint):
    base = {"checkpoint": str(tiny_checkpoint)}
    for options, problem in (
        ({"keep": "600"}, "keep=600 exceeds the query's 512 visual tokens"),
        ({"ratio": "0"}, "ratio must be a fraction"),
        ({"keep": "1"}, "keep=1 leaves fewer than one token per camera image"),
        ({"split": "a,b"}, "split must be comma-separated weights"),
        ({"split": "0.2,0.3,0.5"}, "split needs one weight per camera image"),
        ({"split": "-1,2"}, "split weights must be non-negative"),
        ({"gate": "always"}, "gate must be one of motion, static"),
        ({"decision": "median"}, "decision must be one of extrema, avg"),
        ({"window": "2"}, "window must be at least 3"),
        ({"initial": "2"}, "initial must be 0 or 1"),
        ({"positions": "shift"}, "positions must be one of renumber, keep"),
    ):
        with pytest.raises(PolicyOptionError, match=problem):
            make_policy("adp", {**base, **options})
