"""VLA-Cache: nothing reused at an episode's first step, exact reuse on an unchanged frame,
the reference's per-image selection and entropy schedule, copies of the previous frame,
per-episode reset, FLOPs with reused keys."""

import math

import numpy as np
import pytest
import torch

from policies.base import EpisodeInfo, PolicyOptionError
from policies.pruning.vla_cache import (VLACache, attention_entropy, layer_attention, patch_vectors, reusable_tokens,
                                        reuse_proportions, reuse_schedule, stage_counts)
from policies.registry import make_policy
from policies.vla import flops
from policies.vla.config import replace_llm, tiny_config
from policies.vla.hooks import QueryTrace
from policies.vla.model import OFTModel, prompt_margins
from tests.tiny_vla import fake_observation, inputs, recorded_streams


def query(model, cache, episode, pixels, proprio, prompts):
    cache.begin(episode, pixels[0])
    trace = QueryTrace()
    with torch.no_grad():
        out = model(pixels, proprio, prompts, 2, hooks=cache, traces=[trace])
    return out, trace


def test_first_step_reuses_nothing_and_an_unchanged_frame_reuses_exactly(model8):
    pixels, proprio, prompts = inputs()
    cache = VLACache(similarity=0.99, layers=(2, 4), relevance_layer=4)
    with torch.no_grad():
        plain = model8(pixels, proprio, prompts, 2)
    first, trace1 = query(model8, cache, "ep", pixels, proprio, prompts)
    assert cache.reused_tokens == 0 and trace1.llm_visual_tokens == [512] * 8
    assert torch.equal(first, plain)
    entropies = [float(cache.episodes["ep"].entropy[layer]) for layer in range(8)]
    relevance = cache.episodes["ep"].relevance.clone()
    second, trace2 = query(model8, cache, "ep", pixels.clone(), proprio, prompts)
    # Every patch is static (similarity 1 up to rounding): per image the 150 most similar, less
    # the 100 most relevant.
    patches = patch_vectors(pixels[0], 2)
    similarity = reference_similarity(patches, patches)
    assert (similarity > 0.9999).all()
    expected = [image * 256 + i for image in range(2)
                for i in reference_selection(similarity[image * 256:(image + 1) * 256],
                                             relevance[image * 256:(image + 1) * 256].tolist(), 0.99, 150, 100)]
    assert cache.reuse_order.tolist() == expected and len(expected) >= 100
    schedule = reuse_schedule(reuse_proportions(torch.tensor(entropies)).tolist(), 0.55)
    assert cache.counts == stage_counts(schedule, [2, 4], cache.reusable_tokens)
    assert 0 < cache.reused_tokens <= cache.reusable_tokens
    assert trace2.llm_visual_tokens == [512 - cache.reused_at(layer) for layer in range(8)]
    assert trace2.llm_visual_tokens[:2] == [512, 512] and trace2.llm_visual_tokens[2] < 512
    assert trace2.llm_keys == trace1.llm_keys  # reused tokens are still attended to, from the cache
    assert torch.allclose(second, plain, atol=1e-5)  # same frame: cached keys equal fresh ones
    # Each layer's entropy is read over the keys it attended to, the reused ones' included.
    again = [float(cache.episodes["ep"].entropy[layer]) for layer in range(8)]
    assert np.allclose(again, entropies, rtol=1e-5)


def test_relevance_past_the_first_reusing_layer_counts_the_reused_tokens_through_their_keys(model8):
    # Layer 5 runs without the tokens reused from layer 2 on; for an unchanged frame their
    # cached keys equal fresh ones, so the text tokens' attention is the one of a full query.
    pixels, proprio, prompts = inputs()
    cache = VLACache(similarity=0.99, layers=(2,), relevance_layer=5)
    query(model8, cache, "ep", pixels, proprio, prompts)
    full = cache.episodes["ep"].relevance.clone()
    _, trace = query(model8, cache, "ep", pixels.clone(), proprio, prompts)
    assert cache.reused_at(5) > 0 and trace.llm_visual_tokens[5] == 512 - cache.reused_at(5)
    relevance = cache.episodes["ep"].relevance
    assert torch.allclose(relevance, full, atol=1e-6) and bool((relevance > 0).all())
    assert abs(float(relevance.sum()) - float(full.sum())) < 1e-5


