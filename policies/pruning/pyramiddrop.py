"""PyramidDrop: drop visual tokens in stages, ranked by the last instruction token's attention.

The reference (PyramidDrop, its LLaVA code) splits the LLM into stages at layers 8, 16 and 24
of 32. Before each stage layer L, it computes layer L's own queries and keys of the tokens
still there (its input norm, q and k products and RoPE), takes the attention of the last
instruction token over them, averaged over heads, and keeps the visual tokens it attends to
most: ``int(V * ratio)`` of the V visual tokens the query started with, the ratios 0.5, 0.25
and 0.125. Layer L and the later ones run on what is kept, in the original order; the
reference renumbers the positions of what is left (``positions=renumber``), ``positions=keep``
keeps the original ones.

In OFT's layout the instruction ends before the action slots: ``query=instruction`` (the
default) ranks by the prompt's last token, ``query=last`` by the sequence's last token (the
stop token, which FastV uses). Where this differs from the reference code: its ranking row
sees a causal mask and softmax in float32 rounded to the model's dtype; OFT is bidirectional,
and ours stays in float32. It also computes the stage layer's value products for nothing;
ours does not, so the method's own cost is the q and k products of every token plus one
attention row per stage.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from policies.pruning.base import (POSITIONS, dropped_sizes, keep_tokens, lowest_visual, on_meta, renumbered,
                                   rows_attention, text_counts)
from policies.vla.hooks import Hooks, QueriesKeys, TokenStream

QUERIES = ("instruction", "last")


class PyramidDropPruner(Hooks):
    def __init__(self, layers: Sequence[int] = (8, 16, 24), ratios: Sequence[float] = (0.5, 0.25, 0.125),
                 text_margins: tuple[int, int] = (0, 0), query: str = "instruction", positions: str = "renumber"):
        if len(layers) != len(ratios) or not layers:
            raise ValueError(f"give one ratio per stage layer, got layers {list(layers)} and ratios {list(ratios)}")
        if min(layers) < 1 or list(layers) != sorted(set(layers)):
            raise ValueError(f"stage layers must be increasing and 1 or later (tokens leave before them), "
                             f"got {list(layers)}")
        if not all(0.0 <= r <= 1.0 for r in ratios) or list(ratios) != sorted(ratios, reverse=True):
            raise ValueError(f"ratios must be fractions in [0, 1] that do not grow from stage to stage, "
                             f"got {list(ratios)}")
        if query not in QUERIES:
            raise ValueError(f"query must be one of {', '.join(QUERIES)}, got {query!r}")
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
        self.stages = dict(zip(layers, ratios))
        self.text_margins, self.query, self.positions = text_margins, query, positions
        self.visual_at_start = 0  # each sample's visual tokens when the query started: stages keep shares of it

    def plain_layer(self, layer: int) -> bool:
        return layer not in self.stages

    def before_llm(self, stream: TokenStream) -> TokenStream:
        counts = set(stream.host_sizes().visual)
        if len(counts) != 1:
            raise ValueError(f"PyramidDrop needs the samples of a batch to start with the same number of visual "
                             f"tokens, got {sorted(counts)}")
        self.visual_at_start = counts.pop()
        return stream

    def before_layer(self, layer, stream: TokenStream, queries_keys: QueriesKeys) -> TokenStream:
        if layer not in self.stages:
            return stream
        sizes = stream.host_sizes()
        keep = int(self.visual_at_start * self.stages[layer])  # the same for every sample
        row = self._query_row(stream, stream.hidden.shape[1])
        drop = [max(v - keep, 0) for v in sizes.visual]

        def dropped(hidden, position_ids, padding, visual):
            """(B, T) bool: the visual tokens that leave (fixed shapes: one graph on a GPU)."""
            q, k = queries_keys(hidden, position_ids)
            attention = rows_attention(q[:, :, row, None], k, padding)[:, 0]
            if on_meta(attention):  # no values: any tokens, the same count
                attention = torch.zeros(visual.shape, device=visual.device)
            # The count is the same for every sample: it follows on the device without a read.
            return lowest_visual(attention.to(visual.device), visual, (visual.sum(dim=1) - keep).clamp(min=0))

        args = (stream.hidden, stream.position_ids, stream.padding, stream.visual)
        if self.graphs is not None and not on_meta(stream.hidden):
            name = f"pyramiddrop layer={layer} row={row - stream.hidden.shape[1]} keep={keep}"
            leaving = self.graphs.run(name, dropped, *args)
        else:
            leaving = dropped(*args)
        heads = queries_keys.sizes.num_heads * queries_keys.sizes.head_dim
        self.add_cost([queries_keys.flops(n) + 2 * n * heads for n in sizes.tokens])  # q, k and one attention row
        kept = keep_tokens(stream, ~leaving, dropped_sizes(sizes, drop))
        return renumbered(kept) if self.positions == "renumber" else kept

    def _query_row(self, stream: TokenStream, length: int) -> int:
        """The ranking token's column: samples are left-padded, so it is the same for all."""
        if self.query == "last":
            return length - 1
        text_counts(stream, self.text_margins)  # every sample has an instruction to end
        return length - self.text_margins[1] - 1
