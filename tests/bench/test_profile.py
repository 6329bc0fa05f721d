"""bench profile: the JSON contract, counted FLOPs equal to analytic, latency only on real devices."""

import importlib.util
import json

import pytest

from bench.cli import main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="the model extra is not installed")


def run_json(capsys, *args):
    assert main(["profile", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_tiny_on_cpu_measures_latency_and_the_yardstick(capsys):
    result = run_json(capsys, "--size", "tiny", "--device", "cpu", "--repeats", "3", "--warmup", "1")
    for key in ("policy", "size", "device", "params", "visual_tokens_llm", "tflops_per_query", "tflops_counted",
                "latency_ms"):
        assert key in result
    assert result["policy"] == "oft" and result["device"] == "cpu" and result["visual_tokens_llm"] == 512
    assert result["tflops_counted"] == pytest.approx(result["tflops_per_query"], rel=1e-12)
    assert set(result["latency_ms"]) >= {"mean", "p50", "p90", "p99"} and result["latency_ms"]["n"] == 3
    assert result["yardstick"]["library"] == "transformers" and result["yardstick"]["causal_ms"]["n"] == 3
    assert result["sequence_tokens"] == 1 + 512 + 1 + 28 + 56 + 1


def test_full_size_on_meta_counts_without_memory(capsys):
    result = run_json(capsys, "--size", "full", "--device", "meta", "--prompt-tokens", "35")
    assert result["latency_ms"] is None and result["params"] > 7e9
    assert result["tflops_counted"] == pytest.approx(result["tflops_per_query"], rel=1e-12)
    assert result["sequence_tokens"] == 1 + 512 + 1 + 34 + 56 + 1
    assert set(result["tflops_breakdown"]) == {"vision_dinov2", "vision_siglip", "projector", "proprio_projector",
                                               "llm_linear", "llm_attention", "action_head"}


def test_full_size_random_weights_are_refused_on_a_small_cpu(capsys):
    from policies.vla.policy import _available_memory

    if (_available_memory() or 0) > 40 * 2**30:
        pytest.skip("this machine could hold the full model in fp32")
    code = main(["profile", "--size", "full", "--device", "cpu", "--repeats", "1"])
    assert code == 2 and "Use size=tiny on the CPU" in capsys.readouterr().err


def test_the_yardstick_shares_our_weights_and_computes_the_same_layers():
    import torch

    from bench.profile import yardstick_model
    from policies.vla.config import tiny_config
    from policies.vla.policy import random_model
    from tests.tiny_vla import stream

    model = random_model(tiny_config(), "cpu", torch.float32, seed=0)
    hf = yardstick_model(model, "cpu", torch.float32)
    ours = dict(model.language_model.model.named_parameters())
    theirs = dict(hf.named_parameters())
    assert theirs.keys() == ours.keys()
    assert all(theirs[k].data_ptr() == ours[k].data_ptr() for k in ours)  # no second copy of the LLM
    x = torch.randn(1, 40, model.config.llm.hidden_size)
    everything = torch.ones(1, 1, 40, 40, dtype=torch.bool)
    with torch.no_grad():
        ref = hf(inputs_embeds=x, position_ids=torch.arange(40)[None], attention_mask=everything).last_hidden_state
        out = model.language_model(stream(x))
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)


def test_sweep_runs_every_method_in_bf16_relative_to_oft(capsys):
    # bf16 is what a GPU runs: every plug-in's selection has to work in it, not only in fp32
    results = run_json(capsys, "--sweep", "--size", "tiny", "--device", "cpu", "--dtype", "bf16",
                       "--repeats", "1", "--warmup", "0")
    methods = [r["policy"] for r in results]
    assert methods[0] == "oft" and set(methods) == {"oft", "lightvla", "lightvla_star", "fastv", "pyramiddrop",
                                                    "divprune", "sparsevlm", "vla_cache", "adp"}
    for r in results:
        assert r["dtype"] == "bfloat16" and r["latency_ms"]["n"] == 1
        assert r["tflops_counted"] == pytest.approx(r["tflops_per_query"], rel=1e-9)
        assert r["tflops_vs_oft"] == pytest.approx(r["tflops_per_query"] / results[0]["tflops_per_query"])
    lightvla = next(r for r in results if r["policy"] == "lightvla")
    assert lightvla["visual_tokens_llm"] == 78 and lightvla["tflops_vs_oft"] < 1
    assert lightvla["plugin_ms"]["n"] == 1
    # the LLM alone is timed once, without a plug-in, beside the yardstick's
    assert results[0]["llm_latency_ms"]["n"] == 1 and lightvla["llm_latency_ms"] is None
    assert results[0]["vision_latency_ms"]["n"] == 1 and lightvla["vision_latency_ms"] is None
    divprune = next(r for r in results if r["policy"] == "divprune")
    assert divprune["visual_tokens_llm"] == 78 and divprune["tflops_vs_oft"] < 1
    adp = next(r for r in results if r["policy"] == "adp")
    assert adp["visual_tokens_llm"] == 384 and adp["tflops_breakdown"]["plugin"] > 0
    # an unpruned query reads nothing on the host, nor do FastV, PyramidDrop, DivPrune and ADP
    # (their counts follow from their options); a learned selection needs at least its kept
    # count, SparseVLM its rater matrices' ranks
    reads = {r["policy"]: r["host_reads_per_query"] for r in results}
    assert [reads.pop(m) for m in ("oft", "fastv", "pyramiddrop", "divprune", "adp")] == [0] * 5
    assert min(reads.values()) >= 1


def test_a_failing_method_is_recorded_and_the_sweep_goes_on(capsys, monkeypatch):
    from bench import profile

    def methods(config):
        return [("oft", {}), ("fastv", {"k": "99"}), ("lightvla", {"keep": "8"})]

    monkeypatch.setattr(profile, "sweep_methods", methods)
    assert main(["profile", "--sweep", "--size", "tiny", "--device", "meta"]) == 1
    out = capsys.readouterr()
    rows = [line for line in out.out.splitlines() if line.startswith("| ")][1:]
    assert rows[1].startswith("| fastv k=99 | failed: PolicyOptionError: fastv: k must be in 1..1")
    assert rows[2].startswith("| lightvla keep=8 | 8 x2 |")
    assert "Traceback" in out.err


def test_flops_are_counted_without_compiled_code(monkeypatch):
    from bench import profile as profiling
    from policies.vla import flops
    from tests.tiny_vla import compiled_calls

    calls_while_counting = []
    count = flops.counted_flops

    def counting(fn, *args):
        result, calls = compiled_calls(lambda: count(fn, *args))
        calls_while_counting.append(calls)
        return result

    monkeypatch.setattr(flops, "counted_flops", counting)
    settings = profiling.ProfileSettings(size="tiny", device="cpu", speedups="all", repeats=1, warmup=0,
                                         yardstick=False)
    result = profiling.profile(settings)
    # On a GPU, compiled functions that once ran under the counter ran eagerly from then on.
    assert calls_while_counting == [0]
    assert result["speedups"] == ["compile_kernels", "compile_towers", "parallel_towers", "fuse_gate_up"]
    assert result["tflops_counted"] == pytest.approx(result["tflops_per_query"], rel=1e-12)


def test_a_caching_method_counts_the_query_it_traces(monkeypatch):
    # VLA-Cache's next step may reuse a different number of tokens (its schedule follows the
    # previous step's attention): the FLOP counter must see the traced step, not the one after.
    from bench import profile as profiling
    from policies.vla import config

    monkeypatch.setitem(config.PRESETS, "tiny", lambda: config.replace_llm(config.tiny_config(), num_layers=16))
    settings = profiling.ProfileSettings(policy="vla_cache", size="tiny", device="cpu", repeats=1, warmup=0,
                                         yardstick=False)
    result = profiling.profile(settings)
    assert len(result["visual_tokens_per_layer"]) == 16 and result["reused_tokens"] > 0
    assert result["tflops_counted"] == pytest.approx(result["tflops_per_query"], rel=1e-12)


def test_a_sweep_hands_over_its_rows_as_they_are_measured():
    # A sweep cut short (a time limit) keeps the rows it measured: bench profile saves each.
    from bench.profile import ProfileSettings, sweep

    seen = []
    rows = sweep(ProfileSettings(size="full", device="meta"),
                 on_row=lambda so_far: seen.append((len(so_far), so_far[-1].get("tflops_vs_oft"))))
    assert [count for count, _ in seen] == list(range(1, len(rows) + 1)) and len(rows) >= 8
    assert seen[0][1] == 1.0 and all(ratio is not None for _, ratio in seen)
    # on the meta device too, every plug-in runs the products it reports (no values needed)
    assert all(r["tflops_counted"] == pytest.approx(r["tflops_per_query"], rel=1e-12) for r in rows)