def test_changed_patches_and_task_relevant_tokens_are_not_reused(model8):
    pixels, proprio, prompts = inputs()
    cache = VLACache(similarity=0.99, static=256, relevant=64, relevance_layer=4)
    query(model8, cache, "ep", pixels, proprio, prompts)
    relevance = cache.episodes["ep"].relevance.clone()
    moved = pixels.clone()
    moved[0, :6, :112] = torch.randn(6, 112, 224)  # top half of the first camera changes
    query(model8, cache, "ep", moved, proprio, prompts)
    changed = set(range(0, 128))  # patch rows 0-7 of camera 1
    relevant = {image * 256 + int(i) for image in range(2)
                for i in relevance[image * 256:(image + 1) * 256].topk(64).indices}
    assert cache.reuse_order.tolist() == sorted(set(range(512)) - changed - relevant)


def reference_similarity(now, before):
    """Cosine similarity of two frames' flattened patches, as the reference computes it."""
    flat1, flat2 = now.astype(np.float32), before.astype(np.float32)
    norm1, norm2 = np.linalg.norm(flat1, axis=1), np.linalg.norm(flat2, axis=1)
    return np.sum(flat1 * flat2, axis=1) / (norm1 * norm2 + 1e-8)


def reference_patches(image):
    """(224, 224, 3) uint8 -> (256, 588): 14x14 blocks in raster order, each flattened with its
    channels last, as the reference's block view of the image."""
    blocks = image.reshape(16, 14, 16, 14, 3).transpose(0, 2, 1, 3, 4)
    return blocks.reshape(256, -1)


def reference_selection(similarity, relevance, threshold, static, relevant):
    """One image's reusable patches, written out as the reference's list sorts do it."""
    scored = [(i, s) for i, s in enumerate(similarity) if s >= threshold]
    scored.sort(key=lambda pair: pair[1], reverse=True)
    top_static = {i for i, _ in scored[:static]}
    ranked = sorted(enumerate(relevance), key=lambda pair: pair[1], reverse=True)
    top_relevant = {i for i, _ in ranked[:relevant]}
    return sorted(top_static - top_relevant)


def test_reusable_tokens_are_chosen_per_image_as_the_reference_chooses_them():
    rng = np.random.default_rng(0)
    for trial in range(20):
        # Few distinct values, so that ties decide: both sorts keep token order among equals.
        similarity = rng.choice([0.5, 0.995, 0.996, 0.998, 1.0], size=(2, 64)).astype(np.float32)
        relevance = rng.choice([0.1, 0.2, 0.3], size=(2, 64)).astype(np.float32)
        static, relevant = int(rng.integers(0, 70)), int(rng.integers(0, 70))
        chosen = reusable_tokens(similarity.reshape(-1), relevance.reshape(-1), 2, 0.996, static, relevant)
        expected = [image * 64 + i for image in range(2)
                    for i in reference_selection(similarity[image], relevance[image], 0.996, static, relevant)]
        assert np.flatnonzero(chosen).tolist() == expected, trial


def test_the_schedule_follows_each_layers_attention_entropy():
    # Entropies 3, 2, 1, 2.5 normalise to 1, 0.5, 0, 0.75: proportions 0, 0.5, 1, 0.25, where
    # each rise is damped to 0.55 of itself: 0.5 -> 0.275, 1 -> 0.275 + 0.725 * 0.55.
    undamped = reuse_proportions(torch.tensor([3.0, 2.0, 1.0, 2.5])).tolist()
    proportion = reuse_schedule(undamped, 0.55)
    assert np.allclose(proportion, [0.0, 0.275, 0.67375, 0.25])
    assert np.array_equal(reuse_schedule(undamped, 1.0), [0.0, 0.5, 1.0, 0.25])
    # A stage reuses max(1, int(p * R)); one that would reuse fewer than an earlier stage keeps its count.
    assert stage_counts(proportion, [0, 1, 2, 3], 100) == [(0, 1), (1, 27), (2, 67), (3, 67)]
    assert stage_counts(proportion, [3], 100) == [(3, 25)]


def test_attention_entropy_is_the_mean_entropy_of_the_rows():
    uniform = torch.full((3, 8), 1 / 8)
    assert math.isclose(float(attention_entropy(uniform)), math.log(8), rel_tol=1e-6)
    one_hot = torch.eye(4)
    assert float(attention_entropy(one_hot)) < 1e-6
    mixed = torch.cat([uniform[:1, :4] * 2 / 2, torch.eye(4)[:1]])  # rows: uniform over 4, one-hot
    assert math.isclose(float(attention_entropy(mixed)), math.log(4) / 2, rel_tol=1e-6)


