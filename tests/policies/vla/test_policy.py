"""The oft policy on a tiny checkpoint written by the test."""

import json
import shutil

import numpy as np
import pytest

from policies.base import PolicyOptionError
from policies.registry import make_policy
from tests.tiny_vla import INSTRUCTIONS, fake_observation, norm_stats


@pytest.fixture(scope="module")
def policy(tiny_checkpoint):
    return make_policy("oft", {"checkpoint": str(tiny_checkpoint), "device": "cpu"})


def test_act_returns_env_actions_and_per_query_stats(policy):
    out = policy.act([fake_observation(0)])
    assert len(out) == 1
    actions, stats = out[0].actions, out[0].stats
    assert actions.shape == (8, 7) and np.isfinite(actions).all()
    assert set(np.unique(actions[:, 6])) <= {-1.0, 0.0, 1.0}
    assert stats["visual_tokens"] == 512 and stats["visual_tokens_llm"] == [512, 512]
    assert stats["tokens_llm"][0] == 1 + 512 + 1 + (len(policy.prompt_ids(fake_observation(0).instruction)) - 1) + 57
    assert stats["tflops"] > 0 and stats["batch_size"] == 1


def test_batched_act_equals_single_queries(policy):
    observations = [fake_observation(1), fake_observation(2, "open the middle drawer of the cabinet")]
    batched = policy.act(observations)
    for obs, got in zip(observations, batched):
        alone = policy.act([obs])[0]
        assert np.allclose(got.actions, alone.actions, atol=1e-5)
        assert got.stats["tokens_llm"] == alone.stats["tokens_llm"]


def test_actions_are_unnormalised_with_the_checkpoint_statistics(policy):
    import torch

    obs = fake_observation(3)
    pixels, proprio, prompts = policy.prepare([obs])
    with torch.no_grad():
        raw = policy.model(pixels, proprio, prompts, policy.tokenizer.stop_id)[0].numpy()
    stats = norm_stats()["libero_spatial_no_noops"]["action"]
    low, high = np.array(stats["q01"][:6]), np.array(stats["q99"][:6])
    expected = 0.5 * (raw[:, :6] + 1) * (high - low + 1e-8) + low
    assert np.allclose(policy.act([obs])[0].actions[:, :6], expected, atol=1e-5)
    # the proprio entering the model is normalised and clipped
    assert proprio.abs().max() <= 1.0


def test_chunk_length_option_keeps_the_first_actions(tiny_checkpoint, policy):
    short = make_policy("oft", {"checkpoint": str(tiny_checkpoint), "chunk_length": "3"})
    obs = fake_observation(4)
    assert np.allclose(short.act([obs])[0].actions, policy.act([obs])[0].actions[:3], atol=1e-6)


def test_missing_camera_is_named(policy):
    obs = fake_observation(5)
    del obs.images["wrist"]
    with pytest.raises(ValueError, match="needs camera images"):
        policy.act([obs])


def test_statistics_are_chosen_by_the_suite_as_oft_evaluates(tiny_checkpoint, tmp_path):
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    stats = {**norm_stats("libero_spatial_no_noops"), **norm_stats("libero_goal_no_noops")}
    stats["libero_goal_no_noops"]["action"]["q99"][0] = 5.0
    (ckpt / "dataset_statistics.json").write_text(json.dumps(stats))
    combined = make_policy("oft", {"checkpoint": str(ckpt)})
    with pytest.raises(PolicyOptionError, match="choose one with --unnorm-key"):
        combined.act([fake_observation(0)])  # several statistics and no suite yet
    combined.select_suite("libero_goal")
    assert combined.unnorm_key == "libero_goal_no_noops" and combined.identity()["unnorm_key"] == "libero_goal_no_noops"
    with pytest.raises(PolicyOptionError, match="no statistics for libero_10"):
        combined.select_suite("libero_10")
    single = make_policy("oft", {"checkpoint": str(tiny_checkpoint)})  # libero_spatial's only
    single.select_suite("libero_spatial")
    with pytest.raises(PolicyOptionError, match="not trained on this suite"):
        single.select_suite("libero_goal")
    named = make_policy("oft", {"checkpoint": str(tiny_checkpoint), "unnorm_key": "libero_spatial_no_noops"})
    named.select_suite("libero_goal")  # named statistics: a deliberate cross-suite evaluation
    assert named.unnorm_key == "libero_spatial_no_noops"
    with pytest.raises(PolicyOptionError, match="'libero_10_no_noops' not in"):
        make_policy("oft", {"checkpoint": str(ckpt), "unnorm_key": "libero_10_no_noops"})
    assert make_policy("oft", {"checkpoint": str(ckpt), "unnorm_key": "libero_goal_no_noops"}).unnorm_key == "libero_goal_no_noops"


