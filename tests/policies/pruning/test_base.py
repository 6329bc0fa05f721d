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


def test_keep_tokens_keeps_each_samples_tokens_in_order_left_padded():
    # Checked against the definition, sample by sample: a padded batch of three, random choices.
    from policies.pruning.base import keep_tokens
    from policies.vla.hooks import TokenStream

    generator = torch.Generator().manual_seed(5)
    b, t, d = 3, 12, 4
    padding = torch.zeros(b, t, dtype=torch.bool)
    padding[1, :3] = padding[2, :1] = True
    visual = torch.zeros(b, t, dtype=torch.bool)
    visual[:, 4:9] = True
    task = torch.zeros(b, t, dtype=torch.bool)
    task[:, 9:] = True
    stream = TokenStream(torch.randn(b, t, d, generator=generator), torch.arange(t).expand(b, t) * 10,
                         visual, task, padding)
    keep = torch.rand(b, t, generator=generator) < 0.6
    kept = keep_tokens(stream, keep)
    wanted = [(keep[i] & ~padding[i]).nonzero().flatten() for i in range(b)]
    longest = max(len(w) for w in wanted)
    assert kept.hidden.shape == (b, longest, d) and len({len(w) for w in wanted}) > 1
    for i, columns in enumerate(wanted):
        start = longest - len(columns)
        assert torch.equal(kept.hidden[i, start:], stream.hidden[i, columns])
        assert torch.equal(kept.position_ids[i, start:], stream.position_ids[i, columns])
        assert torch.equal(kept.visual[i, start:], visual[i, columns])
        assert torch.equal(kept.task[i, start:], task[i, columns])
        assert kept.padding[i, :start].all() and not kept.padding[i, start:].any()
        assert not (kept.visual[i, :start] | kept.task[i, :start]).any()
    assert kept.sizes == read_sizes(kept.real(), kept.visual, kept.task)