def test_previous_frame_is_a_copy_not_an_alias(model8):
    pixels, proprio, prompts = inputs()
    cache = VLACache(relevance_layer=4)
    cache.begin("ep", pixels[0])
    stored = cache.episodes["ep"].patches
    pixels[0].mul_(0)  # the caller reuses its buffer for the next frame
    assert np.abs(stored).sum() > 0
    assert not np.array_equal(stored, patch_vectors(pixels[0], 2))


def test_flops_with_reused_keys_equal_the_counter(model8):
    pixels, proprio, prompts = inputs()
    cache = VLACache(similarity=0.99, static=32, relevance_layer=4)
    query(model8, cache, "ep", pixels, proprio, prompts)
    cache.begin("ep", pixels[0])
    trace = QueryTrace()
    _, counted = flops.counted_flops(model8, pixels, proprio, prompts, 2, hooks=cache, traces=[trace])
    assert flops.query_flops(flops.model_dims(model8), trace)["total"] == counted["total"]
    assert trace.llm_tokens[-1] < trace.llm_keys[-1]


def test_policy_resets_per_episode_and_answers_batches_one_by_one(tiny_checkpoint):
    policy = make_policy("vla_cache", {"checkpoint": str(tiny_checkpoint), "similarity": "0.99"})
    config = policy.config  # patches compared as the 8-bit values the first tower's input came from
    assert policy.hooks().levels == (config.image_means[0], config.image_stds[0])
    a, b = fake_observation(0), fake_observation(1)
    b.episode_id = "other"
    first = policy.act([a, b])
    assert [o.stats["reused_tokens"] for o in first] == [0, 0] and first[0].stats["batch_size"] == 1
    assert all(o.stats["preprocess_ms"] > 0 for o in first)  # the stats of every OFT query, and its own
    second = policy.act([a, b])
    assert all(o.stats["reused_tokens"] > 0 for o in second)
    policy.reset(EpisodeInfo(a.episode_id, "libero_spatial", 0, "t", "i", 0, 0))
    third = policy.act([a, b])
    assert third[0].stats["reused_tokens"] == 0 and third[1].stats["reused_tokens"] > 0
    assert np.allclose(third[0].actions, first[0].actions, atol=1e-6)
    # An episode's end frees its cache: one policy serves a whole run.
    policy.end(EpisodeInfo(b.episode_id, "libero_spatial", 0, "t", "i", 1, 0))
    assert set(policy.hooks().episodes) == {a.episode_id}
    policy.end(EpisodeInfo(a.episode_id, "libero_spatial", 0, "t", "i", 0, 0))
    assert policy.hooks().episodes == {}


def test_graphed_steps_equal_eager_ones_and_fill_the_same_cache(model8):
    # With graphs, each layer the cache acts at is a graph of its own (reused keys as inputs, its
    # keys and values as outputs) and the cache's work runs eagerly around it.
    pixels, proprio, prompts = inputs()
    moved = pixels.clone()
    moved[0, :6, :112] = torch.randn(6, 112, 224, generator=torch.Generator().manual_seed(1))
    runs = {}
    for graphed in (False, True):
        model8.use_cuda_graphs(graphed)
        if graphed:
            model8.graphs.check_host_reads = True
        cache = VLACache(similarity=0.99, layers=(2, 4), relevance_layer=4)
        steps = []
        for frame in (pixels, pixels, moved):
            cache.begin("ep", frame[0])
            trace = QueryTrace()
            with torch.inference_mode():
                steps.append((model8(frame, proprio, prompts, 2, hooks=cache, traces=[trace]), trace,
                              cache.reused_tokens))
        runs[graphed] = steps, cache.episodes["ep"]
        if graphed:
            assert len(model8.graphs) > 1
    model8.use_cuda_graphs(False)
    for (eager, eager_trace, eager_reused), (graph, graph_trace, graph_reused) in zip(runs[False][0], runs[True][0]):
        assert torch.allclose(eager, graph, atol=1e-5)
        assert eager_trace == graph_trace and eager_reused == graph_reused
    assert runs[True][0][1][2] > 0  # the second step reused tokens
    for layer, keys in runs[False][1].keys.items():
        assert torch.allclose(keys, runs[True][1].keys[layer], atol=1e-5)
        assert torch.allclose(runs[False][1].values[layer], runs[True][1].values[layer], atol=1e-5)