def test_bad_checkpoint_is_a_policy_option_error(tmp_path):
    with pytest.raises(PolicyOptionError, match="does not exist"):
        make_policy("oft", {"checkpoint": str(tmp_path / "nowhere")})


def test_identity_names_the_weights_and_the_device_they_ran_on(policy, tiny_checkpoint):
    # The resolved device, not the option: "auto" on a CPU machine is the same run as "cpu".
    ident = policy.identity()
    assert ident["weights"]["path"] == str(tiny_checkpoint) and len(ident["weights"]["digest"]) == 16
    assert "device" not in ident["options"] and ident["tokenizer"]["kind"] == "sentencepiece"
    assert ident["device"] == "cpu"


def test_random_weights_without_checkpoint():
    policy = make_policy("oft", {"size": "tiny"}, seed=3)
    out = policy.act([fake_observation(6)])[0]
    assert out.actions.shape == (8, 7) and policy.identity()["weights"] == {"random": True, "size": "tiny", "seed": 3}


@pytest.mark.parametrize("name", ["oft", "lightvla", "fastv"])
def test_random_weights_are_asked_for_by_name_and_not_beside_a_checkpoint(name, tiny_checkpoint):
    # a forgotten --checkpoint would otherwise run a whole benchmark of meaningless episodes
    with pytest.raises(PolicyOptionError, match=f"{name} needs a checkpoint: .* size=tiny or size=full"):
        make_policy(name, {})
    with pytest.raises(PolicyOptionError, match="a checkpoint or a size for random weights, not both"):
        make_policy(name, {"checkpoint": str(tiny_checkpoint), "size": "tiny"})


def test_a_query_with_a_shape_past_the_graph_limit_is_marked(tiny_checkpoint):
    # graphs serve a GPU only; on a CPU the same bookkeeping runs when a model is given them
    policy = make_policy("oft", {"checkpoint": str(tiny_checkpoint), "device": "cpu", "graph_limit": "2"})
    policy.model.use_cuda_graphs(limit=policy.options.graph_limit)
    first = policy.act([fake_observation(0, INSTRUCTIONS[0])])[0].stats  # vision, and the LLM at its length
    again = policy.act([fake_observation(1, INSTRUCTIONS[0])])[0].stats
    longer = policy.act([fake_observation(0, INSTRUCTIONS[1])])[0].stats  # another prompt length: a third shape
    assert (first["warmup"], first["over_graph_limit"]) == (True, False)
    assert (again["warmup"], again["over_graph_limit"]) == (False, False)
    assert (longer["warmup"], longer["over_graph_limit"]) == (False, True)
    with pytest.raises(PolicyOptionError, match="graph_limit must be at least 1, got 0"):
        make_policy("oft", {"checkpoint": str(tiny_checkpoint), "graph_limit": "0"})


