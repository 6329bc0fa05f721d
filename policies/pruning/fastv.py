"""FastV: after layer K-1, drop the visual tokens the last token attends to least.

Layers 0..K-1 see the full sequence. The ranking uses layer K-1's own queries and keys:
one attention row (the last token, ``</s>`` in OFT's layout) averaged over heads, so the
layer itself keeps using fused SDPA. The lowest ``floor(r * visual)`` visual tokens are
dropped for layers K onwards; the rest keep their order and RoPE positions.
"""

from __future__ import annotations

import torch

from policies.pruning.base import keep_tokens, last_token_attention, on_meta
from policies.vla.hooks import Hooks, TokenStream


def lowest_visual(scores: torch.Tensor, visual: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the ``drop[b]`` visual tokens of lowest score in each sample."""
    ranked = scores.masked_fill(~visual, float("inf")).argsort(dim=1)
    rank = torch.empty_like(ranked).scatter_(1, ranked, torch.arange(ranked.shape[1], device=ranked.device).expand_as(ranked))
    return (rank < drop[:, None]) & visual


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
        counts = visual.sum(dim=1)  # on the device: a count copied there from the host would wait for the GPU
        if self.keep:
            drop = (counts - self.keep).clamp(min=0)
        else:
            # floor(r * V) of the decimal r as written: float32 gives 52 for 0.53 * 100, and
            # double 28 for 0.29 * 100 (28.999999999999996) unless rounded first.
            drop = torch.round(counts.double() * self.r, decimals=9).floor().long()
        attention = last_token_attention(q, k, stream.padding)
        if on_meta(attention):  # no values: any tokens, the same count
            scores = torch.zeros(visual.shape, device=visual.device)
        else:
            scores = attention.to(visual.device)
        self.add_cost([2 * n * q.shape[1] * q.shape[3] for n in sizes.tokens])  # one attention row
        return keep_tokens(stream, ~lowest_visual(scores, visual, drop))