def test_host_reads_per_step_do_not_grow_with_the_depth():
    # On a GPU each value read on the host waits for the layer before it; storing keys once per
    # layer must not read the visual mask once per layer.
    from policies.vla.graphs import HostReads

    pixels, proprio, prompts = inputs()
    reads = []
    for layers in (8, 16):
        torch.manual_seed(0)
        model = OFTModel(replace_llm(tiny_config(), num_layers=layers)).eval()
        model.use_cuda_graphs()
        cache = VLACache(similarity=0.99, layers=(2, 4), relevance_layer=4)
        for step in range(2):
            cache.begin("ep", pixels[0])
            with torch.inference_mode(), HostReads() as counter:
                model(pixels, proprio, prompts, 2, hooks=cache)
        assert cache.reused_tokens > 0
        reads.append(counter.count)
    assert reads[0] == reads[1]


def test_a_step_that_reuses_reads_the_patches_and_the_readings_and_knows_its_counts(model8):
    # The patches (for the similarity), the previous step's readings (entropies and relevance);
    # the tokens leaving at each stage are counted on the host, so nothing else is read.
    from policies.vla.graphs import HostReads
    from policies.vla.hooks import read_sizes

    cache = VLACache(similarity=0.99, relevance_layer=4)
    streams = recorded_streams(cache)
    pixels, proprio, prompts = inputs()
    query(model8, cache, "ep", pixels, proprio, prompts)
    streams.clear()
    with torch.no_grad(), HostReads() as reads:
        cache.begin("ep", pixels[0])
        model8(pixels, proprio, prompts, 2, hooks=cache)
    assert cache.reused_tokens > 0 and reads.count == 2
    pruned = [s for s in streams if s.sizes is not None and s.sizes.visual != (512,)]
    assert pruned
    for stream in pruned:
        assert stream.sizes == read_sizes(stream.real(), stream.visual, stream.task)


def reusing_cache(model):
    """A cache after two queries of one unchanged frame: the second reused tokens."""
    pixels, proprio, prompts = inputs()
    cache = VLACache(similarity=0.99, relevance_layer=4)
    for _ in range(2):
        query(model, cache, "ep", pixels, proprio, prompts)
    assert cache.reused_tokens > 0
    return cache, (pixels, proprio, prompts)


def test_after_a_reset_a_query_without_begin_uses_no_cache(model8):
    cache, (pixels, proprio, prompts) = reusing_cache(model8)
    cache.reset()
    with torch.no_grad():
        assert torch.equal(model8(pixels, proprio, prompts, 2, hooks=cache), model8(pixels, proprio, prompts, 2))
    assert cache.reused_tokens == 0 and not cache.episodes


def test_patches_are_compared_as_the_cameras_8_bit_values():
    # The reference's 0.996 threshold is for the prepared 8-bit images: a one-level change keeps
    # every patch of a real frame static there, but not after subtracting the means. And the
    # similarities equal the reference's bit for bit (same values, same summation order).
    from pathlib import Path

    from policies.pruning.vla_cache import patch_similarity
    from policies.vla.config import tiny_config
    from policies.vla.preprocess import pixel_values

    config = tiny_config()
    levels = (config.image_means[0], config.image_stds[0])
    data = np.load(Path(__file__).parents[1] / "vla" / "data" / "tf_preprocess_reference.npz")
    frames = [data["frame0_tf_final"], data["frame1_tf_final"]]
    noise = np.random.default_rng(0).integers(-1, 2, (2, 224, 224, 3))
    nudged = [np.clip(f.astype(int) + n, 0, 255).astype(np.uint8) for f, n in zip(frames, noise)]

    def model_input(images):
        return torch.from_numpy(pixel_values(images, config.image_means, config.image_stds))

    assert np.array_equal(patch_vectors(model_input(frames), 2, levels),
                          np.concatenate([reference_patches(f) for f in frames]).astype(np.float32))
    ours = patch_similarity(*(patch_vectors(model_input(x), 2, levels) for x in (nudged, frames)))
    reference = np.concatenate([reference_similarity(reference_patches(a), reference_patches(b))
                                for a, b in zip(nudged, frames)])
    assert np.array_equal(ours, reference)

    def static(as_levels):
        before, after = (patch_vectors(model_input(x), 2, levels if as_levels else None) for x in (frames, nudged))
        return int((patch_similarity(before, after) >= 0.996).sum())

    assert static(as_levels=True) == 512
    assert static(as_levels=False) < 512


def test_forgetting_the_current_episode_clears_its_query_state(model8):
    cache, (pixels, proprio, prompts) = reusing_cache(model8)
    cache.forget("ep")
    assert cache.current is None and cache.reused_tokens == 0
    with torch.no_grad():  # a query outside any episode runs without the cache
        model8(pixels, proprio, prompts, 2, hooks=cache)