def test_speedups_give_the_same_actions(tiny_checkpoint, policy):
    from tests.tiny_vla import compiled_calls

    compiled = make_policy("oft", {"checkpoint": str(tiny_checkpoint), "device": "cpu", "speedups": "all"})
    compiled.model.use_cuda_graphs()  # the graphs' bookkeeping, where compiled code serves (the CPU has no graphs)
    assert compiled.model.language_model.model.layers[0].self_attn.kernels.compiled
    assert compiled.model.speedups.enabled() == ["compile_kernels", "compile_towers", "parallel_towers", "fuse_gate_up"]
    obs = [fake_observation(seed=5)]
    out, calls = compiled_calls(lambda: compiled.act(obs)[0])
    assert calls > 0 and np.allclose(out.actions, policy.act(obs)[0].actions, atol=1e-4)


def test_a_query_that_captures_graphs_is_marked_warmup(tiny_checkpoint):
    policy = make_policy("oft", {"checkpoint": str(tiny_checkpoint), "device": "cpu"})
    assert policy.act([fake_observation(0)])[0].stats["warmup"] is False  # no graphs on the CPU
    policy.model.use_cuda_graphs()  # the CPU runs the same bookkeeping, captures included
    first, again = (policy.act([fake_observation(seed)])[0].stats["warmup"] for seed in (1, 2))
    other_prompt = policy.act([fake_observation(3, instruction=INSTRUCTIONS[1])])[0].stats["warmup"]
    assert (first, again, other_prompt) == (True, False, True)  # a new prompt length is a new shape


def test_an_unknown_speedup_is_an_error_naming_it(tiny_checkpoint):
    with pytest.raises(PolicyOptionError, match="unknown speedup 'fast'"):
        make_policy("oft", {"checkpoint": str(tiny_checkpoint), "device": "cpu", "speedups": "compile_kernels,fast"})


def test_each_query_reports_its_preprocessing_and_model_time_apart(policy):
    stats = policy.act([fake_observation(seed=4)])[0].stats
    assert stats["preprocess_ms"] > 0 and stats["model_ms"] > 0


def test_a_batch_prepares_each_observation_as_alone(policy):
    # the batch's camera images are preprocessed in threads: each must land in its own sample
    observations = [fake_observation(seed=s) for s in (6, 7, 8)]
    pixels, proprio, _ = policy.prepare(observations)
    for i, obs in enumerate(observations):
        alone, alone_proprio, _ = policy.prepare([obs])
        assert np.array_equal(pixels[i:i + 1].numpy(), alone.numpy())
        assert np.array_equal(proprio[i:i + 1].numpy(), alone_proprio.numpy())
    assert not np.array_equal(pixels[0].numpy(), pixels[1].numpy())


def test_speedups_by_default_are_every_one_a_gpu_can_use_and_none_on_a_cpu(monkeypatch):
    from policies.vla import model
    from policies.vla.model import Speedups
    from policies.vla.policy import OFTPolicy

    assert Speedups.parse("auto", "cpu") == Speedups() == Speedups.parse("none", "cuda") == Speedups.parse("", "cuda")
    monkeypatch.setattr(model, "can_compile", lambda: True)
    assert Speedups.parse("auto", "cuda:0") == Speedups.parse("all")
    monkeypatch.setattr(model, "can_compile", lambda: False)  # no Triton or no C compiler: nothing compiled
    assert Speedups.parse("auto", "cuda").enabled() == ["parallel_towers", "fuse_gate_up"]
    assert OFTPolicy.Options().speedups == "auto"


def test_a_cpu_policy_runs_without_speedups_by_default(policy):
    assert policy.model.speedups.enabled() == []


def test_a_suites_own_statistics_come_before_its_no_noops_ones(tiny_checkpoint, tmp_path):
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    stats = {**norm_stats("libero_goal"), **norm_stats("libero_goal_no_noops")}
    (ckpt / "dataset_statistics.json").write_text(json.dumps(stats))
    policy = make_policy("oft", {"checkpoint": str(ckpt)})
    policy.select_suite("libero_goal")
    assert policy.unnorm_key == "libero_goal"  # OFT's check_unnorm_key: the suite, else _no_noops
