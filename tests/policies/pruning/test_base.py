"""Shared plug-in code: a plug-in that knows the counts of the stream it keeps reads nothing
back, and the counts it gives are those of the stream's masks."""

import pytest
import torch

from policies.pruning.fastv import FastVPruner
from policies.pruning.sparsevlm import SparseVLMPruner
from policies.vla.graphs import HostReads
from policies.vla.hooks import read_sizes
from tests.tiny_vla import inputs, recorded_streams


def sparsevlm(positions):
    return SparseVLMPruner(budget=128, layers=(0, 2, 4, 5), budget_of="mean", num_layers=8, visual_tokens=512,
                           positions=positions)


PLUGINS = {  # the plug-in, and what a query reads: SparseVLM the rank of each stage's rater matrix
    "fastv": (lambda: FastVPruner(2, 0.29), 0),
    "fastv keep": (lambda: FastVPruner(3, keep=100), 0),
    "sparsevlm renumber": (lambda: sparsevlm("renumber"), 4),
    "sparsevlm keep": (lambda: sparsevlm("keep"), 4),
}


@pytest.mark.parametrize("name", list(PLUGINS))
def test_known_counts_are_the_masks_counts_and_are_not_read(model8, name):
    make, expected_reads = PLUGINS[name]
    hooks = make()
    streams = recorded_streams(hooks)
    pixels, proprio, prompts = inputs(batch=3, prompt_lengths=(9, 14, 6))
    model8.use_cuda_graphs()  # on a CPU the graphed parts run as stand-ins, as a GPU query runs them
    try:
        with torch.inference_mode(), HostReads() as reads:
            model8(pixels, proprio, prompts, 2, hooks=hooks)
    finally:
        model8.use_cuda_graphs(False)
    assert reads.count == expected_reads
    pruned = [s for s in streams if s.sizes is not None and s.sizes.visual != (512, 512, 512)]
    assert pruned  # the plug-in pruned, and its streams carry their counts
    for stream in pruned:
        assert stream.sizes == read_sizes(stream.real(), stream.visual, stream.task)