@pytest.mark.parametrize("window", [5, 1000])
def test_a_text_window_ranks_relevance_by_the_tokens_right_after_the_visual_block(model8, monkeypatch, window):
    # The reference's rows: positions from the one after the last visual token on, a window of
    # them (clipped to the sequence); found here from the position ids, as the reference does.
    import policies.pruning.vla_cache as vla_cache

    seen = []
    original = vla_cache.rows_attention
    monkeypatch.setattr(vla_cache, "rows_attention", lambda q, k, p: seen.append(original(q, k, p)) or seen[-1])
    pixels, proprio, prompts = inputs()
    cache = VLACache(similarity=0.99, relevance_layer=4, text_window=window)
    streams = recorded_streams(cache, layers=[4])
    query(model8, cache, "ep", pixels, proprio, prompts)
    (stream,) = streams
    attention = seen[4][0]  # layer 4: (T, T), nothing reused at a first query
    positions = stream.position_ids[0]
    first = 1 + 512  # BOS, then the visual block
    expected = attention[(positions >= first) & (positions < first + window)].mean(dim=0)[stream.visual[0]]
    error = (cache.episodes["ep"].relevance - expected).abs().max()
    prompt_only = VLACache(similarity=0.99, relevance_layer=4, text_margins=prompt_margins(model8.config))
    query(model8, prompt_only, "ep", pixels, proprio, prompts)
    other_rows = (prompt_only.episodes["ep"].relevance - expected).abs().max()
    assert float(error) <= 1e-9 and float(other_rows) > 1e-7


def test_vla_cache_refuses_a_negative_text_window(tiny_checkpoint):
    with pytest.raises(PolicyOptionError, match="text_window"):
        make_policy("vla_cache", {"checkpoint": str(tiny_checkpoint), "text_window": -1})


def reference_eager_attention(q, k):
    """The attention maps the reference's eager attention returns (1, H, T, K): logits in the
    model's dtype, softmax in float32, rounded back."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1])
    return torch.nn.functional.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)


def reference_schedule(maps, growth):
    """The reference's layer schedule from its attention maps, written out (bf16 throughout,
    the damping in Python floats)."""
    entropies = []
    for attn in maps:
        attn = attn.mean(dim=1)[0]
        attn /= attn.sum(dim=-1, keepdim=True) + 1e-10
        attn = torch.nan_to_num(attn, nan=0.0)
        entropies.append((-torch.sum(attn * torch.log(attn + 1e-10), dim=-1)).mean())
    entropies = torch.stack(entropies)
    reuse = (1.0 - (entropies - entropies.min()) / (entropies.max() - entropies.min() + 1e-10)).tolist()
    for i in range(1, len(reuse)):
        if reuse[i] - reuse[i - 1] > 0:
            reuse[i] = reuse[i - 1] + (reuse[i] - reuse[i - 1]) * growth
    return np.asarray(reuse, dtype=np.float32)


def test_rounded_attention_and_schedule_are_the_references_in_bf16():
    gen = torch.Generator().manual_seed(0)
    maps, entropies = [], []
    for layer in range(8):  # grouped key heads, as the tiny model's
        q = (torch.randn(1, 4, 30, 16, generator=gen) * (1 + layer)).bfloat16()
        k = torch.randn(1, 2, 30, 16, generator=gen).bfloat16()
        for_entropy, for_relevance = layer_attention(q, k, rounded=True)
        reference = reference_eager_attention(q, k)
        assert torch.equal(for_entropy, reference.mean(dim=1)[0]) and for_entropy.dtype == torch.bfloat16
        assert torch.equal(for_relevance, reference.to(torch.float32).squeeze(0).mean(dim=0))
        maps.append(reference)
        entropies.append(attention_entropy(for_entropy))
    proportions = reuse_proportions(torch.stack(entropies))
    assert proportions.dtype == torch.bfloat16
    ours = reuse_schedule(proportions.tolist(), 0.55)
    assert np.array_equal(ours, reference_schedule(maps, 0.55))


def test_a_bf16_model_rounds_its_entropies_only_when_asked(tiny_checkpoint):
    for dtype_option, expected in (("model", torch.bfloat16), ("float32", torch.float32)):
        policy = make_policy("vla_cache", {"checkpoint": str(tiny_checkpoint), "dtype": "bf16",
                                           "entropy_dtype": dtype_option, "similarity": "0.9"})
        policy.act([fake_observation(0)])
        (cache,) = policy.hooks().episodes.values()
        assert {e.dtype for e in cache.entropy.values()} == {expected}
    with pytest.raises(PolicyOptionError, match="entropy_dtype must be one of float32, model"):
        make_policy("vla_cache", {"checkpoint": str(tiny_checkpoint), "entropy_dtype": "bf16"})
