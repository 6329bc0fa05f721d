"""Graph replay bookkeeping (static inputs, cloned outputs, one entry per shape) and the model's
graphed path: same actions and token records as the eager path, for OFT and every plug-in.

On the CPU ``Graphs`` calls the function on its static inputs where a GPU replays a capture,
so these tests check everything but the capture itself (the GPU check script compares a
replayed query with an eager one on the device).
"""

import pytest
import torch

from policies.pruning.fastv import FastVPruner
from policies.pruning.lightvla import LightVLAPruner
from policies.pruning.lightvla_star import LightVLAStarPruner
from policies.pruning.sparsevlm import SparseVLMPruner
from policies.vla.config import tiny_config
from policies.vla.graphs import Graphs
from policies.vla.hooks import QueryTrace
from policies.vla.vision import tower_blocks
from tests.tiny_vla import inputs


def test_each_call_sees_its_own_inputs_and_gets_its_own_output():
    graphs = Graphs()
    fn = lambda x, y: x * 2 + y  # noqa: E731
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    first = graphs.run("f", fn, a, b)
    second = graphs.run("f", fn, b, a)
    assert torch.equal(first, a * 2 + b) and torch.equal(second, b * 2 + a)
    second += 1  # a caller's output is its own: the next call does not see this, nor overwrite it
    third = graphs.run("f", fn, a, b)
    assert torch.equal(third, a * 2 + b) and not torch.equal(second, third)
    assert graphs.stats() == {"graphs": 1, "captures": 1, "replays": 3, "eager_calls": 0, "failures": []}


def test_one_entry_per_name_shape_and_missing_argument():
    graphs = Graphs()
    fn = lambda x, mask: x if mask is None else x * mask  # noqa: E731
    graphs.run("f", fn, torch.ones(2), None)
    graphs.run("f", fn, torch.ones(3), None)
    graphs.run("f", fn, torch.ones(3), torch.zeros(3))
    graphs.run("g", fn, torch.ones(3), None)
    graphs.run("f", fn, torch.ones(2), None)
    assert len(graphs) == 4


def test_shapes_over_the_limit_run_without_a_graph():
    graphs = Graphs(limit=2)
    for n in range(1, 5):
        assert torch.equal(graphs.run("f", torch.neg, torch.ones(n)), -torch.ones(n))
    assert graphs.stats()["graphs"] == 2 and graphs.stats()["eager_calls"] == 2


@pytest.mark.parametrize("reads", [
    lambda x: x[x > 0],  # a boolean mask: a data-dependent count
    lambda x: x * int(x.sum()),
    lambda x: torch.tensor(x.tolist()),
    lambda x: x.nonzero(),
    lambda x: x if bool((x > 0).all()) else -x,
    lambda x: x * x.max().item(),
])
def test_a_function_that_reads_values_on_the_host_is_refused_when_checking(reads):
    from policies.vla.graphs import HostReadError

    graphs = Graphs()
    graphs.check_host_reads = True
    assert torch.equal(graphs.run("fine", lambda x: x * 2, torch.ones(3)), torch.full((3,), 2.0))
    with pytest.raises(HostReadError, match="graph 'reads'"):
        graphs.run("reads", reads, torch.ones(3))
    assert torch.ones(2).tolist() == [1.0, 1.0]  # restored


def test_host_reads_are_counted_once_each():
    from policies.vla.graphs import HostReads

    x = torch.arange(-2.0, 3.0)
    with HostReads() as reads:
        x * 2 + x.sum()  # no values on the host
        assert reads.count == 0
        x[x > 0], int(x.sum()), x.max().item(), x.tolist(), x.nonzero(), bool((x > 0).any()), x.numpy()
    assert reads.count == 7
    with HostReads("cuda") as on_a_gpu:
        int(x.sum())  # a value already on the host
    assert on_a_gpu.count == 0
    assert x.tolist() == [-2.0, -1.0, 0.0, 1.0, 2.0] and x.numpy().shape == (5,)  # restored


HOOKS = {
    "oft": (lambda: None, 2),  # vision with projector, all 8 layers
    # + the scoring and choice; the two observations keep different counts: a layer graph each
    "lightvla": (lambda: LightVLAPruner(), 4),
    "lightvla keep": (lambda: LightVLAPruner(keep=40), 3),
    # Layers after which a plug-in acts are graphs of their own, the plug-in eager after them.
    "fastv": (lambda: FastVPruner(2, 0.5), 4),  # vision, layer 0, layer 1 (ranks), layers 2-7
    # SparseVLM: vision, 0, 1, 2-3, 4, 5-7, and each stage's choice and recycling after its read
    "sparsevlm": (lambda: SparseVLMPruner(budget=64, layers=(2, 5)), 8),
    "sparsevlm renumber": (lambda: SparseVLMPruner(budget=64, layers=(2, 5), positions="renumber"), 8),
    # vision, layer 0, layer 1 (selects), layers 2-7 for each of the two kept counts
    "lightvla_star llm": (lambda: LightVLAStarPruner(64, num_queries=16, after_layer=2), 5),
    # Both towers' embedding with block 0 (the hook acts after it) as one graph; per tower, then
    # block 1 as one batch when both images keep as many tokens (seed 0) or image by image
    # (seed 1: 20 and 21 kept, two graphs); the projector and all layers for each of the two
    # kept counts.
    "lightvla_star vision": (lambda: vision_star(), 11),
    "lightvla_star vision keep": (lambda: vision_star(keep=40), 5),  # 20 per image: one batch, one count
}


