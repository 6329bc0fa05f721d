"""``bench profile``: FLOPs, parameters, latency and memory of one policy query.

FLOPs come two ways: analytic, from the token counts each stage saw (policies/vla/flops.py),
and counted by ``torch.utils.flop_counter.FlopCounterMode`` on the same forward (on the
``meta`` device the full size needs no memory). Latency is measured on a real device over
repeated queries after warm-up, with device synchronisation, on random weights (cost does
not depend on the weights). For OFT, our LLM alone and a yardstick, transformers'
``LlamaModel`` with the same config and weights, are timed on the same sequence in the same
run; for a plug-in, its own work between projector and layer 0.
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from policies.vla.policy import device_name

# Prompt length (BOS and the final empty piece included) assumed for cost figures: the mean
# over the 40 instructions of libero_spatial/object/goal/10 with the Llama-2 tokenizer is
# 28.5 (range 20-38; see docs/performance.md), so a query is 1 + 512 + 1 + 28 + 56 + 1 = 599 tokens.
DEFAULT_PROMPT_TOKENS = 29


@dataclass
class ProfileSettings:
    policy: str = "oft"
    policy_args: dict = field(default_factory=dict)
    keep: int | None = None  # force the visual-token count of a pruning policy
    size: str = "full"
    device: str = "meta"
    dtype: str = "auto"
    batch: int = 1
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS
    repeats: int = 20
    warmup: int = 3
    seed: int = 0
    yardstick: bool = True
    count: bool = True
    cuda_graphs: bool = True  # on a GPU, replay fixed-shape parts as CUDA graphs (eager also timed)
    speedups: str = "auto"  # policies.vla.model.Speedups: auto, none, all, or names, comma-separated


def measurement_parser(description: str, repeats: int, warmup: int) -> argparse.ArgumentParser:
    """The arguments the measurement scripts share (scripts/*.py): model size, device, dtype,
    timed and warm-up calls, and a file for the JSON result."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", default="tiny", choices=["tiny", "full"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--save", type=Path, help="also write the JSON result to this file")
    return parser


def settings_from(args: argparse.Namespace) -> ProfileSettings:
    return ProfileSettings(size=args.size, device=args.device, dtype=args.dtype, repeats=args.repeats,
                           warmup=args.warmup)


def percentiles(samples_ms: list[float]) -> dict:
    ordered = sorted(samples_ms)

    def pct(p):
        k = (len(ordered) - 1) * p / 100
        lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

    return {"mean": statistics.fmean(ordered), "p50": pct(50), "p90": pct(90), "p99": pct(99),
            "min": ordered[0], "n": len(ordered)}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_calls(fn, device: str, repeats: int, warmup: int) -> list[float]:
    """Milliseconds of each of ``repeats`` calls after ``warmup`` untimed ones, the device synchronised."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def build_model(settings: ProfileSettings):
    import torch

    from policies.vla.config import preset
    from policies.vla.model import OFTModel
    from policies.vla.policy import random_model, resolve_device, resolve_dtype

    config = preset(settings.size)
    if settings.device == "meta":
        dtype = resolve_dtype(settings.dtype, "cuda")  # the dtype a GPU run would use
        with torch.device("meta"):
            model = OFTModel(config).to(dtype).eval()
        return model, "meta", dtype
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    return random_model(config, device, dtype, settings.seed), device, dtype


def example_inputs(model, settings: ProfileSettings, device: str):
    import torch

    gen = torch.Generator().manual_seed(settings.seed)
    b = settings.batch
    pixels = torch.randn(b, 6 * model.config.num_images, *(model.config.image_sizes[0],) * 2, generator=gen)
    proprio = torch.rand(b, model.config.proprio_dim, generator=gen) * 2 - 1
    vocab = model.config.llm.vocab_size
    body = torch.randint(3, vocab, (settings.prompt_tokens - 1,), generator=gen).tolist()
    prompts = [[1] + body for _ in range(b)]
    return pixels.to(device), proprio.to(device), prompts


def build_hooks(settings: ProfileSettings, config):
    """The plug-in of ``settings.policy`` with its options (and the forced keep count)."""
    from policies.base import parse_options
    from policies.registry import policy_class
    from policies.vla.policy import OFTPolicy

    cls = policy_class(settings.policy)
    if not issubclass(cls, OFTPolicy):
        raise ValueError(f"bench profile measures the VLA policies (oft and its plug-ins), not {settings.policy!r}")
    args = dict(settings.policy_args)
    if settings.keep is not None:
        if cls.keep_option is None:
            raise ValueError(f"policy {settings.policy!r} has no visual-token count to force with --keep")
        args[cls.keep_option] = str(settings.keep)
    return cls.plugin(parse_options(cls.Options, args, settings.policy), config)


def profile(settings: ProfileSettings, shared=None) -> dict:
    """One policy's figures; ``shared`` = (model, device, dtype) reuses a built model (sweeps)."""
    import torch

    from policies.vla import flops
    from policies.vla.graphs import HostReads
    from policies.vla.hooks import Hooks, QueryTrace, TokenStream
    from policies.vla.model import Speedups
    from policies.vla.tokenizer import ByteTokenizer

    if settings.prompt_tokens < 2:
        raise ValueError("--prompt-tokens must be at least 2 (BOS and the final empty piece)")
    model, device, dtype = shared or build_model(settings)
    speedups = Speedups.parse(settings.speedups, device)
    model.use_speedups(speedups)
    hooks = build_hooks(settings, model.config)
    if isinstance(hooks, torch.nn.Module):  # learnable plug-in parameters live with the model
        hooks.to(device=device, dtype=dtype)
    pixels, proprio, prompts = example_inputs(model, settings, device)
    stop_id = ByteTokenizer.stop_id  # random weights come with the byte tokenizer
    dims = flops.model_dims(model)

    caching = hasattr(hooks, "begin")  # a cross-step cache: measure steps that follow an identical frame
    if caching and (device == "meta" or settings.batch != 1):
        raise ValueError(f"{settings.policy} caches across control steps: profile it with batch 1 on a real device")

    def forward(traces=None):
        if caching:
            hooks.begin("profile", pixels[0])
        return model(pixels, proprio, prompts, stop_id, hooks=hooks, traces=traces)

    model.use_cuda_graphs(False)  # token counts and FLOPs from the eager path: a replay runs no operators
    traces = [QueryTrace() for _ in prompts]
    if caching:
        with torch.inference_mode():
            forward()  # the episode's first step fills the cache
    counted = None
    if settings.count:
        # The counter sees the traced query itself: a cache's next step may reuse a different
        # number of tokens. Eager, so no compiled code runs under the counter: on a GPU, compiled
        # functions that once ran under it ran eagerly from then on (OFT 19.8 instead of 17.7 ms
        # on an H100).
        _, by_op = flops.counted_flops(forward, traces)
        counted = by_op["total"] / settings.batch
    else:
        with torch.inference_mode():
            forward(traces)
    breakdown = flops.query_flops(dims, traces[0])

    result = {
        "policy": settings.policy,
        "policy_args": {**settings.policy_args, **({} if settings.keep is None else {"keep": settings.keep})},
        "size": settings.size,
        "device": device,
        "device_name": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "batch": settings.batch,
        "speedups": speedups.enabled(),
        "params": sum(p.numel() for p in model.parameters()),
        "params_computed": _params_computed(model),
        "prompt_tokens": settings.prompt_tokens,
        "sequence_tokens": traces[0].llm_tokens[0],
        "visual_tokens_llm": traces[0].llm_visual_tokens[0],
        "visual_tokens_per_layer": traces[0].llm_visual_tokens,
        "visual_tokens_mean": traces[0].mean_visual_tokens,
        "reused_tokens": getattr(hooks, "reused_tokens", None),
        "tokens_per_layer": traces[0].llm_tokens,
        "tflops_per_query": breakdown["total"] / 1e12,
        "tflops_breakdown": {k: v / 1e12 for k, v in breakdown.items() if k != "total"},
        "tflops_counted": None if counted is None else counted / 1e12,
        "latency_ms": None,
        "llm_latency_ms": None,
        "vision_latency_ms": None,
        "yardstick": None,
        "peak_memory_mb": None,
        "plugin_ms": None,
        "cuda_graphs": None,
        "latency_eager_ms": None,
        "llm_eager_latency_ms": None,
        "plugin_eager_ms": None,
        "host_reads_per_query": None,
    }
    if device == "meta":
        return result

    def query():
        with torch.inference_mode():
            return forward()

    graphed = settings.cuda_graphs and device.startswith("cuda")
    if graphed:  # eager first, then the same query replayed, and how far apart their actions are
        model.language_model.fuse_projections()  # the same weights for both
        result["latency_eager_ms"] = percentiles(time_calls(query, device, settings.repeats, settings.warmup))
        eager_actions = query()
        model.use_cuda_graphs()
        graph_actions = query()
        result["cuda_graphs"] = {"max_abs_diff_actions": float((graph_actions - eager_actions).abs().max())}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    result["latency_ms"] = percentiles(time_calls(query, device, settings.repeats, settings.warmup))
    if device.startswith("cuda"):
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # Values the timed query read on the host: on a GPU each one waits for every queued kernel.
    with HostReads(torch.device(device).type) as reads:
        query()
    result["host_reads_per_query"] = reads.count

    # The LLM alone on the assembled sequence, ours and transformers', same weights.
    with torch.inference_mode():
        visual = model.projector(model.vision_backbone(pixels.to(dtype)).features)
        stream = model.assemble(visual, model.proprio_projector(proprio.to(dtype)), prompts, stop_id)
    embeds, positions = stream.hidden, stream.position_ids

    def timed_on_the_sequence(fn) -> dict:
        """Latency of ``fn`` on a fresh copy of the assembled stream (layers replace its hidden states)."""
        def call():
            with torch.inference_mode():
                fn(TokenStream(embeds, positions, stream.visual, stream.task, sizes=stream.sizes))
        return percentiles(time_calls(call, device, settings.repeats, settings.warmup))

    def llm(graphs):
        return lambda s: model.language_model(s, graphs=graphs)

    def plugin(graphs):
        def run(s):
            hooks.graphs = graphs
            return hooks.before_llm(s)
        return run

    if hooks is None:  # the unpruned LLM, the yardstick's counterpart (a plug-in run would repeat OFT's)
        result["llm_latency_ms"] = timed_on_the_sequence(llm(model.graphs))
        result["vision_latency_ms"] = time_vision(model, pixels.to(dtype), device, settings)
        if graphed:
            result["llm_eager_latency_ms"] = timed_on_the_sequence(llm(None))
    if hooks is not None and type(hooks).before_llm is not Hooks.before_llm:
        # The plug-in's own work between projector and layer 0 (scoring and gather).
        result["plugin_ms"] = timed_on_the_sequence(plugin(model.graphs))
        if graphed:
            result["plugin_eager_ms"] = timed_on_the_sequence(plugin(None))
    if graphed:
        result["cuda_graphs"].update(model.graphs.stats())
    model.use_cuda_graphs(False)
    if settings.yardstick and hooks is None:
        result["yardstick"] = _yardstick(model, embeds, positions, device, dtype, settings)
    return result


def time_vision(model, pixels, device: str, settings: ProfileSettings) -> dict:
    """The towers with projector alone, as a query runs them (one graph where graphs are on):
    the part of a query every method shares, before any plug-in acts."""
    import torch

    def call():
        with torch.inference_mode():
            model.replay_encode_images(pixels, model.graphs)
    return percentiles(time_calls(call, device, settings.repeats, settings.warmup))


def _params_computed(model) -> int:
    """Parameters the query uses: all but the LM head, each tower's last block, final norm and pooling head."""
    unused = model.language_model.lm_head.weight.numel()
    for tower in model.vision_backbone.towers:
        unused += sum(p.numel() for p in tower.blocks[-1].parameters())
        unused += sum(p.numel() for p in tower.norm.parameters())
        pool = getattr(tower, "attn_pool", None)
        if pool is not None:
            unused += sum(p.numel() for p in pool.parameters())
    return sum(p.numel() for p in model.parameters()) - unused


def yardstick_model(model, device: str, dtype):
    """transformers' LlamaModel on the same config, sharing our LLM's weight tensors (no copy,
    so the full size fits wherever our model fits)."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    sizes = model.config.llm
    config = LlamaConfig(
        vocab_size=sizes.vocab_size, hidden_size=sizes.hidden_size, intermediate_size=sizes.intermediate_size,
        num_hidden_layers=sizes.num_layers, num_attention_heads=sizes.num_heads,
        num_key_value_heads=sizes.num_kv_heads, rms_norm_eps=sizes.rms_norm_eps, rope_theta=sizes.rope_theta,
        attn_implementation="sdpa",
    )
    with torch.device("meta"):
        hf = LlamaModel._from_config(config, dtype=dtype)
    hf.load_state_dict(model.language_model.model.state_dict(), assign=True)
    with torch.device(device):  # RoPE frequencies are a computed buffer, not a weight
        hf.rotary_emb = type(hf.rotary_emb)(config)
    return hf.eval()


def _yardstick(model, embeds, positions, device, dtype, settings) -> dict:
    """transformers' LlamaModel, same config and weights: bidirectional (an all-true 4-D mask,
    which rules out flash attention) and causal (its default fast path)."""
    import torch

    hf = yardstick_model(model, device, dtype)
    b, t = embeds.shape[:2]
    bidirectional = torch.ones(b, 1, t, t, dtype=torch.bool, device=device)

    def run(llm, mask):
        def call():
            with torch.inference_mode():
                llm(inputs_embeds=embeds, position_ids=positions, attention_mask=mask, use_cache=False)
        return call

    out = {
        "library": "transformers",
        "bidirectional_ms": percentiles(time_calls(run(hf, bidirectional), device, settings.repeats, settings.warmup)),
        "causal_ms": percentiles(time_calls(run(hf, None), device, settings.repeats, settings.warmup)),
    }
    del hf
    gc.collect()
    return out


def format_profile(result: dict) -> str:
    big = result["tflops_per_query"] >= 0.1
    unit, scale = ("T", 1.0) if big else ("G", 1e3)
    args = " ".join(f"{k}={v}" for k, v in result["policy_args"].items())
    lines = [
        f"policy {result['policy']} {args}  size {result['size']}  device {result['device_name']}  dtype {result['dtype']}  "
        f"batch {result['batch']}" + _speedups_note(result),
        f"parameters: {result['params'] / 1e6:,.1f} M ({result['params_computed'] / 1e6:,.1f} M used by a query)",
        f"tokens: {result['sequence_tokens']} in the LLM sequence = 1 BOS + {result['visual_tokens_llm']} visual + "
        f"1 proprio + {result['prompt_tokens'] - 1} prompt + 56 action slots + 1 stop",
        f"visual tokens entering the LLM layers: {summarize_layers(result['visual_tokens_per_layer'])} "
        f"(mean {result['visual_tokens_mean']:.1f})",
        "FLOPs per query (analytic):",
    ]
    for key, value in result["tflops_breakdown"].items():
        lines.append(f"  {key:<18} {value * scale:9.4f} {unit}")
    lines.append(f"  {'total':<18} {result['tflops_per_query'] * scale:9.4f} {unit}")
    if result["tflops_counted"] is not None:
        ratio = result["tflops_counted"] / result["tflops_per_query"]
        lines.append(f"FLOPs counted by FlopCounterMode: {result['tflops_counted'] * scale:.4f} {unit} "
                     f"(counted / analytic = {ratio:.6f})")
    if result["latency_ms"]:
        lat = result["latency_ms"]
        lines.append(f"latency per query: mean {lat['mean']:.2f} ms  p50 {lat['p50']:.2f}  p90 {lat['p90']:.2f}  "
                     f"p99 {lat['p99']:.2f}  ({lat['n']} runs after warm-up)")
        graphs = result.get("cuda_graphs")
        if graphs:
            eager = result["latency_eager_ms"]
            lines[-1] += "  (CUDA graphs)"
            lines.append(f"latency, eager (no graphs): mean {eager['mean']:.2f} ms  p50 {eager['p50']:.2f}  "
                         f"p90 {eager['p90']:.2f}  p99 {eager['p99']:.2f}")
            lines.append(f"CUDA graphs: {graphs['graphs']} captured; largest action difference from eager "
                         f"{graphs['max_abs_diff_actions']:.2e}")
        lines.append(f"peak memory: {result['peak_memory_mb']:.0f} MB")
        if result.get("host_reads_per_query") is not None:
            lines.append(f"values read on the host per query: {result['host_reads_per_query']} "
                         "(on a GPU each waits for the queued kernels)")
        llm = result["llm_latency_ms"]
        if llm:
            lines.append(f"LLM alone (ours):                 mean {llm['mean']:.2f} ms  p50 {llm['p50']:.2f}")
        if result.get("vision_latency_ms"):
            vision = result["vision_latency_ms"]
            lines.append(f"towers with projector alone:      mean {vision['mean']:.2f} ms  p50 {vision['p50']:.2f}")
        if result.get("llm_eager_latency_ms"):
            llm = result["llm_eager_latency_ms"]
            lines.append(f"LLM alone (ours, eager):          mean {llm['mean']:.2f} ms  p50 {llm['p50']:.2f}")
        if result["plugin_ms"]:
            lines.append(f"plug-in before layer 0:           mean {result['plugin_ms']['mean']:.3f} ms  "
                         f"p50 {result['plugin_ms']['p50']:.3f}")
        if result.get("plugin_eager_ms"):
            lines.append(f"plug-in before layer 0, eager:    mean {result['plugin_eager_ms']['mean']:.3f} ms  "
                         f"p50 {result['plugin_eager_ms']['p50']:.3f}")
        if result["yardstick"]:
            y = result["yardstick"]
            lines.append(f"LLM alone (transformers, bidir.): mean {y['bidirectional_ms']['mean']:.2f} ms  "
                         f"p50 {y['bidirectional_ms']['p50']:.2f}")
            lines.append(f"LLM alone (transformers, causal): mean {y['causal_ms']['mean']:.2f} ms  "
                         f"p50 {y['causal_ms']['p50']:.2f}")
    else:
        lines.append("latency: not measured on the meta device")
    return "\n".join(lines)


def _speedups_note(result: dict) -> str:
    names = result.get("speedups") or []
    return f"  speedups: {', '.join(names)}" if names else ""


def summarize_layers(counts: list) -> str:
    """[512, 512, 256, 256, ...] -> '512 x2, 256 x30' (None: a skipped layer)."""
    parts, previous, run = [], object(), 0
    for value in counts + [object()]:
        if value == previous:
            run += 1
            continue
        if run:
            parts.append(f"{'skip' if previous is None else previous} x{run}")
        previous, run = value, 1
    return ", ".join(parts)


def sparsevlm_budgets(budgets: Sequence[int], config) -> list[dict]:
    """SparseVLM's options for each budget: a mean over the LLM layers, as the reference's
    budgets are, or the count after the last stage where the model is too shallow to reach that mean."""
    from policies.pruning.adapters import SparseVLMPolicy
    from policies.pruning.sparsevlm import least_mean, stage_layers
    from policies.vla.vision import visual_token_count

    layers = config.llm.num_layers
    least = least_mean(stage_layers(SparseVLMPolicy.Options.layers, layers), layers, visual_token_count(config))
    return [{"budget": str(b)} if b >= least else {"budget": str(b), "budget_of": "last"} for b in budgets]


def sweep_methods(config) -> list[tuple[str, dict]]:
    """The methods of ``--sweep``; placements that depend on depth are scaled to the model."""
    from policies.vla.vision import tower_blocks

    layers = config.llm.num_layers
    vision_block = min(12, min(tower_blocks(config)[0]) - 2)
    return [
        ("oft", {}),
        ("lightvla", {"keep": "78"}),
        ("lightvla_star", {"placement": f"llm:{min(2, layers - 1)}", "keep": "78"}),
        ("lightvla_star", {"placement": f"vision:{vision_block}", "keep": "78"}),
        ("fastv", {"k": str(min(2, layers - 1)), "r": "0.5"}),
        *(("sparsevlm", options) for options in sparsevlm_budgets((192, 128, 64), config)),
        ("vla_cache", {}),  # real devices only: it needs two frames' values
        ("pyramiddrop", {} if layers >= 4 else {"layers": "16", "ratios": "0.25"}),  # distinct stage layers
        ("divprune", {"keep": "78"}),
        ("adp", {"ratio": "0.75"}),  # a query that prunes (which do is the motion gate's choice in a run)
    ]


def sweep(settings: ProfileSettings, on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Every method on one model built once, OFT first; ratios relative to OFT in the same run.
    ``on_row(rows so far)`` after each method, so a sweep cut short keeps what it measured."""
    from dataclasses import replace

    from policies.registry import POLICIES

    shared = build_model(settings)
    results = []
    for policy, args in sweep_methods(shared[0].config):
        if policy not in POLICIES or (policy == "vla_cache" and shared[1] == "meta"):
            continue
        run = replace(settings, policy=policy, policy_args=args, keep=None, yardstick=False)
        try:
            results.append(profile(run, shared))
        except Exception as error:  # one method's failure must not cost the other rows
            if not results:  # OFT: without the baseline there is no table
                raise
            traceback.print_exc(file=sys.stderr)
            results.append({"policy": policy, "policy_args": args, "error": f"{type(error).__name__}: {error}"})
            gc.collect()
        _relative_to_oft(results)
        if on_row is not None:
            on_row(results)
    return results


def _relative_to_oft(results: list[dict]) -> None:
    base = results[0]
    for r in results:
        if "error" in r:
            continue
        r["tflops_vs_oft"] = r["tflops_per_query"] / base["tflops_per_query"]
        # Medians: a host's hiccups move the mean of a few dozen GPU queries by tens of percent.
        if r["latency_ms"] and base["latency_ms"]:
            r["latency_vs_oft"] = r["latency_ms"]["p50"] / base["latency_ms"]["p50"]
        if r.get("latency_eager_ms") and base.get("latency_eager_ms"):
            r["latency_eager_vs_oft"] = r["latency_eager_ms"]["p50"] / base["latency_eager_ms"]["p50"]


def format_sweep(results: list[dict]) -> str:
    r0 = results[0]
    lines = [f"size {r0['size']}  device {r0['device_name']}  dtype {r0['dtype']}  batch {r0['batch']}  "
             f"prompt {r0['prompt_tokens']} tokens" + _speedups_note(r0),
             "| method | visual tokens per LLM layer | mean | TFLOPs/query | vs OFT | latency p50 / p90 ms | vs OFT (p50) "
             "| eager p50 / p90 ms | vs OFT (p50) | host reads |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        args = " ".join(f"{k}={v}" for k, v in r["policy_args"].items())
        if "error" in r:
            lines.append(f"| {r['policy']} {args} | failed: {r['error']} | - | - | - | - | - | - | - | - |")
            continue

        def cells(latency, ratio):
            return (f"{latency['p50']:.2f} / {latency['p90']:.2f}" if latency else "-",
                    f"{ratio:.3f}" if ratio else "-")
        latency, rel = cells(r["latency_ms"], r.get("latency_vs_oft"))
        eager, eager_rel = cells(r.get("latency_eager_ms"), r.get("latency_eager_vs_oft"))
        reads = r.get("host_reads_per_query")
        lines.append(f"| {r['policy']} {args} | {summarize_layers(r['visual_tokens_per_layer'])} | "
                     f"{r['visual_tokens_mean']:.1f} | "
                     f"{r['tflops_per_query']:.4f} | {r['tflops_vs_oft']:.3f} | {latency} | {rel} | {eager} | {eager_rel} "
                     f"| {'-' if reads is None else reads} |")
    return "\n".join(lines)
