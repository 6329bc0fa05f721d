"""FastV: after layer K-1, drop the visual tokens the last token attends to least.

Layers 0..K-1 see the full sequence. The ranking uses layer K-1's own queries and keys:
one attention row (the last token, ``</s>`` in OFT's layout) averaged over heads, so the
layer itself keeps using fused SDPA. The lowest ``floor(r * visual)`` visual tokens are
dropped for layers K onwards; the rest keep their order and RoPE positions. The counts are
known on the host, so a query reads nothing back.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from policies.pruning.base import dropped_sizes, keep_tokens, last_token_attention, lowest_visual, on_meta
from policies.vla.hooks import Hooks, TokenStream


class FastVPruner(Hooks):
    def __init__(self, k: int = 2, r: float = 0.5, keep: int = 0):
        if k < 1:
            raise ValueError(f"FastV needs k >= 1 (the layer whose attention ranks the tokens is k-1), got {k}")
        if not 0.0 <= r < 1.0:
            raise ValueError(f"FastV's drop fraction r must be in [0, 1), got {r}")
        self.k, self.r, self.keep = k, r, keep

    def wants_qk(self, layer: int) -> bool:
        return layer == self.k - 1

    def plain_layer(self, layer: int) -> bool:
        return layer != self.k - 1

    def after_layer(self, layer, stream: TokenStream, q, k) -> TokenStream:
        if layer != self.k - 1:
            return stream
        visual, sizes = stream.visual, stream.host_sizes()
        # The same counts on the device and on the host, so that nothing is read back: a count
        # copied to the device would wait for the GPU, one read from it too.
        drop = self.dropped(visual.sum(dim=1))
        host_drop = self.dropped_on_host(sizes.visual)
        attention = last_token_attention(q, k, stream.padding)
        if on_meta(attention):  # no values: any tokens, the same count
            scores = torch.zeros(visual.shape, device=visual.device)
        else:
            scores = attention.to(visual.device)
        self.add_cost([2 * n * q.shape[1] * q.shape[3] for n in sizes.tokens])  # one attention row
        return keep_tokens(stream, ~lowest_visual(scores, visual, drop), dropped_sizes(sizes, host_drop))

    def dropped(self, counts: torch.Tensor) -> torch.Tensor:
        """Visual tokens each sample drops, of its ``counts`` (on the device)."""
        if self.keep:
            return (counts - self.keep).clamp(min=0)
        # floor(r * V) of the decimal r as written: float32 gives 52 for 0.53 * 100, and
        # double 28 for 0.29 * 100 (28.999999999999996) unless rounded first.
        return torch.round(counts.double() * self.r, decimals=9).floor().long()

    def dropped_on_host(self, counts: Sequence[int]) -> list[int]:
        """``dropped`` of counts on the host, by the same double operations (x * 1e9, round half
        to even, / 1e9, floor), so that both sides agree."""
        counts = np.asarray(counts, dtype=np.int64)
        if self.keep:
            return np.maximum(counts - self.keep, 0).tolist()
        return np.floor(np.round(counts.astype(np.float64) * self.r, 9)).astype(np.int64).tolist()