def vision_star(keep=0):
    _, widths, prefixes = tower_blocks(tiny_config())
    return LightVLAStarPruner(widths[0], num_queries=16, vision_block=0, prefix_tokens=prefixes, keep=keep)


@pytest.mark.parametrize("name", list(HOOKS))
def test_graphed_queries_equal_eager_ones(model8, name):
    make, expected_graphs = HOOKS[name]
    results = {}
    for graphed in (False, True):
        model8.use_cuda_graphs(graphed)
        if graphed:  # every graphed function must be capturable on a GPU: no host reads inside
            model8.graphs.check_host_reads = True
        hooks = make()
        outputs, traces = [], []
        for seed in (0, 1, 0):  # a different observation in between: nothing stale is replayed
            pixels, proprio, prompts = inputs(seed=seed)
            trace = QueryTrace()
            with torch.inference_mode():
                outputs.append(model8(pixels, proprio, prompts, 2, hooks=hooks, traces=[trace]))
            traces.append(trace)
        results[graphed] = outputs, traces
        if graphed:
            assert len(model8.graphs) == expected_graphs
    model8.use_cuda_graphs(False)
    for eager, graphed in zip(*(results[False][0], results[True][0])):
        assert torch.allclose(eager, graphed, atol=1e-5)  # fused projections: another summation order
    assert not torch.equal(results[True][0][0], results[True][0][1])
    assert results[False][1] == results[True][1]  # token counts of every vision block and LLM layer


def test_training_queries_are_not_graphed(model8):
    model8.use_cuda_graphs()
    pixels, proprio, prompts = inputs()
    out = model8(pixels, proprio, prompts, 2, hooks=LightVLAPruner())
    assert out.requires_grad and len(model8.graphs) == 0
    model8.use_cuda_graphs(False)


def test_changing_speedups_drops_the_graphs_captured_with_the_old_kernels(model8):
    from policies.vla.model import Speedups

    model8.use_cuda_graphs()
    pixels, proprio, prompts = inputs()
    with torch.inference_mode():
        model8(pixels, proprio, prompts, 2)
    assert len(model8.graphs) == 2
    model8.use_speedups(Speedups())  # unchanged: graphs kept
    assert len(model8.graphs) == 2
    model8.use_speedups(Speedups(parallel_towers=True))
    assert len(model8.graphs) == 0 and model8.vision_backbone.parallel_towers
    model8.use_speedups(Speedups())
    model8.use_cuda_graphs(False)


@pytest.mark.parametrize("name", list(HOOKS))
def test_graphed_batches_with_unequal_prompts_equal_eager_ones(model8, name):
    # two samples, left-padded to the longer prompt: padding masks go into the graphs as inputs
    make = HOOKS[name][0]
    pixels, proprio, prompts = inputs(batch=2, prompt_lengths=(9, 13), seed=3)
    results = {}
    for graphed in (False, True):
        model8.use_cuda_graphs(graphed)
        if graphed:
            model8.graphs.check_host_reads = True
        traces = [QueryTrace(), QueryTrace()]
        with torch.inference_mode():
            results[graphed] = model8(pixels, proprio, prompts, 2, hooks=make(), traces=traces), traces
    model8.use_cuda_graphs(False)
    assert torch.allclose(results[False][0], results[True][0], atol=1e-5)
    assert results[False][1] == results[True][1]


def test_calls_that_record_a_graph_are_marked_and_eager_calls_are_not():
    from policies.vla.graphs import Graphs, is_recording

    graphs, seen = Graphs(limit=1), []

    def fn(x):
        seen.append(is_recording())
        return x + 1

    graphs.run("f", fn, torch.zeros(2))  # recorded (on the CPU, the call stands in for a replay)
    graphs.run("f", fn, torch.zeros(3))  # a shape past the limit runs eagerly
    assert seen == [True, False] and not is_recording()


def test_every_form_of_a_copy_from_a_gpu_to_the_host_is_a_read():
    # Stand-ins with a device: the forms a GPU copy took on an H100 (PyTorch 2.11), where
    # ``.cpu()`` under inference mode reaches the counter as ``aten.to`` and went uncounted.
    from types import SimpleNamespace

    from policies.vla.graphs import copied_to_host

    aten = torch.ops.aten
    gpu, host, cpu = SimpleNamespace(device=torch.device("cuda")), SimpleNamespace(device=torch.device("cpu")), "cpu"
    reads = [
        (aten.to.dtype_layout, (gpu,), {"dtype": torch.float32, "device": torch.device(cpu)}),
        (aten.to.device, (gpu, torch.device(cpu), torch.float32), {}),
        (aten.to.other, (gpu, host), {}),
        (aten._to_copy.default, (gpu,), {"device": torch.device(cpu)}),
        (aten.copy_.default, (host, gpu), {}),
    ]
    for func, args, kwargs in reads:
        assert copied_to_host(func, args, kwargs) is gpu, func
    not_reads = [
        (aten.to.dtype_layout, (host,), {"device": torch.device(cpu)}),  # already on the host
        (aten.to.dtype, (gpu, torch.float16), {}),  # stays on the GPU
        (aten._to_copy.default, (host,), {"device": torch.device("cuda")}),  # host to GPU
        (aten.copy_.default, (gpu, host), {}),
        (aten.add.Tensor, (gpu, gpu), {}),
    ]
    for func, args, kwargs in not_reads:
        assert copied_to_host(func, args, kwargs) is None, func
